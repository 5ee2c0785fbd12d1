"""Edge module benchmark: the REST service on loopback, driven from this (separate) process.

Trains a bundle on FD001 (the default feature spec, one XGBoost configuration of the
pipeline's grid), starts `turbofan edge serve` with 100 registered devices, and measures:

- single-message latency p50/p99 at a steady (open-loop) rate, 1,000 messages/s for 60 s;
- the highest sustained single-message rate (closed loop, several connections);
- batch throughput: POST /telemetry batches of 500 messages from 100 devices (a gateway's batch:
  each item carries its device's SAS token), from two connections with 100 devices each;
- the floor, in the same run: XGBoost's own one-row prediction of both models.

Devices replay FD001 test units with ever-increasing cycles. The last line is JSON.

    .venv/bin/python bench/bench_edge.py [--seconds 60] [--rate 1000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from itertools import count
from pathlib import Path

import numpy as np

from edge_module.auth import DeviceRegistry, make_sas_token
from turbofan_core import training
from turbofan_core.bundle import ModelBundle, write_bundle
from turbofan_core.cmapss import read_cmapss
from turbofan_core.features import DEFAULT_SPEC, compute_features
from turbofan_core.home import Home
from turbofan_core.labels import label_rul
from turbofan_core.storage import LocalStore
from turbofan_core.telemetry import FIELDS

HUB = "turbofan-hub.azure-devices.net"
DEVICES = 200  # FD001's 100 test units, twice over
PARAMS = {"max_depth": 5, "learning_rate": 0.05, "n_estimators": 200}


def train_bundle(data: Path) -> ModelBundle:
    frame = read_cmapss(data / "train_FD001.txt")
    frame["device_id"], frame["lifetime"] = frame["unit"].astype(str), 1
    failures = frame.groupby(["device_id", "lifetime"], as_index=False)["CycleTime"].max()
    labels = label_rul(frame, failures)
    features = compute_features(frame, DEFAULT_SPEC).merge(
        labels[["device_id", "lifetime", "CycleTime", "rul"]]
    )
    X, y = training.design_matrix(features, DEFAULT_SPEC.feature_names)
    folds = training.trajectory_folds(features, 5, seed=0)
    fitted = training.fit_final(X, y, folds, PARAMS, seed=0, workers=2)
    return ModelBundle(
        spec=DEFAULT_SPEC, rul_cap=int(labels["rul_cap"].iloc[0]), quantiles=training.INTERVAL,
        point=fitted.point, quantile_model=fitted.quantile_model, quantile_offsets=fitted.quantile_offsets,
        params=PARAMS,
    )  # fmt: skip


def floor_ms(bundle: ModelBundle, rows: np.ndarray, repeats: int = 2000) -> float:
    """XGBoost's own one-row prediction of the point and the quantile model, median of `repeats`."""
    for booster in (bundle.point, bundle.quantile_model):
        booster.set_param({"nthread": 1})
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        bundle.predict_matrix(rows[i % len(rows)])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


class Devices:
    """FD001 test units as devices, each message the next cycle (ever increasing, so no lifetime ends)."""

    def __init__(self, data: Path, registry: DeviceRegistry) -> None:
        units = [
            group[list(FIELDS)].to_dict("records")
            for _, group in read_cmapss(data / "test_FD001.txt").groupby("unit")
        ]
        self.rows = {f"Bench_{n:03d}": units[(n - 1) % len(units)] for n in range(1, DEVICES + 1)}
        self.tokens = {
            device: make_sas_token(HUB, device, registry.get(device).primary_key, ttl_seconds=7200)
            for device in self.rows
        }
        self._cycles = dict.fromkeys(self.rows, 0)
        self._ids = count()
        self._lock = threading.Lock()

    def next(self, device: str) -> dict:
        with self._lock:
            self._cycles[device] += 1
            cycle, number = self._cycles[device], next(self._ids)
        rows = self.rows[device]
        return {"body": {**rows[cycle % len(rows)], "CycleTime": cycle}, "messageId": f"m{number}"}


def post(
    connection: http.client.HTTPConnection, token: str | None, payload: bytes, message_id: str | None
) -> float:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token
    if message_id:
        headers["iothub-messageid"] = message_id
    start = time.perf_counter()
    connection.request("POST", "/telemetry", payload, headers)
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - start


def steady(port: int, devices: Devices, rate: float, seconds: float, connections: int = 4) -> list[float]:
    """Open loop: each connection sends at rate/connections on a fixed schedule; latencies of all."""
    names = list(devices.rows)
    latencies: list[float] = []

    def sender(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        interval = connections / rate
        start = time.perf_counter() + index * interval / connections
        for n in count():
            due = start + n * interval
            if due - start > seconds:
                break
            time.sleep(max(0.0, due - time.perf_counter()))
            device = names[(n * connections + index) % len(names)]
            message = devices.next(device)
            latencies.append(post(connection, devices.tokens[device], json.dumps(message["body"]).encode(),
                                  message["messageId"]))  # fmt: skip

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def closed_loop(port: int, devices: Devices, seconds: float, connections: int, batch: int = 1) -> float:
    """As fast as `connections` clients go: messages per second."""
    names = list(devices.rows)
    done = [0] * connections
    stop_at = time.perf_counter() + seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        n = index
        while time.perf_counter() < stop_at:
            if batch == 1:
                device = names[n % len(names)]
                message = devices.next(device)
                post(
                    connection,
                    devices.tokens[device],
                    json.dumps(message["body"]).encode(),
                    message["messageId"],
                )
            else:  # a gateway's batch: its devices' next messages, each item with its device's token
                own = names[index::connections]  # one connection per device: its messages stay in order
                messages = [
                    {**devices.next(device), "authorization": devices.tokens[device]}
                    for _ in range(batch // len(own))
                    for device in own
                ]
                post(connection, None, json.dumps(messages).encode(), None)
            done[index] += batch
            n += connections

    threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    args = parser.parse_args()
    data = Home.from_env().cmapss_dir()

    started = time.perf_counter()
    bundle = train_bundle(data)
    seconds = time.perf_counter() - started
    print(f"trained a bundle on FD001 in {seconds:.1f} s ({len(bundle.spec.feature_names)} features)")
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        root = Path(tmp)
        store = LocalStore(root / "models")
        path = store.root / write_bundle(store, bundle)
        registry = DeviceRegistry.load(root / "state" / "devices.json")
        for unit in range(1, DEVICES + 1):
            registry.create(f"Bench_{unit:03d}")
        devices = Devices(data, registry)
        rows = compute_features(
            read_cmapss(data / "test_FD001.txt").assign(device_id=lambda f: f["unit"], lifetime=1),
            bundle.spec,
        )[list(bundle.spec.feature_names)].to_numpy()
        floor = floor_ms(bundle, rows)

        port = free_port()
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "turbofan"), "edge", "serve", "--port", str(port),
             "--state", str(root / "state"), "--landing-dir", str(root / "landing"),
             "--model-uri", str(path), "--model-sha256", bundle.sha256, "--model-version", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(300):
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                    connection.request("GET", "/healthz")
                    if connection.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            closed_loop(port, devices, 3.0, 2)  # warm up: every device's state loaded
            began = time.perf_counter()
            latencies = np.array(steady(port, devices, args.rate, args.seconds)) * 1e3
            achieved = len(latencies) / (
                time.perf_counter() - began
            )  # below the rate: the service fell behind
            p50, p99 = np.percentile(latencies, [50, 99])
            print(
                f"steady {args.rate:.0f} msgs/s for {args.seconds:.0f} s ({achieved:,.0f} msgs/s achieved): "
                f"{len(latencies):,} messages, "
                f"latency p50 {p50:.2f} ms, p99 {p99:.2f} ms "
                f"(floor: XGBoost one row, both models, {floor:.3f} ms)"
            )
            max_rate = max(closed_loop(port, devices, 10.0, connections) for connections in (2, 4))
            print(f"highest sustained single-message rate: {max_rate:,.0f} msgs/s")
            batch_rate = closed_loop(port, devices, 20.0, 2, batch=500)
            print(f"batches of 500: {batch_rate:,.0f} msgs/s")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({
        "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3), "max_rate_per_s": round(max_rate),
        "batch_per_s": round(batch_rate), "floor_ms": round(floor, 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
