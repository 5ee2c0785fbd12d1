"""The numpy tree walk scores exactly as XGBoost does, on the kinds of models training makes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from test_bundle import make_bundle

from turbofan_core.bundle import SMALL_BATCH
from turbofan_core.trees import compile_trees


def _data(rows: int = 600, width: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, width)) * [1, 10, 100, 1000, 0.01, 1, 1, 9000][:width]
    y = x[:, 0] * 3 + np.sin(x[:, 1]) * 20 + (x[:, 2] > 0) * 7 + rng.normal(size=rows)
    return x, y


def _train(params: dict, rounds: int = 40, seed: int = 0) -> tuple[xgb.Booster, np.ndarray]:
    x, y = _data(seed=seed)
    booster = xgb.train({"nthread": 1, "seed": seed, **params}, xgb.DMatrix(x, label=y), rounds)
    return booster, x


def _probes(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    """Rows from the data, plus rows whose values sit exactly on split thresholds and one float32
    step either side: where `<` and `<=`, or float64 and float32 comparison, would differ."""
    thresholds = booster.trees_to_dataframe().dropna(subset=["Split"])
    rows = [x]
    for _, split in thresholds.head(200).iterrows():
        feature = int(split["Feature"].lstrip("f"))
        value = np.float32(split["Split"])
        for probe in (value, np.nextafter(value, -np.inf), np.nextafter(value, np.inf)):
            row = x[len(rows) % len(x)].copy()
            row[feature] = probe
            rows.append(row[None, :])
    return np.concatenate(rows)


@pytest.mark.parametrize(
    "params",
    [
        {"max_depth": 5, "learning_rate": 0.05},
        {"max_depth": 1},  # stumps
        {"max_depth": 8, "min_child_weight": 30},  # unbalanced: leaves on many levels
        {"max_depth": 7, "grow_policy": "lossguide", "max_leaves": 12},
        {"max_depth": 4, "objective": "reg:absoluteerror"},
        {"max_depth": 4, "objective": "reg:quantileerror", "quantile_alpha": [0.1, 0.5, 0.9]},
    ],
)
def test_the_tree_walk_equals_xgboost_bit_for_bit(params: dict) -> None:
    booster, x = _train(params)
    probes = _probes(booster, x)
    trees = compile_trees([booster])
    assert trees is not None
    expected = booster.inplace_predict(probes).reshape(len(probes), -1)
    assert np.array_equal(trees.predict(probes), expected)
    assert np.array_equal(trees.predict(probes[:1]), expected[:1])


def test_several_boosters_give_their_outputs_in_order() -> None:
    point, x = _train({"max_depth": 3})
    quantiles, _ = _train({"max_depth": 6, "objective": "reg:quantileerror", "quantile_alpha": [0.1, 0.9]})
    trees = compile_trees([point, quantiles])
    assert trees is not None
    expected = np.hstack([point.inplace_predict(x)[:, None], quantiles.inplace_predict(x)])
    assert np.array_equal(trees.predict(x), expected)


@pytest.mark.parametrize(
    "params",
    [
        {"objective": "reg:logistic"},  # the sum goes through a sigmoid
        {"booster": "dart", "rate_drop": 0.1},
        {"booster": "gblinear"},
        {"multi_strategy": "multi_output_tree", "tree_method": "hist",
         "objective": "reg:quantileerror", "quantile_alpha": [0.1, 0.9]},
    ],
)  # fmt: skip
def test_models_the_walk_does_not_cover_are_left_to_xgboost(params: dict) -> None:
    x, y = _data()
    label = (y > y.mean()).astype(float) if params.get("objective") == "reg:logistic" else y
    depth = {} if params.get("booster") == "gblinear" else {"max_depth": 3}
    booster = xgb.train({"nthread": 1, **depth, **params}, xgb.DMatrix(x, label=label), 5)
    assert compile_trees([booster]) is None


def test_bundle_scores_a_row_the_same_alone_and_in_a_large_batch(fleet: pd.DataFrame) -> None:
    bundle = make_bundle(fleet)
    rows = np.random.default_rng(1).normal(size=(SMALL_BATCH * 4, len(bundle.spec.feature_names))) * 50
    together = bundle.predict_matrix(rows)  # XGBoost's loop
    alone = np.vstack([bundle.predict_matrix(row) for row in rows])  # the tree walk
    assert np.array_equal(alone, together)
    with_nan = rows[:1].copy()
    with_nan[0, 3] = np.nan  # missing values take XGBoost's default branches
    in_batch = bundle.predict_matrix(np.vstack([with_nan] * 40))[:1]
    assert np.array_equal(bundle.predict_matrix(with_nan), in_batch)
