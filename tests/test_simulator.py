"""The simulator against real C-MAPSS files and real stores: what a replay writes is what the fleet sent."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count, pairwise
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from conftest import REPO_ROOT, AzuriteInfo

from simulator.answers import AcknowledgedTransport
from simulator.capture_writer import CaptureWriter
from simulator.replay import ReplayInterrupted, ReplayStats, UnknownUnits, replay
from turbofan_cli import simulate
from turbofan_cli.main import main
from turbofan_core.capture import CaptureRecord, partition_of, read_capture
from turbofan_core.cmapss import UNIT, read_cmapss
from turbofan_core.storage import TMP_DIR, LocalStore, ObjectStore, blob_store_from_connection_string
from turbofan_core.telemetry import FAILURE, FIELDS, TELEMETRY, parse_message

START = datetime(2024, 3, 1, 11, 58, 30, tzinfo=UTC)
NAME = re.compile(r"turbofan-hub/(0[0-3])/\d{4}/\d\d/\d\d/\d\d/\d\d(-\d{4})?")
SIX = range(1, 7)  # units 1-6: 1,304 cycles, enough for several files and minutes, fast to replay


def ticking_clock(step: timedelta) -> Callable[[], datetime]:
    """A clock that advances `step` per call, so a replay spans several minute windows."""
    ticks = count()
    return lambda: START + next(ticks) * step


def ctrl_c_after(n: int, sent: list[CaptureRecord]) -> Callable[[CaptureRecord], None]:
    """An `on_message` that collects what is sent into `sent` and presses Ctrl-C at the `n`th."""

    def on_message(record: CaptureRecord) -> None:
        sent.append(record)
        if len(sent) == n:
            raise KeyboardInterrupt

    return on_message


def read_partitions(store: ObjectStore) -> dict[str, list[CaptureRecord]]:
    """Every record in the store, per partition, in file-name order (which is write order)."""
    partitions: dict[str, list[CaptureRecord]] = {}
    for name in store.list_names():
        match = NAME.fullmatch(name)
        assert match, f"unexpected file name {name}"
        partitions.setdefault(match[1], []).extend(read_capture(store.read(name)))
    return partitions


class RecordingStore(LocalStore):
    """A LocalStore that remembers the order files were created in (the order a reader sees them appear)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.created: list[str] = []

    def create(self, name: str, data: bytes) -> None:
        super().create(name, data)
        self.created.append(name)


def read_files(store: ObjectStore) -> dict[str, list[CaptureRecord]]:
    return {name: read_capture(store.read(name)) for name in store.list_names()}


def by_device(partitions: dict[str, list[CaptureRecord]]) -> dict[str, list[CaptureRecord]]:
    devices: dict[str, list[CaptureRecord]] = {}
    for partition, records in partitions.items():
        for record in records:
            assert record.device_id is not None
            assert int(partition) == partition_of(record.device_id), "a device must keep to its partition"
            devices.setdefault(record.device_id, []).append(record)
    return devices


@pytest.fixture(scope="module")
def train(cmapss_dir: Path) -> pd.DataFrame:
    return read_cmapss(cmapss_dir / "train_FD001.txt")


def test_full_fd001_train_replay_reads_back_exactly(train: pd.DataFrame, tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    # 5 ms per message spans two minute boundaries; 2,000 records per file forces same-minute splits.
    with CaptureWriter(store, max_records=2_000) as writer:
        stats = replay(train, writer, clock=ticking_clock(timedelta(milliseconds=5)))

    names = list(store.list_names())
    assert any(name.endswith("-0001") for name in names), "max_records should have split a minute"
    assert stats == ReplayStats(100, 20_631, 100, len(names), stats.seconds)
    assert (writer.files, writer.messages) == (len(names), 20_731)
    for name in names:
        records = read_capture(store.read(name))
        minutes = {datetime.fromisoformat(r.enqueued_time_utc).strftime("%Y/%m/%d/%H/%M") for r in records}
        assert minutes == {name.split("/", 2)[2][:16]}, "one minute window per file"

    devices = by_device(read_partitions(store))
    assert sorted(devices) == [f"Client_{unit:03d}" for unit in range(1, 101)]
    for unit, rows in train.groupby(UNIT):
        records = devices[f"Client_{unit:03d}"]
        messages = [
            parse_message(r.body, r.device_id, r.properties, r.system_properties["contentType"])
            for r in records
        ]
        assert [m.kind for m in messages] == [TELEMETRY] * len(rows) + [FAILURE]
        assert messages[-1].cycle == rows["CycleTime"].max()
        expected = rows[list(FIELDS)].to_dict("records")
        assert [orjson.loads(r.body) for r in records[:-1]] == expected  # cycle order, exact values
        assert [r.properties for r in records] == [{}] * len(rows) + [{"type": "failure"}]


def test_units_selection(train: pd.DataFrame, tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with CaptureWriter(store) as writer:
        stats = replay(train, writer, units=[1, 5, 9, 10, 11, 12])
    devices = by_device(read_partitions(store))
    assert sorted(devices) == [
        "Client_001",
        "Client_005",
        "Client_009",
        "Client_010",
        "Client_011",
        "Client_012",
    ]
    assert stats.messages == int(train[UNIT].isin([1, 5, 9, 10, 11, 12]).sum())
    assert stats.failure_events == 6


def test_units_absent_from_the_file_are_refused_before_anything_is_sent(
    train: pd.DataFrame, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(UnknownUnits, match="101-102"), CaptureWriter(store) as writer:
        replay(train, writer, units=[1, 101, 102])
    assert list(store.list_names()) == []


def test_test_file_replay_sends_no_failure_events(cmapss_dir: Path, tmp_path: Path) -> None:
    assert (
        main(["simulate", "--file", str(cmapss_dir / "test_FD001.txt"), "--landing-dir", str(tmp_path)]) == 0
    )
    records = [r for rs in read_partitions(LocalStore(tmp_path)).values() for r in rs]
    assert len(records) == len(read_cmapss(cmapss_dir / "test_FD001.txt"))
    assert all(r.properties == {} for r in records)


def test_no_failure_events_flag(cmapss_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "simulate",
        "--file",
        str(cmapss_dir / "train_FD001.txt"),
        "--units",
        "1-2",
        "--no-failure-events",
    ]
    assert main([*argv, "--landing-dir", str(tmp_path)]) == 0
    assert "failure events: 0" in capsys.readouterr().out
    records = [r for rs in read_partitions(LocalStore(tmp_path)).values() for r in rs]
    assert records and all(r.properties == {} for r in records)


def test_interrupt_leaves_whole_files_with_exactly_the_messages_sent(
    train: pd.DataFrame, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path)
    sent: list[CaptureRecord] = []

    with pytest.raises(ReplayInterrupted) as stopped, CaptureWriter(store) as writer:
        replay(
            train,
            writer,
            clock=ticking_clock(timedelta(milliseconds=20)),
            on_message=ctrl_c_after(5_000, sent),
        )

    assert stopped.value.stats.messages + stopped.value.stats.failure_events == 5_000
    assert stopped.value.stats.files == len(list(store.list_names()))
    partitions = read_partitions(store)  # every file reads whole
    assert sum(len(records) for records in partitions.values()) == 5_000
    for partition, records in partitions.items():
        assert records == [r for r in sent if partition_of(r.device_id) == int(partition)]
    assert os.listdir(tmp_path / TMP_DIR) == [], "no temporary files left behind"


def test_ctrl_c_on_the_command_flushes_prints_and_exits_130(cmapss_dir: Path, tmp_path: Path) -> None:
    argv = ["--file", str(cmapss_dir / "train_FD001.txt"), "--units", "1-3", "--rate", "20"]
    process = subprocess.Popen(
        [sys.executable, "-m", "turbofan_cli.main", "simulate", *argv, "--landing-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal's foreground job gets it: where pytest runs as a shell's background
        # job (`make test &`), SIGINT is ignored and the child would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stderr is not None
        assert process.stderr.readline().startswith("replaying 3 devices")
        try:
            process.wait(timeout=0.5)  # let a few rounds go out (the whole replay would take ~10 s)
        except subprocess.TimeoutExpired:
            pass
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    summary = dict(line.split(":", 1) for line in out.splitlines()[1:])
    assert out.startswith("interrupted")
    records = [r for rs in read_partitions(LocalStore(tmp_path)).values() for r in rs]
    assert 0 < len(records) == int(summary["messages"]) + int(summary["failure events"])
    assert len(records) < int((read_cmapss(cmapss_dir / "train_FD001.txt")[UNIT] <= 3).sum())


def test_two_replays_in_the_same_minute_never_overwrite(train: pd.DataFrame, tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for _ in range(2):
        with CaptureWriter(store) as writer:
            replay(train, writer, units=[1, 2, 3], clock=lambda: START)
    names = list(store.list_names())
    firsts = [name for name in names if not name.endswith("-0001")]
    assert sorted(f"{name}-0001" for name in firsts) == sorted(set(names) - set(firsts))
    devices = by_device(read_partitions(store))
    for unit in (1, 2, 3):
        once = int((train[UNIT] == unit).sum()) + 1
        records = devices[f"Client_{unit:03d}"]
        assert len(records) == 2 * once and records[:once] == records[once:]


def test_rate_paces_rounds(train: pd.DataFrame, tmp_path: Path) -> None:
    first_cycles = train[train["CycleTime"] <= 5]
    with CaptureWriter(LocalStore(tmp_path)) as writer:
        stats = replay(first_cycles, writer, units=[1, 2], rate=50, failure_events=False)
    assert stats.messages == 10 and stats.seconds >= 4 / 50
    records = by_device(read_partitions(LocalStore(tmp_path)))["Client_001"]
    times = [datetime.fromisoformat(r.enqueued_time_utc) for r in records]
    assert all(later - earlier >= timedelta(milliseconds=15) for earlier, later in pairwise(times))


def test_message_ids_are_unique_per_device_and_the_same_in_every_replay(
    train: pd.DataFrame, tmp_path: Path
) -> None:
    ids: list[dict[str, list[str | None]]] = []
    for run, start in enumerate((START, START + timedelta(days=1))):  # ids must not depend on the time
        store = LocalStore(tmp_path / str(run))
        with CaptureWriter(store) as writer:
            replay(train, writer, units=[1, 2, 9], clock=lambda start=start: start)
        ids.append({d: [r.message_id for r in rs] for d, rs in by_device(read_partitions(store)).items()})

    assert ids[0] == ids[1]
    for unit in (1, 2, 9):
        device = f"Client_{unit:03d}"
        cycles = train.loc[train[UNIT] == unit, "CycleTime"]
        expected = [f"{device}-u{unit:03d}-c{cycle:04d}" for cycle in cycles] + [
            f"{device}-u{unit:03d}-failure"
        ]
        assert ids[0][device] == expected
        assert len(set(ids[0][device])) == len(expected)


def test_engines_per_device_fly_one_after_another_after_each_failure(
    train: pd.DataFrame, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path)
    sent: list[CaptureRecord] = []
    with CaptureWriter(store, max_records=100) as writer:
        stats = replay(
            train,
            writer,
            units=[6, 5, 4, 3, 2, 1],
            clock=ticking_clock(timedelta(milliseconds=100)),
            on_message=sent.append,
            engines_per_device=2,
        )

    assert (stats.devices, stats.messages, stats.failure_events) == (3, int(train[UNIT].isin(SIX).sum()), 6)
    devices = by_device(read_partitions(store))
    assert sorted(devices) == ["Client_001", "Client_002", "Client_003"]
    for device, records in devices.items():
        times = [datetime.fromisoformat(r.enqueued_time_utc) for r in records]
        assert times == sorted(times), "a device's records in file order are in enqueued-time order"
        messages = [
            parse_message(r.body, r.device_id, r.properties, r.system_properties["contentType"])
            for r in records
        ]
        expected: list[tuple[str, int, str]] = []
        for unit in (2 * int(device[-3:]) - 1, 2 * int(device[-3:])):  # Client_002 flies units 3 then 4
            cycles = train.loc[train[UNIT] == unit, "CycleTime"].tolist()
            assert cycles[0] == 1
            expected += [(TELEMETRY, cycle, f"{device}-u{unit:03d}-c{cycle:04d}") for cycle in cycles]
            expected.append((FAILURE, cycles[-1], f"{device}-u{unit:03d}-failure"))
        assert [(m.kind, m.cycle, r.message_id) for m, r in zip(messages, records, strict=True)] == expected

    # Round by round: the k-th telemetry message of every device goes out before any device's k+1-th,
    # so the second engine's cycle 1 is sent in the round after the first one's failure event.
    telemetry = [r for r in sent if r.properties == {}]
    rounds = Counter[str | None]()
    keys = []
    for record in telemetry:
        keys.append((rounds[record.device_id], record.device_id))
        rounds[record.device_id] += 1
    assert keys == sorted(keys)


def test_duplicates_are_resent_in_a_later_file_with_the_same_id_and_body(
    train: pd.DataFrame, tmp_path: Path
) -> None:
    clean = LocalStore(tmp_path / "clean")
    with CaptureWriter(clean) as writer:
        once = replay(train, writer, units=SIX, clock=ticking_clock(timedelta(milliseconds=100)))
    originals = {r.message_id: r for records in read_files(clean).values() for r in records}

    store = LocalStore(tmp_path / "duplicates")
    with CaptureWriter(store) as writer:
        stats = replay(
            train, writer, units=SIX, clock=ticking_clock(timedelta(milliseconds=100)), duplicates=0.1, seed=3
        )

    total = once.messages + once.failure_events
    assert (stats.messages, stats.failure_events) == (once.messages, once.failure_events)
    assert stats.duplicates == round(0.1 * total) > 0
    copies: dict[str | None, list[tuple[str, CaptureRecord]]] = {}
    for name, records in read_files(store).items():
        for record in records:
            copies.setdefault(record.message_id, []).append((name, record))
    assert copies.keys() == originals.keys(), (
        "the distinct messages are those of the replay without duplicates"
    )
    assert Counter(len(c) for c in copies.values()) == {1: total - stats.duplicates, 2: stats.duplicates}
    last_original = max(c[0][1].enqueued_time_utc for c in copies.values())
    resent_early = 0
    for message_id, [(name, first), *again] in copies.items():
        assert (first.body, first.properties) == (
            originals[message_id].body,
            originals[message_id].properties,
        )
        for copy_name, copy in again:
            assert copy_name > name, "a copy lands in a later file of its partition, never in the original's"
            assert (copy.body, copy.properties, copy.device_id) == (
                first.body,
                first.properties,
                first.device_id,
            )
            assert copy.enqueued_time_utc > first.enqueued_time_utc
            assert copy.system_properties["enqueuedTime"] == copy.enqueued_time_utc
            resent_early += copy.enqueued_time_utc < last_original
    assert resent_early > 0, "copies go out during the replay once their original's file is closed"

    def duplicated(seed: int) -> set[str | None]:
        sent: list[CaptureRecord] = []
        with CaptureWriter(LocalStore(tmp_path / f"seed{seed}")) as writer:
            replay(train, writer, units=SIX, duplicates=0.1, seed=seed, on_message=sent.append)
        return {m for m, n in Counter(r.message_id for r in sent).items() if n == 2}

    assert {m for m, c in copies.items() if len(c) == 2} == duplicated(3), "the same seed, the same copies"
    assert duplicated(3) != duplicated(4)


def test_late_files_are_published_after_later_ones_under_their_own_name(
    train: pd.DataFrame, tmp_path: Path
) -> None:
    folders = count()

    def publish(late: float, seed: int) -> tuple[RecordingStore, ReplayStats]:
        store = RecordingStore(tmp_path / str(next(folders)))
        # 100 records per file also splits minutes: a late file must keep its name ahead of its -0001.
        with CaptureWriter(store, max_records=100, late=late, seed=seed) as writer:
            stats = replay(train, writer, units=SIX, clock=ticking_clock(timedelta(milliseconds=100)))
        assert (stats.files, stats.late_files) == (len(store.created), writer.late_files)
        return store, stats

    in_time, _ = publish(0.0, 2)
    late, stats = publish(0.3, 2)
    assert late.created == publish(0.3, 2)[0].created != publish(0.3, 5)[0].created, "drawn with the seed"

    assert read_files(late) == read_files(in_time), "the same files, names and records, only later"
    for partition in ("00", "01", "02", "03"):
        names = [name for name in in_time.created if name.split("/")[1] == partition]
        assert names == sorted(names), "without late files a partition's files appear in name order"
    closing = {name: i for i, name in enumerate(in_time.created)}
    overtaken = [
        name
        for i, name in enumerate(late.created)
        if any(closing[n] > closing[name] for n in late.created[:i])
    ]
    assert 0 < len(overtaken) == stats.late_files < len(late.created) // 2
    same_partition = [
        name
        for i, name in enumerate(late.created)
        if any(n > name and n.split("/")[1] == name.split("/")[1] for n in late.created[:i])
    ]
    assert same_partition, "a reader listing a partition sees a file appear before an earlier name"


class ArrivalOrder(AcknowledgedTransport):
    """The receiving end of a transport that delivers one message at a time: the order of arrival."""

    def __init__(self, late: float, seed: int) -> None:
        super().__init__(late, seed)
        self.arrived: list[CaptureRecord] = []

    def _send_now(self, record: CaptureRecord, device_id: str) -> None:
        self.arrived.append(record)

    def close(self) -> None:
        pass


def test_late_messages_arrive_after_later_ones_of_their_device_never_after_its_failure_event(
    train: pd.DataFrame,
) -> None:
    def deliver(late: float, seed: int) -> tuple[ArrivalOrder, ReplayStats]:
        transport = ArrivalOrder(late, seed)
        stats = replay(train, transport, units=SIX, engines_per_device=2, duplicates=0.05, seed=seed)
        return transport, stats

    in_order, _ = deliver(0.0, 4)
    late, stats = deliver(0.2, 4)
    ids = [record.message_id for record in late.arrived]
    assert (
        ids
        == [r.message_id for r in deliver(0.2, 4)[0].arrived]
        != [r.message_id for r in deliver(0.2, 5)[0].arrived]
    ), "drawn with the seed"
    assert Counter(ids) == Counter(r.message_id for r in in_order.arrived), "the same messages, later"

    in_time = dict.fromkeys(record.message_id for record in in_order.arrived)
    sent_at = {message_id: i for i, message_id in enumerate(in_time)}
    originals = list(dict.fromkeys(ids))  # first arrivals; copies come after their original
    overtaken = 0
    for device in {record.device_id for record in late.arrived}:
        arrived = [message_id for message_id in originals if message_id.startswith(f"{device}-")]
        newest = -1
        for i, message_id in enumerate(arrived):
            overtaken += sent_at[message_id] < newest
            newest = max(newest, sent_at[message_id])
            # Late by 1-3 of its device's later sends: at most 3 of its later messages came first.
            assert sum(sent_at[m] > sent_at[message_id] for m in arrived[:i]) <= 3, message_id
            if message_id.endswith("-failure"):  # every message of its engine arrived before it
                engine = message_id.removesuffix("failure")
                assert not [later for later in arrived[i + 1 :] if later.startswith(engine)], message_id
    assert 0 < overtaken <= stats.late_files == late.late_messages < 0.3 * len(ids)


def test_interrupt_publishes_held_files_and_sent_copies(train: pd.DataFrame, tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    sent: list[CaptureRecord] = []
    with (
        pytest.raises(ReplayInterrupted) as stopped,
        CaptureWriter(store, max_records=50, late=0.5) as writer,
    ):
        replay(
            train,
            writer,
            units=SIX,
            clock=ticking_clock(timedelta(milliseconds=100)),
            on_message=ctrl_c_after(900, sent),
            duplicates=0.2,
        )

    stats = stopped.value.stats
    assert stats.duplicates > 0 and stats.late_files > 0
    assert stats.messages + stats.failure_events + stats.duplicates == 900
    files = read_files(store)
    assert stats.files == len(files)
    assert Counter(r.message_id for records in files.values() for r in records) == Counter(
        r.message_id for r in sent
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"engines_per_device": 0}, "engines_per_device"),
        ({"duplicates": 1.0}, "duplicates"),
        ({"duplicates": -0.1}, "duplicates"),
        ({"duplicates": float("nan")}, "duplicates"),
    ],
)
def test_replay_refuses_bad_delivery_arguments(
    arguments: dict[str, Any], message: str, train: pd.DataFrame, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError, match=message), CaptureWriter(store) as writer:
        replay(train, writer, units=[1], **arguments)
    assert list(store.list_names()) == []


@pytest.mark.parametrize("late", [1.0, -0.5, float("nan")])
def test_capture_writer_refuses_a_late_fraction_outside_0_1(late: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="late"):
        CaptureWriter(LocalStore(tmp_path), late=late)


def test_simulate_with_engine_changes_duplicates_and_late_files(
    cmapss_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    writers: list[tuple[CaptureWriter, dict[str, object]]] = []

    class KeptWriter(CaptureWriter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            writers.append((self, kwargs))

    monkeypatch.setattr(simulate, "CaptureWriter", KeptWriter)
    train = cmapss_dir / "train_FD001.txt"
    landing = LocalStore(tmp_path / "landing")
    argv = ["simulate", "--file", str(train), "--units", "1-4", "--landing-dir", landing.location]
    delivery = ["--engines-per-device", "2", "--duplicates", "0.05", "--late", "0.5", "--seed", "7"]
    assert main([*argv, *delivery]) == 0

    out, err = capsys.readouterr()
    assert err.startswith("replaying 2 devices (4 engines), ")
    summary = {key: value.strip() for key, value in (line.split(":", 1) for line in out.splitlines())}
    sent = int(summary["messages"]) + int(summary["failure events"])
    assert (summary["devices"], sent) == ("2", int((read_cmapss(train)[UNIT] <= 4).sum()) + 4)
    assert int(summary["duplicates"]) == round(0.05 * sent) > 0
    [(writer, arguments)] = writers
    assert (arguments["late"], arguments["seed"]) == (0.5, 7)
    assert int(summary["late files"]) == writer.late_files
    assert int(summary["files"]) == writer.files == len(list(landing.list_names()))

    records = [r for records in read_files(landing).values() for r in records]
    assert len(records) == sent + int(summary["duplicates"])
    with CaptureWriter(LocalStore(tmp_path / "direct")) as direct:
        replay(read_cmapss(train), direct, units=range(1, 5), engines_per_device=2, duplicates=0.05, seed=7)
    expected = [r for records in read_files(direct.store).values() for r in records]
    assert Counter((r.device_id, r.message_id) for r in records) == Counter(
        (r.device_id, r.message_id) for r in expected
    ), "the flags reach replay: the same devices, messages and copies as a direct call with seed 7"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--units", "0-3"], "is not a unit list"),
        (["--units", "1,x"], "is not a unit list"),
        (["--units", "99-101"], "units not in the file: 101"),
        (["--rate", "-1"], "is not a positive number"),
        (["--engines-per-device", "0"], "'0' is not a whole number of at least 1"),
        (["--engines-per-device", "1.5"], "'1.5' is not a whole number of at least 1"),
        (["--duplicates", "1"], "'1' is not a fraction in [0, 1)"),
        (["--duplicates", "nan"], "'nan' is not a fraction in [0, 1)"),
        (["--late", "-0.1"], "'-0.1' is not a fraction in [0, 1)"),
        (["--late", "x"], "'x' is not a fraction in [0, 1)"),
        (["--seed", "x"], "invalid int value: 'x'"),
    ],
)
def test_simulate_refuses_bad_arguments_in_one_line_and_writes_nothing(
    argv: list[str], message: str, cmapss_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--file", str(cmapss_dir / "train_FD001.txt"), "--landing-dir", str(tmp_path), *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(LocalStore(tmp_path).list_names()) == []


@pytest.mark.azurite
def test_simulate_into_an_azurite_container(
    cmapss_dir: Path,
    azurite: AzuriteInfo,
    blob_container: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    argv = ["simulate", "--file", str(cmapss_dir / "train_FD001.txt"), "--units", "1-3"]
    assert main([*argv, "--to", "blob", "--container", blob_container]) == 0
    out, err = capsys.readouterr()
    assert azurite.account_key not in out + err
    assert f"where:          {azurite.account_url}/{blob_container}/" in out

    store = blob_store_from_connection_string(azurite.connection_string, blob_container)
    devices = by_device(read_partitions(store))
    train = read_cmapss(cmapss_dir / "train_FD001.txt")
    assert {device: len(records) for device, records in devices.items()} == {
        f"Client_{unit:03d}": int((train[UNIT] == unit).sum()) + 1 for unit in (1, 2, 3)
    }


def test_blob_target_needs_its_secret_from_the_environment(
    cmapss_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    argv = [
        "simulate",
        "--file",
        str(cmapss_dir / "train_FD001.txt"),
        "--to",
        "blob",
        "--container",
        "landing",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "AZURE_STORAGE_CONNECTION_STRING" in err
