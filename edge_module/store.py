"""The edge's durable state: the outbox of capture records to forward, and each device's history.

One SQLite file in WAL mode, written one request at a time: a `record()` call is one outbox row
(its records, Avro-encoded, one after another) and one `accepted` row (the dedupe key, cycle,
lifetime and values of each message it accepted), so a batch of 500 messages costs two inserts,
where a row per message cost five b-tree inserts each. What the hot path asks of that state (was
this message seen? what is this device's lifetime so far?) is answered from memory, loaded from
the file at start and changed only after each commit.

A commit is durable once the WAL is fsync'd, which a thread of its own (in C, without the
interpreter) does for every commit made meanwhile (group commit, `_WalSync`): `record()` returns
once its commit is fsync'd, or at once with `durable=False` for a caller that awaits `synced()`
before it answers, so the event loop goes on serving while the disk syncs. A message acknowledged
that way survives SIGKILL and power loss. The WAL is copied into the database file by a thread of
its own (see `_checkpoint_continually`).

Writes from every thread share one connection guarded by a lock: SQLite lets one writer in at a
time anyway, and per-thread connections would only add SQLITE_BUSY waits between threads of one
process. Reads for other threads (the forwarder, metrics) use a second connection, which in WAL
mode neither waits for the writer nor holds it up; the checkpointer has its own.

Every record has a sequence number, the outbox row's `first_seq` plus its place in the row. They
never repeat, even once every row has been shipped and deleted (the last one given is noted in
`meta` whenever outbox rows are deleted), because the forwarder names landing-zone files by them
and a reused number would make a new file look like one already delivered. A `shipment` row pins
the file being sent (name and sequence range, whole outbox rows) before it is sent, so a resend
after a crash carries the same records under the same name, whatever was recorded since.

Each accepted message carries its device's lifetime number; a failure event closes the lifetime
(`lifetimes` counts them), so an entry is in the current lifetime exactly when its number is the
device's. Dedupe remembers every (device, message id) of a current lifetime, and the others for
`dedupe_window_seconds` after they were recorded; `purge` forgets older ones and deletes the
`accepted` rows that hold nothing else. Keys and current lifetimes are held in memory (about 200
bytes a key, 350 more a current lifetime's message): memory grows with the message rate times the
window, and with the current lifetimes, and nothing else bounds it (`edge serve --dedupe-hours`).
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson

from edge_module._wal_sync import Syncer
from turbofan_core.telemetry import MEASUREMENTS

# A device behind an IoT Edge hub resends for at most the hub's timeToLiveSecs (7200 s by
# default): a day is twelve times that.
DEFAULT_DEDUPE_WINDOW_SECONDS = 24 * 3600.0
FORMAT = "3"  # 2: a row per record; 3: a row per request, dedupe and histories in memory
CHECKPOINT_SECONDS = 0.5
log = logging.getLogger(__name__)

# Columns after a large blob are read through its overflow pages: blobs come last.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    first_seq INTEGER PRIMARY KEY,  -- the sequence number of its first record, the others after it
    count INTEGER NOT NULL,
    queued_at REAL NOT NULL,
    records BLOB NOT NULL  -- the records one after another, Avro-encoded (an Avro block's data)
);
CREATE TABLE IF NOT EXISTS shipment (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS accepted (
    seq INTEGER PRIMARY KEY,  -- the sequence number of the request's first record
    accepted_at REAL NOT NULL,
    entries BLOB NOT NULL,  -- JSON: [[device id, message id, cycle, lifetime, failure], ...]
    vals BLOB NOT NULL  -- the telemetry entries' cycles and values in order (`_ENTRY`)
);
CREATE TABLE IF NOT EXISTS lifetimes (
    device_id TEXT PRIMARY KEY,
    closed INTEGER NOT NULL  -- failure events so far: the number of the current lifetime
) WITHOUT ROWID;
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


class HistoryEntry(NamedTuple):
    """One accepted message of a device, as its streaming features need it (a named tuple: the edge
    makes one per message). Its values travel packed, as the store keeps them: the edge packs a
    batch's at once (`pack_entries`), and the store writes them as they are."""

    device_id: str
    message_id: str
    cycle: int
    packed: bytes  # the cycle, then the MEASUREMENTS values (`_ENTRY`); empty for a failure event
    failure: bool

    @classmethod
    def telemetry(cls, device_id: str, message_id: str, cycle: int, values: Sequence[float]) -> HistoryEntry:
        return cls(device_id, message_id, cycle, _ENTRY.pack(cycle, *values), False)

    @classmethod
    def failure_event(cls, device_id: str, message_id: str, cycle: int) -> HistoryEntry:
        return cls(device_id, message_id, cycle, b"", True)

    @property
    def key(self) -> tuple[str, str]:
        """Its identity for dedupe."""
        return self.device_id, self.message_id

    @property
    def values(self) -> tuple[float, ...]:
        """The MEASUREMENTS values (none for a failure event)."""
        return _ENTRY.unpack(self.packed)[1:] if self.packed else ()


def pack_entries(cycles: np.ndarray, values: np.ndarray) -> list[bytes]:
    """`HistoryEntry.packed` of each cycle (int64) and row of MEASUREMENTS values (float64) at once:
    one table's bytes cut in rows, where packing each message's 25 numbers cost 0.5 µs a message."""
    table = np.empty(len(cycles), _ENTRY_ROW)
    table["cycle"], table["values"] = cycles, values
    data, size = table.tobytes(), _ENTRY.size
    return [data[at : at + size] for at in range(0, len(data), size)]


@dataclass(frozen=True)
class Shipment:
    """The landing-zone file being sent: its name and the outbox sequence numbers it holds."""

    name: str
    first_seq: int
    last_seq: int


_ENTRY = struct.Struct(f"=q{len(MEASUREMENTS)}d")  # a telemetry entry's cycle and values
_CYCLE = struct.Struct("=q")  # an entry's first field
_ENTRY_ROW = np.dtype([("cycle", "=i8"), ("values", "=f8", (len(MEASUREMENTS),))])  # the same, unaligned
_OLDEST = "SELECT queued_at FROM outbox ORDER BY first_seq LIMIT 1"
# Requests are queued in sequence order, so the last row holds the last number given (a lookup of
# the primary key, where max() over an expression would read every row).
_LAST_QUEUED = "SELECT first_seq + count - 1 FROM outbox ORDER BY first_seq DESC LIMIT 1"
_LAST_SEQ = 2**63 - 1  # SQLite's largest integer: no upper bound on a sequence number
DELETE_CHUNK = 250  # outbox records deleted per transaction (whole requests, one at least)
DELETE_PAUSE = 4.0  # after a chunk's delete, a pause this many times as long as it took
WRITER_CACHE_KIB = 16 * 1024  # the writing connection's page cache: a file's rows (see __init__)
PURGE_CHUNK = 200  # accepted rows settled per transaction by `purge`


class _WalSync:
    """Group commit: the WAL is fsync'd for every commit made while the fsync before ran, by a
    thread of `_wal_sync.Syncer` that never holds the interpreter (`_wal_sync.c` says why). Commits
    are counted (`committed`); a commit is durable once `wait` or `wait_async` returns for its
    number. After a failed fsync no later commit is acknowledged (the kernel may have dropped the
    unwritten pages): `wait` raises that error for any commit not fsync'd before it, `wait_async`
    for any commit.

    An event loop that waited watches the syncer's pipe, which gets a byte after each fsync, until
    the store closes. The watch holds the syncer, whose pipe closes with it: no loop ever watches a
    closed pipe, or a new file given its number."""

    def __init__(self, wal: Path) -> None:
        self._fd = os.open(wal, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            self._syncer = Syncer(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._lock = threading.Lock()
        self._waiters: dict[asyncio.AbstractEventLoop, list[tuple[int, asyncio.Future[None]]]] = {}
        self._watching: set[asyncio.AbstractEventLoop] = set()
        self._closed = False
        self.committed = self._syncer.committed  # count one more commit (after COMMIT): its number
        self.committed_so_far = self._syncer.committed_so_far

    def _synced(self) -> int:
        try:
            return self._syncer.synced()
        except OSError as error:
            raise _sync_failed(error) from None

    def wait(self, number: int) -> None:
        try:
            self._syncer.wait(number)
        except OSError as error:
            raise _sync_failed(error) from None

    async def wait_async(self, number: int) -> None:
        if self._synced() >= number:
            return
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._waiters.setdefault(loop, []).append((number, future))
            if loop not in self._watching and not self._closed:
                self._watching = {watching for watching in self._watching if not watching.is_closed()}
                loop.add_reader(self._syncer.fileno(), self._on_synced, loop)
                self._watching.add(loop)
        # The fsync may have ended since the check above, its byte read by another loop's watch
        # before this waiter was there to be found: look again now that it is.
        self._settle(loop)
        await future

    def _on_synced(self, loop: asyncio.AbstractEventLoop) -> None:
        """In `loop`, woken by the pipe: take the bytes, then settle what is due."""
        try:
            os.read(self._syncer.fileno(), 4096)
        except BlockingIOError:
            pass  # read by another loop, or a wake-up sent by one
        self._settle(loop)

    def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        """In `loop`: settle its waiters now due, and wake the other loops with some due (the
        pipe's bytes go to one reader)."""
        try:
            synced, failure = self._syncer.synced(), None
        except OSError as error:
            synced, failure = 0, error
        due: list[tuple[int, asyncio.Future[None]]] = []
        with self._lock:
            for waiting_loop, waiting in list(self._waiters.items()):
                now_due = [w for w in waiting if failure is not None or w[0] <= synced]
                if not now_due:
                    continue
                if waiting_loop is not loop:
                    try:
                        waiting_loop.call_soon_threadsafe(self._settle, waiting_loop)
                    except RuntimeError:  # that loop is closed: nobody awaits its answers any more
                        del self._waiters[waiting_loop]
                    continue
                due = now_due
                if len(due) < len(waiting):
                    self._waiters[loop] = [w for w in waiting if failure is None and w[0] > synced]
                else:
                    del self._waiters[loop]
        for _, future in due:
            if future.done():  # cancelled: the request was abandoned
                continue
            if failure is None:
                future.set_result(None)
            else:
                future.set_exception(_sync_failed(failure))

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """In `loop`, once the store closed: settle what waits, stop watching."""
        self._settle(loop)
        loop.remove_reader(self._syncer.fileno())

    def close(self) -> None:
        """Once every commit counted is fsync'd; each watching loop settles its waiters and stops
        watching (on its next turn), and no loop starts watching from then on."""
        self._syncer.close()
        with self._lock:
            self._closed = True
            loops, self._watching = self._watching, set()
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self._unwatch, loop)
            except RuntimeError:
                pass  # closed, and its watch with it
        os.close(self._fd)


def _sync_failed(error: OSError) -> OSError:
    return OSError(f"the store's disk failed to sync: {error}")


def _key(device_id: str, message_id: str) -> str:
    """A message's identity for dedupe, one string (device ids hold no NUL)."""
    return f"{device_id}\0{message_id}"


class Queued(NamedTuple):
    """Queued requests' records, read from the outbox as one run."""

    first_seq: int  # of their first record
    last_seq: int  # of their last record
    count: int  # records
    records: bytes  # Avro-encoded (capture.encode_record) one after another


@dataclass
class _Accepted:
    """What one `record()` call changes in memory, applied once its commit succeeded."""

    seq: int = 0  # its `accepted` row
    keys: set[str] = field(default_factory=set)  # `_key`s accepted
    history: list[tuple[str, str, bytes]] = field(default_factory=list)  # device, message id, `_ENTRY`
    closed: dict[str, int] = field(default_factory=dict)  # failure events per device, after this call
    records: int = 0  # queued for forwarding


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
        # In memory, under the lock, changed only after a commit: `_key(device, message id)` -> the
        # `accepted` row that recorded it; each device's current lifetime (message id -> cycle and
        # values packed, in arrival order); failure events per device so far. Strings, ints and
        # bytes only, so the garbage collector never walks these (they grow to millions of entries).
        self._seen: dict[str, int] = {}
        self._history: dict[str, dict[str, bytes]] = {}
        self._closed: dict[str, int] = {}
        # Autocommit mode: transactions are opened explicitly, so none is left open by accident.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # Deleted rows are zeroed only on pages written anyway: Debian's SQLite zeroes every freed
        # page (secure_delete ON), which wrote each shipped request's pages to the WAL a second time.
        self._conn.execute("PRAGMA secure_delete=FAST")
        # NORMAL: in WAL mode a commit is not fsync'd (_WalSync does that for every commit made
        # meanwhile), but a WAL restart and the checkpoint at the last close are.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=10000")  # another process (a CLI) may be reading
        self._conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        # The forwarder deletes a file's rows seconds after they were written: with SQLite's default
        # cache (2 MiB) they had left it, and each chunk's delete read its pages back from the
        # operating system, holding the lock (docs/benchmarks.md).
        self._conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        self._sync = _WalSync(Path(f"{self.path}-wal"))
        try:
            with self._transaction() as conn:
                _check_format(conn, self.path)
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                for key, value in (("format", FORMAT), ("store_id", uuid.uuid4().hex), ("last_seq", "0")):
                    conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", [key, value])
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                # Outbox rows are only deleted by transactions that note the last number given so far;
                # the other tables' numbers are a floor all the same.
                [given] = conn.execute(
                    f"SELECT max(coalesce(({_LAST_QUEUED}), 0), "
                    "coalesce((SELECT max(seq) FROM accepted), 0), "
                    "coalesce((SELECT max(last_seq) FROM shipment), 0))"
                ).fetchone()
                self.store_id, self._last_seq = meta["store_id"], max(int(meta["last_seq"]), given)
                self._load(conn)
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

    def _load(self, conn: sqlite3.Connection) -> None:
        """Dedupe keys and current lifetimes from the `accepted` rows (see `purge` for which keys)."""
        self._closed = dict(conn.execute("SELECT device_id, closed FROM lifetimes").fetchall())
        cutoff = self.clock() - self.dedupe_window_seconds
        rows = conn.execute("SELECT seq, accepted_at, entries, vals FROM accepted ORDER BY seq")
        for seq, accepted_at, entries, vals in rows:
            at = 0
            for device, message_id, _, lifetime, failure in orjson.loads(entries):
                current = lifetime == self._closed.get(device, 0)
                if not failure:
                    if current:
                        self._history.setdefault(device, {})[message_id] = vals[at : at + _ENTRY.size]
                    at += _ENTRY.size
                if (current and not failure) or accepted_at >= cutoff:
                    self._seen[_key(device, message_id)] = seq

    @contextmanager
    def _transaction(
        self, durable: bool = True, after_commit: Callable[[], None] | None = None
    ) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the lock; committed on success, then `after_commit` is run
        (still holding the lock), and with `durable` fsync'd before this returns (otherwise
        `synced()` waits for it)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT may have rolled back already
                    self._conn.execute("ROLLBACK")
                raise
            if after_commit is not None:
                after_commit()
            ticket = self._sync.committed()
        if durable:
            self._sync.wait(ticket)

    async def synced(self) -> None:
        """Return once every commit made so far is fsync'd; OSError if the disk failed to sync."""
        await self._sync.wait_async(self._sync.committed_so_far())

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

    def record(self, entries: list[tuple[bytes, HistoryEntry | None]], durable: bool = True) -> list[bool]:
        """Queue each record (Avro-encoded: `capture.encode_record`, or `encode_device_messages` for
        many) for forwarding and add its entry to the device history, in one commit (fsync'd before
        this returns, unless `durable` is False: see `synced`).

        An entry whose (device, message id) was already recorded is a duplicate: nothing of it
        is written and its flag is False. A record without an entry (a malformed message, for
        the warehouse's quarantine) is always queued.
        """
        if not entries:
            return []
        flags: list[bool] = []
        records: list[bytes] = []
        rows: list[tuple[str, str, int, int, bool]] = []
        vals: list[bytes] = []
        changes = _Accepted()
        seen, accepted, history = self._seen, changes.keys, changes.history  # the loop runs per message
        lifetimes: dict[str, int] = {}  # each device's lifetime number as this call goes
        with self._transaction(durable, after_commit=lambda: self._apply(changes)) as conn:
            for record, entry in entries:
                if entry is not None:
                    device, message_id, cycle, packed, failure = entry
                    if len(packed) != (0 if failure else _ENTRY.size):
                        kind = "failure" if failure else "telemetry"
                        raise ValueError(f"a {kind} entry of {len(packed)} bytes")
                    key = _key(device, message_id)
                    if key in seen or key in accepted:
                        flags.append(False)
                        continue
                    accepted.add(key)
                    lifetime = lifetimes.get(device)
                    if lifetime is None:
                        lifetime = lifetimes[device] = self._closed.get(device, 0)
                    rows.append((device, message_id, cycle, lifetime, failure))
                    if failure:
                        lifetimes[device] = changes.closed[device] = lifetime + 1
                        history[:] = [h for h in history if h[0] != device]
                    else:
                        vals.append(packed)
                        history.append((device, message_id, packed))
                records.append(record)
                flags.append(True)
            now = self.clock()
            if records:
                conn.execute(
                    "INSERT INTO outbox VALUES (?, ?, ?, ?)",
                    [self._last_seq + 1, len(records), now, b"".join(records)],
                )
            if rows:
                changes.seq = self._last_seq + 1  # its first record's: never repeats
                conn.execute(
                    "INSERT INTO accepted VALUES (?, ?, ?, ?)",
                    [changes.seq, now, orjson.dumps(rows), b"".join(vals)],
                )
            conn.executemany(
                "INSERT INTO lifetimes VALUES (?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET closed = excluded.closed",
                changes.closed.items(),
            )
            changes.records = len(records)
        return flags

    def _apply(self, changes: _Accepted) -> None:
        for device, closed in changes.closed.items():
            self._closed[device] = closed
            self._history.pop(device, None)
        history = self._history
        for device, message_id, packed in changes.history:
            history.setdefault(device, {})[message_id] = packed
        self._seen.update(dict.fromkeys(changes.keys, changes.seq))
        self._last_seq += changes.records

    def seen_many(self, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (device id, message id) pairs were recorded."""
        with self._lock:
            return {key for key in keys if _key(*key) in self._seen}

    def seen(self, device_id: str, message_id: str) -> bool:
        return bool(self.seen_many([(device_id, message_id)]))

    def lifetime_history(self, device_id: str) -> list[HistoryEntry]:
        """The device's telemetry since its last failure event, by cycle (then arrival)."""
        with self._lock:
            stored = list(self._history.get(device_id, {}).items())
        entries = [
            HistoryEntry(device_id, message_id, _CYCLE.unpack_from(packed)[0], packed, False)
            for message_id, packed in stored
        ]
        return sorted(entries, key=lambda entry: entry.cycle)

    def devices(self) -> list[str]:
        """Devices with telemetry in their current lifetime."""
        with self._lock:
            return sorted(device for device, history in self._history.items() if history)

    def purge(self) -> int:
        """Forget message ids older than the dedupe window, except the current lifetimes'; return how
        many. An `accepted` row older than the window that holds none of a current lifetime is deleted.

        The old rows are read and decoded beside the writer, PURGE_CHUNK at a time (memory holds one
        chunk, not the hour's rows, millions at a high rate); each chunk is then checked and settled
        under the lock (a row only ever stops holding a current entry, and a key recorded again
        since names a newer row), so requests wait for one chunk at most.
        """
        cutoff = self.clock() - self.dedupe_window_seconds
        forgotten = after = 0
        while True:
            rows = self._read(
                "SELECT seq, entries FROM accepted WHERE accepted_at < ? AND seq > ? ORDER BY seq LIMIT ?",
                [cutoff, after, PURGE_CHUNK],
            )
            if not rows:
                return forgotten
            after = rows[-1][0]
            old = [(seq, orjson.loads(entries)) for seq, entries in rows]  # decoded outside the lock
            keys: list[str] = []

            def forget(keys: list[str] = keys) -> None:
                for key in keys:
                    del self._seen[key]

            with self._transaction(after_commit=forget) as conn:
                done = []
                for seq, entries in old:
                    current = False
                    for device, message_id, _, lifetime, failure in entries:
                        if not failure and lifetime == self._closed.get(device, 0):
                            current = True
                        elif self._seen.get(key := _key(device, message_id)) == seq:  # not recorded since
                            keys.append(key)
                    if not current:
                        done.append((seq,))
                conn.executemany("DELETE FROM accepted WHERE seq = ?", done)
            forgotten += len(keys)

    # --- outbox -----------------------------------------------------------------------------------

    def take(self, limit: int, up_to_seq: int | None = None) -> Queued | None:
        """The oldest queued requests, whole, through the one that holds the `limit`th record from the
        oldest (sequence numbers are given without gaps), none whose first record is after
        `up_to_seq` (callers pass a request's last record); None if there are none.

        SQLite joins their records in one step, so a file's worth of single-message requests is
        read with one hand-over of the interpreter instead of one a row (sqlite3 lets go of the
        interpreter for each row it steps to, and the request path's thread then waits to get it
        back). Each request's records are whole, so the run is whole records whatever order SQLite
        joins them in (it follows the subquery's, by rowid)."""
        [(first, last, count, records)] = self._read(
            "SELECT min(first_seq), max(first_seq + count - 1), sum(count), "
            "CAST(group_concat(records, '') AS BLOB) FROM ("
            "SELECT * FROM outbox WHERE first_seq <= ? AND first_seq < "
            "(SELECT first_seq FROM outbox ORDER BY first_seq LIMIT 1) + ? "
            "ORDER BY first_seq)",
            [_LAST_SEQ if up_to_seq is None else up_to_seq, limit],
        )
        return None if first is None else Queued(first, last, count, records)

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
        """Delete the records up to `up_to_seq`, then the pinned shipment (with the last of them):
        they are in the landing zone.

        About DELETE_CHUNK records per transaction, so commits of new messages wait for one chunk,
        not a whole file's. After a crash midway the shipment is still pinned: its resend holds the
        records left, under the same name, which the landing zone refuses, and this finishes.
        """
        self._delete_in_chunks(up_to_seq, last=lambda conn: conn.execute("DELETE FROM shipment"))

    def expire(self, older_than: float) -> int:
        """Drop the unshipped records queued before `older_than`, in queue order (up to the first
        one that is not); return how many (the TTL drops).

        Called on every poll of the forwarder: a write transaction, which would compete with
        `record` for the lock, is only opened when the oldest record is too old, and then one per
        DELETE_CHUNK records.
        """
        [(oldest,)] = self._read(f"SELECT ({_OLDEST})")
        if oldest is None or oldest >= older_than:
            return 0
        [(first_kept,)] = self._read(
            "SELECT coalesce("
            "(SELECT first_seq FROM outbox WHERE queued_at >= ? ORDER BY first_seq LIMIT 1), ?)",
            [older_than, _LAST_SEQ],
        )
        return self._delete_in_chunks(first_kept - 1)

    def _delete_in_chunks(
        self, up_to_seq: int, last: Callable[[sqlite3.Connection], object] | None = None
    ) -> int:
        """Delete the outbox rows whose first record is at most `up_to_seq`, about DELETE_CHUNK records
        a transaction, pausing in between; `last` runs in the transaction that deletes the last of
        them. How many records.

        Each pause lasts DELETE_PAUSE times as long as the chunk before it took: commits of new
        messages wait for the lock (and share the fsync of the pages a delete rewrote), and at a
        steady 1,000 single messages a second, deleting a file's 5,000 rows with pauses of 2 ms made
        the request path fall 30 ms behind every time. The deletes are not waited for to be fsync'd
        (the next commit's fsync takes them): one lost in a crash only has the forwarder send its
        records again under the same name, which the landing zone refuses."""
        deleted = 0
        while True:
            started = time.monotonic()
            with self._transaction(durable=False) as conn:
                if not deleted:  # the first transaction: see _note_last_seq
                    self._note_last_seq(conn)
                count, more = self._delete_chunk(conn, up_to_seq)
                if not more and last is not None:
                    last(conn)
            deleted += count
            if not more:
                return deleted
            time.sleep(DELETE_PAUSE * (time.monotonic() - started))

    def _delete_chunk(self, conn: sqlite3.Connection, up_to_seq: int) -> tuple[int, bool]:
        """Delete the outbox's oldest rows, whole, up to DELETE_CHUNK records (one at least) and none
        whose first record is after `up_to_seq`; return how many records, and whether rows up to it
        are left. Sequence numbers have no gaps (see `take`): the records deleted run from the first
        row's to the end of the last row's, which is found from the chunk's bound through the
        primary key. Only the delete reads the chunk's rows, and none is handed to the interpreter."""
        [(oldest,)] = conn.execute("SELECT min(first_seq) FROM outbox")
        if oldest is None or oldest > up_to_seq:
            return 0, False
        end = oldest + DELETE_CHUNK  # no record of the chunk at or past it, but the oldest row's
        # One bound on first_seq, so the search for the last row starts from it.
        chunk = "first_seq < ? AND (first_seq = ? OR first_seq + count <= ?)"
        arguments = [min(end, up_to_seq + 1), oldest, end]
        [(after,)] = conn.execute(
            f"SELECT first_seq + count FROM outbox WHERE {chunk} ORDER BY first_seq DESC LIMIT 1", arguments
        )
        conn.execute(f"DELETE FROM outbox WHERE {chunk}", arguments)
        [(more,)] = conn.execute("SELECT EXISTS (SELECT 1 FROM outbox WHERE first_seq <= ?)", [up_to_seq])
        return after - oldest, bool(more)

    def _note_last_seq(self, conn: sqlite3.Connection) -> None:
        """Keep the last sequence number given in `meta` before outbox rows are deleted (a commit
        does not write it: the outbox's last row holds it), so that numbers never come back."""
        [(queued,)] = conn.execute(f"SELECT coalesce(({_LAST_QUEUED}), 0)").fetchall()
        conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", [str(max(self._last_seq, queued))])

    def backlog(self) -> tuple[int, float | None]:
        """How many records wait, and when the oldest was queued."""
        [(waiting, oldest)] = self._read(f"SELECT coalesce(sum(count), 0), ({_OLDEST}) FROM outbox")
        return waiting, oldest
