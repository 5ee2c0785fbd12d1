"""Edge device auth: tokens made by azure-iot-device itself must verify, every refusal has its own
reason and leaks no secret, and the registry file stays owner-only and whole."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

import pytest
from azure.iot.device import IoTHubDeviceClient
from azure.iot.device.common.auth.connection_string import ConnectionString
from azure.iot.device.common.auth.sastoken import RenewableSasToken
from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism
from azure.iot.device.iothub import abstract_clients

from edge_module import auth
from edge_module.auth import (
    AuthError,
    DeviceExistsError,
    DeviceRegistry,
    RegistryError,
    UnknownDeviceError,
    admin_key,
    check_admin,
    connection_string,
    device_from_authorization,
    make_sas_token,
    token_expiry,
    verify_sas_token,
)
from turbofan_core import atomic_file

HUB = "turbofan-hub.azure-devices.net"
# Every symbol IoT Hub allows, so percent-encoding and '=' in connection strings are exercised.
ODD_ID = "Client_007-x.%*?!(),:=@$'"


@pytest.fixture
def registry(tmp_path: Path) -> DeviceRegistry:
    registry = DeviceRegistry.load(tmp_path / auth.REGISTRY_FILENAME)
    registry.create("Client_001")
    registry.create("Client_002")
    return registry


def sdk_token(uri: str, key: str, ttl: int = 3600, key_name: str | None = None) -> RenewableSasToken:
    return RenewableSasToken(uri, SymmetricKeySigningMechanism(key), key_name=key_name, ttl=ttl)


def other_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- tokens made by azure-iot-device ---------------------------------------------------------------


@pytest.mark.parametrize("device_id", ["Client_001", ODD_ID])
def test_sdk_renewable_token_verifies(registry: DeviceRegistry, device_id: str) -> None:
    if registry.get(device_id) is None:
        registry.create(device_id)
    token = sdk_token(f"{HUB}/devices/{device_id}", registry.get(device_id).primary_key)
    assert verify_sas_token(str(token), registry) == device_id
    assert verify_sas_token(str(token), registry, expected_device=device_id) == device_id


class _PipelineConfig(Exception):
    """Carries the configuration the SDK client built, out of its pipeline constructor."""

    def __init__(self, config: object) -> None:
        self.config = config


def test_sdk_client_through_gateway_signs_for_the_hub_and_verifies(
    registry: DeviceRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our connection string through the SDK's own create_from_connection_string: the token names
    the hub, not the gateway; it is the MQTT password and the HTTP Authorization header. The
    pipelines are stopped before they start threads (a real client leaves a renewal alarm behind)."""

    def capture(config: object) -> None:
        raise _PipelineConfig(config)

    monkeypatch.setattr(abstract_clients.pipeline, "HTTPPipeline", capture)
    identity = registry.get("Client_001")
    with pytest.raises(_PipelineConfig) as built:
        IoTHubDeviceClient.create_from_connection_string(
            connection_string(identity, HUB, gateway_host="edge.local"), sastoken_ttl=120
        )
    config = built.value.config
    assert config.gateway_hostname == "edge.local"
    token = str(config.sastoken)
    assert token.startswith(f"SharedAccessSignature sr={HUB}%2Fdevices%2FClient_001&sig=")
    assert device_from_authorization(token, registry, expected_device="Client_001") == "Client_001"


def test_make_sas_token_is_the_sdk_format(registry: DeviceRegistry) -> None:
    identity = registry.get(ODD_ID) or registry.create(ODD_ID)
    theirs = sdk_token(f"{HUB}/devices/{ODD_ID}", identity.primary_key, ttl=600)
    ours = make_sas_token(HUB, ODD_ID, identity.primary_key, ttl_seconds=600, now=theirs.expiry_time - 600)
    assert ours == str(theirs)
    assert verify_sas_token(ours, registry) == ODD_ID


def test_secondary_key_works_and_primary_still_does(registry: DeviceRegistry) -> None:
    identity = registry.get("Client_002")
    for key in (identity.secondary_key, identity.primary_key):
        assert verify_sas_token(str(sdk_token(f"{HUB}/devices/Client_002", key)), registry) == "Client_002"


@pytest.mark.parametrize(
    "encode",
    [
        lambda uri: quote(uri, safe="!'()*"),  # encodeURIComponent, as the Node SDK does
        # lowercase escapes, as .NET's HttpUtility.UrlEncode writes them
        lambda uri: re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(uri, safe="")),
    ],
)
def test_other_sdks_encodings_of_sr_verify(registry: DeviceRegistry, encode: Callable[[str], str]) -> None:
    """The signature covers sr as sent; re-encoding it our way would refuse these tokens."""
    key = (registry.get(ODD_ID) or registry.create(ODD_ID)).primary_key
    resource = encode(f"{HUB}/devices/{ODD_ID}")
    assert resource != quote(f"{HUB}/devices/{ODD_ID}", safe="")
    signature = SymmetricKeySigningMechanism(key).sign(f"{resource}\n2000000000")
    token = f"SharedAccessSignature sr={resource}&sig={quote(signature, safe='')}&se=2000000000"
    assert verify_sas_token(token, registry, now=1_900_000_000) == ODD_ID


def test_any_hostname_is_accepted(registry: DeviceRegistry) -> None:
    key = registry.get("Client_001").primary_key
    assert verify_sas_token(make_sas_token("edge.local:8443", "Client_001", key), registry) == "Client_001"


def test_expiry_is_inclusive_until_se(registry: DeviceRegistry) -> None:
    token = make_sas_token(
        HUB, "Client_001", registry.get("Client_001").primary_key, ttl_seconds=10, now=1000
    )
    assert verify_sas_token(token, registry, now=1010) == "Client_001"
    with pytest.raises(AuthError, match="expired"):
        verify_sas_token(token, registry, now=1010.5)
    assert token_expiry(token) == 1010  # what the edge's token cache keeps it for
    with pytest.raises(AuthError, match="malformed"):
        token_expiry("SharedAccessSignature sr=x&sig=y")


# --- refusals --------------------------------------------------------------------------------------


def chain_text(error: BaseException | None) -> str:
    """The error and all it chains to, suppressed context included (a logger may still show it)."""
    parts = []
    while error is not None:
        parts += [repr(error), str(error), *map(repr, error.args)]
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def assert_refused(call: Callable[[], object], reason: str, secrets: list[str]) -> AuthError:
    """Refused with `reason`, and no secret anywhere in the exception or what it chains to."""
    with pytest.raises(AuthError) as caught:
        call()
    error = caught.value
    assert reason in error.reason
    assert str(error) == error.reason
    rendered = chain_text(error)
    for secret in secrets:
        assert secret not in error.reason
        assert secret not in rendered
    return error


def test_expired_sdk_token(registry: DeviceRegistry) -> None:
    key = registry.get("Client_001").primary_key
    token = sdk_token(f"{HUB}/devices/Client_001", key, ttl=60)
    assert_refused(
        lambda: verify_sas_token(str(token), registry, now=token.expiry_time + 1),
        "token expired",
        [str(token), key],
    )


def test_wrong_key(registry: DeviceRegistry) -> None:
    wrong = other_key()
    token = str(sdk_token(f"{HUB}/devices/Client_001", wrong))
    identity = registry.get("Client_001")
    assert_refused(
        lambda: verify_sas_token(token, registry),
        "signature does not match",
        [token, wrong, identity.primary_key, identity.secondary_key],
    )


def test_extended_expiry_breaks_the_signature(registry: DeviceRegistry) -> None:
    key = registry.get("Client_001").primary_key
    token = make_sas_token(HUB, "Client_001", key, ttl_seconds=60)
    head, _, expiry = token.rpartition("&se=")
    forged = f"{head}&se={int(expiry) + 86400}"
    assert_refused(lambda: verify_sas_token(forged, registry), "signature does not match", [forged, key])


def test_another_devices_token(registry: DeviceRegistry) -> None:
    key = registry.get("Client_002").primary_key
    token = str(sdk_token(f"{HUB}/devices/Client_002", key))
    assert_refused(
        lambda: verify_sas_token(token, registry, expected_device="Client_001"),
        "token is for another device",
        [token, key],
    )
    assert_refused(
        lambda: device_from_authorization(token, registry, expected_device="Client_001"),
        "token is for another device",
        [token, key],
    )


def test_unknown_device(registry: DeviceRegistry) -> None:
    key = other_key()
    token = str(sdk_token(f"{HUB}/devices/Client_999", key))
    assert_refused(lambda: verify_sas_token(token, registry), "unknown device", [token, key])


def test_module_token(registry: DeviceRegistry) -> None:
    key = registry.get("Client_001").primary_key
    token = str(sdk_token(f"{HUB}/devices/Client_001/modules/scorer", key))
    assert_refused(lambda: verify_sas_token(token, registry), "module tokens are not accepted", [token, key])


@pytest.mark.parametrize(
    "resource", [HUB, f"{HUB}/devices", f"{HUB}/devices/", f"{HUB}/twins/x", "/devices/x"]
)
def test_not_a_device_uri(registry: DeviceRegistry, resource: str) -> None:
    key = registry.get("Client_001").primary_key
    token = str(sdk_token(resource, key))
    assert_refused(lambda: verify_sas_token(token, registry), "token is not for a device", [token, key])


def test_policy_token(registry: DeviceRegistry) -> None:
    key = registry.get("Client_001").primary_key
    token = str(sdk_token(f"{HUB}/devices/Client_001", key, key_name="iothubowner"))
    assert_refused(lambda: verify_sas_token(token, registry), "policy tokens", [token, key])


def malformed_tokens(good: str) -> list[str]:
    sr, sig, se = good.removeprefix("SharedAccessSignature ").split("&")
    return [
        "",
        "Bearer abc",
        sig,  # no prefix
        f"SharedAccessSignature {sr}&{sig}",  # no se
        f"SharedAccessSignature {sr}&{sig}&{se}&{se}",  # duplicate field
        f"SharedAccessSignature {sr}&{sig}&{se}&extra=1",
        f"SharedAccessSignature {sr}&{sig}&se=soon",
        f"SharedAccessSignature {sr}&{sig}&se=",
        f"SharedAccessSignature {sr}&sig=%%%not-base64&{se}",
        f"SharedAccessSignature {sr}&{sig[:10]}!{sig[10:]}&{se}",  # junk a lax base64 decoder skips
        f"SharedAccessSignature {sr}&{sig}&{se}&" + "x" * 3000,
        f"SharedAccessSignature sr=%ff%fe&{sig}&{se}",  # not UTF-8 once decoded
    ]


@pytest.mark.parametrize("case", range(len(malformed_tokens("SharedAccessSignature a&b&c"))))
def test_malformed(registry: DeviceRegistry, case: int) -> None:
    key = registry.get("Client_001").primary_key
    good = make_sas_token(HUB, "Client_001", key)
    token = malformed_tokens(good)[case]
    sig = good.split("&")[1].removeprefix("sig=")
    assert_refused(lambda: verify_sas_token(token, registry), "malformed token", [good, sig, key])


def test_authorization_header(registry: DeviceRegistry) -> None:
    key = registry.get("Client_001").primary_key
    token = make_sas_token(HUB, "Client_001", key)
    assert device_from_authorization(f"  {token}\r\n", registry) == "Client_001"
    for header in (None, "", "   "):
        assert_refused(
            lambda h=header: device_from_authorization(h, registry), "missing Authorization", [key]
        )


# --- registry --------------------------------------------------------------------------------------


def test_registry_round_trips_and_verifies_after_reload(registry: DeviceRegistry) -> None:
    loaded = DeviceRegistry.load(registry.path)
    assert loaded.ids() == ["Client_001", "Client_002"]
    assert loaded.get("Client_001") == registry.get("Client_001")
    token = make_sas_token(HUB, "Client_002", registry.get("Client_002").secondary_key)
    assert verify_sas_token(token, loaded) == "Client_002"


def test_missing_file_is_an_empty_registry_created_on_first_write(tmp_path: Path) -> None:
    path = tmp_path / "state" / "devices.json"
    registry = DeviceRegistry.load(path)
    assert registry.ids() == [] and not path.exists()
    registry.create("Client_001")
    assert path.exists()


def test_keys_are_fresh_32_random_bytes(registry: DeviceRegistry) -> None:
    keys = [
        key for i in registry.ids() for key in (registry.get(i).primary_key, registry.get(i).secondary_key)
    ]
    assert len(set(keys)) == 4
    assert all(len(base64.b64decode(key, validate=True)) == 32 for key in keys)


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_file_is_0600_after_create_and_remove_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "devices.json"
    previous = os.umask(umask)
    try:
        registry = DeviceRegistry.load(path)
        registry.create("Client_001")
        assert mode(path) == 0o600
        os.chmod(path, 0o644)  # someone loosened it: the next rewrite restores owner-only
        registry.create("Client_002")
        assert mode(path) == 0o600
        registry.remove("Client_001")
        assert mode(path) == 0o600
    finally:
        os.umask(previous)
    assert DeviceRegistry.load(path).ids() == ["Client_002"]


def test_writes_leave_no_temp_files(registry: DeviceRegistry) -> None:
    registry.remove("Client_001")
    registry.create("Client_003")
    assert sorted(os.listdir(registry.path.parent)) == [".devices.json.lock", "devices.json"]


CREATOR = """
import sys
from edge_module.auth import DeviceRegistry
registry = DeviceRegistry.load(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for k in range(20):
    registry.create(f"{sys.argv[2]}_{k:02d}")
"""


def test_processes_changing_the_registry_at_once_lose_nothing(registry: DeviceRegistry) -> None:
    """Four processes (`turbofan devices create` run in parallel), each with the registry as it was
    when it started, create 20 devices each at the same moment, while this one removes a device."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with ExitStack() as stack:  # each child's pipes closed and the child waited for, whatever happens
        creators = [
            stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", CREATOR, str(registry.path), f"P{n}"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                    text=True,
                )
            )
            for n in range(4)
        ]
        for creator in creators:
            assert creator.stdout.readline() == "ready\n"
        for creator in creators:
            creator.stdin.write("go\n")
            creator.stdin.flush()
        registry.remove("Client_001")
        for creator in creators:
            assert creator.wait(timeout=60) == 0
    created = [f"P{n}_{k:02d}" for n in range(4) for k in range(20)]
    assert DeviceRegistry.load(registry.path).ids() == sorted(["Client_002", *created])


def test_failed_write_changes_nothing(registry: DeviceRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    before = registry.path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic_file.os, "replace", broken_replace)  # the disk fails, not our code
    with pytest.raises(OSError, match="disk full"):
        registry.create("Client_003")
    with pytest.raises(OSError, match="disk full"):
        registry.remove("Client_001")
    assert registry.path.read_bytes() == before
    assert sorted(os.listdir(registry.path.parent)) == [".devices.json.lock", "devices.json"]
    assert registry.ids() == ["Client_001", "Client_002"]


@pytest.mark.parametrize(
    "device_id", ["", "x" * 129, "dev/1", "dev 1", "dév", "dev;1", "dev#1", "dev\n", "a&b"]
)
def test_invalid_ids_are_refused(registry: DeviceRegistry, device_id: str) -> None:
    with pytest.raises(RegistryError, match="invalid device id"):
        registry.create(device_id)
    assert registry.ids() == ["Client_001", "Client_002"]


@pytest.mark.parametrize("device_id", ["x" * 128, "-.%_*?!(),:=@$'", "0"])
def test_valid_ids_are_accepted(registry: DeviceRegistry, device_id: str) -> None:
    assert registry.create(device_id).device_id == device_id
    assert device_id in DeviceRegistry.load(registry.path).ids()


def test_existing_and_unknown_ids(registry: DeviceRegistry) -> None:
    with pytest.raises(DeviceExistsError, match="'Client_001' already exists"):
        registry.create("Client_001")
    with pytest.raises(UnknownDeviceError, match="'Client_009' is not registered"):
        registry.remove("Client_009")
    registry.remove("Client_001")
    assert registry.get("Client_001") is None and registry.ids() == ["Client_002"]


def test_removing_from_a_registry_never_written_leaves_no_trace(tmp_path: Path) -> None:
    registry = DeviceRegistry.load(tmp_path / "state" / "devices.json")
    with pytest.raises(UnknownDeviceError, match="'Client_001' is not registered"):
        registry.remove("Client_001")
    assert not (tmp_path / "state").exists()


def test_corrupt_file_is_refused_without_showing_its_content(registry: DeviceRegistry) -> None:
    key = registry.get("Client_001").primary_key
    text = registry.path.read_text()
    for broken in (text[:-20], text.replace(key, "not base64!"), '{"devices": []}', "[]"):
        registry.path.write_text(broken)
        with pytest.raises(RegistryError) as caught:
            DeviceRegistry.load(registry.path)
        assert key not in chain_text(caught.value)


def test_loose_permissions_are_warned_about(
    registry: DeviceRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    os.chmod(registry.path, 0o644)
    DeviceRegistry.load(registry.path)
    assert "readable by others" in caplog.text


def test_repr_hides_keys(registry: DeviceRegistry) -> None:
    identity = registry.get("Client_001")
    for shown in (repr(identity), str(identity), f"{identity}", repr([identity])):
        assert "Client_001" in shown
        assert identity.primary_key not in shown and identity.secondary_key not in shown


# --- connection strings ----------------------------------------------------------------------------


@pytest.mark.parametrize("device_id", ["Client_001", ODD_ID])
def test_connection_string_parses_with_the_sdk(registry: DeviceRegistry, device_id: str) -> None:
    identity = registry.get(device_id) or registry.create(device_id)
    parsed = ConnectionString(connection_string(identity, HUB))
    assert parsed["HostName"] == HUB
    assert parsed["DeviceId"] == device_id
    assert parsed["SharedAccessKey"] == identity.primary_key
    assert parsed.get("GatewayHostName") is None

    via_gateway = ConnectionString(connection_string(identity, HUB, gateway_host="edge.local"))
    assert via_gateway["GatewayHostName"] == "edge.local"
    assert via_gateway["HostName"] == HUB


# --- admin key -------------------------------------------------------------------------------------


def test_admin_key_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("TURBOFAN_EDGE_ADMIN_KEY_FILE", str(key_file))
    monkeypatch.setenv("TURBOFAN_EDGE_ADMIN_KEY", "from-env")
    assert admin_key() == "from-env"


def test_admin_key_from_file_is_stripped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text("  s3cret-admin\n")
    monkeypatch.delenv("TURBOFAN_EDGE_ADMIN_KEY", raising=False)
    monkeypatch.setenv("TURBOFAN_EDGE_ADMIN_KEY_FILE", str(key_file))
    assert admin_key() == "s3cret-admin"


def test_no_admin_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TURBOFAN_EDGE_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TURBOFAN_EDGE_ADMIN_KEY_FILE", raising=False)
    assert admin_key() is None
    monkeypatch.setenv("TURBOFAN_EDGE_ADMIN_KEY_FILE", str(tmp_path / "missing.key"))
    with pytest.raises(FileNotFoundError):
        admin_key()


def test_check_admin() -> None:
    key = "s3cret-admin"
    assert check_admin(f"Bearer {key}", key) is None
    assert check_admin(f"bearer {key}", key) is None
    for header in (f"Bearer {key}x", f"Basic {key}", key, "Bearer ", "Bearer sécret"):
        assert_refused(lambda h=header: check_admin(h, key), "invalid admin key", [key])
    assert_refused(lambda: check_admin(None, key), "missing Authorization", [key])
    for configured in (None, ""):
        error = assert_refused(lambda c=configured: check_admin(f"Bearer {key}", c), "no admin key", [key])
        assert error.reason == "no admin key configured: set TURBOFAN_EDGE_ADMIN_KEY"
