"""`turbofan demo` and `turbofan ui`: what `make demo` and `make ui` run, on real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest
from dagster import DagsterInstance

from turbofan_cli.main import main

UI_START_TIMEOUT_S = 180


def test_demo_replays_materialises_and_summarises(
    turbofan_home: Path, cmapss_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", "restored-after-the-test")
    assert main(["demo", "--units", "1-5"]) == 0
    out = capsys.readouterr().out
    assert f"imported C-MAPSS FD001 from {cmapss_dir}" in out
    assert "5 devices sent" in out
    assert "labelled trajectories:  5 of 5" in out
    # The state folder is self-contained: data, landing zone, warehouse and Dagster instance.
    assert sorted(p.name for p in (turbofan_home / "data" / "cmapss").iterdir()) == [
        "RUL_FD001.txt",
        "test_FD001.txt",
        "train_FD001.txt",
    ]
    with duckdb.connect(str(turbofan_home / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(DISTINCT device_id) FROM telemetry").fetchone() == (5,)
    assert (turbofan_home / "dagster" / "dagster.yaml").is_file()
    # The run is recorded in the instance the UI reads, so it shows there.
    with DagsterInstance.from_config(str(turbofan_home / "dagster")) as instance:
        [record] = instance.get_run_records()
        assert record.dagster_run.job_name == "turbofan_pipeline"
        assert record.dagster_run.is_success


def test_demo_without_data_says_how_to_get_it(
    turbofan_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("CMAPSS_DIR", raising=False)
    assert main(["demo"]) == 2
    assert "turbofan data fetch" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_ui_serves_the_code_location(turbofan_home: Path, cmapss_dir: Path) -> None:
    port = _free_port()
    turbofan = Path(sys.executable).parent / "turbofan"
    log = (turbofan_home / "ui.log").open("wb")
    ui = subprocess.Popen(
        [str(turbofan), "ui", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "TURBOFAN_HOME": str(turbofan_home)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        while True:
            try:
                _get(f"{base}/server_info")
                break
            except OSError:
                assert ui.poll() is None, (turbofan_home / "ui.log").read_text()
                assert time.monotonic() < deadline, "the UI did not answer /server_info in time"
                time.sleep(1)
        query = {"query": "{ assetNodes { assetKey { path } groupName } }"}
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        while True:  # the code server may still be loading the definitions
            nodes = _get(f"{base}/graphql", query).get("data", {}).get("assetNodes") or []
            if nodes or time.monotonic() > deadline:
                break
            time.sleep(1)
        groups = {node["assetKey"]["path"][-1]: node["groupName"] for node in nodes}
        assert groups["raw_telemetry"] == "ingestion"
        assert groups["rul_labels"] == "preparation"
        assert (turbofan_home / "dagster" / "dagster.yaml").is_file()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
        log.close()
