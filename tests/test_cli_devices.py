"""`turbofan devices` as a user runs it: identities in the edge's registry file, or in IoT Hub (the
stand-in, through the real azure-iot-hub client); printed connection strings that authenticate."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
from iothub_standin import IoTHubStandIn

from edge_module.auth import REGISTRY_FILENAME, DeviceRegistry, make_sas_token, verify_sas_token
from turbofan_cli.main import main


def _fields(connection_string: str) -> dict[str, str]:
    return dict(part.partition("=")[::2] for part in connection_string.split(";"))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_local_create_list_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "edge"
    code, out, _ = _run(
        [
            "devices",
            "create",
            "Client_001",
            "Client_002",
            "--state",
            str(state),
            "--gateway-host",
            "edge.local",
        ],
        capsys,
    )
    assert code == 0
    strings = out.splitlines()
    registry_file = state / REGISTRY_FILENAME
    assert stat.S_IMODE(registry_file.stat().st_mode) == 0o600
    registry = DeviceRegistry.load(registry_file)
    for device, line in zip(["Client_001", "Client_002"], strings, strict=True):
        fields = _fields(line)
        assert fields["DeviceId"] == device
        assert fields["HostName"] == socket.gethostname()  # the documented default: where the edge runs
        assert fields["GatewayHostName"] == "edge.local"
        # The printed key signs a token the edge accepts for that device.
        token = make_sas_token(fields["HostName"], device, fields["SharedAccessKey"])
        assert verify_sas_token(token, registry) == device

    code, out, _ = _run(["devices", "list", "--state", str(state)], capsys)
    assert (code, out.splitlines()) == (0, ["Client_001", "Client_002"])
    assert all(_fields(line)["SharedAccessKey"] not in out for line in strings)

    assert _run(["devices", "remove", "Client_001", "--state", str(state)], capsys)[0] == 0
    assert DeviceRegistry.load(registry_file).ids() == ["Client_002"]
    assert stat.S_IMODE(registry_file.stat().st_mode) == 0o600


def test_the_hub_hostname_names_the_hub_in_local_strings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["devices", "create", "Client_001", "--state", str(tmp_path), "--hub-hostname", "hub.example"]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    assert _fields(out.strip())["HostName"] == "hub.example" and "GatewayHostName" not in out


def test_the_state_defaults_to_the_edge_folder_of_turbofan_home(
    turbofan_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["devices", "create", "Client_001"], capsys)[0] == 0
    assert DeviceRegistry.load(turbofan_home / "edge" / REGISTRY_FILENAME).ids() == ["Client_001"]


def test_existing_and_unknown_devices_are_refused_and_nothing_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ["--state", str(tmp_path)]
    assert _run(["devices", "create", "Client_001", *state], capsys)[0] == 0
    before = (tmp_path / REGISTRY_FILENAME).read_bytes()

    code, out, err = _run(["devices", "create", "Client_002", "Client_001", *state], capsys)
    assert (code, out) == (2, "")
    assert "already registered" in err and "Client_001" in err and err.count("\n") == 1
    code, _, err = _run(["devices", "remove", "Client_001", "Client_404", *state], capsys)
    assert code == 2 and "not registered" in err and "Client_404" in err
    code, _, err = _run(["devices", "create", "bad/name", *state], capsys)
    assert code == 2 and "invalid device id" in err
    assert (tmp_path / REGISTRY_FILENAME).read_bytes() == before


def test_flags_of_the_local_registry_are_refused_with_iothub(
    iothub_standin: IoTHubStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["devices", "create", "Client_001", "--iothub", "--state", str(tmp_path)], capsys)
    assert code == 2 and "--state" in err
    assert iothub_standin.requests == []


def test_iothub_create_list_remove(iothub_standin: IoTHubStandIn, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real azure-iot-hub client, on IOTHUB_CONNECTION_STRING from the environment."""
    code, out, err = _run(["devices", "create", "Client_001", "Client_002", "--iothub"], capsys)
    assert code == 0, err
    for device, line in zip(["Client_001", "Client_002"], out.splitlines(), strict=True):
        fields = _fields(line)
        assert fields["HostName"] == iothub_standin.hostname and fields["DeviceId"] == device
        stored = iothub_standin.devices[device]["authentication"]["symmetricKey"]
        assert fields["SharedAccessKey"] == stored["primaryKey"]
    assert iothub_standin.key not in out + err

    code, out, _ = _run(["devices", "list", "--iothub"], capsys)
    assert (code, out.splitlines()) == (0, ["Client_001", "Client_002"])
    assert "SharedAccessKey" not in out

    code, _, err = _run(["devices", "create", "Client_003", "Client_002", "--iothub"], capsys)
    assert code == 2 and "already registered in IoT Hub" in err and "Client_002" in err
    code, _, err = _run(["devices", "remove", "Client_404", "--iothub"], capsys)
    assert code == 2 and "not registered in IoT Hub" in err
    assert sorted(iothub_standin.devices) == ["Client_001", "Client_002"]

    assert _run(["devices", "remove", "Client_001", "Client_002", "--iothub"], capsys)[0] == 0
    assert iothub_standin.devices == {}


def test_iothub_without_the_setting_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("IOTHUB_CONNECTION_STRING", raising=False)
    code, _, err = _run(["devices", "list", "--iothub"], capsys)
    assert code == 2 and "IOTHUB_CONNECTION_STRING is not set" in err
