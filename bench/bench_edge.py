"""Edge module benchmark: the REST service on loopback, driven from this (separate) process.

Trains a bundle on FD001 (the default feature spec, one XGBoost configuration of the
pipeline's grid), starts `turbofan edge serve` with 200 registered devices, and measures:

- single-message latency p50/p99 at a steady (open-loop) rate, 1,000 messages/s for 60 s;
- the highest sustained single-message rate (closed loop, several connections);
- batch throughput: POST /telemetry batches of 500 messages from 100 devices (a gateway's batch:
  each item carries its device's SAS token), from two connections with 100 devices each;
- the floor, in the same run: XGBoost's own one-row prediction of both models (and, beside it,
  `ModelBundle.predict_matrix` on one row, which walks the trees in C: turbofan_core/trees.py);
- the disk's own floor for a durable answer: a 4 kB write and fdatasync in the state folder, alone,
  for 5 s, with its worst stall;
- the bytes the service sends to the disk a message, at the steady rate and in batches.

Devices replay FD001 test units with ever-increasing cycles; a device's messages always travel on
one connection, so they arrive in order. Requests are encoded before the clock starts and sent on
blocking sockets, one thread per connection, so the client costs little beside the service (about
0.06 ms of CPU per message). The last line is JSON.

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
from collections.abc import Callable
from itertools import count
from pathlib import Path

import numpy as np
import xgboost as xgb

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
BATCH = 500
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


def one_row_ms(score: Callable[[np.ndarray], object], rows: np.ndarray, repeats: int = 2000) -> float:
    """Median time of `score` on one feature row, over `repeats` rows."""
    times = []
    for i in range(repeats):
        row = rows[i % len(rows)][None, :]
        start = time.perf_counter()
        score(row)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def xgboost_one_row(bundle: ModelBundle) -> Callable[[np.ndarray], object]:
    """The floor: XGBoost's own prediction of the point and the quantile model, one thread."""
    point, quantiles = (
        xgb.Booster({"nthread": 1}, model_file=bytearray(model))
        for model in (bundle.point, bundle.quantile_model)
    )
    return lambda row: (point.inplace_predict(row), quantiles.inplace_predict(row))


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

    def next(self, device: str) -> dict:
        self._cycles[device] += 1
        cycle, number = self._cycles[device], next(self._ids)
        rows = self.rows[device]
        return {"body": {**rows[cycle % len(rows)], "CycleTime": cycle}, "messageId": f"m{number}"}

    def singles(self, n: int, names: list[str]) -> list[bytes]:
        """`n` single-message requests, round robin over `names`, as the bytes on the wire."""
        requests = []
        for i in range(n):
            device = names[i % len(names)]
            message = self.next(device)
            requests.append(_request(json.dumps(message["body"]).encode(), {
                "Authorization": self.tokens[device], "iothub-messageid": message["messageId"]}))  # fmt: skip
        return requests

    def batches(self, n: int, size: int, names: list[str]) -> list[bytes]:
        """`n` gateway batches of `size` messages from `names`, each item with its device's token."""
        return [
            _request(json.dumps([
                {**self.next(device), "authorization": self.tokens[device]}
                for _ in range(size // len(names)) for device in names
            ]).encode(), {})
            for _ in range(n)
        ]  # fmt: skip


def fleet(root: Path, data: Path, bundle: ModelBundle) -> tuple[Path, DeviceRegistry, Devices]:
    """`bundle` written under `root` (its path, for `--model-uri`), and DEVICES devices registered in
    `root / "state"` with their telemetry."""
    store = LocalStore(root / "models")
    path = store.root / write_bundle(store, bundle)
    registry = DeviceRegistry.load(root / "state" / "devices.json")
    for unit in range(1, DEVICES + 1):
        registry.create(f"Bench_{unit:03d}")
    return path, registry, Devices(data, registry)


def _request(body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        "POST /telemetry HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
        f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items()),
    ]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """HTTP/1.1 keep-alive on a blocking socket (TCP_NODELAY), requests pre-encoded: the client's
    cost per request stays small beside the service's, which shares the machine's two cores."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.socket = socket.create_connection((host, port))
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.socket.makefile("rb")

    def send(self, request: bytes) -> None:
        self.socket.sendall(request)
        status = int(self.reader.readline()[9:12])
        length = 0
        while (line := self.reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line[15:])
        self.reader.read(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")

    def close(self) -> None:
        self.reader.close()
        self.socket.close()


def steady(
    port: int, requests: list[bytes], rate: float, connections: int = 4
) -> tuple[list[float], list[float]]:
    """Open loop: request i is due at i/rate and goes on connection i % connections; its latency runs
    from when it was due, so a service that falls behind is charged for the wait (and a request
    waits for the one before it on its connection). Also each request's round trip alone, from
    when it was sent: the service's own time."""
    latencies: list[float] = []
    round_trips: list[float] = []
    start = time.perf_counter() + 0.1

    def sender(index: int) -> None:
        connection = Connection(port)
        for i in range(index, len(requests), connections):
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            sent = time.perf_counter()
            connection.send(requests[i])
            answered = time.perf_counter()
            latencies.append(answered - due)
            round_trips.append(answered - sent)
        connection.close()

    _in_threads(sender, connections)
    return latencies, round_trips


def closed_loop(
    port: int, streams: list[list[bytes]], seconds: float, per_request: int = 1, host: str = "127.0.0.1"
) -> float:
    """One connection per stream, each sending its requests back to back: messages per second."""
    stop_at = time.perf_counter() + seconds
    done = [0] * len(streams)

    def client(index: int) -> None:
        connection = Connection(port, host)
        for request in streams[index]:
            if time.perf_counter() >= stop_at:
                break
            connection.send(request)
            done[index] += per_request
        connection.close()

    start = time.perf_counter()
    _in_threads(client, len(streams))
    return sum(done) / (time.perf_counter() - start)


def _in_threads(target: Callable[[int], None], n: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def bytes_written(pid: int) -> int:
    """What process `pid` has sent to the disk so far, counted as it dirtied pages (Linux's
    /proc/PID/io write_bytes): the store's WAL, its checkpoints and the landing zone's files."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no write_bytes")


def fsync_ms(folder: Path, seconds: float = 5.0) -> tuple[float, float, float]:
    """p50, p99 and max of a 4 kB write and fdatasync in `folder` (over a 1 MB file, as the store's
    WAL is rewritten), back to back for `seconds`: the disk's own floor for a durable commit, and
    its stalls, which an answer waiting for its fsync shows in full."""
    path = folder / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    stop_at = time.perf_counter() + seconds
    try:
        os.write(fd, bytes(1 << 20))
        os.fsync(fd)
        for slot in count():
            if time.perf_counter() >= stop_at:
                break
            os.pwrite(fd, b"x" * 4096, slot % 256 * 4096)
            start = time.perf_counter()
            getattr(os, "fdatasync", os.fsync)(fd)  # as the store syncs; macOS has only fsync
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    p50, p99 = np.percentile(times, [50, 99]) * 1e3
    return float(p50), float(p99), max(times) * 1e3


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
        path, _, devices = fleet(root, data, bundle)
        rows = compute_features(
            read_cmapss(data / "test_FD001.txt").assign(device_id=lambda f: f["unit"], lifetime=1),
            bundle.spec,
        )[list(bundle.spec.feature_names)].to_numpy()
        floor = one_row_ms(xgboost_one_row(bundle), rows)
        walk = one_row_ms(bundle.predict_matrix, rows)  # what the service calls: the tree walk
        print(f"one row, both models: XGBoost {floor:.3f} ms, the service's tree walk {walk:.3f} ms")
        disk_p50, disk_p99, disk_max = fsync_ms(root / "state")
        print(
            f"the state folder's disk, 4 kB write + fdatasync for 5 s: p50 {disk_p50:.2f}, "
            f"p99 {disk_p99:.2f}, max {disk_max:.1f} ms"
        )

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
            names = list(devices.rows)
            closed_loop(port, [devices.singles(len(names), names)], 60.0)  # every device's state loaded
            requests = devices.singles(int(args.rate * args.seconds), names)
            began, written = time.perf_counter(), bytes_written(server.pid)
            latencies, round_trips = (np.array(times) * 1e3 for times in steady(port, requests, args.rate))
            achieved = len(latencies) / (time.perf_counter() - began)  # below the rate: it fell behind
            single_bytes = (bytes_written(server.pid) - written) / len(latencies)
            p50, p99 = np.percentile(latencies, [50, 99])
            rtt_p50, rtt_p99 = np.percentile(round_trips, [50, 99])
            print(
                f"steady {args.rate:.0f} msgs/s for {args.seconds:.0f} s ({achieved:,.0f} msgs/s achieved): "
                f"{len(latencies):,} messages, latency p50 {p50:.2f} ms, p99 {p99:.2f} ms "
                f"(floor: XGBoost one row, both models, {floor:.3f} ms); round trips alone "
                f"p50 {rtt_p50:.2f} ms, p99 {rtt_p99:.2f} ms; "
                f"disk written {single_bytes / 1e3:.1f} kB a message"
            )
            max_rate = max(
                # A device's messages on one connection, so they arrive in order.
                closed_loop(port, [devices.singles(20_000, names[i::c]) for i in range(c)], 10.0)
                for c in (1, 2, 4)
            )
            print(f"highest sustained single-message rate: {max_rate:,.0f} msgs/s")
            # Two gateways of 100 devices each: a device's messages stay on one connection, in order.
            halves = [names[: len(names) // 2], names[len(names) // 2 :]]
            streams = [devices.batches(120, BATCH, half) for half in halves]
            began, written = time.perf_counter(), bytes_written(server.pid)
            batch_rate = closed_loop(port, streams, 20.0, BATCH)
            batch_bytes = (bytes_written(server.pid) - written) / (batch_rate * (time.perf_counter() - began))
            print(
                f"batches of {BATCH}: {batch_rate:,.0f} msgs/s; "
                f"disk written {batch_bytes:,.0f} bytes a message"
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({
        "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
        "rtt_p99_ms": round(float(rtt_p99), 3), "max_rate_per_s": round(max_rate),
        "batch_per_s": round(batch_rate), "floor_ms": round(floor, 4), "walk_ms": round(walk, 4),
        "fsync_p50_ms": round(disk_p50, 3), "fsync_p99_ms": round(disk_p99, 3),
        "fsync_max_ms": round(disk_max, 1), "disk_bytes_per_single": round(single_bytes),
        "disk_bytes_per_batch_message": round(batch_bytes),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
