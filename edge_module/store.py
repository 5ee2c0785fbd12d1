"""The edge's durable state: the outbox of capture records to forward, and each device's history.

One SQLite file in WAL mode. A commit is durable once the WAL is fsync'd, which a thread of its own
does for every commit made meanwhile (group commit, `_WalSync`): `record()` returns once its commit
is fsync'd, or at once with `durable=False` for a caller that awaits `synced()` before it answers,
so the event loop goes on serving while the disk syncs. A message acknowledged that way survives
SIGKILL and power loss. Every table and index a commit touches is at least one page
written to the WAL, so the tables have only the indexes they cannot do without: a message costs
five pages (seen and its time index, history and its key, the outbox). The WAL is copied into the
database file by a thread of its own (see `_checkpoint_continually`).

Writes from every thread share one connection guarded by a lock: SQLite lets one writer in at a
time anyway, and per-thread connections would only add SQLITE_BUSY waits between threads of one
process. Reads for other threads (the forwarder, metrics) use a second connection, which in WAL
mode neither waits for the writer nor holds it up; the checkpointer has its own.

The outbox's sequence numbers are AUTOINCREMENT: they never repeat, even once every row has been
shipped and deleted, because the forwarder names landing-zone files by them and a reused number
would make a new file look like one already delivered. A `shipment` row pins the file being sent
(name and sequence range) before it is sent, so a resend after a crash carries the same records
under the same name, whatever was recorded since.

History keeps only each device's current lifetime: a failure event closes it and deletes it. The
`seen` table remembers every recorded (device, message id) for dedupe: those of the current
lifetime always, older ones for `dedupe_window_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from turbofan_core.capture import CaptureRecord, encode_record
from turbofan_core.telemetry import MEASUREMENTS

DEFAULT_DEDUPE_WINDOW_SECONDS = 7 * 24 * 3600.0
FORMAT = "2"  # 2: the outbox holds Avro-encoded records
CHECKPOINT_SECONDS = 0.5
log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record BLOB NOT NULL,  -- the capture record in Avro's binary encoding (capture.encode_record)
    queued_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shipment (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    device_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (device_id, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_at ON seen (seen_at);
CREATE TABLE IF NOT EXISTS history (
    device_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    vals BLOB NOT NULL,  -- float64 values in MEASUREMENTS order
    PRIMARY KEY (device_id, message_id)
);
"""


class StoreFormatError(RuntimeError):
    """A state folder whose store was written in another format by another version of the edge."""


def _check_format(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a store of another format, rather than fail on every request (or lose its outbox)."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return  # a new store
    rows = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchall() if "meta" in tables else []
    found = rows[0][0] if rows else "1"  # the first format had no version
    if found != FORMAT:
        raise StoreFormatError(
            f"{path} is an edge store of format {found}, this edge writes format {FORMAT}: start the "
            "edge version that wrote it until its outbox is shipped, then move the file away"
        )


@dataclass(frozen=True)
class HistoryEntry:
    """One accepted message of a device, as its streaming features need it."""

    device_id: str
    message_id: str
    cycle: int
    values: tuple[float, ...]  # MEASUREMENTS order; empty for a failure event
    failure: bool

    @property
    def key(self) -> tuple[str, str]:
        """Its identity for dedupe."""
        return self.device_id, self.message_id

    def __post_init__(self) -> None:
        expected = 0 if self.failure else len(MEASUREMENTS)
        if len(self.values) != expected:
            raise ValueError(f"a {'failure' if self.failure else 'telemetry'} entry has {expected} values")


@dataclass(frozen=True)
class Shipment:
    """The landing-zone file being sent: its name and the outbox sequence numbers it holds."""

    name: str
    first_seq: int
    last_seq: int


# A history row's values: float64 in MEASUREMENTS order, native byte order (as array("d") wrote
# them), packed three times faster than through an array.
_VALUES = struct.Struct(f"={len(MEASUREMENTS)}d")
_OUTBOX_INSERT = "INSERT INTO outbox (record, queued_at) VALUES (?, ?)"
# Records are queued in time order, so the first is the oldest: no index on queued_at to update
# on every commit (each index is one more page written per commit).
_OLDEST = "SELECT queued_at FROM outbox ORDER BY seq LIMIT 1"
_LAST_SEQ = 2**63 - 1  # SQLite's largest integer: no upper bound on a sequence number
DELETE_CHUNK = 250  # outbox rows deleted per transaction once shipped: commits wait a ms at most


class _WalSync:
    """Group commit: fsyncs the WAL on a thread of its own, one fsync for every commit made while
    the one before ran. Commits are counted (`committed`); a commit is durable once `wait` or
    `wait_async` returns for its number. After a failed fsync nothing more is acknowledged: the
    kernel may have dropped the unwritten pages, so every wait raises that error from then on."""

    def __init__(self, wal: Path) -> None:
        self._fd = os.open(wal, os.O_RDONLY | os.O_CREAT, 0o600)
        self._changed = threading.Condition()
        self._committed = self._synced = 0
        self._error: OSError | None = None
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="edge-wal-sync", daemon=True)
        self._thread.start()

    def committed(self) -> int:
        """Count one more commit (call it after COMMIT); return its number."""
        with self._changed:
            if self._closing:
                raise RuntimeError("the store is closed")
            self._committed += 1
            self._changed.notify_all()
            return self._committed

    def committed_so_far(self) -> int:
        with self._changed:
            return self._committed

    def wait(self, number: int) -> None:
        with self._changed:
            while self._synced < number and self._error is None:
                self._changed.wait()
            if self._synced < number:
                raise _sync_failed(self._error)

    async def wait_async(self, number: int) -> None:
        with self._changed:
            if self._synced >= number:
                return
            if self._error is not None:
                raise _sync_failed(self._error)
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._waiters.append((number, loop, future))
        await future

    def _run(self) -> None:
        try:
            self._sync_until_closed()
        except BaseException as error:  # a bug here must fail the waits, never hang them
            with self._changed:
                self._error = OSError(f"the WAL sync thread stopped: {error!r}")
                self._changed.notify_all()
                waiting, self._waiters = self._waiters, []
            for _, loop, future in waiting:
                _settle_threadsafe(loop, future, self._error)
            raise

    def _sync_until_closed(self) -> None:
        while True:
            with self._changed:
                while self._committed == self._synced and not self._closing:
                    self._changed.wait()
                if self._committed == self._synced or self._error is not None:
                    return
                target = self._committed
            error = None
            try:
                os.fsync(self._fd)
            except OSError as failure:
                error = failure
            with self._changed:
                if error is None:
                    self._synced = target
                else:
                    self._error = error
                self._changed.notify_all()
                settled = [w for w in self._waiters if error is not None or w[0] <= target]
                self._waiters = [w for w in self._waiters if w not in settled]
            for _, loop, future in settled:
                _settle_threadsafe(loop, future, error)

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()
        os.close(self._fd)


def _settle_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], error: OSError | None
) -> None:
    try:
        loop.call_soon_threadsafe(_settle, future, error)
    except RuntimeError:  # the waiter's event loop is closed: nobody awaits the answer any more
        pass


def _settle(future: asyncio.Future[None], error: OSError | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(_sync_failed(error))


def _sync_failed(error: OSError | None) -> OSError:
    return OSError(f"the store's disk failed to sync: {error}")


class EdgeStore:
    """The outbox and device histories in the SQLite file `path`; safe to share between threads."""

    def __init__(
        self,
        path: str | Path,
        dedupe_window_seconds: float = DEFAULT_DEDUPE_WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dedupe_window_seconds = dedupe_window_seconds
        self.clock = clock
        self._lock = threading.Lock()
        # Autocommit mode: transactions are opened explicitly, so none is left open by accident.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: in WAL mode a commit is not fsync'd (_WalSync does that for every commit made
        # meanwhile), but a WAL restart and the checkpoint at the last close are.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=10000")  # another process (a CLI) may be reading
        self._conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        self._sync = _WalSync(Path(f"{self.path}-wal"))
        try:
            with self._transaction() as conn:
                _check_format(conn, self.path)
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", [FORMAT])
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", [uuid.uuid4().hex])
                [(self.store_id,)] = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchall()
        except BaseException:
            self._sync.close()
            self._conn.close()
            raise
        # Reads for the forwarder and metrics on their own connection: in WAL mode they neither wait
        # for the writer nor hold it up.
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._read_lock = threading.Lock()
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_continually, daemon=True)
        self._checkpointer.start()

    @contextmanager
    def _transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the lock; committed on success, and with `durable`
        fsync'd before this returns (otherwise `synced()` waits for it)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT may have rolled back already
                    self._conn.execute("ROLLBACK")
                raise
            ticket = self._sync.committed()
        if durable:
            self._sync.wait(ticket)

    async def synced(self) -> None:
        """Return once every commit made so far is fsync'd; OSError if the disk failed to sync."""
        await self._sync.wait_async(self._sync.committed_so_far())

    def _query(self, sql: str, parameters: tuple | list = ()) -> list[tuple]:
        """A read on the writer's connection: it sees what this process just committed."""
        with self._lock:
            return self._conn.execute(sql, parameters).fetchall()

    def _read(self, sql: str, parameters: tuple | list = ()) -> list[tuple]:
        """A read beside the writer (committed data only), for other threads."""
        with self._read_lock:
            return self._reader.execute(sql, parameters).fetchall()

    def close(self) -> None:
        self._closing.set()
        self._checkpointer.join()
        with self._read_lock:
            self._reader.close()
        with self._lock:  # no commit starts from here on
            self._sync.close()  # once every commit is synced
            self._conn.close()

    def _checkpoint_continually(self) -> None:
        """Copy the WAL into the database file on this thread, every CHECKPOINT_SECONDS.

        SQLite's own (automatic) checkpoint runs inside a commit, every 1,000 pages: it made one
        commit in a hundred wait 5 to 200 ms while it wrote and fsync'd the database file. Here
        the bulk of the copy runs beside the commits (a PASSIVE checkpoint never blocks them), in
        passes until one is short; only the frames committed during that last pass are copied with
        commits held, so the WAL is then fully copied and the next commit starts it again from the
        beginning instead of growing it.
        """
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")  # the WAL before, the database file after each copy
        try:
            while not self._closing.wait(CHECKPOINT_SECONDS):
                try:
                    for _ in range(5):  # each pass copies what was committed during the one before
                        started = time.monotonic()
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                        if time.monotonic() - started < 0.002:
                            break
                    with self._lock:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:  # a full disk: commits fail and say so; retried next time
                    log.warning("checkpoint of %s failed: %s", self.path, error)
        finally:
            conn.close()

    def __enter__(self) -> EdgeStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- recording --------------------------------------------------------------------------------

    def record(
        self, entries: list[tuple[CaptureRecord, HistoryEntry | None]], durable: bool = True
    ) -> list[bool]:
        """Queue each record for forwarding and add its entry to the device history, in one commit
        (fsync'd before this returns, unless `durable` is False: see `synced`).

        An entry whose (device, message id) was already recorded is a duplicate: nothing of it
        is written and its flag is False. A record without an entry (a malformed message, for
        the warehouse's quarantine) is always queued.
        """
        for record, entry in entries:
            if entry is not None and (record.device_id, record.message_id) != entry.key:
                raise ValueError(
                    f"entry of {'/'.join(entry.key)} given with a record of "
                    f"{record.device_id}/{record.message_id}"
                )
        flags: list[bool] = []
        with self._transaction(durable) as conn:
            now = self.clock()
            if self._record_new_telemetry(conn, entries, now):
                return [True] * len(entries)
            for record, entry in entries:
                if entry is not None:
                    inserted = conn.execute(
                        "INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", [*entry.key, now]
                    ).rowcount
                    if not inserted:
                        flags.append(False)
                        continue
                    if entry.failure:  # closes the lifetime: only the current one is kept
                        conn.execute("DELETE FROM history WHERE device_id = ?", [entry.device_id])
                    else:
                        conn.execute(
                            "INSERT INTO history VALUES (?, ?, ?, ?)",
                            [
                                entry.device_id,
                                entry.message_id,
                                entry.cycle,
                                _VALUES.pack(*entry.values),
                            ],
                        )
                conn.execute(_OUTBOX_INSERT, [encode_record(record), now])
                flags.append(True)
        return flags

    @staticmethod
    def _record_new_telemetry(
        conn: sqlite3.Connection, entries: list[tuple[CaptureRecord, HistoryEntry | None]], now: float
    ) -> bool:
        """The usual batch (telemetry the caller found new) in three statements; False (nothing
        written) when any entry is a failure event, has no history entry, or was seen after all."""
        if not entries or any(entry is None or entry.failure for _, entry in entries):
            return False
        keys = [(*entry.key, now) for _, entry in entries]
        conn.execute("SAVEPOINT new_telemetry")
        before = conn.total_changes
        conn.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", keys)
        if conn.total_changes - before != len(keys):  # a repeat after all: the careful path decides
            conn.execute("ROLLBACK TO new_telemetry")
            conn.execute("RELEASE new_telemetry")
            return False
        conn.execute("RELEASE new_telemetry")
        conn.executemany(
            "INSERT INTO history VALUES (?, ?, ?, ?)",
            [(e.device_id, e.message_id, e.cycle, _VALUES.pack(*e.values)) for _, e in entries],
        )
        conn.executemany(_OUTBOX_INSERT, [(encode_record(record), now) for record, _ in entries])
        return True

    def seen_many(self, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (device id, message id) pairs were recorded, in one query per 10,000."""
        found: set[tuple[str, str]] = set()
        for start in range(0, len(keys), 10_000):
            chunk = keys[start : start + 10_000]
            values = ", ".join("(?, ?)" for _ in chunk)
            found.update(
                self._query(
                    # A join, so that each pair is one lookup in the primary key, not a scan of `seen`.
                    f"SELECT s.device_id, s.message_id FROM (VALUES {values}) AS v "
                    "JOIN seen AS s ON s.device_id = v.column1 AND s.message_id = v.column2",
                    [part for key in chunk for part in key],
                )
            )
        return found

    def seen(self, device_id: str, message_id: str) -> bool:
        return bool(
            self._query("SELECT 1 FROM seen WHERE device_id = ? AND message_id = ?", [device_id, message_id])
        )

    def lifetime_history(self, device_id: str) -> list[HistoryEntry]:
        """The device's telemetry since its last failure event, by cycle (then arrival)."""
        rows = self._query(
            "SELECT message_id, cycle, vals FROM history WHERE device_id = ? ORDER BY cycle, rowid",
            [device_id],
        )
        return [
            HistoryEntry(device_id, message_id, cycle, _VALUES.unpack(vals), False)
            for message_id, cycle, vals in rows
        ]

    def devices(self) -> list[str]:
        """Devices with telemetry in their current lifetime."""
        return [
            device for (device,) in self._read("SELECT DISTINCT device_id FROM history ORDER BY device_id")
        ]

    def purge(self) -> int:
        """Forget message ids older than the dedupe window, except the current lifetimes'; return how many."""
        with self._transaction() as conn:
            return conn.execute(
                "DELETE FROM seen WHERE seen_at < ? AND NOT EXISTS (SELECT 1 FROM history h "
                "WHERE h.device_id = seen.device_id AND h.message_id = seen.message_id)",
                [self.clock() - self.dedupe_window_seconds],
            ).rowcount

    # --- outbox -----------------------------------------------------------------------------------

    def take(
        self, limit: int, up_to_seq: int | None = None, after_seq: int = 0
    ) -> list[tuple[int, bytes, float]]:
        """The oldest queued records (at most `limit`, after `after_seq`, none after `up_to_seq`):
        seq, the record encoded (`capture.avro_file` makes them a file), queued_at."""
        return self._read(
            "SELECT seq, record, queued_at FROM outbox WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            [after_seq, _LAST_SEQ if up_to_seq is None else up_to_seq, limit],
        )

    def begin_shipment(self, shipment: Shipment) -> None:
        """Pin the file about to be sent, so a resend after a crash is the same file."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO shipment VALUES (1, ?, ?, ?)",
                [shipment.name, shipment.first_seq, shipment.last_seq],
            )

    def shipment(self) -> Shipment | None:
        """The pinned file not yet confirmed, if any."""
        rows = self._read("SELECT name, first_seq, last_seq FROM shipment")
        return Shipment(*rows[0]) if rows else None

    def mark_shipped(self, up_to_seq: int) -> None:
        """Delete the records up to `up_to_seq`, then the pinned shipment: they are in the landing zone.

        DELETE_CHUNK records per transaction, so commits of new messages wait for one chunk, not a
        whole file's. After a crash midway the shipment is still pinned: its resend holds the
        records left, under the same name, which the landing zone refuses, and this finishes.
        """
        while True:
            with self._transaction() as conn:
                deleted = conn.execute(
                    "DELETE FROM outbox WHERE seq IN "
                    "(SELECT seq FROM outbox WHERE seq <= ? ORDER BY seq LIMIT ?)",
                    [up_to_seq, DELETE_CHUNK],
                ).rowcount
                if deleted < DELETE_CHUNK:
                    conn.execute("DELETE FROM shipment")
                    return
            time.sleep(0.002)  # a lock is not fair: without a pause, waiting commits may never get in

    def expire(self, older_than: float) -> int:
        """Drop the unshipped records queued before `older_than`, in queue order (up to the first
        one that is not); return how many (the TTL drops).

        Called on every poll of the forwarder: the write transaction, which would compete with
        `record` for the lock, is only opened when the oldest record is too old.
        """
        [(oldest,)] = self._read(f"SELECT ({_OLDEST})")
        if oldest is None or oldest >= older_than:
            return 0
        with self._transaction() as conn:
            return conn.execute(
                "DELETE FROM outbox WHERE seq < coalesce("
                "(SELECT seq FROM outbox WHERE queued_at >= ? ORDER BY seq LIMIT 1), ?)",
                [older_than, _LAST_SEQ],
            ).rowcount

    def backlog(self) -> tuple[int, float | None]:
        """How many records wait, and when the oldest was queued."""
        [(count, oldest)] = self._read(f"SELECT count(*), ({_OLDEST}) FROM outbox")
        return count, oldest
