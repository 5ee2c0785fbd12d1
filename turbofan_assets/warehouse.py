"""The DuckDB warehouse's tables. One writer at a time: Dagster runs are queued."""

from __future__ import annotations

import duckdb

from turbofan_core.telemetry import MEASUREMENTS

_MEASUREMENT_COLUMNS = ", ".join(f"{name} DOUBLE NOT NULL" for name in MEASUREMENTS)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ingested_files (
    name VARCHAR PRIMARY KEY,
    ingested_at TIMESTAMP NOT NULL,
    records INTEGER NOT NULL,
    telemetry INTEGER NOT NULL,
    failure_events INTEGER NOT NULL,
    quarantined INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry (
    device_id VARCHAR NOT NULL,
    lifetime INTEGER NOT NULL,
    CycleTime INTEGER NOT NULL,
    {_MEASUREMENT_COLUMNS},
    enqueued_time_utc VARCHAR NOT NULL,
    source_file VARCHAR NOT NULL,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS failure_events (
    device_id VARCHAR NOT NULL,
    lifetime INTEGER NOT NULL,
    CycleTime INTEGER NOT NULL,
    enqueued_time_utc VARCHAR NOT NULL,
    source_file VARCHAR NOT NULL,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry_quarantine (
    source_file VARCHAR NOT NULL,
    position INTEGER NOT NULL,
    device_id VARCHAR,
    enqueued_time_utc VARCHAR,
    properties VARCHAR NOT NULL,
    body BLOB,
    reason VARCHAR NOT NULL,
    quarantined_at TIMESTAMP NOT NULL
);
"""


def ensure_schema(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(SCHEMA)


def count(conn: duckdb.DuckDBPyConnection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
