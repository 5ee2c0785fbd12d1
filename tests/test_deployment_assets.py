"""The deployment assets, run as the code location runs them: the champion's manifest, stored and
shown, applied to a real edge module (`turbofan edge serve`) or through azure-iot-hub to the IoT
Hub stand-in, and every attempt recorded in the warehouse, refusals included.

Champions are registered and promoted through the registry (the gate's own tests train them), with
small real bundles, so the edge loads and serves them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, ExecuteInProcessResult
from iothub_standin import API_VERSION, IoTHubStandIn
from test_bundle import PARAMS, make_bundle
from test_deployment_manifest import schema_errors
from test_edge_service import ADMIN_KEY, Edge, start_edge

from turbofan_assets.definitions import DEPLOYMENT_JOB, build_definitions
from turbofan_assets.deployment_targets import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE_ENV,
    EDGE_URL_ENV,
    IOTHUB_DEVICE_ENV,
    REGISTRY_PASSWORD_ENV,
    REGISTRY_PASSWORD_FILE_ENV,
    REGISTRY_USERNAME_ENV,
)
from turbofan_assets.resources import Warehouse
from turbofan_core import deployment_manifest as dm
from turbofan_core.bundle import ModelBundle, bundle_name, write_bundle
from turbofan_core.home import Home
from turbofan_core.storage import LocalStore
from turbofan_warehouse import deployments, registry
from turbofan_warehouse.snapshot import read_snapshot

EDGE_DEVICE = "turbofan-edge-01"
TARGET_SETTINGS = (
    IOTHUB_DEVICE_ENV,
    EDGE_URL_ENV,
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE_ENV,
    REGISTRY_USERNAME_ENV,
    REGISTRY_PASSWORD_ENV,
    REGISTRY_PASSWORD_FILE_ENV,
)


@pytest.fixture(scope="module")
def bundles(fleet: pd.DataFrame) -> list[ModelBundle]:
    """Two different small real models (their RUL caps differ)."""
    return [make_bundle(fleet), make_bundle(fleet, rul_cap=100)]


@pytest.fixture
def home(turbofan_home: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    """A fresh TURBOFAN_HOME, and no deployment setting but those the test sets."""
    for variable in TARGET_SETTINGS:
        monkeypatch.delenv(variable, raising=False)
    return Home.from_env()


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    """A real edge module serving no model yet; its admin key is ADMIN_KEY."""
    state = tmp_path / "edge"
    state.mkdir()
    running = start_edge(state, tmp_path / "edge-landing")
    yield running
    if running.process.poll() is None:
        running.stop()


def promote(home: Home, bundle: ModelBundle) -> int:
    """Store `bundle` and make it the champion, as training and the gate would; its version."""
    store = LocalStore(home.models)
    name = write_bundle(store, bundle)
    with Warehouse(database=str(home.warehouse)).get_connection() as conn:
        version = registry.register_candidate(
            conn,
            registry.Registration(
                run_id=None,
                bundle_sha256=bundle.sha256,
                bundle_location=f"{store.location}/{name}",
                params=PARAMS,
                feature_spec=bundle.spec.to_dict(),
                rul_cap=bundle.rul_cap,
                cv_folds=3,
                cv_seed=0,
                cv_rmse=20.0,
                cv_rmse_std=1.0,
                cv_mae=15.0,
                baseline_cv_rmse=30.0,
                data_watermark=bundle.watermark,
                data_sha256="0" * 64,
            ),
        )
        registry.promote(conn, version, "a test's champion")
    return version


def deploy(home: Home) -> ExecuteInProcessResult:
    """Materialise both deployment assets with the code location's resources (from the environment)."""
    return build_definitions(home).resolve_job_def(DEPLOYMENT_JOB).execute_in_process(raise_on_error=False)


def metadata(result: ExecuteInProcessResult, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset)]
    return {key: value.value for key, value in event.event_specific_data.materialization.metadata.items()}


def stored_manifest(home: Home, sha256: str) -> dict:
    return json.loads((home.models / "manifests" / f"{sha256}.json").read_bytes())


def recorded(home: Home) -> tuple[list[tuple], deployments.Deployment | None]:
    """(manifest, version, target, result, reason) of every deployment, oldest first, and the current one."""
    with read_snapshot(home.warehouse) as conn:
        rows = conn.execute(
            "SELECT manifest_sha256, model_version, target, result, reason FROM deployments "
            "ORDER BY deployed_at, rowid"
        ).fetchall()
        return rows, deployments.current(conn)


def served_version(edge: Edge) -> str | None:
    status, body = edge.call("GET", "/model")
    return body["version"] if status == 200 else None


def test_the_manifest_names_the_champion_and_is_stored_and_shown(
    home: Home, bundles: list[ModelBundle], edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(EDGE_URL_ENV, edge.url)
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    version = promote(home, bundles[0])

    result = deploy(home)
    assert result.success
    shown = metadata(result, "edge_deployment_manifest")
    sha256 = shown["manifest_sha256"]
    manifest = stored_manifest(home, sha256)
    assert dm.manifest_sha256(manifest) == sha256  # content addressed
    assert shown["manifest"] == manifest  # the UI shows exactly what was stored and sent
    assert schema_errors(manifest) == []
    assert dm.model_reference(manifest) == {
        "version": str(version),
        "uri": str(home.models / bundle_name(bundles[0].sha256)),
        "sha256": bundles[0].sha256,
    }
    assert Path(dm.model_reference(manifest)["uri"]).is_absolute()
    assert ADMIN_KEY not in json.dumps(shown) + json.dumps(metadata(result, "edge_deployment"))


def test_without_a_champion_nothing_is_deployed_and_the_run_says_why(home: Home) -> None:
    with Warehouse(database=str(home.warehouse)).get_connection():
        pass  # a warehouse (and its snapshot) with no model registered
    result = deploy(home)
    assert not result.success
    failure = result.failure_data_for_node("edge_deployment_manifest").user_failure_data
    assert "no champion model to deploy" in failure.description
    assert not (home.models / "manifests").exists()


def test_deploying_to_the_local_edge_switches_the_model_it_serves(
    home: Home, bundles: list[ModelBundle], edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(EDGE_URL_ENV, edge.url)
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    assert served_version(edge) is None

    first = promote(home, bundles[0])
    result = deploy(home)
    assert result.success
    assert served_version(edge) == str(first)
    first_manifest = metadata(result, "edge_deployment_manifest")["manifest_sha256"]

    second = promote(home, bundles[1])
    result = deploy(home)
    assert result.success
    assert served_version(edge) == str(second)
    second_manifest = metadata(result, "edge_deployment_manifest")["manifest_sha256"]
    assert edge.call("GET", "/model")[1]["sha256"] == bundles[1].sha256

    rows, current = recorded(home)
    target = f"local:{edge.url}"
    assert rows == [
        (first_manifest, first, target, "applied", None),
        (second_manifest, second, target, "applied", None),
    ]
    assert (current.manifest_sha256, current.model_version) == (second_manifest, second)
    assert metadata(result, "edge_deployment")["in_service_manifest_sha256"] == second_manifest


def test_a_refused_deployment_fails_and_leaves_the_previous_one_current(
    home: Home, bundles: list[ModelBundle], edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(EDGE_URL_ENV, edge.url)
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    first = promote(home, bundles[0])
    assert deploy(home).success
    [(first_manifest, *_)], _ = recorded(home)

    second = promote(home, bundles[1])
    monkeypatch.setenv(ADMIN_KEY_ENV, "not-the-admin-key")
    result = deploy(home)
    assert not result.success
    failure = result.failure_data_for_node("edge_deployment").user_failure_data
    assert "401" in failure.description and "invalid admin key" in failure.description
    assert "not-the-admin-key" not in failure.description
    assert served_version(edge) == str(first)

    monkeypatch.setenv(EDGE_URL_ENV, "http://127.0.0.1:9")  # nothing listens there: refused too
    assert not deploy(home).success

    rows, current = recorded(home)
    assert [(row[1], row[3]) for row in rows] == [
        (first, "applied"),
        (second, "refused"),
        (second, "refused"),
    ]
    assert "invalid admin key" in rows[1][4] and "Connection refused" in rows[2][4]
    assert (current.manifest_sha256, current.model_version) == (first_manifest, first)


@pytest.fixture
def iothub(iothub_standin: IoTHubStandIn, monkeypatch: pytest.MonkeyPatch) -> IoTHubStandIn:
    """The IoT Hub stand-in (its connection string set) with one IoT Edge device, deployed to."""
    iothub_standin.put_device(EDGE_DEVICE, {"deviceId": EDGE_DEVICE, "capabilities": {"iotEdge": True}}, None)
    monkeypatch.setenv(IOTHUB_DEVICE_ENV, EDGE_DEVICE)
    return iothub_standin


def test_deploying_through_iot_hub_sends_the_signed_manifest(
    home: Home, bundles: list[ModelBundle], iothub: IoTHubStandIn
) -> None:
    version = promote(home, bundles[0])
    result = deploy(home)
    assert result.success, result.all_events
    sha256 = metadata(result, "edge_deployment_manifest")["manifest_sha256"]

    [request] = iothub.requests
    assert (request.method, request.path, request.status) == (
        "POST",
        f"/devices/{EDGE_DEVICE}/applyConfigurationContent",
        204,
    )
    assert request.query["api-version"] == [API_VERSION]
    assert request.headers["Authorization"].startswith("SharedAccessSignature sr=")  # checked by the hub
    assert request.body == {"modulesContent": stored_manifest(home, sha256)["modulesContent"]}
    assert iothub.applied[EDGE_DEVICE] == request.body
    rows, current = recorded(home)
    # Sent, not applied: the device's edgeAgent applies it later, out of the hub's answer.
    assert rows == [(sha256, version, f"iothub:{EDGE_DEVICE}", "sent", None)]


def test_iot_hub_gets_registry_credentials_that_are_never_stored_or_shown(
    home: Home, bundles: list[ModelBundle], iothub: IoTHubStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REGISTRY_USERNAME_ENV, "puller")
    monkeypatch.setenv(REGISTRY_PASSWORD_ENV, "registry-password-123")
    promote(home, bundles[0])
    job = build_definitions(home).resolve_job_def(DEPLOYMENT_JOB)
    config = {"ops": {"edge_deployment_manifest": {"config": {"registry": "contoso.azurecr.io"}}}}
    result = job.execute_in_process(run_config=config, raise_on_error=False)
    assert result.success

    [request] = iothub.requests
    runtime = request.body["modulesContent"]["$edgeAgent"]["properties.desired"]["runtime"]["settings"]
    assert runtime["registryCredentials"] == {
        "turbofan": {
            "address": "contoso.azurecr.io",
            "username": "puller",
            "password": "registry-password-123",
        }
    }
    shown = metadata(result, "edge_deployment_manifest")
    stored = (home.models / "manifests" / f"{shown['manifest_sha256']}.json").read_text()
    for kept in (stored, json.dumps(shown), json.dumps(metadata(result, "edge_deployment"))):
        assert "registry-password-123" not in kept


def test_a_deployment_iot_hub_refuses_is_recorded_and_fails(
    home: Home, bundles: list[ModelBundle], iothub: IoTHubStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    promote(home, bundles[0])
    assert deploy(home).success
    [(sent, *_)], _ = recorded(home)

    promote(home, bundles[1])
    monkeypatch.setenv(IOTHUB_DEVICE_ENV, "no-such-device")
    result = deploy(home)
    assert not result.success
    assert "DeviceNotFound" in result.failure_data_for_node("edge_deployment").user_failure_data.description
    rows, current = recorded(home)
    assert [row[3] for row in rows] == ["sent", "refused"]
    assert rows[1][2] == "iothub:no-such-device"
    assert "DeviceNotFound" in rows[1][4]
    assert current.manifest_sha256 == sent


def test_an_unchanged_champion_deploys_nothing_and_a_refused_deployment_is_tried_again(
    home: Home, bundles: list[ModelBundle], edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a refused candidate leaves: the same champion, so the same manifest, which the edge
    already serves: nothing is materialised or deployed. A deployment the edge refused is not in
    service, so running the deployment again tries it again."""
    monkeypatch.setenv(EDGE_URL_ENV, edge.url)
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    promote(home, bundles[0])
    assert deploy(home).success
    again = deploy(home)
    assert again.success and again.get_asset_materialization_events() == []
    assert len(recorded(home)[0]) == 1

    second = promote(home, bundles[1])
    monkeypatch.setenv(ADMIN_KEY_ENV, "not-the-admin-key")
    assert not deploy(home).success
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    assert deploy(home).success
    assert served_version(edge) == str(second)
    assert [row[3] for row in recorded(home)[0]] == ["applied", "refused", "applied"]
