"""At-least-once delivery into the warehouse: the tables are a function of what was delivered,
not of when, how often, in what order or in what state it arrived."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import duckdb
import fastavro
import pytest
from test_contract import MALFORMED

from simulator.capture_writer import CaptureWriter
from simulator.replay import replay
from turbofan_core.capture import AVRO_SCHEMA, CaptureRecord, device_message, encode_avro
from turbofan_core.cmapss import read_cmapss
from turbofan_core.labels import label_rul
from turbofan_core.storage import LocalStore
from turbofan_core.telemetry import FAILURE, PHYSICAL_RANGES, encode_body
from turbofan_warehouse.ingest import IngestReport, ingest_new_files

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
READINGS = {name: (lo + hi) / 2 for name, (lo, hi) in PHYSICAL_RANGES.items()}


def telemetry(device: str, cycle: int, second: int = 0, message_id: str | None = None, **values: float):
    body = encode_body({"CycleTime": cycle, **READINGS, **values})
    return device_message(device, body, T0 + timedelta(seconds=second), {}, message_id)


def failure(device: str, cycle: int, second: int = 0, message_id: str | None = None) -> CaptureRecord:
    body = encode_body({"CycleTime": cycle})
    return device_message(device, body, T0 + timedelta(seconds=second), {"type": FAILURE}, message_id)


class Warehouse:
    """A landing folder and a warehouse file, ingested the way the asset does it."""

    def __init__(self, root: Path) -> None:
        self.store = LocalStore(root / "landing")
        self.path = root / "warehouse.duckdb"

    def land(self, name: str, records: list[CaptureRecord]) -> None:
        self.store.create(name, encode_avro(records))

    def ingest(self, **options) -> IngestReport:
        with duckdb.connect(str(self.path)) as conn:
            return ingest_new_files(self.store, conn, **options)

    def rows(self, sql: str) -> list[tuple]:
        with duckdb.connect(str(self.path), read_only=True) as conn:
            return conn.execute(sql).fetchall()

    def tables(self) -> dict[str, list[tuple]]:
        """What users read: telemetry, failure events and the RUL labels derived from them."""
        with duckdb.connect(str(self.path), read_only=True) as conn:
            telemetry = conn.execute(
                "SELECT * REPLACE (message_key::VARCHAR AS message_key) FROM telemetry ORDER BY ALL"
            ).df()
            failures = conn.execute(
                "SELECT * REPLACE (message_key::VARCHAR AS message_key) FROM failure_events ORDER BY ALL"
            ).df()
        labels = label_rul(telemetry, failures)
        return {
            name: list(frame.itertuples(index=False, name=None))
            for name, frame in (
                ("telemetry", telemetry),
                ("failure_events", failures),
                ("rul_labels", labels),
            )
        }


@pytest.fixture
def warehouse(tmp_path: Path) -> Warehouse:
    return Warehouse(tmp_path)


# --- no message can block ingestion -----------------------------------------------------------


@pytest.mark.parametrize(("raw", "device", "properties", "content_type", "encoding", "reason"), MALFORMED)
def test_a_malformed_message_alone_or_among_good_ones_never_blocks_a_file(
    warehouse: Warehouse, raw, device, properties, content_type, encoding, reason
) -> None:
    system = {"contentType": content_type, "contentEncoding": encoding, "connectionDeviceId": device}
    bad = CaptureRecord(T0.strftime("%Y-%m-%dT%H:%M:%S.0000000Z"), raw, properties,
                        {k: v for k, v in system.items() if v is not None})  # fmt: skip
    warehouse.land("hub/00/a-alone", [bad])
    warehouse.land("hub/00/b-first", [bad, telemetry("Client_001", 1), telemetry("Client_001", 2)])
    warehouse.land("hub/00/c-amid", [telemetry("Client_002", 1), bad, telemetry("Client_002", 2)])
    warehouse.land("hub/00/d-good", [telemetry("Client_003", 1)])

    report = warehouse.ingest()

    assert (report.files, report.telemetry, report.quarantined) == (4, 5, 3)
    assert report.unreadable == {} and report.quarantined_files == {}
    reasons = warehouse.rows("SELECT DISTINCT reason FROM telemetry_quarantine")
    assert len(reasons) == 1 and reasons[0][0].startswith(reason)
    assert warehouse.rows("SELECT count(*) FROM landing_files WHERE status = 'ingested'") == [(4,)]
    assert warehouse.ingest().files == 0  # done: nothing is retried


@pytest.mark.parametrize("cycle", [2**31, 2**53, 2**63 - 1])
def test_every_cycle_the_contract_accepts_is_stored_exactly(warehouse: Warehouse, cycle: int) -> None:
    warehouse.land("hub/00/x", [telemetry("Client_001", cycle), failure("Client_001", cycle, 1)])
    report = warehouse.ingest()
    assert (report.telemetry, report.failure_events, report.quarantined) == (1, 1, 0)
    assert warehouse.rows(
        "SELECT CycleTime FROM telemetry UNION ALL SELECT CycleTime FROM failure_events"
    ) == [
        (cycle,),
        (cycle,),
    ]


def test_an_integral_float_cycle_alone_in_its_file_is_stored(warehouse: Warehouse) -> None:
    """It used to crash the batch checks when no other message of the file was usual."""
    body = encode_body({"CycleTime": 1, **READINGS}).replace(b'"CycleTime":1', b'"CycleTime":17.0')
    warehouse.land("hub/00/x", [device_message("Client_001", body, T0, {})])
    assert warehouse.ingest().telemetry == 1
    assert warehouse.rows("SELECT CycleTime FROM telemetry") == [(17,)]


def test_a_bad_enqueued_time_is_quarantined_not_a_blocked_batch(warehouse: Warehouse) -> None:
    good = telemetry("Client_001", 1)
    bad = CaptureRecord("yesterday", good.body, {}, good.system_properties)
    warehouse.land("hub/00/x", [bad, telemetry("Client_001", 2)])
    report = warehouse.ingest()
    assert (report.telemetry, report.quarantined) == (1, 1)
    assert warehouse.rows("SELECT position, enqueued_time_utc, reason, body FROM telemetry_quarantine") == [
        (0, "yesterday", "EnqueuedTimeUtc 'yesterday' is not an ISO 8601 UTC time", good.body)
    ]


# --- message identity ------------------------------------------------------------------------


def test_messages_delivered_twice_are_stored_once_and_counted(warehouse: Warehouse) -> None:
    first = [telemetry("Client_001", c, c, f"m{c}") for c in (1, 2, 3)] + [failure("Client_001", 3, 4, "f")]
    warehouse.land("hub/00/1", first)
    assert warehouse.ingest().telemetry == 3
    # IoT Hub redelivers two messages and the failure event later, in another file, enqueued again.
    again = [telemetry("Client_001", c, 60 + c, f"m{c}") for c in (2, 3)] + [
        failure("Client_001", 3, 70, "f")
    ]
    warehouse.land("hub/00/2", [*again, telemetry("Client_002", 1, 80, "n1")])

    report = warehouse.ingest()

    assert (report.telemetry, report.failure_events, report.duplicates) == (1, 0, 3)
    assert warehouse.rows(
        "SELECT records, telemetry, duplicates FROM landing_files WHERE name = 'hub/00/2'"
    ) == [(4, 1, 3)]
    assert warehouse.rows(
        "SELECT device_id, lifetime, count(*) FROM telemetry GROUP BY ALL ORDER BY ALL"
    ) == [
        ("Client_001", 1, 3),
        ("Client_002", 1, 1),
    ]


def test_a_redelivered_failure_event_creates_no_lifetime(warehouse: Warehouse) -> None:
    """With an id it is a duplicate; without one, a repeat of the same file is; and a failure event
    resent without id (a new enqueued time) closes the lifetime the first one closed."""
    engine = [telemetry("Client_001", c, c) for c in (1, 2, 3)]
    warehouse.land("hub/00/1", [*engine, failure("Client_001", 3, 4)])
    warehouse.land("hub/00/1-copy", [*engine, failure("Client_001", 3, 4)])  # the same file, copied
    warehouse.land("hub/00/2", [failure("Client_001", 3, 9), telemetry("Client_001", 1, 20, Sensor2=600.0)])
    report = warehouse.ingest()
    assert (report.telemetry, report.duplicates) == (4, 4)
    tables = warehouse.tables()
    assert sorted({row[:2] for row in tables["telemetry"]}) == [("Client_001", 1), ("Client_001", 2)]
    assert {row[1] for row in tables["failure_events"]} == {1}  # the resend closes the same lifetime
    assert [row[1:3] for row in tables["rul_labels"]] == [(1, 1), (1, 2), (1, 3)]


def test_the_same_id_with_another_body_is_quarantined_with_its_reason(warehouse: Warehouse) -> None:
    warehouse.land("hub/00/1", [telemetry("Client_001", 1, 0, "m1")])
    warehouse.land("hub/00/2", [telemetry("Client_001", 1, 5, "m1", Sensor2=600.0)])
    report = warehouse.ingest()
    assert (report.telemetry, report.quarantined, report.duplicates) == (1, 1, 0)
    assert warehouse.rows("SELECT source_file, reason FROM telemetry_quarantine") == [
        ("hub/00/2", "message id 'm1' from Client_001 has another body enqueued earlier")
    ]


def test_of_two_bodies_under_one_id_the_earlier_is_kept_whatever_arrives_first(tmp_path: Path) -> None:
    early, late = telemetry("Client_001", 1, 0, "m1"), telemetry("Client_001", 1, 5, "m1", Sensor2=600.0)
    results = []
    for order in ([("a", early), ("b", late)], [("a", late), ("b", early)]):
        warehouse = Warehouse(tmp_path / order[0][0] / str(len(results)))
        for name, record in order:
            warehouse.land(f"hub/00/{name}", [record])
            warehouse.ingest()
        results.append(
            (
                warehouse.rows("SELECT Sensor2, message_id FROM telemetry"),
                warehouse.rows("SELECT body, reason FROM telemetry_quarantine"),
            )
        )
    assert results[0] == results[1]
    assert results[0][1] == [(late.body, "message id 'm1' from Client_001 has another body enqueued earlier")]


def test_of_two_copies_without_id_the_earlier_is_kept_whatever_arrives_first(tmp_path: Path) -> None:
    early, late = telemetry("Client_001", 1, 0), telemetry("Client_001", 1, 30)
    tables = []
    for trial, order in enumerate(([("a", early), ("b", late)], [("a", late), ("b", early)])):
        warehouse = Warehouse(tmp_path / str(trial))
        for name, record in order:
            warehouse.land(f"hub/00/{name}", [record])
            warehouse.ingest()
        tables.append(warehouse.rows("SELECT enqueued_time_utc, CycleTime FROM telemetry"))
    assert tables[0] == tables[1] and len(tables[0]) == 1


def test_telemetry_without_id_repeats_only_inside_one_lifetime(warehouse: Warehouse) -> None:
    """A new engine may report the very cycle and readings of the old one: not a duplicate."""
    first_engine = [telemetry("Client_001", c, c) for c in (1, 2)] + [failure("Client_001", 2, 3)]
    warehouse.land("hub/00/1", first_engine)
    warehouse.land("hub/00/2", [telemetry("Client_001", 1, 10), telemetry("Client_001", 1, 11)])
    report = warehouse.ingest()
    assert (report.telemetry, report.duplicates) == (3, 1)
    assert warehouse.rows("SELECT lifetime, CycleTime FROM telemetry ORDER BY ALL") == [
        (1, 1),
        (1, 2),
        (2, 1),
    ]


# --- order-independent lifetimes and labels --------------------------------------------------------


def ticking_clock() -> Callable[[], datetime]:
    ticks = count()
    return lambda: T0 + next(ticks) * timedelta(milliseconds=250)


@pytest.fixture(scope="module")
def fleet_files(tmp_path_factory: pytest.TempPathFactory, cmapss_dir: Path) -> dict[str, bytes]:
    """FD001 units 1-7 as three devices whose engines are replaced after each failure (2-3 lifetimes
    each), with some messages delivered twice, in many small files."""
    store = LocalStore(tmp_path_factory.mktemp("fleet"))
    with CaptureWriter(store, max_records=40) as writer:
        replay(
            read_cmapss(cmapss_dir / "train_FD001.txt"),
            writer,
            units=range(1, 8),
            engines_per_device=3,
            duplicates=0.05,
            clock=ticking_clock(),
        )
    return {name: store.read(name) for name in store.list_names()}


def test_every_arrival_order_and_split_gives_the_in_order_tables(tmp_path: Path, fleet_files) -> None:
    names = sorted(fleet_files)
    assert len(names) > 30
    in_order = Warehouse(tmp_path / "in_order")
    for name in names:
        in_order.store.create(name, fleet_files[name])
    in_order.ingest()
    expected = in_order.tables()
    assert {row[1] for row in expected["telemetry"]} == {1, 2, 3}
    assert len(expected["failure_events"]) == 7 and len({row[:2] for row in expected["rul_labels"]}) == 7

    rng = random.Random(7)
    for trial in range(6):
        order = list(reversed(names)) if trial == 0 else rng.sample(names, len(names))
        shuffled = Warehouse(tmp_path / f"trial{trial}")
        relabelled = 0
        for position, name in enumerate(order):
            shuffled.store.create(name, fleet_files[name])
            if rng.random() < 0.3 or position == len(order) - 1:  # a run now and then
                relabelled += shuffled.ingest(batch_records=rng.choice([50, 10_000])).relabelled
        assert shuffled.tables() == expected, f"arrival order {trial} changed the tables"
        assert relabelled > 0  # late files did come before stored ones


# --- whole files only, and changed files noticed ------------------------------------------------


def sync_boundaries(data: bytes) -> list[int]:
    """Where each block of an Avro file ends (after its sync marker): a cut there is a valid file."""
    reader = fastavro.block_reader(io.BytesIO(data))
    marker = reader._header["sync"]
    ends, start = [], data.index(marker) + len(marker)
    while (found := data.find(marker, start)) >= 0:
        ends.append(found + len(marker))
        start = found + len(marker)
    return ends


def test_a_file_cut_at_a_block_boundary_then_completed_is_stored_once(warehouse: Warehouse) -> None:
    records = [telemetry(f"Client_{d:03d}", c, c, f"{d}-{c}") for d in range(1, 4) for c in range(1, 300)]
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(AVRO_SCHEMA),
                    [{"EnqueuedTimeUtc": r.enqueued_time_utc, "Properties": r.properties,
                      "SystemProperties": r.system_properties, "Body": r.body} for r in records],
                    codec="deflate", sync_interval=4000)  # fmt: skip
    whole = buffer.getvalue()
    cut = sync_boundaries(whole)[1]  # two whole blocks: a valid, shorter Avro file
    path = warehouse.store.root / "hub/00/2026/11/27/08/00"
    path.parent.mkdir(parents=True)
    path.write_bytes(whole[:cut])  # a copy that is not atomic, caught half way
    first = warehouse.ingest()
    assert 0 < first.telemetry < len(records)

    path.write_bytes(whole)  # the copy completes under the same name
    second = warehouse.ingest()

    assert first.telemetry + second.telemetry == len(records)
    assert second.duplicates == first.telemetry
    assert warehouse.rows("SELECT count(*), count(DISTINCT message_id) FROM telemetry") == [
        (len(records),) * 2
    ]


def test_empty_and_temporary_files_are_never_done(warehouse: Warehouse) -> None:
    root = warehouse.store.root / "hub/00"
    root.mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "upload.tmp").write_bytes(b"garbage, half written")
    (root / ".hidden").write_bytes(b"garbage")
    report = warehouse.ingest()
    assert (report.files, report.waiting, report.unreadable) == (0, ["hub/00/empty"], {})
    assert warehouse.rows("SELECT count(*) FROM landing_files") == [(0,)]

    os.replace(warehouse.store.root / "hub/00/upload.tmp", root / "empty")
    (root / "empty").write_bytes(encode_avro([telemetry("Client_001", 1)]))
    assert warehouse.ingest().telemetry == 1


def test_a_file_touched_without_change_is_not_read_as_new(warehouse: Warehouse) -> None:
    warehouse.land("hub/00/x", [telemetry("Client_001", 1)])
    warehouse.ingest()
    path = warehouse.store.root / "hub/00/x"
    os.utime(path, ns=(1, 1))
    report = warehouse.ingest()
    assert (report.files, report.unchanged, report.duplicates) == (0, ["hub/00/x"], 0)


# --- failures are loud -------------------------------------------------------------------------


def test_an_unreadable_file_is_retried_then_quarantined_whole_then_read_once_replaced(
    warehouse: Warehouse,
) -> None:
    path = warehouse.store.root / "hub/00/broken"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"Obj\x01 not really avro")
    assert list(warehouse.ingest(max_attempts=2).unreadable) == ["hub/00/broken"]
    second = warehouse.ingest(max_attempts=2)
    assert list(second.quarantined_files) == ["hub/00/broken"] and second.unreadable == {}
    assert warehouse.rows("SELECT status, attempts FROM landing_files") == [("quarantined", 2)]
    third = warehouse.ingest(max_attempts=2)
    assert (third.unreadable, third.quarantined_files) == ({}, {})  # given up: no longer retried

    path.write_bytes(encode_avro([telemetry("Client_001", 1)]))  # replaced with a readable file
    assert warehouse.ingest(max_attempts=2).telemetry == 1
    assert warehouse.rows("SELECT status, attempts, reason FROM landing_files") == [("ingested", 0, None)]


def test_batches_and_worker_processes_give_the_same_tables(tmp_path: Path, fleet_files) -> None:
    results = []
    for name, options in [("one", {"workers": 1}), ("split", {"workers": 2, "batch_records": 100})]:
        warehouse = Warehouse(tmp_path / name)
        for file, data in fleet_files.items():
            warehouse.store.create(file, data)
        warehouse.ingest(**options)
        results.append(warehouse.tables())
    assert results[0] == results[1]
