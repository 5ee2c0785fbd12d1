"""The transparent gateway with the real `azure-iot-device` client: MQTT over TLS on port 8883
(the SDK's fixed port), so each edge here listens on its own loopback address."""

from __future__ import annotations

import itertools
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import duckdb
import paho.mqtt.client as paho
import pandas as pd
import pytest
from azure.iot.device import IoTHubDeviceClient, Message
from azure.iot.device.exceptions import ConnectionFailedError, CredentialError
from test_edge_service import HUB, Edge, bodies, bundles, start_edge, test_units  # noqa: F401 (fixtures)

from edge_module.auth import DeviceRegistry, connection_string, make_sas_token
from edge_module.certs import write_certs
from turbofan_core.cmapss import read_cmapss
from turbofan_core.storage import LocalStore
from turbofan_warehouse.ingest import ingest_new_files

PORT = 8883
_addresses = itertools.count(10)


@pytest.fixture
def gateway_edge(tmp_path: Path, bundles) -> Iterator[tuple[Edge, Path]]:  # noqa: F811
    """An edge with its gateway on a fresh loopback address, and the CA devices must trust."""
    host = f"127.0.0.{next(_addresses)}"
    certs = write_certs(tmp_path / "certs", host)
    state = tmp_path / "state"
    registry = DeviceRegistry.load(state / "devices.json")
    for device in ("Gw_001", "Gw_002", "Rest_001"):
        registry.create(device)
    bundle, path = bundles["1"]
    options = (
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--mqtt-port",
        str(PORT),
    )
    edge = start_edge(state, tmp_path / "landing", ("1", path, bundle.sha256), host=host, options=options)
    yield edge, certs.ca_cert
    if edge.process.poll() is None:
        edge.stop()


def _host(edge: Edge) -> str:
    return edge.url.split("//")[1].split(":")[0]


def device_client(edge: Edge, ca: Path, device: str, key: str | None = None) -> IoTHubDeviceClient:
    identity = edge.registry.get(device)
    if key is not None:
        identity = type(identity)(device, key, key)
    return IoTHubDeviceClient.create_from_connection_string(
        connection_string(identity, HUB, gateway_host=_host(edge)),
        server_verification_cert=ca.read_text(),
        connection_retry=False,
    )


class Answers:
    """The RUL answers a device receives on its cloud-to-device topic, by correlation id."""

    def __init__(self) -> None:
        self.by_id: dict[str, bytes] = {}
        self.changed = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self.changed:
            self.by_id[message.correlation_id] = message.data
            self.changed.notify_all()

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.by_id) >= count, timeout=60), len(self.by_id)


def test_the_sdk_client_gets_the_same_rul_as_post_telemetry(
    gateway_edge,
    test_units: pd.DataFrame,  # noqa: F811
) -> None:
    """Two FD001 test units through the gateway as two devices, and the same units over REST
    as a third: every cycle's answer through MQTT equals the REST answer."""
    edge, ca = gateway_edge
    for unit, device in ((1, "Gw_001"), (2, "Gw_002")):
        frame = test_units[test_units["unit"] == unit]
        client = device_client(edge, ca, device)
        answers = Answers()
        client.on_message_received = answers
        client.connect()
        sent = []
        for cycle, body in zip(frame["CycleTime"], bodies(frame), strict=True):
            message = Message(json.dumps(body), message_id=f"{device}-{cycle}")
            message.content_type, message.content_encoding = "application/json", "utf-8"
            client.send_message(message)  # returns once the gateway acknowledged it: stored durably
            sent.append(message.message_id)
        answers.wait_for(len(sent))
        client.shutdown()
        rest = f"Rest_{unit:03d}" if unit == 1 else None
        for message_id, body in zip(sent, bodies(frame), strict=True):
            answer = json.loads(answers.by_id[message_id])
            assert answer["status"] == "scored" and answer["model_version"] == "1"
            if rest is not None:
                status, expected = edge.send(rest, body, **{"iothub-messageid": message_id})
                assert status == 200
                assert (answer["cycle"], answer["rul"]) == (expected["cycle"], expected["rul"])


def test_refused_credentials_and_plain_tcp(gateway_edge) -> None:
    edge, ca = gateway_edge
    wrong_key = "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkgISE="
    with pytest.raises((CredentialError, ConnectionFailedError)):
        device_client(edge, ca, "Gw_001", key=wrong_key).connect()

    # The SDK will not send an expired token, nor another device's under its own client id; a raw
    # MQTT client does.
    key = edge.registry.get("Gw_001").primary_key
    expired = make_sas_token(HUB, "Gw_001", key, ttl_seconds=-60)
    other = make_sas_token(HUB, "Gw_002", edge.registry.get("Gw_002").primary_key)
    assert _raw_connect(edge, ca, "Gw_001", expired) == 5  # not authorised
    assert _raw_connect(edge, ca, "Gw_001", other) == 5
    assert _raw_connect(edge, ca, "Gw_001", make_sas_token(HUB, "Gw_001", key)) == 0

    with socket.create_connection((_host(edge), PORT), timeout=10) as plain:  # no TLS
        plain.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")  # CONNECT, empty client id
        plain.settimeout(10)
        reply = plain.recv(16)
    assert not reply.startswith(b"\x20")  # never a CONNACK: the TLS handshake fails and closes

    log = (edge.state.parent / f"edge-{edge.url.rsplit(':', 1)[1]}.log").read_text()
    assert "refused device 'Gw_001'" in log
    assert "token is for another device" in log and "token expired" in log
    assert "signature does not match" in log  # the wrong key
    assert "sig=" not in log and key not in log


def _raw_connect(edge: Edge, ca: Path, client_id: str, password: str) -> int:
    """The CONNACK code the gateway gives a paho client with this client id and password."""
    codes: list[int] = []
    done = threading.Event()
    client = paho.Client(client_id=client_id, clean_session=False, protocol=paho.MQTTv311)
    client.username_pw_set(f"{HUB}/{client_id}/?api-version=2021-04-12", password)
    client.tls_set_context(ssl.create_default_context(cafile=str(ca)))
    client.on_connect = lambda _c, _u, _f, rc: (codes.append(rc), done.set())
    client.connect(_host(edge), PORT, keepalive=30)
    client.loop_start()
    try:
        assert done.wait(30)
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


def test_simulated_fleet_through_the_gateway_survives_a_sigkill_exactly_once(
    gateway_edge, cmapss_dir: Path, tmp_path: Path
) -> None:
    """`turbofan simulate --to iothub` streams three train units through the gateway; the edge is
    SIGKILLed mid-stream and restarted; the SDK reconnects and resends what was not acknowledged.
    Then every message is in the warehouse exactly once, failure events included."""
    edge, ca = gateway_edge
    devices = [f"Client_{unit:03d}" for unit in (1, 2, 3)]
    strings = tmp_path / "devices.txt"
    strings.write_text(
        "".join(connection_string(_identity(edge, d), HUB, _host(edge)) + "\n" for d in devices)
    )
    simulate = subprocess.Popen(
        [str(Path(sys.executable).parent / "turbofan"), "simulate",
         "--file", str(cmapss_dir / "train_FD001.txt"), "--units", "1-3", "--to", "iothub",
         "--connection-strings", str(strings), "--ca-file", str(ca), "--rate", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_until(lambda: _messages_received(edge) >= 150, simulate)
        edge.stop(signal.SIGKILL)
        host = _host(edge)
        options = tuple(edge.process.args[edge.process.args.index("--landing-dir") + 2 :])
        restarted = start_edge(edge.state, edge.landing, host=host, options=options)
        output, _ = simulate.communicate(timeout=300)
    finally:
        if simulate.poll() is None:
            simulate.kill()
    restarted.stop(signal.SIGTERM)  # the forwarder's last flush
    assert simulate.returncode == 0, output
    frame = read_cmapss(cmapss_dir / "train_FD001.txt")
    rows = int((frame["unit"] <= 3).sum())
    assert f"messages:       {rows}\nfailure events: 3" in output, output
    assert "Exception caught in background thread" not in output  # the SDK's noise, kept quiet
    # Every message answered on the device's cloud-to-device topic, after the restart too: those
    # sent again because their acknowledgement died with the edge are answered "duplicate".
    counts = dict(re.findall(r"^(scored|duplicates|refused): +(\d+)$", output, re.MULTILINE))
    assert int(counts["scored"]) + int(counts["duplicates"]) == rows and counts["refused"] == "0", output

    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as conn:
        ingest_new_files(LocalStore(edge.landing), conn)
        per_message = conn.execute("SELECT count(*), count(DISTINCT message_id) FROM telemetry").fetchone()
        failures = conn.execute("SELECT count(*) FROM failure_events").fetchone()[0]
        quarantined = conn.execute("SELECT count(*) FROM telemetry_quarantine").fetchone()[0]
    assert per_message == (rows, rows) and failures == 3 and quarantined == 0


def _identity(edge: Edge, device: str):
    return edge.registry.get(device) or edge.registry.create(device)


def _messages_received(edge: Edge) -> float:
    with urllib.request.urlopen(edge.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("edge_messages_total")
    )


def _wait_until(condition, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the condition did not come true within 120 s"
        time.sleep(0.2)


def test_a_device_may_publish_and_subscribe_only_as_itself(gateway_edge) -> None:
    """IoT Hub's topic rules: a device's own telemetry and cloud-to-device topics, nothing else
    (twins and direct methods are not served); publishing elsewhere ends the connection."""
    edge, ca = gateway_edge
    client, events = _raw_client(edge, ca, "Gw_001")
    try:
        granted = []
        client.on_subscribe = lambda _c, _u, _mid, qos: (granted.append(qos), events.set())
        client.subscribe([("devices/Gw_001/messages/devicebound/#", 1), ("$iothub/twin/res/#", 0),
                          ("devices/Gw_002/messages/devicebound/#", 1)])  # fmt: skip
        assert events.wait(30)
        assert granted == [(1, 128, 128)]
        events.clear()
        client.publish("devices/Gw_002/messages/events/", b'{"CycleTime": 1}', qos=1)
        assert events.wait(30)  # on_disconnect: the gateway closed the connection
    finally:
        client.loop_stop()
    assert _messages_received(edge) == 0


def _raw_client(edge: Edge, ca: Path, device: str) -> tuple[paho.Client, threading.Event]:
    """A connected paho client for `device`, and an event its subscribe and disconnect set."""
    event = threading.Event()
    connected = threading.Event()
    client = paho.Client(client_id=device, clean_session=False, protocol=paho.MQTTv311)
    key = edge.registry.get(device).primary_key
    client.username_pw_set(f"{HUB}/{device}/?api-version=2021-04-12", make_sas_token(HUB, device, key))
    client.tls_set_context(ssl.create_default_context(cafile=str(ca)))
    client.on_connect = lambda _c, _u, _f, rc: connected.set()
    client.on_disconnect = lambda _c, _u, rc: event.set()
    client.connect(_host(edge), PORT, keepalive=30)
    client.loop_start()
    assert connected.wait(30)
    return client, event


def test_a_removed_device_is_disconnected_and_refused(gateway_edge) -> None:
    edge, ca = gateway_edge
    client, closed = _raw_client(edge, ca, "Gw_002")
    try:
        DeviceRegistry.load(edge.state / "devices.json").remove("Gw_002")  # `turbofan devices remove`
        client.publish("devices/Gw_002/messages/events/", b'{"CycleTime": 1}', qos=1)
        assert closed.wait(30)
    finally:
        client.loop_stop()
    assert (
        _raw_connect(
            edge, ca, "Gw_002", make_sas_token(HUB, "Gw_002", edge.registry.get("Gw_002").primary_key)
        )
        == 5
    )
    assert _messages_received(edge) == 0


def test_before_authentication_a_client_is_read_only_a_small_connect(gateway_edge) -> None:
    """A CONNECT announcing more than a few kilobytes is refused before its body is read: an
    unauthenticated client cannot make the gateway hold a message-sized buffer."""
    edge, ca = gateway_edge
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((_host(edge), PORT), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=_host(edge)) as tls,
    ):
        tls.sendall(b"\x10\xa0\x9c\x01")  # CONNECT, remaining length 20,000
        assert tls.recv(16) == b""  # closed, with no CONNACK


def test_an_unreadable_sessions_file_does_not_stop_the_edge(tmp_path: Path, bundles) -> None:  # noqa: F811
    host = f"127.0.0.{next(_addresses)}"
    certs = write_certs(tmp_path / "certs", host)
    state = tmp_path / "state"
    state.mkdir()
    (state / "gateway_sessions.json").write_text("{not json")  # as a torn write would leave it
    options = ("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key))
    edge = start_edge(state, tmp_path / "landing", host=host, options=options)
    try:
        assert edge.call("GET", "/healthz")[0] == 200
    finally:
        edge.stop(signal.SIGTERM)


def test_the_simulator_gives_up_on_a_gateway_gone_for_longer_than_its_retry_budget(
    gateway_edge, cmapss_dir: Path, tmp_path: Path
) -> None:
    edge, ca = gateway_edge
    strings = tmp_path / "devices.txt"
    strings.write_text(connection_string(_identity(edge, "Client_001"), HUB, _host(edge)) + "\n")
    simulate = subprocess.Popen(
        [str(Path(sys.executable).parent / "turbofan"), "simulate",
         "--file", str(cmapss_dir / "train_FD001.txt"), "--units", "1", "--to", "iothub",
         "--connection-strings", str(strings), "--ca-file", str(ca), "--rate", "20", "--retry-seconds", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_until(lambda: _messages_received(edge) >= 5, simulate)
        edge.stop(signal.SIGKILL)  # and not restarted
        output, _ = simulate.communicate(timeout=120)
    finally:
        if simulate.poll() is None:
            simulate.kill()
    assert simulate.returncode == 2, output  # a user error, in one line
    assert "was not acknowledged within 3 s" in output and "Traceback" not in output, output
