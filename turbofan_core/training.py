"""Model selection and fitting, free of Dagster: the assets call it, and so can a test or a notebook.

Selection is honest by construction: every score comes from cross-validation whose folds
hold whole trajectories (an engine's cycle 150 is never scored by a model that saw its
cycle 149), and nothing here ever reads the NASA test fleet.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import xgboost as xgb

from turbofan_core import metrics

KEYS: tuple[str, ...] = ("device_id", "lifetime")
TARGET = "rul"
# The parameters a grid varies; everything else about the trees is fixed below.
GRID_PARAMS: tuple[str, ...] = ("max_depth", "learning_rate", "n_estimators")
FIXED_PARAMS: dict[str, Any] = {
    "tree_method": "hist",
    "subsample": 0.8,
    "colsample_bytree": 0.5,
    "min_child_weight": 5.0,
}
BASELINE = "ridge"
INTERVAL: tuple[float, ...] = (0.1, 0.9)  # quantiles of the reported RUL interval (p10-p90)
DEFAULT_WORKERS = 2  # fits run side by side, one core each
T = TypeVar("T")


def param_grid(
    max_depth: Iterable[int], learning_rate: Iterable[float], n_estimators: Iterable[int]
) -> list[dict[str, Any]]:
    """Every combination, in a fixed order (ties in CV go to the earlier one)."""
    return [
        {"max_depth": int(d), "learning_rate": float(lr), "n_estimators": int(n)}
        for d, lr, n in itertools.product(max_depth, learning_rate, n_estimators)
    ]


def design_matrix(frame: pd.DataFrame, feature_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Features (in the spec's order) and the RUL target as float arrays."""
    return frame[list(feature_names)].to_numpy(dtype=np.float64), frame[TARGET].to_numpy(dtype=np.float64)


def trajectory_folds(frame: pd.DataFrame, n_folds: int, seed: int, keys: Sequence[str] = KEYS) -> np.ndarray:
    """Fold number of every row; all rows of a trajectory share one fold.

    Trajectories are sorted before the seeded shuffle, so the folds depend on which
    trajectories exist, never on row order, and the same data always gives the same folds.
    """
    trajectories = frame[list(keys)].drop_duplicates().sort_values(list(keys), ignore_index=True)
    if not 2 <= n_folds <= len(trajectories):
        raise ValueError(f"need 2 <= folds <= trajectories ({len(trajectories)}), got {n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(trajectories))
    trajectories["fold"] = np.empty(len(trajectories), dtype=np.int64)
    trajectories.loc[order, "fold"] = np.arange(len(trajectories)) % n_folds
    return frame[list(keys)].merge(trajectories, on=list(keys), how="left")["fold"].to_numpy()


def _in_parallel(tasks: Sequence[Callable[[], T]], workers: int) -> list[T]:
    """Results of `tasks` in order, run `workers` at a time on threads.

    Every XGBoost fit here is single-threaded and releases the GIL, so independent fits
    (folds, grid entries) run side by side. That scales like XGBoost's own threads on an
    idle machine and degrades gracefully on a busy one, where a multi-threaded fit can
    crawl: its OpenMP threads spin at every barrier waiting for a descheduled sibling.
    """
    if workers <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda task: task(), tasks))


def _booster_params(params: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """XGBoost's native parameter names for one configuration (n_estimators is the round count)."""
    native = {**FIXED_PARAMS, "max_depth": params["max_depth"], "eta": params["learning_rate"]}
    return {**native, "seed": seed, "nthread": 1}


def fit_point(X: np.ndarray, y: np.ndarray, params: Mapping[str, Any], *, seed: int) -> xgb.Booster:
    """The point-estimate model: squared error on the capped RUL."""
    return xgb.train(
        {**_booster_params(params, seed), "objective": "reg:squarederror"},
        xgb.QuantileDMatrix(X, y, nthread=1),
        num_boost_round=params["n_estimators"],
    )


def fit_quantiles(X: np.ndarray, y: np.ndarray, params: Mapping[str, Any], *, seed: int) -> xgb.Booster:
    """One model for every quantile of INTERVAL (XGBoost's multi-quantile objective), same trees.

    Boosting starts from the mean RUL, not XGBoost's default (the label quantile): the
    p90 of capped labels is the cap itself, and from there every row has the same
    gradient, no split gains anything and the p90 model never moves.
    """
    return xgb.train(
        {
            **_booster_params(params, seed),
            "objective": "reg:quantileerror",
            "quantile_alpha": np.asarray(INTERVAL),
            "base_score": float(np.mean(y)),
        },
        xgb.QuantileDMatrix(X, y, nthread=1),
        num_boost_round=params["n_estimators"],
    )


def _predict(booster: xgb.Booster, X: np.ndarray, rounds: int | None = None) -> np.ndarray:
    matrix = xgb.DMatrix(X, nthread=1)
    return booster.predict(matrix, iteration_range=(0, rounds or booster.num_boosted_rounds()))


def model_file(booster: xgb.Booster) -> bytes:
    """A trained model as the file a bundle stores: XGBoost's own UBJSON format."""
    return bytes(booster.save_raw("ubj"))


@dataclass(frozen=True)
class FittedModel:
    """The chosen configuration refit on all training data, with its calibrated interval."""

    point: bytes  # model files (`model_file`), as a bundle holds them
    quantile_model: bytes
    quantile_offsets: tuple[float, ...]
    """Added to each quantile's prediction so it holds out of fold (conformalised quantile regression)."""
    raw_interval_coverage: float
    """Out-of-fold p10-p90 coverage before that calibration."""


def fit_final(
    X: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    params: Mapping[str, Any],
    *,
    seed: int,
    workers: int = DEFAULT_WORKERS,
) -> FittedModel:
    """Point and quantile models on all training data, the interval calibrated on the CV folds.

    Quantile models come out too narrow (and a p90 just under the cap misses every
    capped label). Quantile q is shifted by the q-quantile of its out-of-fold residuals,
    so it holds on trajectories the model never saw (conformalised quantile regression,
    Romano et al., 2019).
    """
    fold_ids = np.unique(folds)
    tasks: list[Callable[[], xgb.Booster]] = [
        partial(fit_quantiles, X, y, params, seed=seed),
        partial(fit_point, X, y, params, seed=seed),
        *(partial(fit_quantiles, X[folds != k], y[folds != k], params, seed=seed) for k in fold_ids),
    ]
    quantile_model, point, *per_fold = _in_parallel(tasks, workers)
    oof = np.zeros((len(y), len(INTERVAL)))
    for k, model in zip(fold_ids, per_fold, strict=True):
        oof[folds == k] = _predict(model, X[folds == k]).reshape(-1, len(INTERVAL))
    offsets = tuple(float(np.quantile(y - oof[:, i], q)) for i, q in enumerate(INTERVAL))
    coverage = metrics.interval_coverage(y, oof[:, 0], oof[:, -1])
    return FittedModel(model_file(point), model_file(quantile_model), offsets, coverage)


@dataclass(frozen=True)
class CVResult:
    """One configuration's cross-validated scores (each fold's RMSE; mean and spread over folds)."""

    name: str
    params: dict[str, Any]
    fold_rmse: tuple[float, ...]
    mae: float

    @property
    def rmse(self) -> float:
        return float(np.mean(self.fold_rmse))

    @property
    def rmse_std(self) -> float:
        return float(np.std(self.fold_rmse))


def _scores(name: str, params: dict[str, Any], y: np.ndarray, oof: np.ndarray, folds: np.ndarray) -> CVResult:
    per_fold = tuple(metrics.rmse(y[folds == k], oof[folds == k]) for k in np.unique(folds))
    return CVResult(name, params, per_fold, metrics.mae(y, oof))


def cross_validate_xgb(
    X: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    grid: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    workers: int = DEFAULT_WORKERS,
) -> list[CVResult]:
    """Out-of-fold scores of every grid entry, in grid order.

    Entries that differ only in n_estimators share one fit per fold: the model with the
    most trees is trained once and scored after each smaller number of trees, which is
    exactly the model that would have been trained with fewer rounds.
    """
    shared: dict[tuple, list[int]] = {}
    for i, params in enumerate(grid):
        shared.setdefault((params["max_depth"], params["learning_rate"]), []).append(i)
    jobs = [(k, members) for k in np.unique(folds) for members in shared.values()]

    def fold_fit(k: int, members: list[int]) -> list[np.ndarray]:
        longest = {**grid[members[0]], "n_estimators": max(grid[i]["n_estimators"] for i in members)}
        booster = fit_point(X[folds != k], y[folds != k], longest, seed=seed)
        return [_predict(booster, X[folds == k], grid[i]["n_estimators"]) for i in members]

    predictions = _in_parallel([partial(fold_fit, k, members) for k, members in jobs], workers)
    oof = np.zeros((len(grid), len(y)))
    for (k, members), predicted in zip(jobs, predictions, strict=True):
        for i, values in zip(members, predicted, strict=True):
            oof[i, folds == k] = values
    return [_scores(config_name(p), dict(p), y, oof[i], folds) for i, p in enumerate(grid)]


def cross_validate_baseline(X: np.ndarray, y: np.ndarray, folds: np.ndarray) -> CVResult:
    """Ridge regression on standardised features: the yardstick a boosted model has to beat.

    One BLAS thread: the matrices are small, and multi-threaded BLAS spins (like OpenMP)
    when another process holds a core.
    """
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    oof = np.zeros(len(y))
    with threadpool_limits(limits=1):
        for k in np.unique(folds):
            train, held_out = folds != k, folds == k
            model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(X[train], y[train])
            oof[held_out] = model.predict(X[held_out])
    return _scores(BASELINE, {"alpha": 1.0}, y, oof, folds)


def config_name(params: Mapping[str, Any]) -> str:
    return "xgboost " + " ".join(f"{key}={params[key]}" for key in GRID_PARAMS)


def best(results: Sequence[CVResult]) -> CVResult:
    """Lowest mean CV RMSE; the earliest entry wins a tie, so selection is reproducible."""
    return min(results, key=lambda result: result.rmse)


def data_fingerprint(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """sha256 of the given columns in row order: names the exact data a model was trained on.

    Built from raw column bytes (strings joined with NUL), not pandas' hashing, so it
    stays the same across pandas versions.
    """
    digest = hashlib.sha256()
    for column in columns:
        digest.update(column.encode() + b"\0")
        values = frame[column].to_numpy()
        if values.dtype.kind in "biuf":
            digest.update(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes())
        else:
            digest.update("\0".join(map(str, values)).encode())
    return digest.hexdigest()
