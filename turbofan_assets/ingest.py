"""Incremental ingestion of landing-zone capture files into the warehouse.

Each file is read once: its valid telemetry, failure events and quarantined records
are written in the same transaction as its row in `ingested_files`, so a rerun reads
only new files and a crash leaves either all of a file or none of it. Files are taken
in name order (IoT Hub names sort by partition, then time), and in batches so memory
stays bounded whatever the landing zone's size.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import numpy as np
import pandas as pd

from turbofan_assets.parsing import ParsedFile, parse_file
from turbofan_assets.warehouse import ensure_schema
from turbofan_core.capture import CorruptCaptureFile
from turbofan_core.labels import assign_lifetimes
from turbofan_core.storage import ObjectStore
from turbofan_core.telemetry import MEASUREMENTS

BATCH_RECORDS = 200_000
# Worker processes cost about half a second to start; below this many new files one
# process is as fast (figures in docs/benchmarks.md), and a sensor-triggered run
# usually finds only a few.
PARALLEL_MIN_FILES = 16


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


def _messages_frame(files: list[ParsedFile], closed_lifetimes: dict[str, int]) -> pd.DataFrame:
    """Valid messages of a batch in arrival order, with their engine lifetime."""
    devices = pd.Series([d for p in files for d in p.devices], dtype=object)
    is_failure = pd.Series(np.concatenate([p.failure for p in files]))
    measurements = np.concatenate([p.measurements for p in files])
    return pd.DataFrame(
        {
            "device_id": devices,
            "lifetime": assign_lifetimes(devices, is_failure, closed_lifetimes),
            "CycleTime": np.concatenate([p.cycles for p in files]),
            **{name: measurements[:, i] for i, name in enumerate(MEASUREMENTS)},
            "enqueued_time_utc": pd.Series([t for p in files for t in p.times], dtype=object),
            "source_file": np.repeat([p.name for p in files], [len(p.devices) for p in files]).astype(object),
            "position": np.concatenate([p.positions for p in files]),
            "is_failure": is_failure,
        },
        copy=False,
    )


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


def _write(conn: duckdb.DuckDBPyConnection, files: list[ParsedFile]) -> None:
    """Write a batch and mark its files ingested, all in one transaction."""
    now = datetime.now(UTC).replace(tzinfo=None)
    devices = {device for parsed in files for device in parsed.devices}
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.register("batch_messages", _messages_frame(files, _closed_lifetimes(conn, devices)))
        conn.execute(
            f"INSERT INTO telemetry SELECT {_TELEMETRY_COLUMNS} FROM batch_messages WHERE NOT is_failure"
        )
        conn.execute(
            f"INSERT INTO failure_events SELECT {_FAILURE_COLUMNS} FROM batch_messages WHERE is_failure"
        )
        conn.unregister("batch_messages")
        quarantine = [(*row, now) for parsed in files for row in parsed.quarantine]
        if quarantine:
            conn.executemany("INSERT INTO telemetry_quarantine VALUES (?, ?, ?, ?, ?, ?, ?, ?)", quarantine)
        conn.executemany(
            "INSERT INTO ingested_files VALUES (?, ?, ?, ?, ?, ?)",
            [(name, now, *counts) for name, *counts in (parsed.ledger_row() for parsed in files)],
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


def _parsed_in_order(
    store: ObjectStore, names: list[str], workers: int
) -> Iterator[tuple[str, ParsedFile | CorruptCaptureFile]]:
    """Parse files in worker processes (decoding is CPU-bound) while keeping name order.

    The main process reads the bytes, so any store works; at most two files per worker
    are in flight, which bounds memory.
    """
    if workers <= 1:
        yield from ((name, parse_file(name, store.read(name))) for name in names)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        in_flight: deque[tuple[str, Future]] = deque()
        for name in names:
            in_flight.append((name, pool.submit(parse_file, name, store.read(name))))
            if len(in_flight) >= 2 * workers:
                done, future = in_flight.popleft()
                yield done, future.result()
        for done, future in in_flight:
            yield done, future.result()


def ingest_new_files(
    store: ObjectStore,
    conn: duckdb.DuckDBPyConnection,
    log: logging.Logger | None = None,
    batch_records: int = BATCH_RECORDS,
    workers: int | None = None,
) -> IngestReport:
    """Ingest every landing-zone file not yet in `ingested_files`.

    `workers` parsing processes (default: one per core for a backlog of at least
    PARALLEL_MIN_FILES files, else none).
    """
    log = log or logging.getLogger(__name__)
    report = IngestReport()
    batch: list[ParsedFile] = []
    batch_size = 0

    def flush() -> None:
        nonlocal batch_size
        batch_size = 0
        if batch:
            _write(conn, batch)
            for parsed in batch:
                report.files += 1
                report.telemetry += parsed.telemetry
                report.failure_events += parsed.failure_events
                report.quarantined += len(parsed.quarantine)
            batch.clear()

    names = pending_files(store, conn)
    if workers is None:
        workers = (os.cpu_count() or 1) if len(names) >= PARALLEL_MIN_FILES else 1
    for name, parsed in _parsed_in_order(store, names, workers):
        if isinstance(parsed, CorruptCaptureFile):
            report.unreadable[name] = str(parsed)
            log.warning("%s: not ingested, will retry on the next run: %s", name, parsed)
            continue
        batch.append(parsed)
        batch_size += parsed.records
        if batch_size >= batch_records:
            flush()
    flush()
    return report
