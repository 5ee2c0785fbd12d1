"""Store-and-forward to real landing zones (a folder, Azurite): batching, crashes between sending and
confirming, outages with backoff, TTL drops, and a SIGKILL while shipping."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import ContainerClient
from conftest import AZURITE_ACCOUNT_KEY, AZURITE_ACCOUNT_NAME, AzuriteInfo
from test_edge_store import (
    FakeClock,
    drain,
    expected_ids,
    landing_ids,
    malformed,
    run_and_kill,
    telemetry,
    warehouse_ids,
)

from edge_module import store as store_module
from edge_module.forwarder import Forwarder, capture_file, describe
from edge_module.store import EdgeStore
from turbofan_core.capture import read_capture
from turbofan_core.storage import BlobStore, LocalStore, blob_store_from_connection_string


def record(store: EdgeStore, device: str, first: int, count: int) -> list[str]:
    """Record `count` telemetry messages of `device` from cycle `first`, a request each; their ids."""
    cycles = range(first, first + count)
    for cycle in cycles:
        assert store.record([telemetry(device, f"{device}-{cycle}", cycle)]) == [True]
    return [f"{device}-{cycle}" for cycle in cycles]


def broken_landing(tmp_path: Path) -> LocalStore:
    """A landing folder under a regular file: every create fails with an OSError."""
    (tmp_path / "not-a-folder").write_bytes(b"")
    return LocalStore(tmp_path / "not-a-folder" / "landing")


def unreachable_blob_store() -> BlobStore:
    """A blob container on a closed local port, failing fast: nothing listens, no retries."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ContainerClient(
        f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT_NAME}",
        "landing",
        credential={"account_name": AZURITE_ACCOUNT_NAME, "account_key": AZURITE_ACCOUNT_KEY},
        retry_total=0,
        connection_timeout=1,
        read_timeout=1,
    )
    return BlobStore(client)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[EdgeStore]:
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:
        yield store


def test_ships_a_file_when_enough_records_or_the_oldest_is_old_enough(
    tmp_path: Path, clock: FakeClock, store: EdgeStore
) -> None:
    landing = LocalStore(tmp_path / "landing")
    forwarder = Forwarder(store, landing, hub="hub", max_records=4, max_age_seconds=5.0, clock=clock)
    first = record(store, "A", 1, 3)
    clock.now += 4.9
    assert forwarder.ship_once() == 0 and list(landing.list_names()) == []
    clock.now += 0.1
    assert forwarder.ship_once() == 3
    assert list(landing.list_names()) == [f"hub/edge/{store.store_id}/000000000001-000000000003"]
    second = record(store, "A", 4, 6)  # 6 >= max_records: due at once, 4 per file
    assert forwarder.ship_once() == 4 and forwarder.ship_once() == 0  # the last 2 are not old enough
    assert forwarder.backlog() == (2, clock.now)
    assert forwarder.ship_once(force=True) == 2
    assert landing_ids(landing) == first + second
    assert (forwarder.shipped_records, forwarder.shipped_files, forwarder.failures) == (9, 3, 0)
    # A file holds whole requests: one of 6 messages goes whole, past max_records.
    entries = [telemetry("B", f"B-{cycle}", cycle) for cycle in range(1, 7)]
    assert store.record(entries) == [True] * 6
    assert forwarder.ship_once() == 6
    assert landing_ids(landing)[-6:] == [entry.message_id for _, entry in entries]


def test_a_crash_between_creating_and_confirming_a_file_resends_it_under_the_same_name(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    landing = LocalStore(tmp_path / "landing")
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:
        sent = record(store, "A", 1, 3)
        forwarder = Forwarder(store, broken_landing(tmp_path), clock=clock)
        assert forwarder.ship_once(force=True) == 0 and forwarder.failures == 1
        shipment = store.shipment()
        assert shipment is not None and shipment.name == forwarder.file_name(1, 3)
        # The create reached the landing zone but the answer was lost (or the edge died right after).
        landing.create(shipment.name, capture_file(store.take(3)))
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:  # restarted
        later = record(store, "A", 4, 2)  # arrived before the forwarder ran again
        forwarder = Forwarder(store, landing, clock=clock)
        assert forwarder.ship_once(force=True) == 3  # NameTaken: already there, marked shipped
        assert store.shipment() is None and store.backlog() == (2, clock.now)
        assert forwarder.ship_once(force=True) == 2
        assert list(landing.list_names()) == [forwarder.file_name(1, 3), forwarder.file_name(4, 5)]
        assert landing_ids(landing) == sent + later


def test_a_shipped_file_leaves_the_outbox_and_a_crash_midway_through_its_deletes_finishes_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "DELETE_CHUNK", 2)
    clock = FakeClock()
    landing = LocalStore(tmp_path / "landing")
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:
        sent = record(store, "A", 1, 5)
        assert Forwarder(store, landing, clock=clock).ship_once(force=True) == 5  # 2 + 2 + 1 deleted
        assert store.backlog() == (0, None) and store.shipment() is None
        sent += record(store, "A", 6, 5)
        assert Forwarder(store, broken_landing(tmp_path), clock=clock).ship_once(force=True) == 0
        shipment = store.shipment()
        assert shipment is not None
        landing.create(shipment.name, capture_file(store.take(5)))
    with sqlite3.connect(tmp_path / "edge.sqlite") as conn:  # the edge died after one chunk's delete
        conn.execute("DELETE FROM outbox WHERE first_seq <= 7")
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:
        forwarder = Forwarder(store, landing, clock=clock)
        assert forwarder.ship_once(force=True) == 3  # the rest, under the same name: refused, marked
        assert store.backlog() == (0, None) and store.shipment() is None
    assert list(landing.list_names()) == [forwarder.file_name(1, 5), forwarder.file_name(6, 10)]
    assert landing_ids(landing) == sent


def test_landing_zone_outage_backs_off_then_drains_exactly_once(
    clock: FakeClock, store: EdgeStore, azurite: AzuriteInfo, blob_container: str
) -> None:
    forwarder = Forwarder(store, unreachable_blob_store(), max_records=10, max_age_seconds=1.0, clock=clock)
    sent: list[str] = []
    backoffs = []
    for step in range(1, 8):
        sent += record(store, f"D{step % 2}", step * 100, 4)
        clock.now += 1.0
        started = time.monotonic()
        forwarder.ship_once()
        assert time.monotonic() - started < 5, "a refused connection must fail fast"
        backoffs.append(forwarder.backoff_seconds)
    # Attempts at steps 1, 2, 3 and 5, none during backoff; each failure doubles the wait.
    assert forwarder.failures == 4
    assert backoffs == [0.5, 1.0, 2.0, 2.0, 4.0, 4.0, 4.0]
    assert forwarder.backlog()[0] == len(sent) == 28
    assert forwarder.last_error is not None and forwarder.last_error.startswith("ServiceRequestError: ")
    assert "\n" not in forwarder.last_error and AZURITE_ACCOUNT_KEY not in forwarder.last_error

    forwarder.landing = landing = blob_store_from_connection_string(azurite.connection_string, blob_container)
    clock.now = forwarder.retry_at
    while forwarder.ship_once():
        pass
    assert forwarder.backlog() == (0, None) and forwarder.backoff_seconds == 0
    assert sorted(landing_ids(landing)) == sorted(sent)
    # The file pinned at the first attempt (4 records), then 10, 10 and 4.
    assert forwarder.shipped_files == 4 and forwarder.failures == 4


def test_records_older_than_the_ttl_are_dropped_and_counted(tmp_path: Path) -> None:
    clock = FakeClock()
    landing = LocalStore(tmp_path / "landing")
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:
        forwarder = Forwarder(store, broken_landing(tmp_path), max_records=3, ttl_seconds=100.0, clock=clock)
        old = record(store, "A", 1, 2)
        clock.now += 60
        kept = record(store, "A", 3, 3)
        assert forwarder.ship_once(force=True) == 0  # pins the first file: 2 old records and 1 newer
        clock.now += 50  # the first 2 are 110 s old
        forwarder.landing = landing
        assert forwarder.ship_once(force=True) == 1
        assert forwarder.ship_once(force=True) == 2
        assert forwarder.dropped == len(old) == 2 and forwarder.shipped_records == 3
        # The pinned file keeps its name with what is left of it.
        assert list(landing.list_names())[0] == forwarder.file_name(1, 3)
        assert landing_ids(landing) == kept


def test_a_pinned_file_that_expired_whole_is_given_up(tmp_path: Path) -> None:
    clock = FakeClock()
    with EdgeStore(tmp_path / "edge.sqlite", clock=clock) as store:
        forwarder = Forwarder(store, broken_landing(tmp_path), ttl_seconds=100.0, clock=clock)
        record(store, "A", 1, 2)
        forwarder.ship_once(force=True)
        clock.now += 101
        later = record(store, "A", 3, 1)
        forwarder.landing = landing = LocalStore(tmp_path / "landing")
        assert forwarder.ship_once(force=True) == 0 and store.shipment() is None
        assert forwarder.ship_once(force=True) == 1 and forwarder.dropped == 2
        assert landing_ids(landing) == later


def test_the_thread_ships_as_records_come_and_flushes_on_stop(tmp_path: Path) -> None:
    with EdgeStore(tmp_path / "edge.sqlite") as store:
        landing = LocalStore(tmp_path / "landing")
        forwarder = Forwarder(store, landing, max_records=5, max_age_seconds=60.0, poll_seconds=0.01)
        forwarder.start()
        sent = record(store, "A", 1, 5)
        deadline = time.monotonic() + 10
        while forwarder.shipped_records < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert forwarder.shipped_records == 5
        sent += record(store, "A", 6, 2) + ["x"]
        store.record([malformed("A", "x")])
        forwarder.stop()  # the last 3 were not due yet: the flush ships them
        assert forwarder.backlog() == (0, None)
        assert landing_ids(landing) == sent


def test_errors_are_one_line_without_secrets() -> None:
    error = OSError("upload to https://a.blob.core.windows.net/c/x?se=2030&sig=S3cr%2Bt failed\nmore")
    assert describe(error) == "OSError: upload to https://a.blob.core.windows.net/c/x?se=2030&sig=*** failed"
    assert describe(ValueError("AccountKey=abc;Endpoint=x")) == "ValueError: AccountKey=***;Endpoint=x"


@pytest.mark.parametrize("run", range(3))
def test_sigkill_while_forwarding_loses_and_doubles_nothing(tmp_path: Path, run: int) -> None:
    landing_path = tmp_path / "landing"
    acked = run_and_kill(tmp_path / "edge.sqlite", landing_path, acks=20 + 7 * run)
    landing = LocalStore(landing_path)
    with EdgeStore(tmp_path / "edge.sqlite") as store:
        drain(store, landing)
    ids = landing_ids(landing)
    assert max(Counter(ids).values()) == 1, "a record was sent in two files"
    groups = sum(1 for m in ids if m is not None and m.startswith("bad"))
    assert groups >= acked
    telemetry_ids, bad_ids = expected_ids(groups)
    assert set(ids) == telemetry_ids | bad_ids
    in_telemetry, in_quarantine = warehouse_ids(landing, tmp_path / "warehouse.duckdb")
    assert sorted(in_telemetry) == sorted(telemetry_ids)
    assert sorted(in_quarantine) == sorted(bad_ids)
    assert all(read_capture(landing.read(name)) for name in landing.list_names())


def test_azurite_stopped_then_back_buffers_then_drains_exactly_once(
    tmp_path: Path, store: EdgeStore, clock: FakeClock
) -> None:
    """A real Azurite goes away mid-stream: the outbox grows, then drains when it is back."""
    from azure.storage.blob import BlobServiceClient
    from conftest import _stop, start_azurite

    workdir = tmp_path / "azurite"
    workdir.mkdir()
    proc, info = start_azurite(workdir)
    port = int(info.account_url.split(":")[2].split("/")[0])
    try:
        service = BlobServiceClient.from_connection_string(
            info.connection_string, retry_total=0, connection_timeout=1
        )
        landing = BlobStore.created_if_missing(service.get_container_client("landing"))
        forwarder = Forwarder(store, landing, max_records=10, max_age_seconds=1.0, clock=clock)
        sent = record(store, "D1", 1, 10)
        clock.now += 2
        assert forwarder.ship_once() == 10

        _stop(proc)  # the landing zone is gone
        sent += record(store, "D1", 11, 15)
        clock.now += 2
        assert forwarder.ship_once() == 0 and forwarder.failures == 1
        assert forwarder.backlog()[0] == 15

        proc, _ = start_azurite(workdir, port)  # back, with what it held
        clock.now = forwarder.retry_at
        while forwarder.ship_once():
            pass
        assert forwarder.backlog() == (0, None)
        assert sorted(landing_ids(landing)) == sorted(sent)
    finally:
        _stop(proc)
