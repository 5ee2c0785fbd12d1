"""Incremental ingestion of landing-zone capture files into the warehouse.

The ledger `landing_files` holds one row per file name with the version (etag, or size and
mtime) and content hash last read. A file is read when it is new, when its version changed
(a non-atomic copy completed, a file replaced), or while it is unreadable; a file read whole
has its messages stored through `delivery` (duplicates dropped, lifetimes by device order)
in the same transaction as its ledger row, so a crash leaves all of a batch or none of it.
Empty files are left for later, never marked done. A file still unreadable after
`max_attempts` reads of one version is quarantined whole, with its reason, and no longer
retried until it changes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import numpy as np
import pandas as pd

from turbofan_core.capture import CorruptCaptureFile, read_columns
from turbofan_core.storage import ObjectStore, StoredFile
from turbofan_core.telemetry import MEASUREMENTS
from turbofan_warehouse import delivery
from turbofan_warehouse.parsing import ParsedFile, parse_file, quarantine_rows
from turbofan_warehouse.schema import INGESTED, QUARANTINED, UNREADABLE, ensure_schema

BATCH_RECORDS = 200_000
# Worker processes cost about half a second to start; below this many new files one
# process is as fast (figures in docs/benchmarks.md), and a sensor-triggered run
# usually finds only a few.
PARALLEL_MIN_FILES = 16
DEFAULT_MAX_ATTEMPTS = 3


@dataclass
class IngestReport:
    """What a run read and stored; `records` counts every record of the files read whole."""

    files: int = 0
    telemetry: int = 0
    failure_events: int = 0
    quarantined: int = 0
    duplicates: int = 0
    relabelled: int = 0  # stored rows whose lifetime changed because late data came before them
    unchanged: list[str] = field(default_factory=list)  # version changed, content the same
    waiting: list[str] = field(default_factory=list)  # empty files: not read, looked at again next run
    unreadable: dict[str, str] = field(default_factory=dict)  # file name -> reason; retried next run
    quarantined_files: dict[str, str] = field(default_factory=dict)  # file name -> reason; given up

    @property
    def records(self) -> int:
        return self.telemetry + self.failure_events + self.quarantined + self.duplicates


@dataclass(frozen=True)
class _Pending:
    file: StoredFile
    sha256: str | None  # of the content last read whole, if any
    attempts: int  # failed reads of this version so far


def pending_files(
    store: ObjectStore, conn: duckdb.DuckDBPyConnection | None
) -> tuple[list[_Pending], list[str]]:
    """Files to read, in name order, and the empty files left for later. `conn` may be a read-only
    snapshot (the landing-zone sensor asks the same question ingestion does), or None before
    anything was ingested."""
    rows = [] if conn is None else conn.execute(
        "SELECT name, version, sha256, status, attempts FROM landing_files"
    ).fetchall()  # fmt: skip
    ledger = {name: (version, sha256, status, attempts) for name, version, sha256, status, attempts in rows}
    pending: list[_Pending] = []
    waiting: list[str] = []
    for file in store.list_files():
        if file.size == 0:
            waiting.append(file.name)
            continue
        version, sha256, status, attempts = ledger.get(file.name, (None, None, None, 0))
        if version != file.version:
            pending.append(_Pending(file, sha256, 0))
        elif status == UNREADABLE:
            pending.append(_Pending(file, sha256, attempts))
    return pending, waiting


def _messages_frame(files: list[ParsedFile]) -> pd.DataFrame:
    """Valid messages of a batch, one row each, as `delivery` expects them."""
    measurements = np.concatenate([p.measurements for p in files])
    devices = pd.Series([d for p in files for d in p.devices], dtype=object)
    return pd.DataFrame(
        {
            "idx": np.arange(len(devices), dtype=np.int64),
            "device_id": devices,
            "message_id": pd.Series([m for p in files for m in p.message_ids], dtype=object),
            "is_failure": np.concatenate([p.failure for p in files]),
            "CycleTime": np.concatenate([p.cycles for p in files]),
            **{name: measurements[:, i] for i, name in enumerate(MEASUREMENTS)},
            "enqueued_time_utc": pd.Series([t for p in files for t in p.times], dtype=object),
            "source_file": np.repeat([p.name for p in files], [len(p.devices) for p in files]).astype(object),
            "position": np.concatenate([p.positions for p in files]),
        },
        copy=False,
    )


_LEDGER_COLUMNS = (
    "name, version, size, sha256, status, attempts, reason, run_id, read_at, "
    "records, telemetry, failure_events, quarantined, duplicates"
)


def _save_ledger(conn: duckdb.DuckDBPyConnection, rows: list[tuple]) -> None:
    conn.executemany(
        f"INSERT OR REPLACE INTO landing_files ({_LEDGER_COLUMNS}) VALUES ({', '.join('?' * 14)})", rows
    )


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class _Read:
    pending: _Pending
    data: bytes
    parsed: ParsedFile


def _write(
    conn: duckdb.DuckDBPyConnection,
    store: ObjectStore,
    reads: list[_Read],
    run_id: str | None,
    report: IngestReport,
) -> None:
    """Store a batch of whole files and their ledger rows in one transaction."""
    now = _now()
    frame = _messages_frame([read.parsed for read in reads])
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.register("batch_messages", frame)
        outcome = delivery.store_batch(conn)
        conn.unregister("batch_messages")
        quarantine = [row for read in reads for row in read.parsed.quarantine] + _rejected_records(
            store, reads, frame, outcome
        )
        quarantined = _quarantine(conn, quarantine, now)
        refused = np.zeros(len(frame), dtype=bool)
        refused[list(outcome.rejected)] = True
        ledger, start = [], 0
        for read in reads:
            parsed, file = read.parsed, read.pending.file
            stored = ~refused[start : start + len(parsed.devices)]
            start += len(parsed.devices)
            failures = int((stored & parsed.failure).sum())
            telemetry = int(stored.sum()) - failures
            held = quarantined.get(parsed.name, 0)
            duplicates = parsed.records - telemetry - failures - held
            ledger.append(
                (parsed.name, file.version, file.size, parsed.sha256, INGESTED, 0, None, run_id, now,
                 parsed.records, telemetry, failures, held, duplicates)
            )  # fmt: skip
            report.files += 1
            report.telemetry += telemetry
            report.failure_events += failures
            report.quarantined += held
            report.duplicates += duplicates
        _save_ledger(conn, ledger)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    report.relabelled += outcome.relabelled


def _conflict(message_id: str | None, device_id: str) -> str:
    return f"message id {message_id!r} from {device_id} has another body enqueued earlier"


def _rejected_records(
    store: ObjectStore, reads: list[_Read], frame: pd.DataFrame, outcome: delivery.Outcome
) -> list[tuple]:
    """Quarantine rows, raw records decoded again from their files (rare), for the valid messages the
    warehouse refused (a bad enqueued time, a message id reused for another body) and for the stored
    copies that a copy enqueued earlier with another body displaced."""
    reasons: dict[str, dict[int, str]] = {}
    for idx, verdict in outcome.rejected.items():
        if verdict == delivery.DUPLICATE:
            continue
        row = frame.iloc[idx]
        if verdict == delivery.BAD_TIME:
            reason = f"EnqueuedTimeUtc {row['enqueued_time_utc']!r} is not an ISO 8601 UTC time"
        else:
            reason = _conflict(row["message_id"], row["device_id"])
        reasons.setdefault(row["source_file"], {})[int(row["position"])] = reason
    for name, position, device_id, message_id in outcome.displaced:
        reasons.setdefault(name, {})[position] = _conflict(message_id, device_id)
    in_batch = {read.parsed.name: read.data for read in reads}
    return [
        row
        for name, at in reasons.items()
        for row in quarantine_rows(name, read_columns(in_batch.get(name) or store.read(name)), at)
    ]


def _quarantine(conn: duckdb.DuckDBPyConnection, rows: list[tuple], now: datetime) -> dict[str, int]:
    """Insert quarantined records not already held (a file read again); return the new ones per file."""
    if not rows:
        return {}
    frame = pd.DataFrame(
        rows,
        columns=[
            "source_file", "position", "device_id", "message_id", "enqueued_time_utc", "properties", "body",
            "reason",
        ],
    ).assign(quarantined_at=now)  # fmt: skip
    conn.register("new_quarantine", frame)
    added = conn.execute(
        "INSERT INTO telemetry_quarantine SELECT * FROM new_quarantine q WHERE NOT EXISTS ("
        "SELECT 1 FROM telemetry_quarantine t WHERE t.source_file = q.source_file AND t.position = q.position"
        ") RETURNING source_file"
    ).fetchall()
    conn.unregister("new_quarantine")
    return Counter(name for (name,) in added)


def _unreadable(
    conn: duckdb.DuckDBPyConnection,
    pending: _Pending,
    error: CorruptCaptureFile,
    max_attempts: int,
    run_id: str | None,
    report: IngestReport,
    log: logging.Logger,
) -> None:
    """Count a failed read; after `max_attempts` of one version, quarantine the file whole."""
    attempts = pending.attempts + 1
    given_up = attempts >= max_attempts
    status = QUARANTINED if given_up else UNREADABLE
    file = pending.file
    reason = str(error)
    _save_ledger(
        conn,
        [(file.name, file.version, file.size, pending.sha256, status, attempts, reason, run_id, _now(),
          0, 0, 0, 0, 0)],
    )  # fmt: skip
    if given_up:
        report.quarantined_files[file.name] = reason
        log.error("%s: quarantined whole after %d unreadable reads: %s", file.name, attempts, reason)
    else:
        report.unreadable[file.name] = reason
        log.warning(
            "%s: unreadable (read %d of %d), retried next run: %s", file.name, attempts, max_attempts, reason
        )


def _parsed_in_order(
    store: ObjectStore, pending: list[_Pending], workers: int
) -> Iterator[tuple[_Pending, bytes, ParsedFile | CorruptCaptureFile]]:
    """Parse files in worker processes (decoding is CPU-bound) while keeping name order.

    The main process reads the bytes, so any store works; at most two files per worker
    are in flight, which bounds memory.
    """
    if workers <= 1:
        for item in pending:
            data = store.read(item.file.name)
            yield item, data, parse_file(item.file.name, data)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        in_flight: deque[tuple[_Pending, bytes, Future]] = deque()
        for item in pending:
            data = store.read(item.file.name)
            in_flight.append((item, data, pool.submit(parse_file, item.file.name, data)))
            if len(in_flight) >= 2 * workers:
                done, done_data, future = in_flight.popleft()
                yield done, done_data, future.result()
        for done, done_data, future in in_flight:
            yield done, done_data, future.result()


def ingest_new_files(
    store: ObjectStore,
    conn: duckdb.DuckDBPyConnection,
    log: logging.Logger | None = None,
    batch_records: int = BATCH_RECORDS,
    workers: int | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    run_id: str | None = None,
) -> IngestReport:
    """Ingest every landing-zone file that is new, changed, or still unreadable.

    `workers` parsing processes (default: one per core for a backlog of at least
    PARALLEL_MIN_FILES files, else none). `run_id` is recorded in the ledger.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    log = log or logging.getLogger(__name__)
    report = IngestReport()
    ensure_schema(conn)
    pending, report.waiting = pending_files(store, conn)
    batch: list[_Read] = []
    batch_size = 0

    def flush() -> None:
        nonlocal batch_size
        if batch:
            _write(conn, store, batch, run_id, report)
        batch.clear()
        batch_size = 0

    if workers is None:
        workers = (os.cpu_count() or 1) if len(pending) >= PARALLEL_MIN_FILES else 1
    for item, data, parsed in _parsed_in_order(store, pending, workers):
        if isinstance(parsed, CorruptCaptureFile):
            _unreadable(conn, item, parsed, max_attempts, run_id, report, log)
            continue
        if parsed.sha256 == item.sha256:  # touched or copied again, same bytes: nothing to store
            conn.execute(
                "UPDATE landing_files SET version = ?, size = ?, status = ?, attempts = 0, reason = NULL, "
                "read_at = ? WHERE name = ?",
                [item.file.version, item.file.size, INGESTED, _now(), item.file.name],
            )
            report.unchanged.append(item.file.name)
            continue
        batch.append(_Read(item, data, parsed))
        batch_size += parsed.records
        if batch_size >= batch_records:
            flush()
    flush()
    return report
