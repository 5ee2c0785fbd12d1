"""Gateway benchmark: devices on IoT Hub's MQTT protocol (over TLS) against the same edge over REST.

Starts `turbofan edge serve` with its gateway on a loopback address (port 8883: the SDK's), with
a bundle trained on FD001 (bench_edge's), and measures from this process, in the same run:

- REST, the baseline: single-message POST /telemetry, closed loop, one connection per device;
- the SDK: one `azure-iot-device` client per device, `send_message` back to back (each returns
  once the gateway has the message on disk), with the ack latency per message;
- pipelined MQTT: one paho client per device with up to 100 QoS 1 messages in flight, what the
  gateway itself takes when a device does not wait for each acknowledgement.

The last line is JSON.

    .venv/bin/python bench/bench_gateway.py [--devices 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from azure.iot.device import IoTHubDeviceClient, Message
from bench_edge import HUB, Devices, closed_loop, fleet, free_port, train_bundle

from edge_module.auth import DeviceRegistry, connection_string, make_sas_token
from edge_module.certs import write_certs
from turbofan_core.home import Home

HOST = "127.0.0.2"  # its own loopback address: the SDK always uses port 8883
PORT = 8883
IN_FLIGHT = 100


def wait_for_health(port: int) -> None:
    import http.client

    for _ in range(300):
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=1)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the edge did not start")


def sdk_devices(
    devices: Devices, registry: DeviceRegistry, names: list[str], ca: str, seconds: float
) -> tuple[float, list[float]]:
    """Messages per second and each message's ack latency (s), one SDK client per device."""
    latencies: list[list[float]] = [[] for _ in names]
    clients = [
        IoTHubDeviceClient.create_from_connection_string(
            connection_string(registry.get(name), HUB, gateway_host=HOST), server_verification_cert=ca
        )
        for name in names
    ]
    for client in clients:
        client.connect()
    stop_at = time.perf_counter() + seconds

    def send(index: int) -> None:
        while time.perf_counter() < stop_at:
            message = devices.next(names[index])
            outgoing = Message(json.dumps(message["body"]), message_id=message["messageId"])
            outgoing.content_type, outgoing.content_encoding = "application/json", "utf-8"
            start = time.perf_counter()
            clients[index].send_message(outgoing)
            latencies[index].append(time.perf_counter() - start)

    began = time.perf_counter()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(names))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for client in clients:
        client.shutdown()
    flat = [latency for per_device in latencies for latency in per_device]
    return len(flat) / elapsed, flat


def pipelined(
    devices: Devices, registry: DeviceRegistry, names: list[str], ca: Path, seconds: float
) -> float:
    """Messages per second acknowledged, paho clients keeping IN_FLIGHT QoS 1 messages in flight."""
    acked = [0] * len(names)
    stop_at = time.perf_counter() + seconds

    def run(index: int) -> None:
        name = names[index]
        window = threading.Semaphore(IN_FLIGHT)
        client = paho.Client(client_id=name, clean_session=False, protocol=paho.MQTTv311)
        key = registry.get(name).primary_key
        client.username_pw_set(f"{HUB}/{name}/?api-version=2021-04-12", make_sas_token(HUB, name, key))
        client.tls_set_context(ssl.create_default_context(cafile=str(ca)))
        client.max_inflight_messages_set(IN_FLIGHT)

        def published(_client: object, _userdata: object, _mid: int) -> None:
            acked[index] += 1
            window.release()

        client.on_publish = published
        client.connect(HOST, PORT, keepalive=60)
        client.loop_start()
        while time.perf_counter() < stop_at:
            window.acquire()
            message = devices.next(name)
            properties = f"%24.mid={message['messageId']}&%24.ct=application%2Fjson&%24.ce=utf-8"
            client.publish(f"devices/{name}/messages/events/{properties}", json.dumps(message["body"]), qos=1)
        for _ in range(IN_FLIGHT):  # the last acknowledgements
            window.acquire()
        client.disconnect()
        client.loop_stop()

    began = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(acked) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    data = Home.from_env().cmapss_dir()
    bundle = train_bundle(data)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        root = Path(tmp)
        path, registry, devices = fleet(root, data, bundle)
        certs = write_certs(root / "certs", HOST)
        port = free_port()
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "turbofan"), "edge", "serve",
             "--host", HOST, "--port", str(port),
             "--state", str(root / "state"), "--landing-dir", str(root / "landing"),
             "--model-uri", str(path), "--model-sha256", bundle.sha256, "--model-version", "1",
             "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_health(port)
            names = list(devices.rows)
            groups = [names[i :: args.devices] for i in range(args.devices)]
            rest = closed_loop(
                port, [devices.singles(5_000, group) for group in groups], args.seconds, host=HOST
            )
            print(f"REST, {args.devices} connections, one message per request: {rest:,.0f} msgs/s")
            ca = certs.ca_cert.read_text()
            sdk, latencies = sdk_devices(devices, registry, names[: args.devices], ca, args.seconds)
            p50, p99 = np.percentile(np.array(latencies) * 1e3, [50, 99])
            print(
                f"azure-iot-device, {args.devices} devices, send_message back to back: {sdk:,.0f} msgs/s "
                f"({sdk / rest:.2f} x REST), ack latency p50 {p50:.2f} ms, p99 {p99:.2f} ms"
            )
            others = names[args.devices : 2 * args.devices]
            piped = pipelined(devices, registry, others, certs.ca_cert, args.seconds)
            print(
                f"paho, {args.devices} devices, {IN_FLIGHT} QoS 1 messages in flight each: "
                f"{piped:,.0f} msgs/s ({piped / rest:.2f} x REST)"
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({
        "rest_per_s": round(rest), "sdk_per_s": round(sdk), "sdk_ack_p50_ms": round(float(p50), 3),
        "sdk_ack_p99_ms": round(float(p99), 3), "pipelined_per_s": round(piped),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
