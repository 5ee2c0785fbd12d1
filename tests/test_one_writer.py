"""One writer, enforced by Dagster's pool, and readers (the CLI, notebooks, checks) that never block it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
from dagster import DagsterEventType, DagsterInstance, asset, materialize

from turbofan_assets.assets.ingestion import ingest_landing_zone
from turbofan_assets.definitions import build_definitions
from turbofan_assets.resources import WAREHOUSE_POOL
from turbofan_cli.dagster_home import DAGSTER_YAML, ensure_dagster_home
from turbofan_core.capture import device_message, encode_avro
from turbofan_core.home import Home
from turbofan_core.storage import LocalStore
from turbofan_core.telemetry import PHYSICAL_RANGES, encode_body
from turbofan_warehouse import registry
from turbofan_warehouse.snapshot import publish, read_snapshot

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


def land(home: Home, name: str, device: str, cycles: range) -> None:
    readings = {name: (lo + hi) / 2 for name, (lo, hi) in PHYSICAL_RANGES.items()}
    records = [
        device_message(device, encode_body({"CycleTime": c, **readings}), T0, {}, f"{device}-{c}")
        for c in cycles
    ]
    LocalStore(home.landing).create(name, encode_avro(records))


def ingest(home: Home, instance: DagsterInstance | None = None) -> bool:
    resources = build_definitions(home).resources
    if instance is None:
        with DagsterInstance.ephemeral() as ephemeral:
            return materialize([ingest_landing_zone], resources=resources, instance=ephemeral).success
    return materialize([ingest_landing_zone], resources=resources, instance=instance).success


def test_the_repository_dagster_yaml_is_the_one_turbofan_writes() -> None:
    """`dagster dev -w workspace.yaml` in the repository reads ./dagster.yaml: the same pool limit."""
    assert (REPO / "dagster.yaml").read_text() == DAGSTER_YAML


def test_models_list_answers_while_a_writer_holds_the_warehouse(turbofan_home: Path) -> None:
    home = Home.from_env()
    with duckdb.connect(str(home.warehouse)) as writer:
        registry.ensure_registry(writer)
        version = registry.register_candidate(
            writer,
            registry.Registration(
                run_id="r1", bundle_sha256="ab" * 32, bundle_location="models/x", params={"max_depth": 4},
                feature_spec={}, rul_cap=125, cv_folds=5, cv_seed=0, cv_rmse=9.0, cv_rmse_std=1.0, cv_mae=7.0,
                baseline_cv_rmse=15.0, data_watermark={}, data_sha256="cd" * 32,
            ),
        )  # fmt: skip
        publish(writer, home.warehouse)
        # The writer keeps the file open (a materialisation in progress) while a user asks.
        done = subprocess.run(
            [str(Path(sys.executable).parent / "turbofan"), "models", "list"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    assert f"{version}" in done.stdout and "candidate" in done.stdout


def test_a_run_succeeds_while_a_reader_holds_the_snapshot(turbofan_home: Path) -> None:
    home = Home.from_env()
    land(home, "hub/00/1", "Client_001", range(1, 4))
    assert ingest(home)
    reader = subprocess.Popen(  # a notebook that keeps the documented read-only copy open
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=True); "
         "print(c.execute('SELECT count(*) FROM telemetry').fetchone()[0], flush=True); time.sleep(60)",
         str(home.warehouse.with_name("warehouse.snapshot.duckdb"))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == "3"
        land(home, "hub/00/2", "Client_001", range(4, 6))
        assert ingest(home)
        assert reader.poll() is None  # still reading, and the run did not wait for it
    finally:
        reader.kill()
        reader.wait()
        reader.stdout.close()
    with read_snapshot(home.warehouse) as conn:
        assert conn.execute("SELECT count(*) FROM telemetry").fetchone() == (5,)


SLOW_SECONDS = 3.0


@asset(pool=WAREHOUSE_POOL)
def slow_writer() -> None:
    """Stands for a long warehouse write (training): it holds the pool for a few seconds."""
    time.sleep(SLOW_SECONDS)


def _step_window(instance: DagsterInstance, run_id: str) -> tuple[float, float]:
    events = instance.all_logs(run_id)
    starts = [e.timestamp for e in events if e.dagster_event_type == DagsterEventType.STEP_START]
    ends = [e.timestamp for e in events if e.dagster_event_type == DagsterEventType.STEP_SUCCESS]
    return min(starts), max(ends)


def test_two_writers_launched_together_run_one_after_the_other(turbofan_home: Path) -> None:
    home = Home.from_env()
    land(home, "hub/00/1", "Client_001", range(1, 4))
    ensure_dagster_home(home)
    runs: dict[str, str] = {}
    with DagsterInstance.from_config(str(home.dagster)) as instance:

        def launch(name: str, assets: list) -> None:
            result = materialize(assets, resources=build_definitions(home).resources, instance=instance)
            assert result.success
            runs[name] = result.run_id

        slow = threading.Thread(target=launch, args=("slow", [slow_writer]))
        slow.start()
        time.sleep(SLOW_SECONDS / 3)  # the slow writer holds the pool now
        launch("ingest", [ingest_landing_zone])
        slow.join()
        slow_start, slow_end = _step_window(instance, runs["slow"])
        ingest_start, _ = _step_window(instance, runs["ingest"])
    assert slow_start < ingest_start
    assert ingest_start >= slow_end, "the ingestion step wrote while another writer held the pool"
