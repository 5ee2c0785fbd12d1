"""`turbofan simulate --to edge` against the real edge module as a process: every message answered,
and once the edge has forwarded its outbox, every message in the warehouse exactly once, even when
the edge is killed mid-replay and restarted."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from conftest import free_port
from test_bundle import make_bundle
from tqdm import tqdm

from edge_module.auth import DeviceRegistry
from simulator.answers import Answer, Answers
from simulator.edge_client import EdgeClient
from turbofan_cli.main import main
from turbofan_cli.simulate import _LiveAnswers
from turbofan_core.bundle import write_bundle
from turbofan_core.capture import device_message, read_capture
from turbofan_core.cmapss import UNIT, read_cmapss
from turbofan_core.storage import LocalStore
from turbofan_warehouse.ingest import ingest_new_files

UNITS = (1, 2, 3)
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens there
DEVICES = [f"Client_{unit:03d}" for unit in UNITS]


class Edge:
    """`turbofan edge serve` on a fixed port, so a restart is found at the same URL."""

    def __init__(self, state: Path, model: tuple[Path, str] | None = None) -> None:
        self.state = state
        self.landing = state.parent / "landing"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(Path(sys.executable).parent / "turbofan"), "edge", "serve", "--port", str(self.port),
                   "--state", str(self.state), "--landing-dir", str(self.landing)]  # fmt: skip
        if self.model is not None:
            path, sha256 = self.model
            command += ["--model-uri", str(path), "--model-sha256", sha256, "--model-version", "7"]
        with (self.state.parent / "edge.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"the edge did not answer /healthz within 60 s:\n{self.log()}")

    def stop(self, sig: int) -> None:
        """SIGTERM: the edge forwards its whole outbox before it exits. SIGKILL: it just dies."""
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=30)

    def log(self) -> str:
        return (self.state.parent / "edge.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def train(cmapss_dir: Path) -> pd.DataFrame:
    return read_cmapss(cmapss_dir / "train_FD001.txt")


@pytest.fixture(scope="module")
def model(train: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small real bundle (units 4-10, so it scores engines it never saw) and its sha256."""
    fleet = train[train[UNIT].between(4, 10)].copy()
    fleet["device_id"] = fleet[UNIT].map(lambda unit: f"Client_{unit:03d}")
    fleet["lifetime"] = 1
    bundle = make_bundle(fleet)
    store = LocalStore(tmp_path_factory.mktemp("models"))
    return store.root / write_bundle(store, bundle), bundle.sha256


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """An edge state folder whose registry holds the devices of units 1-3."""
    registry = DeviceRegistry.load(tmp_path / "state" / "devices.json")
    for device in DEVICES:
        registry.create(device)
    return registry.path.parent


def running(edge: Edge) -> Iterator[Edge]:
    edge.start()
    yield edge
    if edge.process is not None and edge.process.poll() is None:
        edge.stop(signal.SIGKILL)


@pytest.fixture
def edge(state: Path) -> Iterator[Edge]:
    """An edge without a model: it accepts messages unscored."""
    yield from running(Edge(state))


@pytest.fixture
def scoring_edge(state: Path, model: tuple[Path, str]) -> Iterator[Edge]:
    yield from running(Edge(state, model))


def simulate(edge: Edge, *flags: str, file: Path) -> list[str]:
    argv = ["simulate", "--file", str(file), "--units", "1-3", "--to", "edge", "--edge-url", edge.url]
    return [*argv, "--edge-state", str(edge.state), *flags]


def count(out: str, name: str) -> int:
    """The number on the summary line `name:`."""
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(lines[name].split()[0])


def expected_ids(train: pd.DataFrame) -> set[str]:
    """The ids the replay gives units 1-3: one per cycle, and a failure event per unit."""
    ids = {f"Client_{u:03d}-u{u:03d}-failure" for u in UNITS}
    for unit, cycle in train.loc[train[UNIT].isin(UNITS), [UNIT, "CycleTime"]].itertuples(index=False):
        ids.add(f"Client_{unit:03d}-u{unit:03d}-c{cycle:04d}")
    return ids


def warehouse_ids(landing: Path, database: Path) -> Counter[str]:
    """Every message id the warehouse holds (telemetry and failure events) after ingesting `landing`."""
    with duckdb.connect(str(database)) as conn:
        ingest_new_files(LocalStore(landing), conn)
        rows = conn.execute(
            "SELECT message_id FROM telemetry UNION ALL SELECT message_id FROM failure_events"
        ).fetchall()
    return Counter(message_id for (message_id,) in rows)


def test_a_replay_to_the_edge_with_copies_and_late_messages_is_scored_and_lands_each_message_once(
    scoring_edge: Edge,
    train: pd.DataFrame,
    cmapss_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    edge = scoring_edge
    argv = simulate(edge, "--duplicates", "0.1", "--late", "0.1", file=cmapss_dir / "train_FD001.txt")
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    ids = expected_ids(train)
    messages = len(ids) - len(UNITS)
    assert (count(out, "messages"), count(out, "failure events")) == (messages, len(UNITS))
    copies = round(0.1 * len(ids))
    assert (count(out, "resent copies"), count(out, "duplicates")) == (copies, copies), out
    assert 0.05 < count(out, "late messages") / (len(ids) + copies) < 0.15, out
    assert count(out, "scored") == messages, out
    assert (count(out, "refused"), count(out, "retries"), count(out, "unscored")) == (0, 0, 0), out

    # Refusals are counted, not resent: a key the edge does not know (401), a body it refuses (422).
    record = device_message(DEVICES[0], b'{"CycleTime": 0}', datetime.now(UTC), {}, "bad-1")
    wrong_key = DeviceRegistry.load(edge.state / "devices.json").get(DEVICES[1]).primary_key
    with EdgeClient(edge.url, {DEVICES[0]: wrong_key}) as client:
        client.send(record, DEVICES[0])
    assert (client.answers.refused, client.retries) == (1, 0)
    assert "signature" in next(iter(client.answers.refusals)), client.answers.refusals
    right_key = DeviceRegistry.load(edge.state / "devices.json").get(DEVICES[0]).primary_key
    with EdgeClient(edge.url, {DEVICES[0]: right_key}) as client:
        client.send(record, DEVICES[0])
    assert (client.answers.refused, client.retries) == (1, 0)
    assert next(iter(client.answers.refusals)).startswith("HTTP 422: "), client.answers.refusals

    edge.stop(signal.SIGTERM)
    landed = Counter(
        record.message_id
        for name in LocalStore(edge.landing).list_names()
        for record in read_capture(LocalStore(edge.landing).read(name))
    )
    assert landed == Counter(dict.fromkeys(ids, 1)) + Counter({"bad-1": 1}), "copies are not forwarded"
    assert warehouse_ids(edge.landing, tmp_path / "warehouse.duckdb") == Counter(dict.fromkeys(ids, 1))


def test_an_edge_killed_mid_replay_and_restarted_loses_nothing(
    edge: Edge, train: pd.DataFrame, cmapss_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failures: list[BaseException] = []

    def kill_and_restart() -> None:
        try:
            time.sleep(1.0)  # the replay runs about 3 s at 100 cycles a second
            edge.stop(signal.SIGKILL)
            time.sleep(0.3)
            edge.start()
        except BaseException as error:
            failures.append(error)

    restarter = threading.Thread(target=kill_and_restart)
    restarter.start()
    try:
        code = main(simulate(edge, "--rate", "100", file=cmapss_dir / "train_FD001.txt"))
    finally:
        restarter.join()
    assert not failures, failures
    out, err = capsys.readouterr()
    assert code == 0, err
    assert count(out, "retries") > 0, "the edge was not down during the replay: the test proved nothing"
    assert (count(out, "refused"), count(out, "scored")) == (0, 0), out
    assert count(out, "duplicates") <= 1, "only a message in flight at the kill can be resent"

    edge.stop(signal.SIGTERM)
    ids = expected_ids(train)
    assert warehouse_ids(edge.landing, tmp_path / "warehouse.duckdb") == Counter(dict.fromkeys(ids, 1))


def test_devices_missing_from_the_registry_are_one_line_and_register_creates_them(
    cmapss_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = DeviceRegistry.load(tmp_path / "edge" / "devices.json")
    registry.create(DEVICES[0])
    nowhere = Edge(registry.path.parent)  # a free port nobody listens on
    argv = simulate(nowhere, file=cmapss_dir / "train_FD001.txt")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Client_002, Client_003" in err and "--register" in err, err
    assert "Client_001" not in err

    started = time.monotonic()
    assert main([*argv, "--register", "--retry-seconds", "0.5"]) == 2
    assert time.monotonic() - started < 5
    assert DeviceRegistry.load(registry.path).ids() == DEVICES
    last = capsys.readouterr().err.splitlines()[-1]
    assert "did not take message Client_001-u001-c0001" in last and "ConnectionRefusedError" in last, last


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--to", "edge"], "--to edge needs --edge-url URL"),
        (
            ["--to", "edge", "--edge-url", NOWHERE, "--landing-dir", "."],
            "do not apply to --to edge",
        ),
        (
            ["--edge-url", NOWHERE, "--register"],
            "--edge-url, --register only apply to --to edge",
        ),
        (["--to", "edge", "--edge-url", "ftp://host", "--edge-state", "STATE"], "is not an http(s) URL"),
    ],
)
def test_flags_that_mean_nothing_for_the_target_are_refused_in_one_line(
    flags: list[str], message: str, cmapss_dir: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--file", str(cmapss_dir / "train_FD001.txt"), "--units", "1-3"]
    assert main([*argv, *(str(state) if flag == "STATE" else flag for flag in flags)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_the_progress_bar_shows_the_devices_nearest_failure_and_retries() -> None:
    stream = io.StringIO()
    with EdgeClient(NOWHERE, {}) as client, tqdm(total=10, file=stream, ncols=200) as bar:
        live = _LiveAnswers(client, bar)
        client.answers.latest |= {
            "Client_001": Answer("scored", 50, 80.0, 60.0, 100.0, "7"),
            "Client_002": Answer("scored", 90, 12.4, 3.0, 25.0, "7"),
            "Client_003": Answer("failure_event", 99),  # failed: no longer an estimate
            "Client_004": Answer("scored", 70, 30.0, 20.0, 40.0, "7"),
        }
        live.answered(None)
        bar.refresh()
        assert "Client_002 c90 RUL 12 [3-25], Client_004 c70 RUL 30 [20-40]" in stream.getvalue()
        assert "Client_001" not in stream.getvalue()
        live.retrying("ConnectionRefusedError: refused", 118.4)
        assert "edge unreachable (ConnectionRefusedError); resending for 118 s more" in stream.getvalue()


def test_a_late_message_s_answer_does_not_replace_its_device_s_newer_one() -> None:
    def scored(cycle: int, p50: float) -> dict:
        return {"status": "scored", "cycle": cycle, "rul": {"p50": p50, "p10": p50 - 9, "p90": p50 + 9}}

    answers = Answers()
    answers.count("Client_001", scored(10, 50.0))
    answers.count("Client_001", scored(8, 52.0))  # sent late, after cycle 10
    assert (answers.latest["Client_001"].cycle, answers.scored) == (10, 2)
    answers.count("Client_001", {"status": "failure_event", "cycle": 11})
    answers.count("Client_001", scored(1, 120.0))  # the next engine's first cycle
    assert answers.latest["Client_001"] == Answer("scored", 1, 120.0, 111.0, 129.0)
