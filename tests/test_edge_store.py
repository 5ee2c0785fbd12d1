"""The edge store on a real SQLite file: dedupe, lifetime histories, the outbox, and what a SIGKILL leaves."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import REPO_ROOT

from edge_module import store as store_module
from edge_module.forwarder import Forwarder, capture_file
from edge_module.store import EdgeStore, HistoryEntry, StoreFormatError, _WalSync, pack_entries
from turbofan_core.capture import CaptureRecord, avro_file, device_message, encode_record, read_capture
from turbofan_core.storage import LocalStore, ObjectStore
from turbofan_core.telemetry import FAILURE, MEASUREMENTS, encode_body
from turbofan_warehouse.ingest import ingest_new_files

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
Entry = tuple[bytes, HistoryEntry | None]  # a record Avro-encoded, as the edge records it


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def telemetry(device: str, message_id: str, cycle: int, base: float = 0.0) -> Entry:
    """A valid telemetry message and its history entry; values chosen to test float round trips."""
    values = tuple(base + cycle / 3 + k for k in range(len(MEASUREMENTS)))
    body = encode_body({"CycleTime": cycle, **dict(zip(MEASUREMENTS, values, strict=True))})
    record = device_message(device, body, T0 + timedelta(seconds=cycle), {}, message_id)
    return encode_record(record), HistoryEntry.telemetry(device, message_id, cycle, values)


def failure(device: str, message_id: str, cycle: int) -> Entry:
    body = encode_body({"CycleTime": cycle})
    record = device_message(device, body, T0 + timedelta(seconds=cycle), {"type": FAILURE}, message_id)
    return encode_record(record), HistoryEntry.failure_event(device, message_id, cycle)


def malformed(device: str, message_id: str) -> Entry:
    return encode_record(device_message(device, b"not json", T0, {"why": "test"}, message_id)), None


def records(*entries: Entry) -> list[CaptureRecord]:
    """The records of `entries`, decoded."""
    return read_capture(avro_file(record for record, _ in entries))


def outbox(store: EdgeStore) -> list[CaptureRecord]:
    queued = store.take(1_000_000)
    return [] if queued is None else read_capture(capture_file(queued))


def cycles(store: EdgeStore, device: str) -> list[int]:
    return [entry.cycle for entry in store.lifetime_history(device)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EdgeStore]:
    with EdgeStore(tmp_path / "edge.sqlite") as store:
        yield store


def test_record_queues_every_record_and_drops_duplicates(store: EdgeStore) -> None:
    a1, a2, b1 = telemetry("A", "m1", 1), telemetry("A", "m2", 2), telemetry("B", "m1", 1)
    bad = malformed("A", "x")
    assert store.record([a1, a2, bad]) == [True, True, True]
    # A resend (later or in the same group) is refused; the same id on another device is not.
    assert store.record([a2, b1, b1, bad]) == [False, True, False, True]
    assert outbox(store) == records(a1, a2, bad, b1, bad)
    assert store.seen("A", "m2") and store.seen("B", "m1") and not store.seen("B", "m2")
    assert not store.seen("A", "x")  # malformed messages have no identity here
    assert store.devices() == ["A", "B"]
    assert store.lifetime_history("A") == [a1[1], a2[1]]


def test_an_entry_must_hold_its_kinds_values(store: EdgeStore) -> None:
    record, entry = telemetry("A", "m1", 1)
    with pytest.raises(ValueError, match="a telemetry entry of 8 bytes"):
        store.record([(record, entry._replace(packed=entry.packed[:8]))])
    with pytest.raises(ValueError, match="a failure entry of 200 bytes"):
        store.record([(record, entry._replace(failure=True))])
    assert outbox(store) == [] and not store.seen("A", "m1")
    assert store.record([(record, entry)]) == [True]
    with pytest.raises(ValueError, match="a telemetry entry of 16 bytes"):  # a duplicate too
        store.record([(record, entry._replace(packed=entry.packed[:16]))])


def test_a_batchs_entries_packed_at_once_are_each_ones_packing() -> None:
    """The edge packs a batch's values in one table (`pack_entries`): the same bytes as each alone."""
    rng = np.random.default_rng(7)
    cycles = rng.integers(1, 2**40, 50)
    values = rng.normal(500, 300, (50, len(MEASUREMENTS)))
    values[3, 5], values[4, 0] = -0.0, 1e-310  # a negative zero and a subnormal keep their bits
    packed = pack_entries(cycles, values)
    for cycle, row, one in zip(cycles.tolist(), values.tolist(), packed, strict=True):
        entry = HistoryEntry.telemetry("A", "m", cycle, row)
        assert one == entry.packed
        assert entry._replace(packed=one).values == tuple(row)


def test_a_group_is_recorded_whole_or_not_at_all(store: EdgeStore) -> None:
    good = telemetry("A", "m1", 1)
    record, entry = telemetry("B", "m1", 1)
    # A device id that is not text fails the second insert (its entries as JSON), after the first.
    unwritable = (record, entry._replace(device_id=b"B"))
    with pytest.raises(TypeError):
        store.record([good, unwritable])
    assert outbox(store) == [] and store.devices() == [] and not store.seen("A", "m1")
    assert store.record([good]) == [True]


def test_history_comes_back_in_cycle_order_with_exact_values(tmp_path: Path) -> None:
    entries = [telemetry("A", f"m{cycle}", cycle, base=0.1) for cycle in (3, 1, 4, 2)]
    with EdgeStore(tmp_path / "edge.sqlite") as store:
        store.record(entries[:2])
        store.record(entries[2:])
    with EdgeStore(tmp_path / "edge.sqlite") as reopened:
        history = reopened.lifetime_history("A")
    assert [entry.cycle for entry in history] == [1, 2, 3, 4]
    assert history == sorted((entry for _, entry in entries), key=lambda entry: entry.cycle)


def test_a_failure_event_starts_a_new_lifetime(store: EdgeStore) -> None:
    store.record([telemetry("A", f"m{cycle}", cycle) for cycle in (1, 2, 3)] + [telemetry("B", "b1", 1)])
    assert store.record([failure("A", "f1", 3), telemetry("A", "n1", 1)]) == [True, True]
    assert cycles(store, "A") == [1] and cycles(store, "B") == [1]
    # The closed lifetime's ids and the failure's own id are still duplicates.
    assert store.record([telemetry("A", "m2", 2), failure("A", "f1", 3)]) == [False, False]
    assert cycles(store, "A") == [1]
    store.record([failure("B", "fb", 1)])
    assert store.devices() == ["A"] and store.lifetime_history("B") == []
    assert len(outbox(store)) == 7  # every accepted message is forwarded, failure events too


def test_failure_events_in_one_call_each_close_a_lifetime(tmp_path: Path) -> None:
    """Lifetimes are numbered as the call goes: two failure events of a device in one request close
    two lifetimes, and only the telemetry after the second is the current one, also after a restart."""
    path = tmp_path / "edge.sqlite"
    with EdgeStore(path) as store:
        store.record([telemetry("A", "a1", 1)])
        group = [telemetry("A", "a2", 2), failure("A", "f1", 2), telemetry("A", "b1", 1)]
        group += [failure("A", "f2", 1), telemetry("A", "c1", 1), telemetry("A", "c2", 2)]
        assert store.record(group) == [True] * 6
        assert [e.message_id for e in store.lifetime_history("A")] == ["c1", "c2"]
    with EdgeStore(path) as store:
        assert [e.message_id for e in store.lifetime_history("A")] == ["c1", "c2"]
        assert store.record([failure("A", "f3", 2)]) == [True]
        assert store.lifetime_history("A") == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT closed FROM lifetimes WHERE device_id = 'A'").fetchone() == (3,)


@pytest.mark.parametrize("chunk", [1, store_module.PURGE_CHUNK])
def test_purge_forgets_old_lifetimes_ids_after_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(store_module, "PURGE_CHUNK", chunk)  # a row a read, as many as there are
    clock = FakeClock()
    with EdgeStore(tmp_path / "edge.sqlite", dedupe_window_seconds=100.0, clock=clock) as store:
        store.record([telemetry("A", "old", 1), failure("A", "f", 1), telemetry("A", "current", 1)])
        clock.now += 50
        store.record([telemetry("A", "recent", 2)])
        assert store.purge() == 0
        clock.now += 60  # "old", "f" and "current" are 110 s old, "recent" 60 s
        assert store.purge() == 2  # "current" stays: its lifetime is still going on
        assert not store.seen("A", "old") and not store.seen("A", "f")
        assert store.seen("A", "current") and store.seen("A", "recent")
        assert store.record([telemetry("A", "current", 1), telemetry("A", "old", 1)]) == [False, True]
        # "old" is in the current lifetime again: a later purge reads the first request once more (it
        # holds "current") and must not forget "old" for the copy of the closed lifetime it holds.
        clock.now += 200
        assert store.purge() == 0
    with EdgeStore(tmp_path / "edge.sqlite", dedupe_window_seconds=100.0, clock=clock) as reopened:
        assert reopened.seen("A", "old") and reopened.seen("A", "current")
        assert not reopened.seen("A", "f")


@pytest.mark.parametrize("chunk", [1, store_module.PURGE_CHUNK])
def test_a_restart_rebuilds_dedupe_and_lifetimes_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(store_module, "PURGE_CHUNK", chunk)  # purge reads a row at a time, or all
    clock = FakeClock()
    path = tmp_path / "edge.sqlite"
    with EdgeStore(path, dedupe_window_seconds=100.0, clock=clock) as store:
        # One request holds both devices; A's lifetime closes in a later one.
        store.record([telemetry("A", "a1", 1), telemetry("B", "b1", 1), telemetry("A", "a2", 2)])
        store.record([failure("A", "fa", 2), telemetry("A", "a3", 1)])
        before = {device: store.lifetime_history(device) for device in ("A", "B")}
    with EdgeStore(path, dedupe_window_seconds=100.0, clock=clock) as store:
        assert {device: store.lifetime_history(device) for device in ("A", "B")} == before
        assert cycles(store, "A") == [1] and [e.message_id for e in store.lifetime_history("A")] == ["a3"]
        assert all(store.seen("A", m) for m in ("a1", "a2", "fa", "a3")) and store.seen("B", "b1")
        clock.now += 101  # past the window: only the current lifetimes' ids are remembered
    with EdgeStore(path, dedupe_window_seconds=100.0, clock=clock) as store:
        assert [store.seen("A", m) for m in ("a1", "a2", "fa", "a3")] == [False, False, False, True]
        assert store.seen("B", "b1") and cycles(store, "B") == [1]
        assert store.purge() == 0  # the restart forgot what the purge would have
        assert store.record([telemetry("A", "a1", 2)]) == [True]  # a new message now
        assert cycles(store, "A") == [1, 2]
        store.record([failure("A", "fa2", 3), failure("B", "fb", 2)])
        clock.now += 101
        assert store.purge() == 5  # b1, a3, a1, fa2, fb: no lifetime is open any more
    with sqlite3.connect(path) as conn:  # and nothing is kept for them
        assert conn.execute("SELECT count(*) FROM accepted").fetchone() == (0,)


def test_outbox_take_mark_expire_backlog(tmp_path: Path) -> None:
    clock = FakeClock(100.0)
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:
        assert store.backlog() == (0, None)
        store.record([telemetry("A", "m1", 1), telemetry("A", "m2", 2)])  # records 1 and 2, one row
        clock.now = 150.0
        store.record([telemetry("A", "m3", 3)])
        clock.now = 200.0
        store.record([telemetry("A", "m4", 4), malformed("A", "x")])
        assert store.backlog() == (5, 100.0)
        # Whole requests, as one run (first, last, records): through the one holding the limit's record.
        assert store.take(1)[:3] == store.take(2)[:3] == (1, 2, 2)
        assert store.take(3)[:3] == (1, 3, 3)
        assert store.take(4)[:3] == (1, 5, 5)  # the 4th record is in the request of records 4 and 5
        assert store.take(10, up_to_seq=3)[:3] == (1, 3, 3)
        taken = store.take(10)
        assert taken is not None and taken[:3] == (1, 5, 5)
        assert [r.message_id for r in read_capture(capture_file(taken))] == ["m1", "m2", "m3", "m4", "x"]
        store.mark_shipped(2)
        assert store.take(10)[:3] == (3, 5, 3)
        assert store.expire(200.0) == 1  # m3: queued at 150
        assert store.backlog() == (2, 200.0)
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:
        store.mark_shipped(5)
        assert store.backlog() == (0, None)
    # Sequence numbers never come back, even once the outbox was empty and the edge restarted: files
    # are named by them.
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:
        store.record([telemetry("A", "m5", 5)])
        assert store.take(10)[:3] == (6, 6, 1)
        clock.now = 300.0
        assert store.expire(301.0) == 1
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:  # emptied by the TTL this time
        store.record([telemetry("A", "m6", 6)])
        assert store.take(10)[:3] == (7, 7, 1)


def test_deletes_take_whole_requests_about_delete_chunk_records_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "DELETE_CHUNK", 3)
    with EdgeStore(tmp_path / "edge.sqlite") as store:
        store.record([telemetry("A", "m1", 1), telemetry("A", "m2", 2)])  # records 1-2
        store.record([telemetry("B", f"b{c}", c) for c in range(1, 11)])  # 3-12: larger than a chunk
        store.record([telemetry("A", "m3", 3)])  # 13
        store.record([telemetry("A", "m4", 4)])  # 14
        with store._transaction() as conn:
            assert store._delete_chunk(conn, 12) == (2, True)  # 3-12 would pass 3
            assert store._delete_chunk(conn, 12) == (10, False)  # one request at least
            assert store._delete_chunk(conn, 12) == (0, False)
            assert store._delete_chunk(conn, 13) == (1, False)  # 14 would fit the chunk, not the bound
            assert store._delete_chunk(conn, 20) == (1, False)
        assert store.backlog()[0] == 0


def test_after_a_failed_fsync_no_commit_is_acknowledged() -> None:
    sync = _WalSync(Path("/dev/null"))  # fsync of /dev/null fails (EINVAL): a real failing disk call
    try:
        first = sync.committed()
        with pytest.raises(OSError, match="failed to sync"):
            sync.wait(first)
        with pytest.raises(OSError, match="failed to sync"):
            sync.wait(first)  # and every later wait, sync or async: nothing is acknowledged any more
        with pytest.raises(OSError, match="failed to sync"):
            asyncio.run(sync.wait_async(first))
    finally:
        sync.close()


def test_waits_pending_when_the_fsync_fails_get_the_error() -> None:
    async def wait_for_each(sync: _WalSync) -> list[BaseException | None]:
        numbers = [sync.committed() for _ in range(3)]
        waits = asyncio.gather(*(sync.wait_async(n) for n in numbers), return_exceptions=True)
        return await asyncio.wait_for(waits, timeout=30)  # a wait never answered fails here

    for _ in range(20):  # the failure lands before or after the waits are registered
        sync = _WalSync(Path("/dev/null"))
        try:
            outcomes = asyncio.run(wait_for_each(sync))
        finally:
            sync.close()
        assert all(isinstance(o, OSError) and "failed to sync" in str(o) for o in outcomes), outcomes


def test_a_commit_is_acknowledged_once_the_wal_is_synced(tmp_path: Path) -> None:
    async def record_then_wait(store: EdgeStore) -> list[bool]:
        flags = store.record([telemetry("A", "m1", 1)], durable=False)
        await store.synced()
        return flags

    with EdgeStore(tmp_path / "edge.sqlite") as store:
        assert asyncio.run(record_then_wait(store)) == [True]
        assert store.record([telemetry("A", "m2", 2)]) == [True]  # durable: returns once synced
    with EdgeStore(tmp_path / "edge.sqlite") as store:
        assert cycles(store, "A") == [1, 2]


def test_event_loops_in_several_threads_each_get_their_acknowledgements(tmp_path: Path) -> None:
    """The fsync thread wakes a waiting loop through a pipe, whose bytes only one loop reads: the
    others must still be woken; once the store closes, no loop watches the pipe, which closes."""
    with EdgeStore(tmp_path / "edge.sqlite") as store:

        async def requests(device: str) -> list[bool]:
            flags = []
            for cycle in range(1, 41):
                flags += store.record([telemetry(device, f"m{cycle}", cycle)], durable=False)
                await store.synced()
            return flags

        answers: dict[str, list[bool]] = {}
        threads = [
            threading.Thread(target=lambda d=device: answers.setdefault(d, asyncio.run(requests(d))))
            for device in ("A", "B", "C")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert answers == {device: [True] * 40 for device in ("A", "B", "C")}

    async def reuse_after_close() -> None:
        loop = asyncio.get_running_loop()
        with EdgeStore(tmp_path / "other.sqlite") as other:
            other.record([telemetry("A", "m1", 1)], durable=False)
            await other.synced()
            watched = other._sync._syncer.fileno()
        await asyncio.sleep(0)  # the loop's turn to stop watching the closed store
        assert not loop.remove_reader(watched)  # False: it was not watched any more
        del other  # its pipe closes with it, and the number is free again
        opened = [os.pipe() for _ in range(16)]  # the lowest free numbers: the old pipe's among them
        try:
            assert watched in {fd for pair in opened for fd in pair}
        finally:
            for pair in opened:
                for fd in pair:
                    os.close(fd)

    asyncio.run(reuse_after_close())


def test_a_store_of_another_format_is_refused_at_start_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "edge.sqlite"
    with sqlite3.connect(path) as old:  # the first format: no version, the outbox in columns
        old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        old.execute("INSERT INTO meta VALUES ('store_id', 'abc')")
        old.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, enqueued_time_utc TEXT, body BLOB)")
        old.execute("INSERT INTO outbox VALUES (1, '2026-11-27T00:00:00.0000000Z', x'7b7d')")
    with pytest.raises(StoreFormatError, match="format 1, this edge writes format 3"):
        EdgeStore(path)
    with sqlite3.connect(path) as old:
        assert old.execute("SELECT count(*) FROM outbox").fetchone() == (1,)
        old.execute("INSERT INTO meta VALUES ('format', '2')")  # the second: a row per record
    with pytest.raises(StoreFormatError, match="format 2, this edge writes format 3"):
        EdgeStore(path)
    with EdgeStore(tmp_path / "new.sqlite"):
        pass
    with EdgeStore(tmp_path / "new.sqlite") as reopened:  # its own format opens again
        assert reopened.backlog() == (0, None)


def test_threads_share_one_store(store: EdgeStore) -> None:
    def device(name: str) -> None:
        for cycle in range(1, 41):
            store.record([telemetry(name, f"m{cycle}", cycle)])

    threads = [threading.Thread(target=device, args=(f"D{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.backlog()[0] == 160
    assert store.take(1000)[:3] == (1, 160, 160)  # each number given once
    assert len({(r.device_id, r.message_id) for r in outbox(store)}) == 160
    assert all(cycles(store, f"D{n}") == list(range(1, 41)) for n in range(4))


# --- crashes ---------------------------------------------------------------------------------------

GROUP = 5  # telemetry messages per record() call
DEVICES = 3

# Records groups of GROUP telemetry messages (ids m0000000...), each with one malformed message
# (bad0000...) and a resend of the previous group's last message; prints a group's last id once
# record() returned. With a landing folder, a forwarder ships at the same time.
CHILD = f"""
import sys
from datetime import UTC, datetime, timedelta
from edge_module.forwarder import Forwarder
from edge_module.store import EdgeStore, HistoryEntry
from turbofan_core.capture import device_message, encode_record
from turbofan_core.storage import LocalStore
from turbofan_core.telemetry import MEASUREMENTS, encode_body

store = EdgeStore(sys.argv[1])
if sys.argv[2]:
    Forwarder(store, LocalStore(sys.argv[2]), max_records=7, max_age_seconds=0.0, poll_seconds=0.0).start()
t0 = datetime(2026, 11, 27, tzinfo=UTC)
resend = []
for group in range(10**6):
    entries = []
    for n in range(group * {GROUP}, (group + 1) * {GROUP}):
        device, cycle, message_id = f"Client_{{n % {DEVICES}:03d}}", n // {DEVICES} + 1, f"m{{n:07d}}"
        values = {{name: float(n + k) for k, name in enumerate(MEASUREMENTS)}}
        body = encode_body({{"CycleTime": cycle, **values}})
        record = encode_record(device_message(device, body, t0 + timedelta(seconds=n), {{}}, message_id))
        entries.append((record, HistoryEntry.telemetry(device, message_id, cycle, tuple(values.values()))))
    bad = encode_record(device_message("Client_000", b"{{", t0, {{}}, f"bad{{group:07d}}"))
    store.record([*entries, (bad, None), *resend])
    resend = entries[-1:]
    print(message_id, flush=True)
"""


def expected_ids(groups: int) -> tuple[set[str], set[str]]:
    """The telemetry and malformed message ids of the first `groups` groups."""
    return {f"m{n:07d}" for n in range(groups * GROUP)}, {f"bad{g:07d}" for g in range(groups)}


def run_and_kill(path: Path, landing: Path | None, acks: int) -> int:
    """Run CHILD until it acknowledged `acks` groups, SIGKILL it mid-stream; return the groups acked."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [sys.executable, "-c", CHILD, str(path), str(landing or "")]
    with subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True) as child:
        acked = 0
        try:
            for line in child.stdout:
                assert line.strip() == f"m{(acked + 1) * GROUP - 1:07d}"
                acked += 1
                if acked == acks:
                    break
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert acked == acks, "the child stopped before it acknowledged enough groups"
    return acked


def drain(store: EdgeStore, landing: ObjectStore) -> None:
    forwarder = Forwarder(store, landing, max_records=50)
    while forwarder.ship_once(force=True):
        pass
    assert store.backlog() == (0, None) and forwarder.failures == 0


def landing_ids(landing: ObjectStore) -> list[str | None]:
    return [record.message_id for name in landing.list_names() for record in read_capture(landing.read(name))]


def warehouse_ids(landing: ObjectStore, path: Path) -> tuple[list[str], list[str]]:
    """Ingest the landing zone as the pipeline does; the message ids of telemetry and quarantine."""
    with duckdb.connect(str(path)) as conn:
        ingest_new_files(landing, conn, workers=1)
        telemetry_ids = [m for (m,) in conn.execute("SELECT message_id FROM telemetry").fetchall()]
        quarantined = [m for (m,) in conn.execute("SELECT message_id FROM telemetry_quarantine").fetchall()]
    return telemetry_ids, quarantined


def test_sigkill_loses_no_acknowledged_message(tmp_path: Path) -> None:
    acked = run_and_kill(tmp_path / "edge.sqlite", None, acks=30)
    with EdgeStore(tmp_path / "edge.sqlite") as store:
        queued = [record.message_id for record in outbox(store)]
        groups = sum(1 for m in queued if m.startswith("bad"))
        assert groups >= acked
        # Whole groups only (one transaction each), every acknowledged one, no resend queued twice.
        telemetry_ids, bad_ids = expected_ids(groups)
        assert sorted(queued) == sorted(telemetry_ids | bad_ids)
        assert sum(len(store.lifetime_history(device)) for device in store.devices()) == len(telemetry_ids)
        landing = LocalStore(tmp_path / "landing")
        drain(store, landing)
    in_telemetry, in_quarantine = warehouse_ids(landing, tmp_path / "warehouse.duckdb")
    assert sorted(in_telemetry) == sorted(telemetry_ids)
    assert sorted(in_quarantine) == sorted(bad_ids)
