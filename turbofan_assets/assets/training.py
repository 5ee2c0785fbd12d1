"""Training: features of the labelled trajectories, model selection, and the promotion gate.

Nothing in this module reads the NASA test fleet: models are chosen and promoted on
cross-validation over training trajectories only. The test fleet is `model_evaluation`'s.
"""

import json
import time
from dataclasses import dataclass

import duckdb
import pandas as pd
from dagster import (
    AssetExecutionContext,
    AutomationCondition,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from turbofan_assets.resources import WAREHOUSE_POOL, FileStore, Warehouse
from turbofan_core import training
from turbofan_core.bundle import BundleError, ModelBundle, quantile_column, read_bundle, write_bundle
from turbofan_core.features import CYCLE, FeatureSpec, NoSignal, compute_features, fit_spec
from turbofan_core.storage import ObjectStore
from turbofan_core.telemetry import MEASUREMENTS
from turbofan_warehouse import registry
from turbofan_warehouse.schema import has_table, transaction

FEATURES_GROUP = "preparation"
GROUP = "training"
TABLE = "training_features"
SPEC_TABLE = "training_feature_spec"  # the spec fitted with the features, written with them
KEYS = list(training.KEYS)


class TrainingConfig(Config):
    """The XGBoost grid (every combination is cross-validated) and how selection is run."""

    max_depth: list[int] = [4, 5]
    learning_rate: list[float] = [0.05]
    n_estimators: list[int] = [100, 150, 200, 300]
    """Grid entries differing only here share one fit per fold, so extra values are nearly free."""
    folds: int = 5
    """Cross-validation folds; each holds whole trajectories. Fewer trajectories: one per fold."""
    seed: int = 0
    """Seeds the folds and XGBoost's row and column sampling: the same data gives the same bundle."""
    workers: int = training.DEFAULT_WORKERS
    """Fits run side by side, one core each (folds and grid entries are independent)."""


def labelled_rows(conn: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Every labelled cycle's measurements and RUL, ordered by trajectory and cycle (so whatever is
    fitted on them comes out the same for the same data)."""
    measurements = ", ".join(f"t.{name}" for name in MEASUREMENTS)
    return conn.execute(
        f"SELECT t.device_id, t.lifetime, t.CycleTime, {measurements}, l.rul FROM telemetry t "
        "JOIN rul_labels l USING (device_id, lifetime, CycleTime) ORDER BY device_id, lifetime, CycleTime"
    ).df()


def labelled_features(rows: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """Features of labelled rows (`labelled_rows`), with their RUL, ordered by trajectory and cycle."""
    features = compute_features(rows, spec, KEYS)
    labels = rows[[*KEYS, CYCLE, training.TARGET]]
    return features.merge(labels, on=[*KEYS, CYCLE], how="left", validate="1:1")


def _markdown(frame: pd.DataFrame) -> MetadataValue:
    return MetadataValue.md(frame.to_markdown(index=False, floatfmt=".2f"))


@asset(
    group_name=FEATURES_GROUP,
    deps=["rul_labels"],
    pool=WAREHOUSE_POOL,
    automation_condition=AutomationCondition.eager(),
)
def training_features(warehouse: Warehouse):
    """The feature matrix models train on, and the feature spec fitted on the same labelled cycles.

    The spec's operating regimes (found in the operational settings), each sensor's
    standardisation within its regime and the sensors that carry signal are learnt here, from
    training rows only (all of them: the cross-validation's folds then share the regimes and the
    sensor choice); its windows and smoothing are the shared default. The features are
    computed by the same batch engine, from the same spec, that the bundle carries to the edge,
    so training and scoring see identical features. Both tables are written in one transaction.
    """
    with warehouse.get_connection() as conn:
        rows = labelled_rows(conn)
        spec, unfitted = _fitted(rows)
        frame = rows[[*KEYS, CYCLE, training.TARGET]] if spec is None else labelled_features(rows, spec)
        conn.register("new_features", frame)
        with transaction(conn):
            conn.execute(f"CREATE OR REPLACE TABLE {TABLE} AS SELECT * FROM new_features")
            conn.execute(f"CREATE OR REPLACE TABLE {SPEC_TABLE} (spec VARCHAR NOT NULL)")
            if spec is not None:
                conn.execute(f"INSERT INTO {SPEC_TABLE} VALUES (?)", [json.dumps(spec.to_dict())])
        conn.unregister("new_features")
    spec_metadata = (
        {
            "features": len(spec.feature_names),
            "sensors": MetadataValue.text(", ".join(spec.sensors)),
            "operating_regimes": spec.regimes.count,
            "feature_spec": MetadataValue.json(spec.to_dict()),
        }
        if spec is not None
        else {"feature_spec": MetadataValue.text(f"none: {unfitted}")}
    )
    return MaterializeResult(
        metadata={
            "dagster/row_count": len(frame),
            "trajectories": int(frame[KEYS].drop_duplicates().shape[0]),
            **spec_metadata,
        }
    )


def _fitted(rows: pd.DataFrame) -> tuple[FeatureSpec | None, str]:
    """The spec fitted on the labelled rows, or None and why nothing could be fitted (then no spec
    is stored and the features table holds only the rows' keys and RUL: training says why it
    cannot start)."""
    if not len(rows):
        return None, "no labelled trajectories yet: an engine must report its failure first"
    try:
        return fit_spec(rows, training.TARGET), ""
    except NoSignal as error:
        return None, str(error)


def _load_training_set(conn: duckdb.DuckDBPyConnection) -> tuple[pd.DataFrame, FeatureSpec]:
    """The features and the spec they were computed with (written together by training_features)."""
    stored = conn.execute(f"SELECT spec FROM {SPEC_TABLE}").fetchall() if has_table(conn, SPEC_TABLE) else []
    if not stored:
        raise Failure(
            "training_features holds no feature spec: no labelled trajectories yet, no sensor carries "
            "signal in them (see its latest materialisation), or it was made by a version that kept "
            "no spec: materialise training_features again"
        )
    spec = FeatureSpec.from_dict(json.loads(stored[0][0]))
    frame = conn.execute(f"SELECT * FROM {TABLE} ORDER BY device_id, lifetime, CycleTime").df()
    missing = sorted(set(spec.feature_names) - set(frame.columns))
    if missing:
        raise Failure(f"{TABLE} lacks features {missing[:5]}...: re-materialise training_features")
    return frame, spec


def _watermark(conn: duckdb.DuckDBPyConnection, frame: pd.DataFrame, fingerprint: str) -> dict:
    """What identifies the data a model saw: the exact trajectories, its newest message and a hash.

    The newest message is by enqueued time (device order), not by file name or arrival, so a
    late file that fills an old trajectory does not move it.
    """
    trajectories = frame[KEYS].drop_duplicates().sort_values(KEYS)
    conn.register("used_trajectories", trajectories)
    newest = conn.execute(
        "SELECT device_id, lifetime, CycleTime, message_id, enqueued_time_utc::VARCHAR FROM telemetry "
        "JOIN used_trajectories USING (device_id, lifetime) "
        "ORDER BY enqueued_time_utc DESC, device_id LIMIT 1"
    ).fetchall()[0]
    conn.unregister("used_trajectories")
    return {
        "trajectories": len(trajectories),
        "trajectory_keys": [
            f"{device}/{lifetime}" for device, lifetime in trajectories.itertuples(index=False)
        ],
        "rows": len(frame),
        "newest_message": dict(
            zip(
                ["device_id", "lifetime", "CycleTime", "message_id", "enqueued_time_utc"], newest, strict=True
            )
        ),
        "data_sha256": fingerprint,
    }


@asset(group_name=GROUP, deps=["training_features"], pool=WAREHOUSE_POOL)
def model_candidates(
    context: AssetExecutionContext, config: TrainingConfig, warehouse: Warehouse, model_store: FileStore
) -> Output[int]:
    """The best XGBoost configuration by trajectory-grouped cross-validation, refit on all training data.

    A ridge-regression baseline is scored on the same folds, so the comparison means
    something. The chosen configuration is refit on every labelled trajectory together
    with a p10/p90 quantile model, written as a content-addressed bundle to the model
    store and registered as a candidate. The test fleet plays no part. Its value is the
    registered version, which the gate and the evaluation take as their input.
    """
    with warehouse.get_connection() as conn:
        frame, spec = _load_training_set(conn)
        trajectories = frame[KEYS].drop_duplicates().shape[0]
        if trajectories < 2:
            raise Failure(f"{trajectories} labelled trajectories: at least 2 are needed to cross-validate")
        [(rul_cap,)] = conn.execute("SELECT max(rul_cap) FROM rul_labels").fetchall()
        names = list(spec.feature_names)
        fingerprint = training.data_fingerprint(frame, [*KEYS, CYCLE, training.TARGET, *names])
        watermark = _watermark(conn, frame, fingerprint)

    started, cpu_started = time.monotonic(), time.process_time()
    folds_used = min(config.folds, trajectories)
    folds = training.trajectory_folds(frame, folds_used, config.seed)
    X, y = training.design_matrix(frame, names)
    grid = training.param_grid(config.max_depth, config.learning_rate, config.n_estimators)
    results = training.cross_validate_xgb(X, y, folds, grid, seed=config.seed, workers=config.workers)
    baseline = training.cross_validate_baseline(X, y, folds)
    chosen = training.best(results)
    fitted = training.fit_final(X, y, folds, chosen.params, seed=config.seed, workers=config.workers)
    train_seconds, train_cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started

    cv = {"cv_rmse": chosen.rmse, "cv_rmse_std": chosen.rmse_std, "cv_mae": chosen.mae}
    bundle = ModelBundle(
        spec=spec,
        rul_cap=rul_cap,
        quantiles=training.INTERVAL,
        point=fitted.point,
        quantile_model=fitted.quantile_model,
        quantile_offsets=fitted.quantile_offsets,
        params={**chosen.params, **training.FIXED_PARAMS, "seed": config.seed},
        watermark=watermark,
        metrics={
            **cv,
            "baseline_cv_rmse": baseline.rmse,
            "cv_folds": folds_used,
            "cv_interval_coverage_uncalibrated": fitted.raw_interval_coverage,
        },
    )
    with model_store.open() as store:
        name = write_bundle(store, bundle)
        location = f"{store.location.rstrip('/')}/{name}"
    with warehouse.get_connection() as conn:
        registration = registry.Registration(
            run_id=context.run.run_id,
            bundle_sha256=bundle.sha256,
            bundle_location=location,
            params=chosen.params,
            feature_spec=spec.to_dict(),
            rul_cap=rul_cap,
            cv_folds=folds_used,
            cv_seed=config.seed,
            baseline_cv_rmse=baseline.rmse,
            data_watermark=watermark,
            data_sha256=fingerprint,
            **cv,
        )
        version = registry.register_candidate(conn, registration)
    context.log.info(
        f"version {version}: {chosen.name}, CV RMSE {chosen.rmse:.2f}, ridge {baseline.rmse:.2f}"
    )
    return Output(
        version,
        metadata={
            "version": version,
            "selected": chosen.name,
            "cv_rmse": chosen.rmse,
            "cv_rmse_std": chosen.rmse_std,
            "cv_mae": chosen.mae,
            "baseline_cv_rmse": baseline.rmse,
            "train_seconds": train_seconds,
            "train_cpu_seconds": train_cpu_seconds,
            "cv_folds": folds_used,
            "cv_interval_coverage_uncalibrated": fitted.raw_interval_coverage,
            "interval_offsets": MetadataValue.json(
                dict(zip(map(quantile_column, training.INTERVAL), fitted.quantile_offsets, strict=True))
            ),
            "comparison": _markdown(_comparison(results, baseline, chosen)),
            "bundle_sha256": bundle.sha256,
            "bundle": MetadataValue.path(location),
            "data_watermark": MetadataValue.json(watermark),
        },
    )


def _comparison(
    results: list[training.CVResult], baseline: training.CVResult, chosen: training.CVResult
) -> pd.DataFrame:
    """Every configuration and the baseline, best first, on the same folds."""
    rows = [
        {
            "model": result.name,
            "cv_rmse": result.rmse,
            "cv_rmse_std": result.rmse_std,
            "cv_mae": result.mae,
            "selected": "yes" if result is chosen else "",
        }
        for result in [*results, baseline]
    ]
    return pd.DataFrame(rows).sort_values("cv_rmse", kind="stable")


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on one candidate, and the champion's score it was weighed against, if any."""

    promote: bool
    reason: str
    champion_score: float | None = None


def _champion_score(
    conn: duckdb.DuckDBPyConnection, champion: registry.ModelRecord, candidate: registry.ModelRecord
) -> tuple[float, str]:
    """The champion's CV RMSE on the candidate's data and folds, and how it was obtained.

    CV scores are only comparable on the same trajectories and folds. When the data or
    the folds changed since the champion was trained, its recipe (feature spec and
    params, from the registry) is cross-validated again on the candidate's folds, so
    both face the same test.
    """
    fold_identity = ("data_sha256", "cv_folds", "cv_seed")
    if all(getattr(champion, key) == getattr(candidate, key) for key in fold_identity):
        return champion.cv_rmse, "same training data and folds"
    spec = FeatureSpec.from_dict(champion.feature_spec)
    frame = labelled_features(labelled_rows(conn), spec)
    folds = training.trajectory_folds(frame, candidate.cv_folds, candidate.cv_seed)
    X, y = training.design_matrix(frame, spec.feature_names)
    [rescored] = training.cross_validate_xgb(X, y, folds, [champion.params], seed=candidate.cv_seed)
    return (
        rescored.rmse,
        f"re-scored on the candidate's data and folds; it had {champion.cv_rmse:.3f} on its own",
    )


def judge(
    conn: duckdb.DuckDBPyConnection,
    store: ObjectStore,
    candidate: registry.ModelRecord,
    champion: registry.ModelRecord | None,
) -> Verdict:
    """The promotion rule, in order: the candidate's bundle verifies; its CV RMSE is strictly
    below the ridge baseline's; and strictly below the champion's on the same folds."""
    try:
        read_bundle(store, candidate.bundle_sha256)
    except BundleError as error:
        return Verdict(False, f"its bundle failed verification: {error}")
    ours, ridge = f"CV RMSE {candidate.cv_rmse:.3f}", f"the ridge baseline's {candidate.baseline_cv_rmse:.3f}"
    if not candidate.cv_rmse < candidate.baseline_cv_rmse:
        return Verdict(False, f"{ours} does not beat {ridge}")
    if champion is None:
        return Verdict(True, f"first champion: {ours} beats {ridge}")
    score, basis = _champion_score(conn, champion, candidate)
    versus = f"champion version {champion.version}'s {score:.3f} ({basis})"
    if candidate.cv_rmse < score:
        return Verdict(True, f"{ours} is below {versus}", score)
    return Verdict(False, f"{ours} is not below {versus}", score)


@asset(group_name=GROUP, pool=WAREHOUSE_POOL)
def champion_model(
    context: AssetExecutionContext, model_candidates: int, warehouse: Warehouse, model_store: FileStore
):
    """The promotion gate: the candidate `model_candidates` registered replaces the champion only if better.

    Rule (see `judge`): strictly lower CV RMSE than the ridge baseline and than the
    champion, on the candidate's folds. A refused candidate stays registered with the
    reason, and the champion stays in service.
    """
    with warehouse.get_connection() as conn, model_store.open() as store:
        registry.ensure_registry(conn)
        candidate = registry.get(conn, model_candidates)
        if candidate is None:
            raise Failure(f"model version {model_candidates} is not in the registry of this warehouse")
        if candidate.gate is not None:
            verdict = Verdict(candidate.gate == registry.PROMOTED, f"already judged: {candidate.reason}")
        else:
            verdict = judge(conn, store, candidate, registry.champion(conn))
            if verdict.promote:
                registry.promote(conn, candidate.version, verdict.reason)
                context.log.info(f"version {candidate.version} promoted: {verdict.reason}")
            else:
                registry.refuse(conn, candidate.version, verdict.reason)
                context.log.warning(f"version {candidate.version} refused: {verdict.reason}")
        champion = registry.champion(conn)
        recent = registry.table(conn, limit=10)
    metadata: dict = {"registry": _markdown(recent)}
    if champion is not None:
        metadata |= {
            "champion_version": champion.version,
            "champion_cv_rmse": champion.cv_rmse,
            "champion_bundle_sha256": champion.bundle_sha256,
        }
    metadata |= {
        "decision": "promoted" if verdict.promote else "refused",
        "reason": verdict.reason,
        "candidate_version": candidate.version,
        "candidate_cv_rmse": candidate.cv_rmse,
    }
    if verdict.champion_score is not None:
        metadata["compared_champion_cv_rmse"] = verdict.champion_score
    return MaterializeResult(metadata=metadata)
