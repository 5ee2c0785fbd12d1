"""The IoT Hub stand-in answers the real azure-iot-hub client as IoT Hub does: it accepts the policy
key's signature and refuses a wrong key, an expired token, another api-version, a malformed device
and an edge deployment the published schemas refuse, with IoT Hub's status codes and error bodies."""

from __future__ import annotations

import base64
import copy
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.iot.hub import IoTHubConfigurationManager, IoTHubRegistryManager
from azure.iot.hub.models import AuthenticationMechanism, ConfigurationContent, Device, SymmetricKey
from azure.iot.hub.sastoken import SasToken
from iothub_standin import API_VERSION, POLICY_NAME, SCHEMAS_DIR_ENV, IoTHubStandIn, running_iothub_standin
from msrest.exceptions import ClientRequestError, HttpOperationError

# A minimal IoT Edge deployment, valid against the published schemas (agent 1.1, hub 1.2).
DEPLOYMENT: dict[str, Any] = {
    "$edgeAgent": {
        "properties.desired": {
            "schemaVersion": "1.1",
            "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25"}},
            "systemModules": {
                "edgeAgent": {
                    "type": "docker",
                    "settings": {"image": "mcr.microsoft.com/azureiotedge-agent:1.5", "createOptions": "{}"},
                },
                "edgeHub": {
                    "type": "docker",
                    "status": "running",
                    "restartPolicy": "always",
                    "settings": {"image": "mcr.microsoft.com/azureiotedge-hub:1.5", "createOptions": "{}"},
                },
            },
            "modules": {
                "turbofan": {
                    "version": "1.0",
                    "type": "docker",
                    "status": "running",
                    "restartPolicy": "always",
                    "settings": {"image": "turbofan-edge:latest", "createOptions": "{}"},
                }
            },
        }
    },
    "$edgeHub": {
        "properties.desired": {
            "schemaVersion": "1.2",
            "routes": {"upstream": "FROM /messages/* INTO $upstream"},
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200},
        }
    },
    "turbofan": {"properties.desired": {"model": {"version": 3}}},
}


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _error(error: HttpOperationError) -> tuple[int, str]:
    """(status, IoT Hub error code) of an error answer, read from its body as clients read it."""
    body = json.loads(error.response.text)
    assert set(body) == {"Message", "ExceptionMessage"}
    assert body["ExceptionMessage"].startswith("Tracking ID:")
    code = body["Message"].partition(";")[0].removeprefix("ErrorCode:")
    assert error.response.headers["iothub-errorcode"] == code
    return error.response.status_code, code


def _registry(standin: IoTHubStandIn, connection_string: str | None = None) -> IoTHubRegistryManager:
    return IoTHubRegistryManager.from_connection_string(connection_string or standin.connection_string)


def test_device_identities_round_trip_through_the_real_client(iothub_standin: IoTHubStandIn) -> None:
    registry = _registry(iothub_standin)
    primary, secondary = _key(), _key()
    created = registry.create_device_with_sas("Client_001", primary, secondary, "enabled")
    assert created.device_id == "Client_001" and created.authentication.type == "sas"
    assert created.authentication.symmetric_key.primary_key == primary
    assert registry.get_device("Client_001").etag == created.etag
    generated = registry.create_device_with_sas("Client_002", None, None, "enabled")  # IoT Hub makes keys
    assert len(base64.b64decode(generated.authentication.symmetric_key.primary_key)) >= 16
    assert sorted(device.device_id for device in registry.get_devices()) == ["Client_001", "Client_002"]

    updated = registry.update_device_with_sas("Client_001", created.etag, primary, secondary, "disabled")
    assert updated.status == "disabled" and updated.etag != created.etag
    with pytest.raises(HttpOperationError) as stale:  # the ETag read before the update
        registry.update_device_with_sas("Client_001", created.etag, primary, secondary, "enabled")
    assert _error(stale.value) == (412, "PreconditionFailed")

    registry.delete_device("Client_001")
    with pytest.raises(HttpOperationError) as gone:
        registry.get_device("Client_001")
    assert _error(gone.value) == (404, "DeviceNotFound")
    assert {(r.method, r.query["api-version"][0]) for r in iothub_standin.requests} == {
        ("PUT", API_VERSION),
        ("GET", API_VERSION),
        ("DELETE", API_VERSION),
    }


def test_device_conflicts_and_unknown_devices_are_iot_hubs_errors(iothub_standin: IoTHubStandIn) -> None:
    registry = _registry(iothub_standin)
    registry.create_device_with_sas("Client_001", _key(), _key(), "enabled")
    with pytest.raises(HttpOperationError) as again:
        registry.create_device_with_sas("Client_001", _key(), _key(), "enabled")
    assert _error(again.value) == (409, "DeviceAlreadyExists")
    with pytest.raises(HttpOperationError) as unknown:
        registry.delete_device("Client_404")
    assert _error(unknown.value) == (404, "DeviceNotFound")


@pytest.mark.parametrize(
    "device",
    [
        Device(device_id="Client_999", status="enabled"),  # not the id of the path
        Device(device_id="Client_001", status="paused"),
        Device(
            device_id="Client_001",
            status="enabled",
            authentication=AuthenticationMechanism(
                type="sas", symmetric_key=SymmetricKey(primary_key="c2hvcnQ=", secondary_key="c2hvcnQ=")
            ),
        ),
    ],
    ids=["id-mismatch", "bad-status", "bad-keys"],
)
def test_malformed_device_identities_are_refused_with_400(
    iothub_standin: IoTHubStandIn, device: Device
) -> None:
    registry = _registry(iothub_standin)
    with pytest.raises(HttpOperationError) as refused:
        registry.protocol.devices.create_or_update_identity("Client_001", device)
    assert _error(refused.value) == (400, "ArgumentInvalid")
    assert iothub_standin.devices == {}


def test_a_wrong_policy_key_is_refused_with_401(iothub_standin: IoTHubStandIn) -> None:
    wrong = iothub_standin.connection_string.replace(iothub_standin.key, _key())
    with pytest.raises(HttpOperationError) as refused:
        _registry(iothub_standin, wrong).create_device_with_sas("Client_001", _key(), _key(), "enabled")
    assert _error(refused.value) == (401, "IotHubUnauthorizedAccess")
    assert iothub_standin.devices == {}


def test_an_expired_token_is_refused_with_401(iothub_standin: IoTHubStandIn) -> None:
    """The SDK's own token class, once expired and once fresh: only the expiry differs."""
    url = f"https://{iothub_standin.hostname}/devices?api-version={API_VERSION}"
    answers = {}
    for ttl in (-60, 3600):
        token = SasToken(iothub_standin.hostname, iothub_standin.key, POLICY_NAME, ttl=ttl)
        answers[ttl] = requests.get(url, headers={"Authorization": str(token)}, timeout=30)
    assert answers[3600].status_code == 200
    assert answers[-60].status_code == 401
    assert answers[-60].json()["Message"].startswith("ErrorCode:IotHubUnauthorizedAccess;")


def test_another_api_version_is_refused_with_400(iothub_standin: IoTHubStandIn) -> None:
    registry = _registry(iothub_standin)
    registry.protocol.devices.api_version = "2018-06-30"
    with pytest.raises(HttpOperationError) as refused:
        registry.get_devices()
    assert _error(refused.value) == (400, "InvalidProtocolVersion")


def test_the_server_is_verified_against_the_test_ca_only(
    iothub_standin: IoTHubStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS is real: without the fixture's REQUESTS_CA_BUNDLE the client refuses the certificate."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    registry = _registry(iothub_standin)
    registry.protocol.config.retry_policy.retries = 0
    with pytest.raises(ClientRequestError, match="CERTIFICATE_VERIFY_FAILED"):
        registry.get_devices()
    assert iothub_standin.requests == []


def _edge_device(standin: IoTHubStandIn, device_id: str = "edge-1") -> str:
    _registry(standin).create_device_with_sas(device_id, _key(), _key(), "enabled", iot_edge=True)
    return device_id


def test_a_valid_deployment_is_applied_to_an_edge_device(iothub_standin: IoTHubStandIn) -> None:
    device = _edge_device(iothub_standin)
    manager = IoTHubConfigurationManager.from_connection_string(iothub_standin.connection_string)
    manager.apply_configuration_on_edge_device(device, ConfigurationContent(modules_content=DEPLOYMENT))
    assert iothub_standin.applied[device]["modulesContent"] == DEPLOYMENT
    posted = iothub_standin.requests[-1]
    assert (posted.method, posted.path, posted.status) == (
        "POST",
        f"/devices/{device}/applyConfigurationContent",
        204,
    )


def _broken(path: list[str], value: Any) -> dict[str, Any]:
    """DEPLOYMENT with the value at `path` replaced, or removed when `value` is None."""
    content = copy.deepcopy(DEPLOYMENT)
    parent = content
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return content


@pytest.mark.parametrize(
    "content",
    [
        _broken(["$edgeHub", "properties.desired", "routes"], None),
        _broken(["$edgeAgent", "properties.desired", "modules", "turbofan", "restartPolicy"], "sometimes"),
        _broken(["$edgeAgent", "properties.desired", "systemModules", "edgeHub"], None),
        _broken(["$edgeAgent", "properties.desired", "schemaVersion"], "9.9"),
        _broken(["$edgeHub"], None),
        _broken(["turbofan"], {"model": 3}),
    ],
    ids=[
        "no-routes",
        "bad-restart-policy",
        "no-edgehub-module",
        "unknown-schema",
        "no-edgehub",
        "no-desired",
    ],
)
def test_a_deployment_the_schemas_refuse_is_refused_with_400(
    iothub_standin: IoTHubStandIn, content: dict[str, Any]
) -> None:
    device = _edge_device(iothub_standin)
    manager = IoTHubConfigurationManager.from_connection_string(iothub_standin.connection_string)
    with pytest.raises(HttpOperationError) as refused:
        manager.apply_configuration_on_edge_device(device, ConfigurationContent(modules_content=content))
    assert _error(refused.value) == (400, "InvalidConfigurationContent")
    assert iothub_standin.applied == {}


def test_deployments_need_a_registered_edge_device(iothub_standin: IoTHubStandIn) -> None:
    _registry(iothub_standin).create_device_with_sas("Client_001", _key(), _key(), "enabled")
    manager = IoTHubConfigurationManager.from_connection_string(iothub_standin.connection_string)
    content = ConfigurationContent(modules_content=DEPLOYMENT)
    with pytest.raises(HttpOperationError) as unknown:
        manager.apply_configuration_on_edge_device("edge-404", content)
    assert _error(unknown.value) == (404, "DeviceNotFound")
    with pytest.raises(HttpOperationError) as not_edge:
        manager.apply_configuration_on_edge_device("Client_001", content)
    assert _error(not_edge.value) == (400, "ArgumentInvalid")


def test_a_missing_schema_folder_fails_instead_of_skipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SCHEMAS_DIR_ENV, str(tmp_path / "nowhere"))
    missing = pytest.raises(pytest.fail.Exception, match=SCHEMAS_DIR_ENV)
    with missing, running_iothub_standin(tmp_path / "certs"):
        pass
