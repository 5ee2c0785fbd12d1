"""The edge module as a real process (`turbofan edge serve`): scoring equal to the batch model,
device authentication, refusals, model swaps, restarts and SIGKILL with nothing lost."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import free_port
from test_bundle import make_bundle, rezip, with_rul
from test_contract import MALFORMED

from edge_module.auth import DeviceRegistry, make_sas_token
from edge_module.messages import Arrivals, Incoming
from edge_module.service import Edge as EdgeService
from edge_module.service import EdgeConfig
from turbofan_core.bundle import ModelBundle, write_bundle
from turbofan_core.cmapss import read_cmapss
from turbofan_core.deployment_manifest import DEFAULT_IMAGE, ManifestSettings, build
from turbofan_core.features import FeatureSpec, fit_spec
from turbofan_core.storage import LocalStore, blob_store_from_connection_string
from turbofan_core.telemetry import FIELDS
from turbofan_warehouse.ingest import ingest_new_files

HUB = "turbofan-hub.azure-devices.net"
ADMIN_KEY = "test-admin-key"
DEVICES = [f"Test_{unit:03d}" for unit in range(1, 11)]


@dataclass
class Edge:
    """A running edge module and what it was started with."""

    url: str
    state: Path
    landing: Path
    process: subprocess.Popen
    registry: DeviceRegistry
    log: BinaryIO

    def stop(self, sig: int = signal.SIGKILL) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=30)
        self.log.close()

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict | None = None,
        raw: bytes | None = None,
    ):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def token(self, device: str, ttl: int = 3600, key: str | None = None) -> dict:
        key = key or self.registry.get(device).primary_key
        return {"Authorization": make_sas_token(HUB, device, key, ttl_seconds=ttl)}

    def send(self, device: str, body: object, **headers: str):
        return self.call("POST", "/telemetry", body, {**self.token(device), **headers})

    def admin(self, method: str, path: str, body: object = None):
        return self.call(method, path, body, {"Authorization": f"Bearer {ADMIN_KEY}"})


def start_edge(
    state: Path,
    landing: Path,
    model: tuple[str, Path, str] | None = None,
    host: str = "127.0.0.1",
    options: tuple[str, ...] = (),
) -> Edge:
    port = free_port()
    command = [str(Path(sys.executable).parent / "turbofan"), "edge", "serve", "--host", host,
               "--port", str(port), "--state", str(state), "--landing-dir", str(landing),
               *options]  # fmt: skip
    if model is not None:
        version, path, sha256 = model
        command += ["--model-uri", str(path), "--model-sha256", sha256, "--model-version", version]
    log = (state.parent / f"edge-{port}.log").open("wb")
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TURBOFAN_EDGE_ADMIN_KEY": ADMIN_KEY},
    )
    edge = Edge(
        f"http://{host}:{port}", state, landing, process, DeviceRegistry.load(state / "devices.json"), log
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, (state.parent / f"edge-{port}.log").read_text()
        try:
            if edge.call("GET", "/healthz")[0] == 200:
                return edge
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the edge module did not answer /healthz within 60 s")


@pytest.fixture(scope="module")
def test_units(cmapss_dir: Path) -> pd.DataFrame:
    """FD001 test units 1-10, the devices the edge sees."""
    frame = read_cmapss(cmapss_dir / "test_FD001.txt")
    frame = frame[frame["unit"] <= len(DEVICES)].copy()
    frame["device_id"] = frame["unit"].map(lambda unit: f"Test_{unit:03d}")
    frame["lifetime"] = 1
    return frame


OTHER_SPEC = FeatureSpec(
    sensors=("Sensor3", "Sensor7", "Sensor12"), windows=(8,), statistics=("mean",), ewm_alphas=()
)


@pytest.fixture(scope="module")
def bundles(
    fleet: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[ModelBundle, Path]]:
    store = LocalStore(tmp_path_factory.mktemp("models"))
    made = {"1": make_bundle(fleet), "2": make_bundle(fleet, spec=OTHER_SPEC)}
    return {version: (bundle, store.root / write_bundle(store, bundle)) for version, bundle in made.items()}


@pytest.fixture
def edge(tmp_path: Path, bundles) -> Iterator[Edge]:
    state = tmp_path / "state"
    state.mkdir()
    registry = DeviceRegistry.load(state / "devices.json")
    for device in DEVICES:
        registry.create(device)
    bundle, path = bundles["1"]
    running = start_edge(state, tmp_path / "landing", ("1", path, bundle.sha256))
    yield running
    if running.process.poll() is None:
        running.stop()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bodies(frame: pd.DataFrame) -> list[dict]:
    return [dict(zip(FIELDS, row, strict=True)) for row in frame[list(FIELDS)].itertuples(index=False)]


def expected(bundle: ModelBundle, frame: pd.DataFrame) -> pd.DataFrame:
    return bundle.predict(frame).set_index(["device_id", "CycleTime"])


def assert_scored_like(results: list[dict], device: str, want: pd.DataFrame) -> None:
    for result in results:
        row = want.loc[(device, result["cycle"])]
        got = [result["rul"]["p50"], result["rul"]["p10"], result["rul"]["p90"]]
        np.testing.assert_allclose(
            got, row[["rul_pred", "rul_p10", "rul_p90"]].to_numpy(), rtol=1e-6, atol=1e-4
        )


def test_streamed_predictions_equal_the_batch_models(edge: Edge, bundles, test_units: pd.DataFrame) -> None:
    bundle, _ = bundles["1"]
    want = expected(bundle, test_units)
    for device, frame in test_units.groupby("device_id"):
        messages = bodies(frame)
        head = [
            edge.send(device, body, **{"iothub-messageid": f"{device}-{body['CycleTime']}"})
            for body in messages[:5]
        ]
        assert all(status == 200 and result["model_version"] == "1" for status, result in head)
        status, batch = edge.send(
            device, [{"body": b, "messageId": f"{device}-{b['CycleTime']}"} for b in messages[5:]]
        )
        assert status == 200 and {r["status"] for r in batch} == {"scored"}
        assert_scored_like([result for _, result in head] + batch, device, want)
    # Redelivered: acknowledged as duplicates, never scored again.
    first = bodies(test_units[test_units["device_id"] == DEVICES[0]])[0]
    status, again = edge.send(DEVICES[0], [{"body": first, "messageId": f"{DEVICES[0]}-1"}])
    assert status == 200 and again[0]["status"] == "duplicate"


def test_arrivals_of_messages_hold_each_field_in_its_own_column() -> None:
    first = Incoming("d1", b"{}", {"a": "1"}, "m1", "application/json", "utf-8", {"x": 1})
    second = Incoming("d2", b"[]", {}, None)
    arrivals = Arrivals.of([first, second])
    assert arrivals.device_ids == ["d1", "d2"] and arrivals.bodies == [b"{}", b"[]"]
    assert arrivals.properties == [{"a": "1"}, {}] and arrivals.message_ids == ["m1", None]
    assert arrivals.content_types == ["application/json", None]
    assert arrivals.content_encodings == ["utf-8", None] and arrivals.parsed == [{"x": 1}, None]
    assert Arrivals.of([]) == Arrivals([], [], [], [], [], [], [])


def test_no_messages_get_no_answers_and_change_nothing(tmp_path: Path) -> None:
    service = EdgeService(EdgeConfig(state_dir=tmp_path))
    try:
        assert service.receive(Arrivals.of([])) == []
        assert service.store.backlog() == (0, None)
    finally:
        service.store.close()


def test_each_refused_credential(edge: Edge) -> None:
    body = {"CycleTime": 1, **dict.fromkeys(FIELDS[1:], 1.0)}
    other_key = edge.registry.get(DEVICES[1]).primary_key
    for headers, reason in [
        ({}, None),
        (edge.token(DEVICES[0], ttl=-10), "expired"),
        (edge.token(DEVICES[0], key=other_key), None),  # signed with another device's key
        ({"Authorization": make_sas_token(HUB, "Nobody", other_key)}, None),
        ({"Authorization": "SharedAccessSignature garbage"}, None),
    ]:
        status, answer = edge.call("POST", "/telemetry", body, headers)
        assert status == 401, (headers, answer)
        if reason:
            assert reason in answer["detail"]
        assert other_key not in json.dumps(answer)
    log = next(edge.state.parent.glob("edge-*.log")).read_text()
    assert other_key not in log


@pytest.mark.parametrize(("raw", "device", "properties", "content_type", "encoding", "reason"), MALFORMED[2:])
def test_malformed_input_gets_a_4xx_with_the_contracts_reason(
    edge: Edge, raw, device, properties, content_type, encoding, reason
) -> None:
    headers = {**edge.token(DEVICES[0]), **{f"iothub-app-{k}": v for k, v in properties.items()}}
    if content_type is not None:
        headers["Content-Type"] = content_type + (f"; charset={encoding}" if encoding else "")
    status, answer = edge.call("POST", "/telemetry", headers=headers, raw=raw or b"")
    assert 400 <= status < 500, answer
    if raw == b"[1, 2]":  # a JSON list is a batch, and a batch holds objects
        assert "item 0 is not one" in answer["detail"]
    elif status == 422:
        assert answer["detail"].startswith(reason)


def test_oversized_and_wrongly_typed_bodies_are_refused(edge: Edge) -> None:
    status, _ = edge.call(
        "POST", "/telemetry", headers=edge.token(DEVICES[0]), raw=b"[" + b"1," * 600_000 + b"1]"
    )
    assert status == 413
    headers = {**edge.token(DEVICES[0]), "Content-Type": "text/plain"}
    assert edge.call("POST", "/telemetry", headers=headers, raw=b"{}")[0] == 415


def test_malformed_batch_envelopes_get_a_422_with_the_item_and_field(edge: Edge) -> None:
    body = {"CycleTime": 1, **dict.fromkeys(FIELDS[1:], 1.0)}
    for envelope, reason in [
        ({"body": body, "messageId": 123}, "item 0: messageId must be a string"),
        ({"body": body, "properties": ["a"]}, "item 0: properties must be a JSON object"),
        ({"body": body, "authorization": 5}, "item 0: authorization must be a string"),
    ]:
        status, answer = edge.send(DEVICES[0], [envelope])
        assert (status, answer["detail"]) == (422, reason)
    # An empty batch is refused before anything is stored, with or without a credential.
    for headers in (edge.token(DEVICES[0]), {}):
        status, answer = edge.call("POST", "/telemetry", [], headers)
        assert (status, answer["detail"]) == (422, "an empty batch: no message to take")


def test_a_client_that_leaves_mid_upload_records_nothing(edge: Edge) -> None:
    def counted() -> float:
        with urllib.request.urlopen(edge.url + "/metrics", timeout=10) as response:
            lines = response.read().decode().splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith("edge_messages_total"))

    before = counted()
    token = edge.token(DEVICES[0])["Authorization"]
    host, port = edge.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = "POST /telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += f"Authorization: {token}\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head.encode() + b'{"CycleTime": 1, "Sens')
    time.sleep(0.5)
    assert counted() == before


def test_bad_bundles_are_refused_while_the_old_model_serves_then_rollback(
    edge: Edge, bundles, tmp_path: Path, test_units: pd.DataFrame
) -> None:
    first, first_path = bundles["1"]
    second, second_path = bundles["2"]
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(first_path.read_bytes()[:-100])
    newer = tmp_path / "newer.zip"
    newer.write_bytes(rezip(first_path.read_bytes(), {"format_version": 99}))
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip at all")
    for reference, reason in [
        ({"version": "x", "uri": str(corrupt), "sha256": first.sha256}, "changed or corrupted"),
        (
            {"version": "x", "uri": str(second_path), "sha256": first.sha256},
            "changed or corrupted",
        ),  # tampered
        ({"version": "x", "uri": str(newer), "sha256": sha256_of(newer)}, "this code reads"),  # incompatible
        ({"version": "x", "uri": str(garbage), "sha256": sha256_of(garbage)}, "unreadable"),
        ({"version": "x", "uri": str(tmp_path / "missing.zip"), "sha256": first.sha256}, "cannot fetch"),
    ]:
        status, answer = edge.admin("PUT", "/admin/model", reference)
        assert status == 422 and reason in answer["detail"], answer
        assert edge.call("GET", "/model")[1]["version"] == "1"
    assert (
        edge.call("PUT", "/admin/model", {"version": "2", "uri": str(second_path), "sha256": second.sha256})[
            0
        ]
        == 401
    )

    status, answer = edge.admin(
        "PUT", "/admin/model", {"version": "2", "uri": str(second_path), "sha256": second.sha256}
    )
    assert status == 200 and edge.call("GET", "/model")[1]["sha256"] == second.sha256
    device = DEVICES[2]
    frame = test_units[test_units["device_id"] == device]
    status, results = edge.send(device, bodies(frame))
    assert {r["model_version"] for r in results} == {"2"}
    assert_scored_like(results, device, expected(second, frame))  # the other spec's features

    assert edge.admin("POST", "/admin/model/rollback")[1]["version"] == "1"
    last = bodies(frame)[-1]
    status, result = edge.send(device, {**last, "CycleTime": last["CycleTime"] + 1})
    assert result["model_version"] == "1"
    longer = pd.concat([frame, frame.tail(1).assign(CycleTime=last["CycleTime"] + 1)])
    assert_scored_like([result], device, expected(first, longer))  # state rebuilt for the first spec


def test_sigkill_mid_stream_loses_nothing_and_restart_scores_as_if_uninterrupted(
    edge: Edge, bundles, test_units: pd.DataFrame, tmp_path: Path
) -> None:
    bundle, path = bundles["1"]
    want = expected(bundle, test_units)
    acknowledged: list[str] = []
    devices = DEVICES[:4]
    streams = {d: bodies(test_units[test_units["device_id"] == d]) for d in devices}
    half = {d: len(s) // 2 for d, s in streams.items()}
    for device in devices:
        for body in streams[device][: half[device]]:
            message_id = f"{device}-{body['CycleTime']}"
            assert edge.send(device, body, **{"iothub-messageid": message_id})[0] == 200
            acknowledged.append(message_id)
    edge.stop(signal.SIGKILL)

    restarted = start_edge(edge.state, edge.landing)  # the model comes back from the state folder
    try:
        for device in devices:
            rest = streams[device][half[device] - 1 :]  # the last acknowledged one again, as a resend
            results = []
            for body in rest:
                message_id = f"{device}-{body['CycleTime']}"
                status, result = restarted.send(device, body, **{"iothub-messageid": message_id})
                assert status == 200
                results.append(result)
                acknowledged.append(message_id)
            assert results[0]["status"] == "duplicate"
            assert_scored_like(results[1:], device, want)
    finally:
        restarted.stop(signal.SIGTERM)  # stops the forwarder with a last flush

    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as conn:
        ingest_new_files(LocalStore(edge.landing), conn)
        stored = conn.execute("SELECT message_id, count(*) FROM telemetry GROUP BY ALL").fetchall()
    assert dict(stored) == dict.fromkeys(set(acknowledged), 1)


def test_score_is_the_stateless_web_service(edge: Edge, bundles, test_units: pd.DataFrame) -> None:
    bundle, _ = bundles["1"]
    frame = test_units[test_units["device_id"] == DEVICES[5]]
    status, answer = edge.call("POST", "/score", bodies(frame))
    assert status == 200
    assert_scored_like([answer], DEVICES[5], expected(bundle, frame))
    assert edge.call("POST", "/score", [])[0] == 422


def test_model_and_metrics_describe_the_service(edge: Edge, bundles) -> None:
    bundle, path = bundles["1"]
    status, model = edge.call("GET", "/model")
    assert (status, model["version"], model["sha256"], model["source"]) == (
        200,
        "1",
        bundle.sha256,
        str(path),
    )
    edge.send(DEVICES[0], {"CycleTime": 0})
    request = urllib.request.Request(edge.url + "/metrics")
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    assert f'edge_model_info{{sha256="{bundle.sha256}",version="1"}} 1.0' in text
    assert 'edge_messages_total{result="refused"} 1.0' in text
    assert "edge_forward_backlog" in text and "edge_telemetry_seconds_bucket" in text
    assert "edge_devices 0.0" in text  # the refused message started no lifetime
    status, document = edge.call("GET", "/openapi.json")
    assert status == 200 and {"/telemetry", "/score", "/model", "/admin/model"} <= set(document["paths"])
    telemetry = document["paths"]["/telemetry"]["post"]
    assert [p["name"] for p in telemetry["parameters"]] == ["Authorization"]
    assert edge.call("GET", "/telemetry")[0] == 405


def test_a_gateway_batch_of_many_devices_scores_like_the_batch_model(
    edge: Edge, bundles, test_units: pd.DataFrame
) -> None:
    """One request, many devices, each item with its device's token: scored a round at a time."""
    bundle, _ = bundles["1"]
    live = test_units.sort_values(["CycleTime", "device_id"], kind="stable")
    tokens = {device: edge.token(device)["Authorization"] for device in DEVICES}
    batch = [
        {"body": body, "messageId": f"{device}-{body['CycleTime']}", "authorization": tokens[device]}
        for device, body in zip(live["device_id"], bodies(live), strict=True)
    ]  # fmt: skip
    status, results = edge.call("POST", "/telemetry", batch[:500])
    assert status == 200 and {r["status"] for r in results} == {"scored"}
    want = expected(bundle, test_units)
    for item, result in zip(batch[:500], results, strict=True):
        device = item["messageId"].rsplit("-", 1)[0]
        assert_scored_like([result], device, want)
    forged = [{**batch[500], "authorization": edge.token(DEVICES[0], key="A" * 44)["Authorization"]}]
    assert edge.call("POST", "/telemetry", forged)[0] == 401


def test_a_batch_with_a_late_message_and_a_failure_event_follows_device_order(
    edge: Edge, bundles, test_units: pd.DataFrame
) -> None:
    bundle, _ = bundles["1"]
    device = DEVICES[3]
    frame = test_units[test_units["device_id"] == device].head(8)
    messages = bodies(frame)
    assert edge.send(device, [{"body": b, "messageId": f"m{b['CycleTime']}"} for b in messages[:5]])[0] == 200
    late_batch = [
        {"body": messages[6], "messageId": "m7"},
        {"body": messages[5], "messageId": "m6"},  # late: cycle 6 after cycle 7
        {"body": {"CycleTime": 7}, "messageId": "f1", "properties": {"type": "failure"}},
        {"body": {**messages[0], "Sensor2": 642.5}, "messageId": "n1"},  # the next engine, cycle 1
    ]
    status, results = edge.send(device, late_batch)
    assert [r["status"] for r in results] == ["scored", "scored", "failure_event", "scored"]
    # Cycle 7 is scored as it arrived (cycle 6 not there yet); cycle 6 takes its place in the lifetime.
    assert_scored_like(results[:1], device, expected(bundle, frame.head(7)[frame.head(7)["CycleTime"] != 6]))
    assert_scored_like(results[1:2], device, expected(bundle, frame.head(6)))
    next_engine = frame.head(1).assign(Sensor2=642.5)
    assert_scored_like(results[3:], device, expected(bundle, next_engine))


def test_a_closed_lifetimes_ids_are_duplicates_for_the_dedupe_window_set_at_start(
    edge: Edge, test_units: pd.DataFrame
) -> None:
    device = DEVICES[4]
    messages = bodies(test_units[test_units["device_id"] == device].head(2))
    old = [{"body": body, "messageId": f"old{body['CycleTime']}"} for body in messages]
    failure = {"body": {"CycleTime": 2}, "messageId": "f", "properties": {"type": "failure"}}
    new = {"body": messages[0], "messageId": "new1"}  # the next engine's first cycle
    assert edge.send(device, [*old, failure, new])[0] == 200
    edge.stop(signal.SIGTERM)
    restarted = start_edge(edge.state, edge.landing)  # the default window: a day
    status, results = restarted.send(device, [old[1], new])
    assert [r["status"] for r in results] == ["duplicate", "duplicate"]
    restarted.stop(signal.SIGTERM)
    forgetful = start_edge(edge.state, edge.landing, options=("--dedupe-hours", "0"))
    status, results = forgetful.send(device, [old[1], new])
    # The closed lifetime's ids are forgotten: "old2" is now the current engine's cycle 2. Its own
    # ids are remembered whatever the window.
    assert [r["status"] for r in results] == ["scored", "duplicate"]
    forgetful.stop(signal.SIGTERM)
    turbofan = str(Path(sys.executable).parent / "turbofan")
    for hours in ("-1", "nan"):
        done = subprocess.run(
            [turbofan, "edge", "serve", "--state", str(edge.state), "--dedupe-hours", hours],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2
        assert f"--dedupe-hours is {float(hours)}: give 0 or more" in done.stderr


def test_a_deployment_manifest_names_the_model_served_at_start(tmp_path: Path, bundles) -> None:
    bundle, path = bundles["2"]
    manifest = build(
        ManifestSettings(image=DEFAULT_IMAGE), {"version": "2", "uri": str(path), "sha256": bundle.sha256}
    )
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    edge = start_edge(
        tmp_path / "state", tmp_path / "landing", options=("--manifest", str(tmp_path / "manifest.json"))
    )
    try:
        assert edge.call("GET", "/model")[1]["version"] == "2"
    finally:
        edge.stop(signal.SIGTERM)

    del manifest["modulesContent"]["turbofan"]["properties.desired"]["model"]["sha256"]
    (tmp_path / "broken.json").write_text(json.dumps(manifest))
    turbofan = str(Path(sys.executable).parent / "turbofan")
    done = subprocess.run(
        [turbofan, "edge", "serve", "--manifest", str(tmp_path / "broken.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "modulesContent.turbofan.properties.desired.model.sha256: missing" in done.stderr


def test_a_bundle_in_a_private_blob_container_is_fetched_with_the_storage_setting(
    tmp_path: Path, bundles, azurite, blob_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model store in a private container: the edge reads the bundle with the account of
    AZURE_STORAGE_CONNECTION_STRING, the setting the pipeline writes it with; without the setting
    the same URL is refused with its reason, and nothing else changes."""
    bundle, _ = bundles["1"]
    store = blob_store_from_connection_string(azurite.connection_string, blob_container)
    url = store.location + write_bundle(store, bundle)
    reference = {"version": "1", "uri": url, "sha256": bundle.sha256}

    without = start_edge(tmp_path / "anonymous", tmp_path / "landing")
    try:
        status, answer = without.admin("PUT", "/admin/model", reference)
        assert status == 422 and "cannot fetch" in answer["detail"], answer
    finally:
        without.stop(signal.SIGTERM)

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    edge = start_edge(tmp_path / "state", tmp_path / "landing", ("1", url, bundle.sha256))
    try:
        assert edge.call("GET", "/model")[1]["source"] == url
    finally:
        edge.stop(signal.SIGTERM)


def test_a_model_with_operating_regimes_scores_fd002_like_the_batch_model_and_flags_far_settings(
    tmp_path: Path, cmapss_fd002_dir: Path
) -> None:
    """The edge scores with whatever the bundle holds: here regimes fitted on FD002's six conditions."""
    train = read_cmapss(cmapss_fd002_dir / "train_FD002.txt")
    train = train[train["unit"] <= 12].assign(
        device_id=lambda f: f["unit"].map("Client_{:03d}".format), lifetime=1
    )
    bundle = make_bundle(train, spec=fit_spec(with_rul(train), "rul"))
    store = LocalStore(tmp_path / "models")
    path = store.root / write_bundle(store, bundle)
    state = tmp_path / "state"
    state.mkdir()
    registry = DeviceRegistry.load(state / "devices.json")
    for device in DEVICES[:3]:
        registry.create(device)
    edge = start_edge(state, tmp_path / "landing", ("1", path, bundle.sha256))
    try:
        test = read_cmapss(cmapss_fd002_dir / "test_FD002.txt")
        test = test[test["unit"] <= 3].assign(
            device_id=lambda f: f["unit"].map("Test_{:03d}".format), lifetime=1
        )
        want = expected(bundle, test)
        for device, frame in test.groupby("device_id"):
            status, results = edge.send(
                device, [{"body": b, "messageId": f"{device}-{b['CycleTime']}"} for b in bodies(frame)]
            )
            assert status == 200 and {r["status"] for r in results} == {"scored"}
            assert_scored_like(results, device, want)
            assert all(r["operating_regime"]["known"] for r in results)
            last = bodies(frame)[-1]

        # At an altitude no engine of the fleet flew: scored all the same, flagged and counted.
        far_off = {**last, "CycleTime": last["CycleTime"] + 1, "OperationalSetting1": 60.0}
        status, result = edge.send(device, far_off)
        assert (status, result["status"], result["operating_regime"]["known"]) == (200, "scored", False)
        with urllib.request.urlopen(edge.url + "/metrics", timeout=10) as response:
            assert "edge_unknown_operating_regime_total 1.0" in response.read().decode()
    finally:
        edge.stop()
