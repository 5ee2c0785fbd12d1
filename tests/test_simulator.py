"""The simulator against real C-MAPSS files and real stores: what a replay writes is what the fleet sent."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count, pairwise
from pathlib import Path

import orjson
import pandas as pd
import pytest
from conftest import REPO_ROOT, AzuriteInfo

from simulator.capture_writer import CaptureWriter
from simulator.replay import ReplayInterrupted, ReplayStats, UnknownUnits, replay
from turbofan_cli.main import main
from turbofan_core.capture import CaptureRecord, partition_of, read_capture
from turbofan_core.cmapss import UNIT, read_cmapss
from turbofan_core.storage import TMP_DIR, LocalStore, ObjectStore, blob_store_from_connection_string
from turbofan_core.telemetry import FAILURE, FIELDS, TELEMETRY, parse_message

START = datetime(2024, 3, 1, 11, 58, 30, tzinfo=UTC)
NAME = re.compile(r"turbofan-hub/(0[0-3])/\d{4}/\d\d/\d\d/\d\d/\d\d(-\d{4})?")


def ticking_clock(step: timedelta) -> Callable[[], datetime]:
    """A clock that advances `step` per call, so a replay spans several minute windows."""
    ticks = count()
    return lambda: START + next(ticks) * step


def read_partitions(store: ObjectStore) -> dict[str, list[CaptureRecord]]:
    """Every record in the store, per partition, in file-name order (which is write order)."""
    partitions: dict[str, list[CaptureRecord]] = {}
    for name in store.list_names():
        match = NAME.fullmatch(name)
        assert match, f"unexpected file name {name}"
        partitions.setdefault(match[1], []).extend(read_capture(store.read(name)))
    return partitions


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

    def stop_after_5000(record: CaptureRecord) -> None:
        sent.append(record)
        if len(sent) == 5_000:
            raise KeyboardInterrupt

    with pytest.raises(ReplayInterrupted) as stopped, CaptureWriter(store) as writer:
        replay(train, writer, clock=ticking_clock(timedelta(milliseconds=20)), on_message=stop_after_5000)

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
