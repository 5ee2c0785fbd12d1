"""The DuckDB warehouse's tables. One writer at a time (a Dagster pool of one); readers use a snapshot.

The landing zone is the source of truth: every table here can be rebuilt by ingesting it
again, so a warehouse made by an older schema is refused with that advice rather than
migrated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb

from turbofan_core.telemetry import MEASUREMENTS

SCHEMA_VERSION = 2

_MEASUREMENT_COLUMNS = ", ".join(f"{name} DOUBLE NOT NULL" for name in MEASUREMENTS)

# Ledger states of a landing-zone file (one row per file name, for the version last read).
INGESTED, UNREADABLE, QUARANTINED = "ingested", "unreadable", "quarantined"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS warehouse_info (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS landing_files (
    name VARCHAR PRIMARY KEY,
    version VARCHAR NOT NULL,   -- blob etag, or size and mtime of a local file: a change means read again
    size BIGINT NOT NULL,
    sha256 VARCHAR,             -- of the content last read whole
    status VARCHAR NOT NULL CHECK (status IN ('{INGESTED}', '{UNREADABLE}', '{QUARANTINED}')),
    attempts INTEGER NOT NULL,  -- failed reads of this version
    reason VARCHAR,             -- why it is unreadable or quarantined
    run_id VARCHAR,
    read_at TIMESTAMP NOT NULL,
    records BIGINT NOT NULL,    -- of the last read: = telemetry + failure_events + quarantined + duplicates
    telemetry BIGINT NOT NULL,
    failure_events BIGINT NOT NULL,
    quarantined BIGINT NOT NULL,
    duplicates BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry (
    device_id VARCHAR NOT NULL,
    lifetime INTEGER NOT NULL,
    CycleTime BIGINT NOT NULL,
    {_MEASUREMENT_COLUMNS},
    enqueued_time_utc TIMESTAMP_NS NOT NULL,
    message_id VARCHAR,          -- IoT Hub's messageId, when the device set one
    message_key UHUGEINT NOT NULL, -- identity: md5 of device and message id (or of the content without one)
    source_file VARCHAR NOT NULL,
    position BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS failure_events (
    device_id VARCHAR NOT NULL,
    lifetime INTEGER NOT NULL,
    CycleTime BIGINT NOT NULL,
    enqueued_time_utc TIMESTAMP_NS NOT NULL,
    message_id VARCHAR,
    message_key UHUGEINT NOT NULL,
    source_file VARCHAR NOT NULL,
    position BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry_quarantine (
    source_file VARCHAR NOT NULL,
    position BIGINT NOT NULL,
    device_id VARCHAR,
    message_id VARCHAR,
    enqueued_time_utc VARCHAR,
    properties VARCHAR NOT NULL,
    body BLOB,
    reason VARCHAR NOT NULL,
    quarantined_at TIMESTAMP NOT NULL
);
INSERT INTO warehouse_info VALUES ('schema_version', '{SCHEMA_VERSION}') ON CONFLICT DO NOTHING;
"""


class WarehouseSchemaError(RuntimeError):
    """The warehouse file was made by another version of this code."""


def ensure_schema(conn: duckdb.DuckDBPyConnection) -> None:
    """Create the tables if missing; refuse a warehouse of another schema version."""
    found = schema_version(conn)
    if found is not None and found != SCHEMA_VERSION:
        raise WarehouseSchemaError(
            f"the warehouse has schema version {found}, this code needs {SCHEMA_VERSION}: delete the "
            "warehouse file (the landing zone keeps every message) and run ingestion again"
        )
    if found is None and has_table(conn, "telemetry"):
        raise WarehouseSchemaError(
            "the warehouse predates schema versions: delete the warehouse file (the landing zone keeps "
            "every message) and run ingestion again"
        )
    conn.execute(SCHEMA)


def schema_version(conn: duckdb.DuckDBPyConnection) -> int | None:
    if not has_table(conn, "warehouse_info"):
        return None
    row = conn.execute("SELECT value FROM warehouse_info WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """What the block writes, committed together or (on any exception) not at all."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def has_table(conn: duckdb.DuckDBPyConnection, table: str) -> bool:
    query = "SELECT count(*) FROM information_schema.tables WHERE table_name = ?"
    return conn.execute(query, [table]).fetchone()[0] > 0


def count(conn: duckdb.DuckDBPyConnection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
