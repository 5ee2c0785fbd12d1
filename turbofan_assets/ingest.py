"""Incremental ingestion of landing-zone capture files into the warehouse.

Each file is read once: its valid telemetry, failure events and quarantined records
are written in the same transaction as its row in `ingested_files`, so a rerun reads
only new files and a crash leaves either all of a file or none of it. Files are taken
in name order (IoT Hub names sort by partition, then time), and in batches so memory
stays bounded whatever the landing zone's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import numpy as np
import orjson
import pandas as pd

from turbofan_assets.warehouse import ensure_schema
from turbofan_core.capture import DEVICE_ID, CorruptCaptureFile, read_capture
from turbofan_core.labels import assign_lifetimes
from turbofan_core.storage import ObjectStore
from turbofan_core.telemetry import FAILURE, MEASUREMENTS, InvalidMessage, parse_message

BATCH_RECORDS = 200_000
_NO_MEASUREMENTS = (np.nan,) * len(MEASUREMENTS)


@dataclass
class IngestReport:
    files: int = 0
    telemetry: int = 0
    failure_events: int = 0
    quarantined: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # file name -> reason, retried next run

    @property
    def records(self) -> int:
        return self.telemetry + self.failure_events + self.quarantined


@dataclass
class _Batch:
    """Rows parsed from a run of files, not yet written."""

    files: list[tuple[str, int, int, int, int]] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    failure: list[bool] = field(default_factory=list)
    cycles: list[int] = field(default_factory=list)
    measurements: list[tuple[float, ...]] = field(default_factory=list)
    times: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    quarantine: list[tuple] = field(default_factory=list)

    @property
    def records(self) -> int:
        return len(self.devices) + len(self.quarantine)

    def add_file(self, name: str, data: bytes) -> None:
        """Parse a whole file; raises CorruptCaptureFile before adding anything."""
        records = read_capture(data)
        valid = failures = quarantined = 0
        for position, record in enumerate(records):
            system = record.system_properties
            try:
                message = parse_message(
                    record.body,
                    system.get(DEVICE_ID),
                    record.properties,
                    system.get("contentType"),
                    system.get("contentEncoding"),
                )
            except InvalidMessage as error:
                self.quarantine.append(
                    (
                        name,
                        position,
                        system.get(DEVICE_ID),
                        record.enqueued_time_utc,
                        orjson.dumps(record.properties).decode(),
                        record.body,
                        error.reason,
                    )
                )
                quarantined += 1
                continue
            is_failure = message.kind == FAILURE
            self.devices.append(message.device_id)
            self.failure.append(is_failure)
            self.cycles.append(message.cycle)
            self.measurements.append(_NO_MEASUREMENTS if is_failure else message.measurements)
            self.times.append(record.enqueued_time_utc)
            self.sources.append(name)
            self.positions.append(position)
            failures += is_failure
            valid += 1
        self.files.append((name, len(records), valid - failures, failures, quarantined))

    def frame(self, closed_lifetimes: dict[str, int]) -> pd.DataFrame:
        """Valid messages in arrival order, with their engine lifetime."""
        frame = pd.DataFrame(
            np.array(self.measurements, dtype=np.float64).reshape(-1, len(MEASUREMENTS)),
            columns=list(MEASUREMENTS),
        )
        frame.insert(0, "device_id", pd.Series(self.devices, dtype=object))
        frame.insert(1, "CycleTime", np.array(self.cycles, dtype=np.int64))
        frame["enqueued_time_utc"] = pd.Series(self.times, dtype=object)
        frame["source_file"] = pd.Series(self.sources, dtype=object)
        frame["position"] = np.array(self.positions, dtype=np.int64)
        is_failure = pd.Series(self.failure, dtype=bool)
        frame.insert(1, "lifetime", assign_lifetimes(frame["device_id"], is_failure, closed_lifetimes))
        frame["is_failure"] = is_failure
        return frame


def _closed_lifetimes(conn: duckdb.DuckDBPyConnection, devices: set[str]) -> dict[str, int]:
    if not devices:
        return {}
    rows = conn.execute(
        "SELECT device_id, count(*) FROM failure_events WHERE device_id IN (SELECT unnest(?)) "
        "GROUP BY device_id",
        [sorted(devices)],
    ).fetchall()
    return dict(rows)


_TELEMETRY_COLUMNS = ", ".join(
    ["device_id", "lifetime", "CycleTime", *MEASUREMENTS, "enqueued_time_utc", "source_file", "position"]
)
_FAILURE_COLUMNS = "device_id, lifetime, CycleTime, enqueued_time_utc, source_file, position"


def _write(conn: duckdb.DuckDBPyConnection, batch: _Batch) -> None:
    """Write a batch and mark its files ingested, all in one transaction."""
    now = datetime.now(UTC).replace(tzinfo=None)
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.register("batch_messages", batch.frame(_closed_lifetimes(conn, set(batch.devices))))
        conn.execute(
            f"INSERT INTO telemetry SELECT {_TELEMETRY_COLUMNS} FROM batch_messages WHERE NOT is_failure"
        )
        conn.execute(
            f"INSERT INTO failure_events SELECT {_FAILURE_COLUMNS} FROM batch_messages WHERE is_failure"
        )
        conn.unregister("batch_messages")
        if batch.quarantine:
            conn.executemany(
                "INSERT INTO telemetry_quarantine VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, now) for row in batch.quarantine],
            )
        conn.executemany(
            "INSERT INTO ingested_files VALUES (?, ?, ?, ?, ?, ?)",
            [(name, now, *counts) for name, *counts in batch.files],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def pending_files(store: ObjectStore, conn: duckdb.DuckDBPyConnection) -> list[str]:
    """Landing-zone files not yet ingested, in name order."""
    ensure_schema(conn)
    done = {name for (name,) in conn.execute("SELECT name FROM ingested_files").fetchall()}
    return [name for name in store.list_names() if name not in done]


def ingest_new_files(
    store: ObjectStore,
    conn: duckdb.DuckDBPyConnection,
    log: logging.Logger | None = None,
    batch_records: int = BATCH_RECORDS,
) -> IngestReport:
    """Ingest every landing-zone file not yet in `ingested_files`."""
    log = log or logging.getLogger(__name__)
    report = IngestReport()
    batch = _Batch()

    def flush() -> None:
        nonlocal batch
        if batch.files:
            _write(conn, batch)
            for _, _, telemetry, failures, quarantined in batch.files:
                report.files += 1
                report.telemetry += telemetry
                report.failure_events += failures
                report.quarantined += quarantined
        batch = _Batch()

    for name in pending_files(store, conn):
        try:
            batch.add_file(name, store.read(name))
        except CorruptCaptureFile as error:
            report.unreadable[name] = str(error)
            log.warning("%s: not ingested, will retry on the next run: %s", name, error)
            continue
        if batch.records >= batch_records:
            flush()
    flush()
    return report
