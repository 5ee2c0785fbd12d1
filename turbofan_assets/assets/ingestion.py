"""Ingestion group: landing-zone capture files into the warehouse."""

from collections.abc import Iterator

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from turbofan_assets.resources import WAREHOUSE_POOL, FileStore, Warehouse
from turbofan_warehouse.ingest import DEFAULT_MAX_ATTEMPTS, ingest_new_files
from turbofan_warehouse.schema import count

GROUP = "ingestion"
TABLES = {
    "raw_telemetry": "telemetry",
    "telemetry_quarantine": "telemetry_quarantine",
    "failure_events": "failure_events",
}


class IngestionConfig(Config):
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """Reads of an unreadable file (of one version) before it is quarantined whole and no longer retried."""


def _files_md(files: dict[str, str] | list[str]) -> MetadataValue:
    if isinstance(files, dict):
        return MetadataValue.md(
            "\n".join(f"- `{name}`: {reason}" for name, reason in files.items()) or "none"
        )
    return MetadataValue.md("\n".join(f"- `{name}`" for name in files) or "none")


@multi_asset(
    specs=[
        AssetSpec(
            "raw_telemetry",
            group_name=GROUP,
            skippable=True,
            description="Valid device telemetry (table `telemetry`), one row per message (duplicates "
            "dropped by device and message id), keyed by device, engine lifetime and cycle; lifetimes "
            "follow device order, whatever order files arrive in. Read incrementally from the landing "
            "zone (ledger `landing_files`).",
        ),
        AssetSpec(
            "telemetry_quarantine",
            group_name=GROUP,
            skippable=True,
            description="Every record that failed validation (source file, position, raw body and reason), "
            "and, in `landing_files`, every file that could not be read.",
        ),
        AssetSpec(
            "failure_events",
            group_name=GROUP,
            skippable=True,
            description="Engine failures reported by devices; each closes an engine lifetime.",
        ),
    ],
    can_subset=True,  # only to refuse a part with a one-line reason: see the first lines of the body
    pool=WAREHOUSE_POOL,
)
def ingest_landing_zone(
    context: AssetExecutionContext, config: IngestionConfig, landing_zone: FileStore, warehouse: Warehouse
) -> Iterator[MaterializeResult]:
    """One pass over the new and changed files feeds the three tables, one transaction per batch.

    A run that finds nothing new materialises nothing, so downstream assets have nothing to
    update. Telemetry and failure events are one device history (a failure event sets the
    lifetime of what follows it), so both are materialised when either changed; the
    quarantine when records or files were quarantined or found unreadable.
    """
    if context.selected_asset_keys != {AssetKey(key) for key in TABLES}:
        raise Failure(
            description=f"{', '.join(TABLES)} are written by one pass over the landing zone and "
            "materialise together: select all three, e.g. --select 'group:ingestion'",
            allow_retries=False,
        )
    with landing_zone.open() as store, warehouse.get_connection() as conn:
        report = ingest_new_files(
            store, conn, context.log, max_attempts=config.max_attempts, run_id=context.run.run_id
        )
        totals = {asset: count(conn, table) for asset, table in TABLES.items()}
        files_total = count(conn, "landing_files")
    context.log.info(
        f"{report.files} files: {report.telemetry} telemetry, {report.failure_events} failure events, "
        f"{report.quarantined} quarantined, {report.duplicates} duplicates dropped, "
        f"{report.relabelled} stored rows relabelled; {len(report.unreadable)} unreadable, "
        f"{len(report.quarantined_files)} quarantined whole, {len(report.waiting)} empty"
    )
    history_changed = bool(report.telemetry or report.failure_events or report.relabelled)
    if history_changed:
        yield MaterializeResult(
            asset_key="raw_telemetry",
            metadata={
                "dagster/row_count": totals["raw_telemetry"],
                "new_rows": report.telemetry,
                "duplicates_dropped": report.duplicates,
                "rows_relabelled": report.relabelled,
                "new_files": report.files,
                "files_in_ledger": files_total,
                "empty_files_waiting": _files_md(report.waiting),
                "landing_zone": store.location,
            },
        )
    if report.quarantined or report.unreadable or report.quarantined_files:
        yield MaterializeResult(
            asset_key="telemetry_quarantine",
            metadata={
                "dagster/row_count": totals["telemetry_quarantine"],
                "new_rows": report.quarantined,
                "quarantine_rate_of_new_records": report.quarantined / report.records
                if report.records
                else 0.0,
                "unreadable_files_retried_next_run": _files_md(report.unreadable),
                "files_quarantined_whole": _files_md(report.quarantined_files),
            },
        )
    if history_changed:
        yield MaterializeResult(
            asset_key="failure_events",
            metadata={"dagster/row_count": totals["failure_events"], "new_rows": report.failure_events},
        )
