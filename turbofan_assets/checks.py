"""Asset checks: the data-quality promises the warehouse keeps, evaluated in SQL."""


from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check
from dagster_duckdb import DuckDBResource

from turbofan_core.telemetry import PHYSICAL_RANGES

QUARANTINE_RATE_LIMIT = 0.01
SAMPLE = 10


def _sample_md(rows: list[tuple], columns: list[str]) -> MetadataValue:
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return MetadataValue.md(header + "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows))


def _result(conn, offenders_sql: str, columns: list[str], **kwargs) -> AssetCheckResult:
    """Run a query listing offenders; pass when it lists none, show a sample when it does."""
    # One scan: the sample rows carry the total count of offenders.
    query = f"SELECT *, count(*) OVER () FROM ({offenders_sql}) ORDER BY ALL LIMIT {SAMPLE}"
    rows = conn.execute(query).fetchall()
    offenders = rows[0][-1] if rows else 0
    sample = [row[:-1] for row in rows]
    return AssetCheckResult(
        passed=offenders == 0,
        metadata={"offenders": offenders, "sample": _sample_md(sample, columns)},
        **kwargs,
    )


@asset_check(asset="raw_telemetry", description="One row per (device, lifetime, cycle).")
def no_duplicate_cycles(warehouse: DuckDBResource) -> AssetCheckResult:
    with warehouse.get_connection() as conn:
        return _result(
            conn,
            "SELECT device_id, lifetime, CycleTime, count(*) AS copies FROM telemetry "
            "GROUP BY ALL HAVING count(*) > 1 ORDER BY ALL",
            ["device_id", "lifetime", "CycleTime", "copies"],
        )


@asset_check(
    asset="raw_telemetry",
    description="Each trajectory starts at cycle 1 and has no gaps (a gap means lost messages).",
)
def cycles_contiguous(warehouse: DuckDBResource) -> AssetCheckResult:
    with warehouse.get_connection() as conn:
        return _result(
            conn,
            "SELECT device_id, lifetime, min(CycleTime) AS first, max(CycleTime) AS last, "
            "count(DISTINCT CycleTime) AS cycles FROM telemetry GROUP BY device_id, lifetime "
            "HAVING min(CycleTime) <> 1 OR max(CycleTime) <> count(DISTINCT CycleTime) ORDER BY ALL",
            ["device_id", "lifetime", "first", "last", "cycles"],
        )


@asset_check(
    asset="raw_telemetry",
    description="Settings and sensors inside physically possible ranges.",
)
def sensor_values_in_physical_range(warehouse: DuckDBResource) -> AssetCheckResult:
    outside = " OR ".join(f"{name} NOT BETWEEN {lo} AND {hi}" for name, (lo, hi) in PHYSICAL_RANGES.items())
    with warehouse.get_connection() as conn:
        return _result(
            conn,
            f"SELECT device_id, lifetime, CycleTime, source_file FROM telemetry WHERE {outside} ORDER BY ALL",
            ["device_id", "lifetime", "CycleTime", "source_file"],
            severity=AssetCheckSeverity.WARN,
        )


@asset_check(
    asset="telemetry_quarantine",
    description=f"Under {QUARANTINE_RATE_LIMIT:.0%} of all received records quarantined.",
)
def quarantine_rate_below_threshold(warehouse: DuckDBResource) -> AssetCheckResult:
    with warehouse.get_connection() as conn:
        quarantined, received = conn.execute(
            "SELECT coalesce(sum(quarantined), 0), coalesce(sum(records), 0) FROM ingested_files"
        ).fetchone()
        reasons = conn.execute(
            "SELECT reason, count(*) FROM telemetry_quarantine GROUP BY reason ORDER BY 2 DESC LIMIT ?",
            [SAMPLE],
        ).fetchall()
    rate = quarantined / received if received else 0.0
    return AssetCheckResult(
        passed=rate < QUARANTINE_RATE_LIMIT,
        metadata={
            "quarantine_rate": rate,
            "quarantined": quarantined,
            "received": received,
            "top_reasons": _sample_md(reasons, ["reason", "records"]),
        },
    )


CHECKS = [
    no_duplicate_cycles,
    cycles_contiguous,
    sensor_values_in_physical_range,
    quarantine_rate_below_threshold,
]
