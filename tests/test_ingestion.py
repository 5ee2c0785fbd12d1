"""Ingestion through Dagster's materialize(): landing zone to warehouse, locally and on Azurite."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from dagster import AssetKey, DagsterInstance, materialize
from dagster_azure.blob import AzureBlobStorageKeyCredential, AzureBlobStorageResource

from simulator.capture_writer import CaptureWriter
from simulator.replay import replay
from turbofan_assets.assets.ingestion import ingest_landing_zone
from turbofan_assets.assets.preparation import reference_test_fleet, rul_labels
from turbofan_assets.checks import CHECKS
from turbofan_assets.definitions import build_definitions
from turbofan_assets.resources import AzureContainer, FileStore
from turbofan_core.capture import CaptureRecord, device_message, encode_avro
from turbofan_core.cmapss import read_cmapss
from turbofan_core.home import Home
from turbofan_core.storage import LocalStore, ObjectStore, blob_store_from_connection_string
from turbofan_core.telemetry import FAILURE, MEASUREMENTS, PHYSICAL_RANGES, encode_body

FD001_TRAIN_ROWS = 20_631
T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
ASSETS = [ingest_landing_zone, rul_labels, reference_test_fleet, *CHECKS]


def run(home: Home, landing_zone: FileStore | None = None, batch: list | None = None):
    """Materialise the ingestion and preparation assets with the code location's resources."""
    resources = dict(build_definitions(home).resources)
    if landing_zone is not None:
        resources["landing_zone"] = landing_zone
    with DagsterInstance.ephemeral() as instance:
        result = materialize(batch or ASSETS, resources=resources, instance=instance)
    assert result.success
    return result


def metadata(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def query(home: Home, sql: str) -> list[tuple]:
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def replay_train(store: ObjectStore, cmapss_dir: Path, units: list[int] | None = None) -> None:
    with CaptureWriter(store) as writer:
        replay(read_cmapss(cmapss_dir / "train_FD001.txt"), writer, units=units)


def message(
    device: str,
    cycle: int,
    minute: int = 0,
    message_id: str | None = None,
    sensor1: float | None = None,
    **props: str,
) -> CaptureRecord:
    values = {"CycleTime": cycle, **{name: (lo + hi) / 2 for name, (lo, hi) in PHYSICAL_RANGES.items()}}
    if sensor1 is not None:
        values["Sensor1"] = sensor1
    body = encode_body({"CycleTime": cycle} if props.get("type") == FAILURE else values)
    return device_message(device, body, T0 + timedelta(minutes=minute), props, message_id)


def materialized(result) -> set[str]:
    return {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}


def test_all_fd001_train_rows_land_once(turbofan_home: Path, cmapss_dir: Path) -> None:
    home = Home.from_env()
    replay_train(LocalStore(home.landing), cmapss_dir)

    first = run(home)
    assert metadata(first, "raw_telemetry")["dagster/row_count"] == FD001_TRAIN_ROWS
    assert metadata(first, "failure_events")["dagster/row_count"] == 100
    assert "telemetry_quarantine" not in materialized(first)  # nothing was quarantined
    assert query(home, "SELECT count(*) FROM telemetry_quarantine") == [(0,)]
    labels = metadata(first, "rul_labels")
    assert (labels["dagster/row_count"], labels["labelled_trajectories"]) == (FD001_TRAIN_ROWS, 100)
    assert metadata(first, "reference_test_fleet")["dagster/row_count"] == 13_096
    assert all(checks(first).values()), checks(first)
    # Unit 1 of FD001 runs 192 cycles: RUL counts down to 0, capped at 125 early on.
    assert query(
        home, "SELECT min(rul), max(rul), count(*) FROM rul_labels WHERE device_id = 'Client_001'"
    ) == [(0, 125, 192)]
    assert query(home, "SELECT rul FROM rul_labels WHERE device_id = 'Client_001' AND CycleTime = 100") == [
        (92,)
    ]

    # Nothing new: no ingestion output is materialised, so nothing downstream runs again.
    again = run(home)
    assert materialized(again) == {"reference_test_fleet"}  # it reads C-MAPSS files, not the landing zone
    assert query(home, "SELECT count(*) FROM telemetry") == [(FD001_TRAIN_ROWS,)]
    assert query(home, "SELECT count(*) FROM failure_events") == [(100,)]


def test_new_files_are_ingested_incrementally(turbofan_home: Path, cmapss_dir: Path) -> None:
    home = Home.from_env()
    store = LocalStore(home.landing)
    replay_train(store, cmapss_dir, units=[1, 2])
    run(home, batch=[ingest_landing_zone])
    replay_train(store, cmapss_dir, units=[3])
    second = run(home, batch=[ingest_landing_zone])
    unit3 = len(read_cmapss(cmapss_dir / "train_FD001.txt").query("unit == 3"))
    assert metadata(second, "raw_telemetry")["new_rows"] == unit3
    assert query(home, "SELECT count(DISTINCT device_id) FROM telemetry") == [(3,)]


def test_bad_records_are_quarantined_and_the_rest_ingested(turbofan_home: Path) -> None:
    home = Home.from_env()
    good = [message("Client_009", cycle) for cycle in (1, 2, 3)]
    not_json = CaptureRecord(good[0].enqueued_time_utc, b"{oops", {}, good[0].system_properties)
    anonymous = CaptureRecord(good[0].enqueued_time_utc, good[0].body, {}, {})
    nan_body = encode_body({"CycleTime": 4, **dict.fromkeys(MEASUREMENTS, 1.0)})
    nan = device_message("Client_009", nan_body.replace(b'"Sensor3":1.0', b'"Sensor3":NaN'), T0, {})
    huge_body = nan_body.replace(b'"Sensor7":1.0', b'"Sensor7":' + b"9" * 400)  # JSON has no number limit
    huge = device_message("Client_009", huge_body, T0, {})
    name = "hub/00/2026/11/27/08/00"
    records = [good[0], not_json, good[1], anonymous, nan, huge, good[2]]
    LocalStore(home.landing).create(name, encode_avro(records))

    result = run(home, batch=[ingest_landing_zone, *CHECKS])

    assert query(home, "SELECT CycleTime, source_file, position FROM telemetry ORDER BY 1") == [
        (1, name, 0),
        (2, name, 2),
        (3, name, 6),
    ]
    quarantined = query(
        home, "SELECT source_file, position, device_id, body, reason FROM telemetry_quarantine ORDER BY 2"
    )
    assert [row[:4] for row in quarantined] == [
        (name, 1, "Client_009", b"{oops"),
        (name, 3, None, good[0].body),
        (name, 4, "Client_009", nan.body),
        (name, 5, "Client_009", huge.body),
    ]
    reasons = [row[4] for row in quarantined]
    assert reasons[0].startswith("body is not JSON")
    assert reasons[1:] == [
        "no device id (connectionDeviceId is missing)",
        "Sensor3 is NaN",
        "Sensor7 is an integer beyond a float's range",
    ]
    assert metadata(result, "telemetry_quarantine")["new_rows"] == 4
    assert query(home, "SELECT records, telemetry, quarantined FROM landing_files") == [(7, 3, 4)]
    # Half the records were bad: the quarantine-rate check fails, and says why.
    assert checks(result)["quarantine_rate_below_threshold"] is False


def test_truncated_file_is_reported_and_retried_not_half_ingested(turbofan_home: Path) -> None:
    home = Home.from_env()
    whole = encode_avro([message(f"Client_{n:03d}", cycle) for n in range(1, 6) for cycle in range(1, 200)])
    # A writer that is not atomic (an upload still in progress) leaves a partial file behind.
    partial = home.landing / "hub/01/2026/11/27/08/00"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(whole[: len(whole) // 2])

    first = run(home, batch=[ingest_landing_zone, *CHECKS])
    assert materialized(first) == {"telemetry_quarantine"}
    assert (
        "hub/01/2026/11/27/08/00"
        in metadata(first, "telemetry_quarantine")["unreadable_files_retried_next_run"]
    )
    assert checks(first) == {"landing_files_readable": False, "quarantine_rate_below_threshold": True}
    assert query(home, "SELECT count(*) FROM telemetry") == [(0,)]
    assert query(home, "SELECT status, attempts FROM landing_files") == [("unreadable", 1)]

    partial.write_bytes(whole)  # the upload completes
    second = run(home, batch=[ingest_landing_zone, *CHECKS])
    assert metadata(second, "raw_telemetry")["new_rows"] == 5 * 199
    assert query(home, "SELECT status, attempts FROM landing_files") == [("ingested", 0)]
    assert "telemetry_quarantine" not in materialized(second)


def test_an_engine_replaced_after_failure_is_a_new_lifetime(turbofan_home: Path) -> None:
    home = Home.from_env()
    store = LocalStore(home.landing)
    first_engine = [message("Client_042", c) for c in (1, 2, 3)] + [message("Client_042", 3, type=FAILURE)]
    store.create("hub/02/2026/11/27/08/00", encode_avro(first_engine))
    run(home, batch=[ingest_landing_zone])
    # The replacement engine reports from cycle 1 in a later file and a later run.
    store.create("hub/02/2026/11/27/08/01", encode_avro([message("Client_042", c, 1) for c in (1, 2)]))

    result = run(home, batch=[ingest_landing_zone, rul_labels, *CHECKS])

    assert query(home, "SELECT lifetime, CycleTime FROM telemetry ORDER BY ALL") == [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
        (2, 2),
    ]
    assert query(home, "SELECT lifetime, CycleTime FROM failure_events") == [(1, 3)]
    assert query(home, "SELECT lifetime, CycleTime, rul FROM rul_labels ORDER BY ALL") == [
        (1, 1, 2),
        (1, 2, 1),
        (1, 3, 0),
    ]
    labels = metadata(result, "rul_labels")
    assert (labels["labelled_trajectories"], labels["censored_trajectories"]) == (1, 1)
    assert all(checks(result).values())


def test_duplicate_and_gapped_cycles_fail_their_checks(turbofan_home: Path) -> None:
    home = Home.from_env()
    # Cycle 2 twice with different readings and ids: not a redelivery, a device that repeats a cycle.
    records = [message("Client_007", c, message_id=f"m{c}") for c in (1, 2, 4)]
    records.append(message("Client_007", 2, message_id="m2-again", sensor1=600.0))
    LocalStore(home.landing).create("hub/03/2026/11/27/08/00", encode_avro(records))
    result = run(home, batch=[ingest_landing_zone, *CHECKS])
    outcome = checks(result)
    assert outcome["no_duplicate_cycles"] is False
    assert outcome["cycles_contiguous"] is False
    assert outcome["sensor_values_in_physical_range"] is True


def test_batches_and_worker_processes_give_the_same_warehouse(tmp_path: Path, cmapss_dir: Path) -> None:
    """Batches bound memory and workers share the parsing: neither may change the result."""
    from turbofan_warehouse.ingest import ingest_new_files

    store = LocalStore(tmp_path / "landing")
    with CaptureWriter(store, max_records=200) as writer:
        replay(read_cmapss(cmapss_dir / "train_FD001.txt"), writer, units=range(1, 11))
    tables = []
    for name, options in [("one", {"workers": 1}), ("split", {"workers": 2, "batch_records": 500})]:
        with duckdb.connect(str(tmp_path / f"{name}.duckdb")) as conn:
            report = ingest_new_files(store, conn, **options)
            assert report.files == len(list(store.list_names())) > 10
            tables.append(
                [
                    conn.execute(f"SELECT * FROM {table} ORDER BY source_file, position").fetchall()
                    for table in ("telemetry", "failure_events")
                ]
            )
    telemetry, failure_events = tables[0]
    assert len(telemetry) == report.telemetry and len(failure_events) == report.failure_events == 10
    assert {row[0] for row in telemetry} == {f"Client_{unit:03d}" for unit in range(1, 11)}
    assert tables[0] == tables[1]


@pytest.mark.azurite
def test_the_same_flow_on_an_azurite_blob_container(
    azurite, blob_container: str, turbofan_home: Path, cmapss_dir: Path
) -> None:
    home = Home.from_env()
    replay_train(blob_store_from_connection_string(azurite.connection_string, blob_container), cmapss_dir)
    landing = AzureContainer(
        storage=AzureBlobStorageResource(
            account_url=azurite.account_url,
            credential=AzureBlobStorageKeyCredential(key=azurite.account_key),
        ),
        container=blob_container,
    )
    first = run(home, landing_zone=landing)
    assert metadata(first, "raw_telemetry")["dagster/row_count"] == FD001_TRAIN_ROWS
    assert metadata(first, "rul_labels")["labelled_trajectories"] == 100
    assert all(checks(first).values())
    assert not (home.landing).exists()  # nothing was read from or written to the local default

    again = run(home, landing_zone=landing, batch=[ingest_landing_zone])
    assert materialized(again) == set()  # blob etags unchanged: nothing read again


def test_definitions_load_the_way_dagster_dev_loads_them(turbofan_home: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    dagster = Path(sys.executable).parent / "dagster"
    done = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", str(repo / "workspace.yaml")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "turbofan_assets.definitions" in done.stdout + done.stderr


def test_the_quarantine_rate_judges_the_latest_run_not_all_history(turbofan_home: Path) -> None:
    """A feed that breaks now fails the check, however clean its history."""
    home = Home.from_env()
    store = LocalStore(home.landing)
    history = [message(f"Client_{d:03d}", c) for d in range(300) for c in range(1, 101)]
    oops = CaptureRecord(history[0].enqueued_time_utc, b"{oops", {}, history[0].system_properties)
    store.create("hub/00/1", encode_avro([*history, oops]))  # 1 bad record in 30,001
    assert checks(run(home, batch=[ingest_landing_zone, *CHECKS]))["quarantine_rate_below_threshold"]
    broken = [CaptureRecord(message("Client_900", 1).enqueued_time_utc, b"{oops", {}, {}) for _ in range(199)]
    store.create("hub/00/2", encode_avro([*broken, message("Client_900", 1)]))
    result = run(home, batch=[ingest_landing_zone, *CHECKS])
    assert metadata(result, "telemetry_quarantine")["quarantine_rate_of_new_records"] == 199 / 200
    # Over all history 200 of 30,201 records (0.66 %) would pass; the latest run's 99.5 % does not.
    assert checks(result)["quarantine_rate_below_threshold"] is False


def test_a_landing_zone_of_unreadable_files_fails_loudly_then_gives_up(turbofan_home: Path) -> None:
    home = Home.from_env()
    for name in ("hub/00/a", "hub/01/b"):
        path = home.landing / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a capture file")
    config = {"ops": {"ingest_landing_zone": {"config": {"max_attempts": 2}}}}
    resources = dict(build_definitions(home).resources)
    with DagsterInstance.ephemeral() as instance:
        first, second, third = (
            materialize(
                [ingest_landing_zone, *CHECKS], resources=resources, instance=instance, run_config=config
            )
            for _ in range(3)
        )
        assert first.success and checks(first)["landing_files_readable"] is False
        assert "hub/00/a" in metadata(first, "telemetry_quarantine")["unreadable_files_retried_next_run"]
        assert "hub/01/b" in metadata(second, "telemetry_quarantine")["files_quarantined_whole"]
        assert checks(second)["landing_files_readable"] is False
        assert materialized(third) == set()  # given up: not read again, nothing to report anew
    assert query(home, "SELECT name, status, attempts FROM landing_files ORDER BY 1") == [
        ("hub/00/a", "quarantined", 2),
        ("hub/01/b", "quarantined", 2),
    ]


def test_a_file_delivered_twice_leaves_training_features_working(
    turbofan_home: Path, cmapss_dir: Path
) -> None:
    from turbofan_assets.assets.training import training_features

    home = Home.from_env()
    store = LocalStore(home.landing)
    replay_train(store, cmapss_dir, units=[1, 2])
    for name in list(store.list_names()):  # IoT Hub routes the same messages again, in new files
        store.create(f"{name}-redelivered", store.read(name))
    result = run(home, batch=[ingest_landing_zone, rul_labels, training_features, *CHECKS])
    assert (
        metadata(result, "raw_telemetry")["duplicates_dropped"]
        == metadata(result, "raw_telemetry")["dagster/row_count"] + 2
    )  # every message and both failure events once more
    assert all(checks(result).values())


def test_selecting_one_ingestion_output_explains_in_one_line(turbofan_home: Path) -> None:
    dagster = Path(sys.executable).parent / "dagster"
    done = subprocess.run(
        [
            str(dagster),
            "asset",
            "materialize",
            "-m",
            "turbofan_assets.definitions",
            "--select",
            "raw_telemetry",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "DagsterInvalidSubsetError" not in output
    assert "materialise together: select all three, e.g. --select 'group:ingestion'" in output
