"""One configuration for every Azure client: the connection strings come from the environment, a
wrong endpoint fails within seconds naming its setting, a malformed one is refused naming it, no
message ever holds a secret, and the Dagster resource built from the one storage setting works."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from conftest import AzuriteInfo
from dagster import asset, materialize
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._serdes import serialize_value
from iothub_standin import IoTHubStandIn

from turbofan_assets.definitions import build_definitions, file_store
from turbofan_assets.resources import FileStore
from turbofan_core import azure_settings
from turbofan_core.azure_settings import (
    IOTHUB_CONNECTION_STRING_ENV,
    STORAGE_CONNECTION_STRING_ENV,
    IoTHubError,
    SettingError,
)
from turbofan_core.home import Home
from turbofan_core.storage import LANDING_CONTAINER_ENV, LocalStore, write_new

TURBOFAN = str(Path(sys.executable).parent / "turbofan")
HANG_GUARD_S = 120  # far above the seconds a refused connection takes with the bounded retries
KEY = base64.b64encode(b"a secret that must never be printed, 32b").decode()


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port of 127.0.0.1 bound by nobody listening: connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # held, never listened on, so no other test takes it
        yield sock.getsockname()[1]


def _turbofan(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TURBOFAN, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=HANG_GUARD_S,
    )


def test_an_unreachable_storage_account_fails_naming_the_setting(
    closed_port: int, cmapss_dir: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{closed_port}/devstoreaccount1"
    run = _turbofan(
        ["simulate", "--file", str(cmapss_dir / "train_FD001.txt"), "--units", "1", "--to", "blob"],
        TURBOFAN_HOME=str(tmp_path),
        TURBOFAN_LANDING_CONTAINER="landing",
        AZURE_STORAGE_CONNECTION_STRING=(
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};BlobEndpoint={url}"
        ),
    )
    assert run.returncode == 2
    assert f"{STORAGE_CONNECTION_STRING_ENV}: cannot reach {url}: " in run.stderr
    assert "Connection refused" in run.stderr
    assert KEY not in run.stderr + run.stdout


def test_an_unreachable_iot_hub_fails_naming_the_setting(closed_port: int) -> None:
    run = _turbofan(
        ["devices", "list", "--iothub"],
        IOTHUB_CONNECTION_STRING=f"HostName=127.0.0.1:{closed_port};SharedAccessKeyName=owner;SharedAccessKey={KEY}",
    )
    assert run.returncode == 2
    assert f"{IOTHUB_CONNECTION_STRING_ENV}: cannot reach https://127.0.0.1:{closed_port}: " in run.stderr
    assert KEY not in run.stderr + run.stdout


@pytest.mark.parametrize(
    "value",
    [
        "   ",
        "not a connection string",
        f"AccountName=acct;AccountKey={KEY};Colour=blue",
        "AccountName=acct;AccountKey=not-base64!",
        "AccountName=acct",
        f"AccountKey={KEY}",
        f"AccountName=acct;AccountKey={KEY};AccountKey={KEY}",
    ],
)
def test_malformed_storage_strings_are_refused_naming_the_setting(value: str) -> None:
    with pytest.raises(SettingError) as refused:
        azure_settings.blob_service_client(env={STORAGE_CONNECTION_STRING_ENV: value})
    assert str(refused.value).startswith(STORAGE_CONNECTION_STRING_ENV)
    assert KEY not in str(refused.value) and "not-base64!" not in str(refused.value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "HostName=hub.azure-devices.net",
        f"HostName=hub.azure-devices.net;DeviceId=Client_001;SharedAccessKey={KEY}",
        "HostName=hub.azure-devices.net;SharedAccessKeyName=owner;SharedAccessKey=not-base64!",
        f"HostName=hub azure;SharedAccessKeyName=owner;SharedAccessKey={KEY}",
        f"HostName=hub.azure-devices.net;SharedAccessKeyName=owner;SharedAccessKey={KEY};Extra=1",
    ],
)
def test_malformed_iot_hub_strings_are_refused_naming_the_setting(value: str) -> None:
    for factory in (azure_settings.iothub_registry_manager, azure_settings.iothub_configuration_manager):
        with pytest.raises(SettingError) as refused:
            factory(env={IOTHUB_CONNECTION_STRING_ENV: value})
        assert str(refused.value).startswith(IOTHUB_CONNECTION_STRING_ENV)
        assert KEY not in str(refused.value) and "not-base64!" not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TURBOFAN_AZURE_CONNECT_TIMEOUT_S", "soon"),
        ("TURBOFAN_AZURE_READ_TIMEOUT_S", "0"),
        ("TURBOFAN_AZURE_RETRIES", "-1"),
        ("TURBOFAN_AZURE_RETRIES", "nan"),
    ],
)
def test_malformed_timeouts_are_refused_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingError, match=f"^{name}: "):
        azure_settings.iothub_registry_manager(
            env={
                IOTHUB_CONNECTION_STRING_ENV: f"HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY}",
                name: value,
            }
        )


def test_a_refused_policy_key_names_the_setting_not_the_key(iothub_standin: IoTHubStandIn) -> None:
    wrong = _key()
    manager = azure_settings.iothub_registry_manager(
        iothub_standin.connection_string.replace(iothub_standin.key, wrong)
    )
    with pytest.raises(SettingError) as refused:
        manager.get_devices()
    message = str(refused.value)
    assert message.startswith(f"{IOTHUB_CONNECTION_STRING_ENV}: https://{iothub_standin.hostname} refused")
    assert "401" in message and wrong not in message and iothub_standin.key not in message


def test_iot_hub_clients_from_the_environment_work_and_report_iot_hubs_errors(
    iothub_standin: IoTHubStandIn,
) -> None:
    """The fixture put the stand-in's policy in IOTHUB_CONNECTION_STRING: the factories read it."""
    registry = azure_settings.iothub_registry_manager()
    registry.create_device_with_sas("Client_001", _key(), _key(), "enabled")
    assert [device.device_id for device in registry.get_devices()] == ["Client_001"]
    with pytest.raises(IoTHubError) as unknown:
        registry.delete_device("Client_404")
    assert (unknown.value.status, unknown.value.code) == (404, "DeviceNotFound")
    assert "Client_404" in str(unknown.value)

    configurations = azure_settings.iothub_configuration_manager()
    with pytest.raises(IoTHubError) as refused:
        configurations.apply_configuration_on_edge_device("Client_001", {"modulesContent": {}})
    assert refused.value.status == 400


def test_a_refused_storage_key_names_the_setting_not_the_key(azurite: AzuriteInfo) -> None:
    wrong = azurite.connection_string.replace(azurite.account_key, KEY)
    with pytest.raises(SettingError) as refused:
        azure_settings.blob_store("landing", connection_string=wrong)
    message = str(refused.value)
    assert message.startswith(
        f"{STORAGE_CONNECTION_STRING_ENV}: {azurite.account_url} refused the credential (403"
    )
    assert KEY not in message and azurite.account_key not in message


def test_the_landing_zone_is_the_container_the_environment_names(
    azurite: AzuriteInfo, tmp_path: Path
) -> None:
    local = azure_settings.landing_store_from_env(tmp_path, env={})
    assert isinstance(local, LocalStore) and local.location.startswith(str(tmp_path))
    env = {
        LANDING_CONTAINER_ENV: "landing-from-env",
        STORAGE_CONNECTION_STRING_ENV: azurite.connection_string,
    }
    store = azure_settings.landing_store_from_env(tmp_path, env=env)
    write_new(store, "hub/0/file.avro", b"records")
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        blob = service.get_blob_client("landing-from-env", "hub/0/file.avro")
        assert blob.download_blob().readall() == b"records"


def test_the_dagster_blob_resource_works_from_the_one_connection_string(
    azurite: AzuriteInfo, blob_container: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built by the code location from AZURE_STORAGE_CONNECTION_STRING against Azurite on 127.0.0.1;
    its account key never reaches what the code location shows the UI."""
    monkeypatch.setenv(STORAGE_CONNECTION_STRING_ENV, azurite.connection_string)
    monkeypatch.setenv(LANDING_CONTAINER_ENV, blob_container)
    monkeypatch.setenv("TURBOFAN_MODEL_CONTAINER", blob_container)

    @asset
    def probe(landing_zone: FileStore) -> None:
        with landing_zone.open() as store:
            write_new(store, "probe/written-by-dagster", b"hello")

    landing = file_store(LANDING_CONTAINER_ENV, tmp_path / "unused")
    assert materialize([probe], resources={"landing_zone": landing}).success
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        blob = service.get_blob_client(blob_container, "probe/written-by-dagster")
        assert blob.download_blob().readall() == b"hello"

    snapshot = RepositorySnap.from_def(build_definitions(Home(tmp_path)).get_repository_def())
    users = {user.name for user in snapshot.utilized_env_vars[STORAGE_CONNECTION_STRING_ENV]}
    assert users == {"landing_zone", "model_store"}
    assert azurite.account_key not in serialize_value(snapshot)


def test_importing_the_settings_loads_no_azure_sdk_nor_dagster() -> None:
    """The edge image and `turbofan --help` import it; the SDKs come only with the clients."""
    code = (
        "import sys, turbofan_core.azure_settings; "
        "print(sorted(m for m in sys.modules if m.startswith(('azure', 'dagster', 'msrest', 'uamqp'))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.fixture
def silent_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A port that accepts connections and never answers: an endpoint that hangs."""
    accepted: list[socket.socket] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()
    for connection in accepted:
        connection.close()


def test_an_endpoint_that_never_answers_is_given_up_after_the_read_timeout_and_retries(
    silent_server: tuple[int, list[socket.socket]], cmapss_dir: Path, tmp_path: Path
) -> None:
    """The timeouts are applied, not the SDK's (about a minute of retries): with one retry, the
    storage account is tried twice, then the error names the setting."""
    port, accepted = silent_server
    url = f"http://127.0.0.1:{port}/devstoreaccount1"
    run = _turbofan(
        ["simulate", "--file", str(cmapss_dir / "train_FD001.txt"), "--units", "1", "--to", "blob"],
        TURBOFAN_HOME=str(tmp_path),
        TURBOFAN_LANDING_CONTAINER="landing",
        TURBOFAN_AZURE_READ_TIMEOUT_S="1",
        TURBOFAN_AZURE_RETRIES="1",
        AZURE_STORAGE_CONNECTION_STRING=(
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};BlobEndpoint={url}"
        ),
    )
    assert run.returncode == 2, run.stderr
    assert f"{STORAGE_CONNECTION_STRING_ENV}: cannot reach {url}: " in run.stderr
    assert len(accepted) == 2  # the first attempt and one retry
