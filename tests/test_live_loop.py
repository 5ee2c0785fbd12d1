"""The closed loop on real processes: `turbofan live` (what `make demo` runs) starts the edge module,
`dagster dev` with its daemon, and the simulator streaming engines through the gateway; the edge is
SIGKILLed once mid-stream. Models are trained and deployed by the sensors and automation alone,
and every message sent ends in the warehouse exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from browser import artifacts_of, chromium, ui_page
from conftest import free_port
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from playwright.sync_api import expect

from turbofan_core.cmapss import read_cmapss
from turbofan_core.storage import LocalStore
from turbofan_warehouse.ingest import ingest_new_files

FIRST, MORE = "1-12", "13-24"  # engines `turbofan live` flies, then more from a second simulator
UNITS = 24
WAIT_SECONDS = 420  # a hang guard, far above what the loop takes
UI_TIMEOUT_MS = 60_000
FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
TURBOFAN = str(Path(sys.executable).parent / "turbofan")


def _wait_for(pattern: str, log: Path, live: subprocess.Popen) -> re.Match:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = re.search(pattern, text)
        if found:
            return found
        assert live.poll() is None, f"turbofan live exited {live.returncode}:\n{text}"
        assert not re.search(r"simulator finished \(exit [^0]", text), text
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} within {WAIT_SECONDS} s:\n{log.read_text()}")


def _fly_more_engines(home: Path, env: dict[str, str]) -> None:
    """New devices, registered with `turbofan devices` while the edge runs, fly more engines."""
    devices = [f"Client_{unit:03d}" for unit in range(13, 25)]
    created = subprocess.run(
        [TURBOFAN, "devices", "create", *devices, "--state", str(home / "edge"),
         "--gateway-host", "localhost"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    strings = home / "more_devices.txt"
    strings.write_text(created.stdout)
    flown = subprocess.run(
        [TURBOFAN, "simulate", "--file", str(home / "data" / "cmapss" / "train_FD001.txt"),
         "--units", MORE, "--to", "iothub", "--connection-strings", str(strings),
         "--ca-file", str(home / "edge" / "certs" / "ca.pem"), "--rate", "20"],
        capture_output=True, text=True, env=env, timeout=WAIT_SECONDS,
    )  # fmt: skip
    assert flown.returncode == 0, flown.stdout + flown.stderr


def _see_the_live_ui(url: str, artifacts: Path) -> None:
    """What a user watching the loop sees in the UI: the runs the sensors launched, and the
    deployment that automation materialised (screenshots kept as artifacts)."""
    with chromium() as browser, ui_page(browser, url, UI_TIMEOUT_MS) as page:
        page.goto("/runs")  # "Launched by": the sensor (its name cut short) and the automation
        expect(page.get_by_text(re.compile("^landing_zone_")).first).to_be_visible(timeout=UI_TIMEOUT_MS)
        expect(page.get_by_text("automation", exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
        page.screenshot(path=str(artifacts / "runs.png"))
        page.goto("/locations/turbofan_assets.definitions/asset-groups/deployment")
        node = page.locator("svg foreignObject").filter(has=page.get_by_text("edge_deployment", exact=True))
        expect(node.get_by_text("Materialized", exact=True)).to_be_visible(timeout=UI_TIMEOUT_MS)
        page.screenshot(path=str(artifacts / "deployment.png"))


def test_the_loop_trains_and_deploys_by_itself_and_loses_nothing_when_the_edge_is_killed(
    tmp_path: Path, cmapss_dir: Path, request: pytest.FixtureRequest
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "TURBOFAN_HOME": str(home)}
    env.pop("DAGSTER_HOME", None)
    log = tmp_path / "live.out"
    ui_port = free_port()
    with log.open("wb") as out:
        live = subprocess.Popen(
            [TURBOFAN, "live", "--units", FIRST, "--rate", "10",
             "--retrain-after", "5", "--ui-port", str(ui_port), "--edge-port", str(free_port())],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        edge_pid = int(_wait_for(r"edge module \(pid (\d+)\) ready", log, live)[1])
        _wait_for(r"landed +\d+ new files", log, live)
        _wait_for(r"ingested +[\d,]+ messages", log, live)  # the landing-zone sensor's run
        os.kill(edge_pid, signal.SIGKILL)  # mid-stream
        _wait_for(r"edge module stopped \(exit -9\); restarted", log, live)
        # The event lines read a snapshot: it may show v1 registered before the gate promoted it.
        _wait_for(r"model v1 (?:trained|now): champion", log, live)
        # The champion deployed and served: v1, or v2 when it was promoted before v1 was deployed.
        deployed = _wait_for(r"deployment +v(\d+) to local:\S+: applied", log, live)[1]
        _wait_for(rf"edge serves model v{deployed}", log, live)
        _see_the_live_ui(f"http://127.0.0.1:{ui_port}", artifacts_of(request))
        _wait_for(r"simulator finished \(exit 0\)", log, live)
        _fly_more_engines(home, env)
        _wait_for(r"model v2 trained", log, live)  # they retrain it, whatever the gate says
        # Every run the sensors and automation launched that has finished (Ctrl-C interrupts the rest).
        with DagsterInstance.from_config(str(home / "dagster")) as instance:
            finished = instance.get_runs(RunsFilter(statuses=FINISHED))
        failed = [run.job_name for run in finished if run.status != DagsterRunStatus.SUCCESS]
        assert finished and not failed, f"runs that did not succeed: {failed}"
    finally:
        os.killpg(live.pid, signal.SIGINT)  # Ctrl-C
        live.wait(timeout=180)
    text = log.read_text()
    assert "stopped. `make demo` resumes from" in text, text
    assert live.returncode == 0
    # Never twice on the same data: no model was refused for having the champion's data.
    assert "same training data" not in text, text

    # What the edge forwarded as it stopped may not be ingested yet: ingest it, then count.
    frame = read_cmapss(cmapss_dir / "train_FD001.txt")
    sent = int((frame["unit"] <= UNITS).sum())
    with duckdb.connect(str(home / "warehouse.duckdb")) as conn:
        ingest_new_files(LocalStore(home / "landing"), conn)
        rows, ids = conn.execute("SELECT count(*), count(DISTINCT message_id) FROM telemetry").fetchone()
        failures = conn.execute("SELECT count(*) FROM failure_events").fetchone()[0]
        quarantined = conn.execute("SELECT count(*) FROM telemetry_quarantine").fetchone()[0]
    assert (rows, ids, failures, quarantined) == (sent, sent, UNITS, 0)
