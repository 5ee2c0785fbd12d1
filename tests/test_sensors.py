"""The landing-zone sensor, evaluated with `build_sensor_context` on a real instance, and the runs it
requests executed for real (ingestion into the warehouse of a fresh TURBOFAN_HOME)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    RunRequest,
    SensorResult,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
    evaluate_automation_conditions,
)

from turbofan_assets.definitions import build_definitions
from turbofan_assets.resources import AzureContainer, LocalFolder, Warehouse
from turbofan_assets.sensors import (
    FILES_TAG,
    INGEST_JOB,
    RETRAIN_JOB,
    RetrainPolicy,
    landing_zone_sensor,
    retrain_job,
    retrain_policy_sensor,
    retrain_schedule,
)
from turbofan_core.capture import device_message, encode_avro
from turbofan_core.home import Home
from turbofan_core.storage import LocalStore, ObjectStore, blob_store_from_connection_string
from turbofan_core.telemetry import encode_body
from turbofan_warehouse import registry

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


def land_failures(home: Home, devices: range, minute: int) -> None:
    """A file of engines that each fly two cycles and fail: completed trajectories."""
    records = []
    for n in devices:
        device = f"Client_{n:03d}"
        records += [
            device_message(
                device,
                encode_body({"CycleTime": c, **READINGS}),
                T0 + timedelta(seconds=c),
                {},
                f"{device}-{c}",
            )
            for c in (1, 2)
        ]
        records.append(
            device_message(
                device,
                encode_body({"CycleTime": 2}),
                T0 + timedelta(seconds=3),
                {"type": "failure"},
                f"{device}-f",
            )
        )
    LocalStore(home.landing).create(f"hub/00/2026/11/28/12/{minute:02d}", encode_avro(records))


def register(home: Home, trajectories: int) -> int:
    """A model registered as trained on `trajectories` completed lifetimes (what the policy reads)."""
    with Warehouse(database=str(home.warehouse)).get_connection() as conn:
        return registry.register_candidate(
            conn,
            registry.Registration(
                run_id=None, bundle_sha256="0" * 64, bundle_location="models/x", params={}, feature_spec={},
                rul_cap=125, cv_folds=3, cv_seed=0, cv_rmse=20.0, cv_rmse_std=1.0, cv_mae=15.0,
                baseline_cv_rmse=30.0, data_watermark={"trajectories": trajectories}, data_sha256="0" * 64,
            ),
        )  # fmt: skip


def retrain_tick(home: Home, instance: DagsterInstance, threshold: int = 3) -> SensorResult:
    resources = {
        "warehouse": Warehouse(database=str(home.warehouse)),
        "retrain_policy": RetrainPolicy(min_new_trajectories=threshold),
    }
    with build_sensor_context(instance=instance, resources=resources) as context:
        return retrain_policy_sensor(context)


def test_the_retrain_policy_waits_for_enough_completed_engines_and_never_trains_twice_on_the_same_data(
    home: Home, tick: Tick, instance: DagsterInstance
) -> None:
    assert "nothing ingested" in retrain_tick(home, instance).skip_reason.skip_message
    land_failures(home, range(1, 3), minute=0)
    tick()
    below = retrain_tick(home, instance)
    assert skipped(below) and "2 newly completed trajectories" in below.skip_reason.skip_message

    land_failures(home, range(3, 4), minute=1)
    tick()
    [request] = retrain_tick(home, instance).run_requests  # at the threshold: one run
    [again] = retrain_tick(home, instance).run_requests
    assert again.run_key == request.run_key == "retrain-3"  # the same data: a key Dagster runs once

    # While that run is queued or running, nothing more is asked: it may register a model on data
    # the snapshot does not show yet.
    retraining = instance.create_run_for_job(tick.defs.resolve_job_def(RETRAIN_JOB), tags=request.tags)
    land_failures(home, range(10, 13), minute=3)
    tick()
    assert "is not finished" in retrain_tick(home, instance).skip_reason.skip_message
    instance.report_run_failed(retraining)

    register(home, trajectories=6)  # what a run on the six completed lifetimes registers
    assert skipped(retrain_tick(home, instance))
    land_failures(home, range(4, 7), minute=2)
    tick()
    [later] = retrain_tick(home, instance).run_requests
    assert later.run_key == "retrain-9"


def test_automation_rematerialises_labels_and_features_only_after_new_telemetry(
    home: Home, tick: Tick, instance: DagsterInstance
) -> None:
    defs = build_definitions(home)
    start = evaluate_automation_conditions(defs=defs, instance=instance)  # the sensor's ticks go on
    land_failures(home, range(1, 3), minute=0)
    tick()  # ingestion: raw_telemetry and failure_events materialised
    first = evaluate_automation_conditions(defs=defs, instance=instance, cursor=start.cursor)
    assert first.get_num_requested(AssetKey("rul_labels")) == 1
    assert first.get_num_requested(AssetKey("model_candidates")) == 0  # training follows the policy
    defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={AssetKey("rul_labels"), AssetKey("training_features")}
    ).execute_in_process(instance=instance)
    quiet = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert quiet.get_num_requested(AssetKey("rul_labels")) == 0  # nothing new ingested
    assert quiet.get_num_requested(AssetKey("training_features")) == 0

    land_failures(home, range(3, 4), minute=1)
    tick()
    later = evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
    assert later.get_num_requested(AssetKey("rul_labels")) == 1


def test_the_retrain_schedule_retrains_on_any_new_data_and_never_on_the_same(
    home: Home, tmp_path: Path
) -> None:
    # A schedule's context holds a reference to its instance: a persistent one, not ephemeral.
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster")) as instance:
        _scheduled_retraining(home, Tick(home, instance, LocalFolder(path=str(home.landing))))


def _scheduled_retraining(home: Home, tick: Tick) -> None:
    def scheduled() -> RunRequest | SkipReason:
        resources = {"warehouse": tick.resources["warehouse"]}
        with build_schedule_context(instance=tick.instance, resources=resources) as context:
            return retrain_schedule(context)

    assert isinstance(scheduled(), SkipReason)  # nothing ingested
    land_failures(home, range(1, 2), minute=0)
    tick()
    request = scheduled()
    assert isinstance(request, RunRequest) and request.run_key == "retrain-1"  # one new lifetime is enough
    register(home, trajectories=1)
    skipped_night = scheduled()
    assert isinstance(skipped_night, SkipReason) and "0 newly completed" in skipped_night.skip_message


def test_the_retrain_job_holds_everything_it_reads_but_the_ingested_tables(home: Home) -> None:
    """A retraining on a fresh state folder must not depend on automation having run first (the
    first live retraining once failed: `reference_test_fleet` did not exist yet)."""
    graph = build_definitions(home).resolve_asset_graph()
    job = AssetSelection.assets(*retrain_job.selection.resolve(graph))
    needed = job.upstream().resolve(graph) - AssetSelection.groups("ingestion").resolve(graph)
    assert needed == job.resolve(graph)
