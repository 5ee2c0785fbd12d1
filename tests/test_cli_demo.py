"""`turbofan demo` and `turbofan ui`: what `make demo` and `make ui` run, on real processes."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest
from conftest import DagsterUI
from dagster import DagsterInstance

from turbofan_cli.main import main


def test_demo_replays_materialises_and_summarises(
    turbofan_home: Path, cmapss_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", "restored-after-the-test")
    assert main(["demo", "--units", "1-5"]) == 0
    out = capsys.readouterr().out
    assert f"imported C-MAPSS FD001 from {cmapss_dir}" in out
    assert "5 devices sent" in out
    assert "labelled trajectories:  5 of 5" in out
    # The demo delivers a few messages twice, and the warehouse drops exactly those.
    sent_twice = int(re.search(r"\((\d+) delivered twice", out)[1])
    assert sent_twice > 0 and f"duplicates dropped:     {sent_twice}" in out
    assert "latest model:           v1, champion" in out
    assert "champion on FD001 test: v1, RMSE" in out
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


def test_ui_serves_the_code_location(dagster_ui: DagsterUI) -> None:
    # The `dagster_ui` fixture (tests/conftest.py) ran `turbofan demo` and then `turbofan ui`, and
    # waited for /server_info and for the code location to serve its asset nodes.
    nodes = dagster_ui.graphql("{ assetNodes { assetKey { path } groupName } }")["assetNodes"]
    groups = {node["assetKey"]["path"][-1]: node["groupName"] for node in nodes}
    assert groups["raw_telemetry"] == "ingestion"
    assert groups["rul_labels"] == "preparation"
    assert (dagster_ui.home / "dagster" / "dagster.yaml").is_file()
