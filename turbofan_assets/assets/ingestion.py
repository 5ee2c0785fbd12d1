"""Ingestion group: landing-zone capture files into the warehouse."""


from dagster import AssetExecutionContext, AssetSpec, MaterializeResult, MetadataValue, multi_asset
from dagster_duckdb import DuckDBResource

from turbofan_assets.ingest import ingest_new_files
from turbofan_assets.resources import FileStore
from turbofan_assets.warehouse import count

GROUP = "ingestion"


@multi_asset(
    specs=[
        AssetSpec(
            "raw_telemetry",
            group_name=GROUP,
            description="Valid device telemetry (table `telemetry`), keyed by device, engine lifetime "
            "and cycle; read incrementally from the landing zone (table `ingested_files`).",
        ),
        AssetSpec(
            "telemetry_quarantine",
            group_name=GROUP,
            description="Every record that failed validation: source file, position, raw body and reason.",
        ),
        AssetSpec(
            "failure_events",
            group_name=GROUP,
            description="Engine failures reported by devices; each closes an engine lifetime.",
        ),
    ],
    can_subset=False,
)
def ingest_landing_zone(
    context: AssetExecutionContext, landing_zone: FileStore, warehouse: DuckDBResource
):
    """One pass over the new files feeds all three tables in one transaction per batch."""
    with landing_zone.open() as store, warehouse.get_connection() as conn:
        report = ingest_new_files(store, conn, context.log)
        totals = {t: count(conn, t) for t in ("telemetry", "telemetry_quarantine", "failure_events")}
        files_total = count(conn, "ingested_files")
    unreadable = MetadataValue.md(
        "\n".join(f"- `{name}`: {reason}" for name, reason in report.unreadable.items()) or "none"
    )
    yield MaterializeResult(
        asset_key="raw_telemetry",
        metadata={
            "dagster/row_count": totals["telemetry"],
            "new_rows": report.telemetry,
            "new_files": report.files,
            "files_ingested_total": files_total,
            "unreadable_files": len(report.unreadable),
            "unreadable_files_retried_next_run": unreadable,
            "landing_zone": store.location,
        },
    )
    yield MaterializeResult(
        asset_key="telemetry_quarantine",
        metadata={
            "dagster/row_count": totals["telemetry_quarantine"],
            "new_rows": report.quarantined,
            "quarantine_rate_of_new_records": report.quarantined / report.records if report.records else 0.0,
        },
    )
    yield MaterializeResult(
        asset_key="failure_events",
        metadata={"dagster/row_count": totals["failure_events"], "new_rows": report.failure_events},
    )
