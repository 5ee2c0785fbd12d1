"""Asset checks: the data-quality promises the warehouse keeps, evaluated in SQL on its read snapshot."""

from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from turbofan_assets.resources import Warehouse
from turbofan_core.telemetry import PHYSICAL_RANGES
from turbofan_warehouse.schema import QUARANTINED, UNREADABLE

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
def no_duplicate_cycles(warehouse: Warehouse) -> AssetCheckResult:
    with warehouse.read() as conn:
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
def cycles_contiguous(warehouse: Warehouse) -> AssetCheckResult:
    with warehouse.read() as conn:
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
def sensor_values_in_physical_range(warehouse: Warehouse) -> AssetCheckResult:
    outside = " OR ".join(f"{name} NOT BETWEEN {lo} AND {hi}" for name, (lo, hi) in PHYSICAL_RANGES.items())
    with warehouse.read() as conn:
        return _result(
            conn,
            f"SELECT device_id, lifetime, CycleTime, source_file FROM telemetry WHERE {outside} ORDER BY ALL",
            ["device_id", "lifetime", "CycleTime", "source_file"],
            severity=AssetCheckSeverity.WARN,
        )


@asset_check(
    asset="telemetry_quarantine",
    description=f"Under {QUARANTINE_RATE_LIMIT:.0%} of the records of the latest ingestion run's files "
    "quarantined: a feed that breaks now fails, however clean its history.",
)
def quarantine_rate_below_threshold(warehouse: Warehouse) -> AssetCheckResult:
    with warehouse.read() as conn:
        quarantined, received = conn.execute(
            "SELECT coalesce(sum(quarantined), 0), coalesce(sum(records), 0) FROM landing_files WHERE "
            f"run_id = (SELECT arg_max(run_id, read_at) FROM landing_files WHERE status <> '{UNREADABLE}')"
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


@asset_check(
    asset="telemetry_quarantine",
    description="Every landing-zone file could be read. Fails while a file is unreadable (retried each run) "
    "or quarantined whole (given up after the configured attempts): replace the file to have it read again.",
)
def landing_files_readable(warehouse: Warehouse) -> AssetCheckResult:
    with warehouse.read() as conn:
        return _result(
            conn,
            "SELECT name, status, attempts, reason FROM landing_files "
            f"WHERE status IN ('{UNREADABLE}', '{QUARANTINED}') ORDER BY ALL",
            ["name", "status", "attempts", "reason"],
            severity=AssetCheckSeverity.ERROR,
        )


CHECKS = [
    no_duplicate_cycles,
    cycles_contiguous,
    sensor_values_in_physical_range,
    quarantine_rate_below_threshold,
    landing_files_readable,
]
