"""Sensors: ingestion when files land in the landing zone, retraining when enough engines failed.

The landing-zone sensor asks, each tick, the question ingestion itself asks (which files are new,
changed, or still unreadable, against the ledger in the warehouse's read snapshot) and requests
an ingestion run for those not already in a run it requested. Its cursor holds those in-flight
files; a run key names exactly the files its run was requested for (and how many runs for the
same files failed before), so:

- a file is requested once: the same files again give the same key, which Dagster never runs twice;
- none is skipped: the ledger, not the cursor, says what is ingested, so a cursor that is lost or
  moves back only lets files be requested again (ingestion reads a file once whatever runs);
- a failed run's files are requested again, under a new key, at the next tick.

Between the two, declarative automation (`AutomationCondition.eager()` on the labels and the
features) re-materialises what depends on new telemetry. Retraining is not eager: the retrain
policy sensor requests it when at least `RetrainPolicy.min_new_trajectories` engine lifetimes
completed (ended in a failure event) since the data of the latest registered model, with a run
key naming that count, so the same data never trains twice.
"""

from __future__ import annotations

import hashlib
import json

import duckdb
from dagster import (
    AssetSelection,
    ConfigurableResource,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    schedule,
    sensor,
)

from turbofan_assets.resources import FileStore, Warehouse
from turbofan_warehouse import registry
from turbofan_warehouse.ingest import pending_files
from turbofan_warehouse.snapshot import NoSnapshot

INGEST_JOB = "ingest_landing_zone_job"
RETRAIN_JOB = "retrain_job"
RETRAIN_AFTER_ENV = "TURBOFAN_RETRAIN_AFTER"  # the retrain policy's threshold for this code location
FILES_TAG = "turbofan/landing_files"  # the digest of the files a run was requested for
_FAILED = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
_DONE = (DagsterRunStatus.SUCCESS, *_FAILED)
_UNFINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]

retrain_job = define_asset_job(
    RETRAIN_JOB,
    selection=AssetSelection.assets(
        "rul_labels",
        "training_features",
        "reference_test_fleet",
        "model_candidates",
        "champion_model",
        "model_evaluation",
    ),
    description="Labels, features and the reference test fleet brought up to date, then a new "
    "candidate trained, judged by the promotion gate and evaluated (requested by the retrain "
    "policy and schedule).",
)

ingest_job = define_asset_job(
    INGEST_JOB,
    selection=AssetSelection.groups("ingestion"),
    description="Ingest what is new in the landing zone (requested by landing_zone_sensor).",
)


def _digest(files: dict[str, str]) -> str:
    """A name for exactly these files at these versions."""
    text = "\n".join(f"{name}\0{version}" for name, version in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _to_ingest(landing_zone: FileStore, warehouse: Warehouse) -> dict[str, str]:
    """name -> version of every file ingestion would read now."""
    with landing_zone.open() as store:
        try:
            with warehouse.read() as conn:
                pending, _ = pending_files(store, conn)
        except (NoSnapshot, duckdb.CatalogException):  # nothing ingested yet
            pending, _ = pending_files(store, None)
    return {item.file.name: item.file.version for item in pending}


@sensor(
    job=ingest_job,
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Starts ingestion when files land in the landing zone: one run for each batch of new "
    "files, never two for the same files, and again for the files of a run that failed.",
)
def landing_zone_sensor(
    context: SensorEvaluationContext, landing_zone: FileStore, warehouse: Warehouse
) -> SensorResult:
    in_flight: dict[str, dict[str, str]] = json.loads(context.cursor) if context.cursor else {}
    # Forget the batches whose run has ended: ingested files leave the pending list, and the files
    # of a failed run come back into it.
    for digest in list(in_flight):
        runs = context.instance.get_run_records(RunsFilter(tags={FILES_TAG: digest}), limit=1)
        if runs and runs[0].dagster_run.status in _DONE:
            del in_flight[digest]
    requested = {name: version for files in in_flight.values() for name, version in files.items()}
    pending = _to_ingest(landing_zone, warehouse)
    new = {name: version for name, version in pending.items() if requested.get(name) != version}
    if not new:
        waiting = f"; {len(requested)} files in runs not finished yet" if requested else ""
        return SensorResult(
            skip_reason=f"no new files in the landing zone{waiting}",
            cursor=json.dumps(in_flight, sort_keys=True),
        )
    digest = _digest(new)
    earlier = context.instance.get_run_records(RunsFilter(tags={FILES_TAG: digest}))
    failed = sum(record.dagster_run.status in _FAILED for record in earlier)
    in_flight[digest] = new
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=f"landing-{digest}-{failed}",
                tags={FILES_TAG: digest, "turbofan/files": str(len(new))},
            )
        ],
        cursor=json.dumps(in_flight, sort_keys=True),
    )


class RetrainPolicy(ConfigurableResource):
    """When to retrain: after this many newly completed engine lifetimes (trajectories that ended in a
    failure event) since the data the latest registered model was trained on."""

    min_new_trajectories: int = 10


def completed_trajectories(conn: duckdb.DuckDBPyConnection) -> int:
    """Engine lifetimes that ended in a failure event: what labels, and so training, can use."""
    return conn.execute(
        "SELECT count(*) FROM (SELECT DISTINCT device_id, lifetime FROM failure_events)"
    ).fetchone()[0]


@sensor(
    job=retrain_job,
    minimum_interval_seconds=10,
    default_status=DefaultSensorStatus.RUNNING,
    description="Retrains when enough engines completed a lifetime since the latest model's data "
    "(RetrainPolicy.min_new_trajectories, default 10), never on every file nor twice for the same data. "
    "Reads the warehouse's read snapshot, never the writer's lock.",
)
def retrain_policy_sensor(
    context: SensorEvaluationContext, warehouse: Warehouse, retrain_policy: RetrainPolicy
) -> SensorResult:
    decision = _retrain(context.instance, warehouse, retrain_policy.min_new_trajectories)
    if isinstance(decision, str):
        return SensorResult(skip_reason=decision)
    return SensorResult(run_requests=[decision])


@schedule(
    job=retrain_job,
    cron_schedule="0 3 * * *",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Retrains every night at 03:00 (turn it on here) when any engine completed a lifetime "
    "since the latest model's data: the calendar beside the policy, never on the same data twice.",
)
def retrain_schedule(context: ScheduleEvaluationContext, warehouse: Warehouse) -> RunRequest | SkipReason:
    decision = _retrain(context.instance, warehouse, 1)
    return SkipReason(decision) if isinstance(decision, str) else decision


def _retrain(instance: DagsterInstance, warehouse: Warehouse, min_new: int) -> RunRequest | str:
    """A request to retrain when at least `min_new` lifetimes completed since the latest model's
    data, else why not. A retraining queued or running will register a model on data the snapshot
    may not show yet: nothing is asked until it ends, or the same data would train twice."""
    unfinished = instance.get_run_records(RunsFilter(job_name=RETRAIN_JOB, statuses=_UNFINISHED), limit=1)
    if unfinished:
        return f"retraining run {unfinished[0].dagster_run.run_id} is not finished"
    try:
        with warehouse.read() as conn:
            completed = completed_trajectories(conn)
            latest = registry.latest(conn) if registry.exists(conn) else None
    except (NoSnapshot, duckdb.CatalogException):
        return "nothing ingested yet"
    trained_on = latest.data_watermark["trajectories"] if latest is not None else 0
    new = completed - trained_on
    basis = f"model version {latest.version}'s {trained_on}" if latest is not None else "no model yet"
    if new < min_new:
        return f"{new} newly completed trajectories since {basis}; retraining needs {min_new}"
    return RunRequest(
        run_key=f"retrain-{completed}",
        tags={
            "turbofan/completed_trajectories": str(completed),
            "turbofan/reason": f"{new} new since {basis}",
        },
    )
