"""Sensors: ingestion when files land in the landing zone.

The landing-zone sensor asks, each tick, the question ingestion itself asks (which files are new,
changed, or still unreadable, against the ledger in the warehouse's read snapshot) and requests
an ingestion run for those not already in a run it requested. Its cursor holds those in-flight
files; a run key names exactly the files its run was requested for (and how many runs for the
same files failed before), so:

- a file is requested once: the same files again give the same key, which Dagster never runs twice;
- none is skipped: the ledger, not the cursor, says what is ingested, so a cursor that is lost or
  moves back only lets files be requested again (ingestion reads a file once whatever runs);
- a failed run's files are requested again, under a new key, at the next tick.
"""

from __future__ import annotations

import hashlib
import json

import duckdb
from dagster import (
    AssetSelection,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from turbofan_assets.resources import FileStore, Warehouse
from turbofan_warehouse.ingest import pending_files
from turbofan_warehouse.snapshot import NoSnapshot

INGEST_JOB = "ingest_landing_zone_job"
FILES_TAG = "turbofan/landing_files"  # the digest of the files a run was requested for
_FAILED = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
_DONE = (DagsterRunStatus.SUCCESS, *_FAILED)

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
        except (NoSnapshot, duckdb.CatalogException):  # nothing ingested yet: every file is new
            return {file.name: file.version for file in store.list_files() if file.size}
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
