"""The landing-zone sensor, evaluated with `build_sensor_context` on a real instance, and the runs it
requests executed for real (ingestion into the warehouse of a fresh TURBOFAN_HOME)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance, RunRequest, SensorResult, build_sensor_context

from turbofan_assets.definitions import build_definitions
from turbofan_assets.resources import AzureContainer, LocalFolder, Warehouse
from turbofan_assets.sensors import FILES_TAG, INGEST_JOB, landing_zone_sensor
from turbofan_core.capture import device_message, encode_avro
from turbofan_core.home import Home
from turbofan_core.storage import LocalStore, ObjectStore, blob_store_from_connection_string
from turbofan_core.telemetry import encode_body

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
READINGS = {f"Sensor{n}": 500.0 + n for n in range(1, 22)} | {
    "OperationalSetting1": 0.0,
    "OperationalSetting2": 0.0,
    "OperationalSetting3": 100.0,
}


def land(store: ObjectStore, name: str, device: str, cycles: range) -> None:
    records = [
        device_message(
            device, encode_body({"CycleTime": c, **READINGS}), T0 + timedelta(seconds=c), {}, f"{device}-{c}"
        )
        for c in cycles
    ]
    store.create(name, encode_avro(records))


class Tick:
    """Evaluates the sensor as the daemon does: its cursor carried from tick to tick, and the runs it
    requests executed in the same instance (or, with `run=False`, left queued)."""

    def __init__(self, home: Home, instance: DagsterInstance, landing_zone) -> None:
        self.defs = build_definitions(home)
        self.instance = instance
        self.resources = {"landing_zone": landing_zone, "warehouse": Warehouse(database=str(home.warehouse))}
        self.cursor: str | None = None
        self.keys: list[str] = []

    def __call__(self, run: bool = True) -> SensorResult:
        with build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources=self.resources
        ) as context:
            result = landing_zone_sensor(context)
        self.cursor = result.cursor
        for request in result.run_requests:
            if request.run_key in self.keys:  # Dagster never runs a key twice
                continue
            self.keys.append(request.run_key)
            if run:
                self.execute(request)
        return result

    def execute(self, request: RunRequest) -> None:
        tags = {**request.tags, "dagster/run_key": request.run_key}
        self.defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=self.instance, tags=tags)

    def fail(self, request: RunRequest) -> None:
        """The run the daemon launched for `request` failed (what the sensor sees of it)."""
        job = self.defs.resolve_job_def(INGEST_JOB)
        run = self.instance.create_run_for_job(job, tags={**request.tags, "dagster/run_key": request.run_key})
        self.instance.report_run_failed(run)


def skipped(result: SensorResult) -> bool:
    return result.skip_reason is not None and not result.run_requests


def telemetry_count(home: Home) -> int:
    with Warehouse(database=str(home.warehouse)).read() as conn:
        return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]


@pytest.fixture
def home(turbofan_home: Path) -> Home:
    return Home.from_env()


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


@pytest.fixture
def tick(home: Home, instance: DagsterInstance) -> Tick:
    return Tick(home, instance, LocalFolder(path=str(home.landing)))


def test_no_files_no_run(tick: Tick) -> None:
    result = tick()
    assert skipped(result) and "no new files" in result.skip_reason.skip_message


def test_new_files_are_requested_once_and_ingested(home: Home, tick: Tick) -> None:
    store = LocalStore(home.landing)
    land(store, "hub/00/2026/11/28/12/00", "Client_001", range(1, 11))
    land(store, "hub/00/2026/11/28/12/01", "Client_002", range(1, 6))
    first = tick()
    [request] = first.run_requests
    assert request.tags["turbofan/files"] == "2"
    assert telemetry_count(home) == 15
    assert skipped(tick())  # ingested: nothing new

    land(store, "hub/00/2026/11/28/12/02", "Client_001", range(11, 13))
    [later] = tick().run_requests
    assert later.run_key != request.run_key and later.tags["turbofan/files"] == "1"
    assert telemetry_count(home) == 17


def test_files_in_a_run_not_finished_are_not_requested_again(home: Home, tick: Tick) -> None:
    store = LocalStore(home.landing)
    land(store, "hub/00/2026/11/28/12/00", "Client_001", range(1, 11))
    [queued] = tick(run=False).run_requests
    land(store, "hub/00/2026/11/28/12/01", "Client_002", range(1, 6))
    [second] = tick(run=False).run_requests
    assert second.tags["turbofan/files"] == "1"  # only the new file: the first is in a queued run
    assert skipped(tick(run=False))


def test_a_lost_or_older_cursor_drops_nothing(home: Home, tick: Tick) -> None:
    store = LocalStore(home.landing)
    land(store, "hub/00/2026/11/28/12/00", "Client_001", range(1, 11))
    [queued] = tick(run=False).run_requests
    older = tick.cursor
    land(store, "hub/00/2026/11/28/12/01", "Client_002", range(1, 6))
    tick(run=False)

    tick.cursor = None  # lost: both files are requested again, in one run
    [again] = tick(run=False).run_requests
    assert again.tags["turbofan/files"] == "2"
    tick.execute(again)
    assert telemetry_count(home) == 15

    tick.cursor = older  # moved back: nothing is pending any more, so nothing is requested
    assert skipped(tick())
    assert telemetry_count(home) == 15


def test_the_files_of_a_failed_run_are_requested_again_under_a_new_key(home: Home, tick: Tick) -> None:
    store = LocalStore(home.landing)
    land(store, "hub/00/2026/11/28/12/00", "Client_001", range(1, 11))
    [failed] = tick(run=False).run_requests
    tick.fail(failed)
    [retry] = tick().run_requests
    assert retry.tags[FILES_TAG] == failed.tags[FILES_TAG] and retry.run_key != failed.run_key
    assert telemetry_count(home) == 10


def test_a_blob_container_landing_zone(
    home: Home, instance: DagsterInstance, azurite, blob_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    monkeypatch.setenv("TURBOFAN_LANDING_CONTAINER", blob_container)
    store = blob_store_from_connection_string(azurite.connection_string, blob_container)
    land(store, "hub/00/2026/11/28/12/00", "Client_001", range(1, 11))
    defs = build_definitions(home)
    landing_zone = defs.resources["landing_zone"]
    assert isinstance(landing_zone, AzureContainer)
    tick = Tick(home, instance, landing_zone)
    [request] = tick().run_requests
    assert request.tags["turbofan/files"] == "1"
    assert telemetry_count(home) == 10
    assert skipped(tick())


def test_the_cursor_holds_only_the_files_of_unfinished_runs(home: Home, tick: Tick) -> None:
    land(LocalStore(home.landing), "hub/00/2026/11/28/12/00", "Client_001", range(1, 11))
    [request] = tick(run=False).run_requests
    [files] = json.loads(tick.cursor).values()
    assert list(files) == ["hub/00/2026/11/28/12/00"]
    tick.execute(request)
    assert skipped(tick()) and json.loads(tick.cursor) == {}
