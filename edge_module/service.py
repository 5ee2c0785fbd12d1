"""The edge module's REST service: authenticated telemetry in, RUL estimates out, everything forwarded.

`POST /telemetry` takes one message or a batch from a device authenticated by its IoT Hub SAS
token (the device id comes from the token, never from the body). Each message is validated by
the contract; a valid one updates its device's features and is scored by the current model; a
duplicate (same message id) is acknowledged and not scored twice; a malformed one is refused
with its reason. All of them are written to the durable store (history and outbox) in one
commit before the response, and the forwarder ships the outbox to the landing zone, where the
warehouse quarantines what is malformed. `POST /score` is the stateless scorer of the original
tutorial's web service: a window of cycles in, the estimate at the last one out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Header, HTTPException, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from edge_module.auth import (
    REGISTRY_FILENAME,
    AuthError,
    DeviceRegistry,
    admin_key,
    check_admin,
    device_from_authorization,
)
from edge_module.forwarder import Forwarder
from edge_module.model_slot import LoadedModel, ModelReference, ModelRefused, ModelSlot, load
from edge_module.scoring import DeviceFeatures
from edge_module.store import EdgeStore, HistoryEntry
from turbofan_core.capture import CaptureRecord, device_message
from turbofan_core.features import StreamingFeatures
from turbofan_core.storage import ObjectStore
from turbofan_core.telemetry import FAILURE, MEASUREMENTS, InvalidMessage, parse_message

MAX_BODY_BYTES = 1 << 20  # a batch of a few thousand messages; larger is refused, not read
DESIRED_MODEL = "desired_model.json"
PURGE_SECONDS = 3600.0  # the last model reference set, so a restart serves it again


@dataclass(frozen=True)
class EdgeConfig:
    state_dir: Path
    landing: ObjectStore | None = None  # where the outbox is shipped; None: kept until one is set
    model: ModelReference | None = None  # served at start unless the state folder names a newer one
    forward_max_age_seconds: float = 5.0
    ttl_seconds: float = 7200.0


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "edge_messages", "Messages received, by result", ["result"], registry=self.registry
        )
        self.rejections = Counter(
            "edge_rejections", "Messages refused, by reason", ["reason"], registry=self.registry
        )
        self.latency = Histogram(
            "edge_telemetry_seconds",
            "Time to validate, score and commit one POST /telemetry",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry,
        )
        self.model_version = Gauge(
            "edge_model_info", "The model serving", ["version", "sha256"], registry=self.registry
        )
        self.backlog = Gauge(
            "edge_forward_backlog", "Messages waiting to be forwarded", registry=self.registry
        )
        self.backlog_age = Gauge(
            "edge_forward_backlog_oldest_seconds", "Age of the oldest message waiting", registry=self.registry
        )
        self.dropped = Gauge(
            "edge_forward_dropped",
            "Messages dropped after waiting longer than the TTL",
            registry=self.registry,
        )


class Edge:
    """The module's state: devices, durable store, model, features, forwarder, metrics."""

    def __init__(self, config: EdgeConfig) -> None:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.devices = DeviceRegistry.load(config.state_dir / REGISTRY_FILENAME)
        self.admin_key = admin_key()  # read once: a missing key file fails the start, not a request
        self.store = EdgeStore(config.state_dir / "edge.sqlite")
        self.slot = ModelSlot()
        self.metrics = _Metrics()
        self.forwarder = (
            Forwarder(
                self.store,
                config.landing,
                max_age_seconds=config.forward_max_age_seconds,
                ttl_seconds=config.ttl_seconds,
            )
            if config.landing is not None
            else None
        )
        self._lock = threading.Lock()  # one message at a time through features, store and outbox
        self._features: DeviceFeatures | None = None
        desired = self._desired()
        if desired is not None:
            self.set_model(desired)

    def _desired(self) -> ModelReference | None:
        path = self.config.state_dir / DESIRED_MODEL
        if path.exists():
            return ModelReference(**json.loads(path.read_text()))
        return self.config.model

    def set_model(self, reference: ModelReference) -> LoadedModel:
        """Load, verify and swap in a model (ModelRefused leaves the current one serving)."""
        loaded = load(reference)  # scoring goes on meanwhile
        with self._lock:
            loaded = self.slot.install(loaded)
            self._activate(loaded)
        path = self.config.state_dir / DESIRED_MODEL
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(reference.__dict__))
        staging.replace(path)
        return loaded

    def rollback(self) -> LoadedModel:
        with self._lock:
            loaded = self.slot.rollback()
            self._activate(loaded)
        return loaded

    def _activate(self, loaded: LoadedModel) -> None:
        """Features for the model now current (under the lock): a new spec rebuilds them from history."""
        if self._features is None or self._features.spec != loaded.bundle.spec:
            self._features = DeviceFeatures(loaded.bundle.spec, self.store.lifetime_history)
        self.metrics.model_version.clear()
        self.metrics.model_version.labels(loaded.reference.version, loaded.reference.sha256).set(1)

    def receive(self, device_id: str, messages: list[tuple[bytes, dict[str, str], str | None]]) -> list[dict]:
        """Validate, score and durably record a device's messages: (body, properties, message id)."""
        results: list[dict] = []
        entries: list[tuple[CaptureRecord, HistoryEntry | None]] = []
        now = datetime.now(UTC)
        batch_ids: set[str] = set()
        with self._lock:
            model = self.slot.current
            for body, properties, message_id in messages:
                message_id = (
                    message_id or "edge-" + hashlib.sha256(device_id.encode() + b"\0" + body).hexdigest()[:32]
                )
                try:
                    message = parse_message(body, device_id, properties)
                except InvalidMessage as error:
                    self.metrics.rejections.labels(_rule(error.reason)).inc()
                    entries.append((device_message(device_id, body, now, properties, message_id), None))
                    results.append({"message_id": message_id, "status": "refused", "reason": error.reason})
                    continue
                if message_id in batch_ids or self.store.seen(device_id, message_id):
                    results.append({"message_id": message_id, "status": "duplicate", "cycle": message.cycle})
                    continue
                batch_ids.add(message_id)
                failure = message.kind == FAILURE
                entry = HistoryEntry(
                    device_id, message_id, message.cycle, tuple(map(float, message.measurements)), failure
                )
                result: dict[str, Any] = {"message_id": message_id, "cycle": message.cycle}
                forwarded = dict(properties)
                if failure:
                    if self._features is not None:
                        self._features.failure(device_id)
                    result["status"] = "failure_event"
                elif model is None or self._features is None:
                    result["status"] = "accepted_unscored"
                else:
                    vector = self._features.features(entry)
                    point, low, high = map(float, model.bundle.predict_matrix(vector)[0])
                    rul = {"p50": point, "p10": low, "p90": high}
                    result |= {"status": "scored", "rul": rul, "model_version": model.reference.version}
                    forwarded |= {"rul_p50": f"{point:.3f}", "model_version": model.reference.version}
                entries.append((device_message(device_id, body, now, forwarded, message_id), entry))
                results.append(result)
            try:
                self.store.record(entries)
            except Exception:
                if self._features is not None:  # its state moved on for messages now lost
                    self._features.forget(device_id)
                raise
        for result in results:
            self.metrics.messages.labels(result["status"]).inc()
        return results

    def refresh_metrics(self) -> None:
        count, oldest = self.store.backlog()
        self.metrics.backlog.set(count)
        self.metrics.backlog_age.set(0 if oldest is None else time.time() - oldest)
        if self.forwarder is not None:
            self.metrics.dropped.set(self.forwarder.dropped)


def _rule(reason: str) -> str:
    """A refusal reason without its values, so the metric has one series per rule, not per message."""
    return re.sub(r"'[^']*'|-?\d[\d.e+-]*|\b(?:str|int|float|bool|NoneType|list|dict)\b.*", "_", reason)[:80]


def _messages(body: bytes, headers: dict[str, str]) -> list[tuple[bytes, dict[str, str], str | None]]:
    """A JSON body (one message) or a JSON list (a batch) as (raw body, properties, message id).

    A batch item is a telemetry body, or an envelope {"body": ..., "properties": ..., "messageId": ...};
    a single message takes its id and type from IoT Hub's REST headers.
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [
            (body, _header_properties(headers), headers.get("iothub-messageid"))
        ]  # refused by the contract
    if not isinstance(parsed, list):
        return [(body, _header_properties(headers), headers.get("iothub-messageid"))]
    items = []
    for index, item in enumerate(parsed):
        if not isinstance(item, dict):
            raise HTTPException(
                422, f"a batch holds JSON objects (bodies or envelopes); item {index} is not one"
            )
        if "body" in item:
            properties = {str(k): str(v) for k, v in (item.get("properties") or {}).items()}
            items.append((orjson.dumps(item["body"]), properties, item.get("messageId")))
        else:
            items.append((orjson.dumps(item), {}, None))
    return items


def _header_properties(headers: dict[str, str]) -> dict[str, str]:
    """IoT Hub's REST API carries application properties as `iothub-app-NAME` headers."""
    prefix = "iothub-app-"
    return {name[len(prefix) :]: value for name, value in headers.items() if name.startswith(prefix)}


def create_app(config: EdgeConfig) -> FastAPI:
    edge = Edge(config)

    async def purge_hourly() -> None:
        """Forget message ids older than the dedupe window, so the store stays bounded."""
        while True:
            await _in_thread(edge.store.purge)
            await asyncio.sleep(PURGE_SECONDS)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        purging = asyncio.create_task(purge_hourly())
        if edge.forwarder is not None:
            edge.forwarder.start()
        yield
        purging.cancel()
        if edge.forwarder is not None:
            edge.forwarder.stop(flush=True)

    app = FastAPI(title="turbofan edge module", version="1", lifespan=lifespan)
    app.state.edge = edge

    def _device(authorization: str | None) -> str:
        try:
            return device_from_authorization(authorization, edge.devices)
        except AuthError as error:
            raise HTTPException(401, error.reason) from None

    def _admin(authorization: str | None) -> None:
        try:
            check_admin(authorization, edge.admin_key)
        except AuthError as error:
            raise HTTPException(401, error.reason) from None

    @app.post("/telemetry")
    async def telemetry(request: Request, authorization: str | None = Header(None)) -> Response:
        """One message (IoT Hub REST style) or a batch, from the device the SAS token names."""
        started = time.perf_counter()
        device_id = _device(authorization)
        content_type, _, parameters = request.headers.get("content-type", "application/json").partition(";")
        if content_type.strip().lower() != "application/json":
            raise HTTPException(415, f"content type {content_type.strip()!r} is not 'application/json'")
        charset = parameters.strip().removeprefix("charset=").strip().lower()
        if charset not in ("", "utf-8", "utf8"):
            raise HTTPException(415, f"content encoding {charset!r} is not 'utf-8'")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"body of {len(body)} bytes is over {MAX_BODY_BYTES}")
        messages = _messages(body, {k.lower(): v for k, v in request.headers.items()})
        try:
            results = await _in_thread(edge.receive, device_id, messages)
        except (sqlite3.Error, OSError) as error:
            raise HTTPException(
                503, f"could not store the messages durably, send them again: {error}"
            ) from None
        edge.metrics.latency.observe(time.perf_counter() - started)
        single = len(messages) == 1 and not body.lstrip().startswith(b"[")
        if single and results[0]["status"] == "refused":
            return Response(
                orjson.dumps({"detail": results[0]["reason"]}), 422, media_type="application/json"
            )
        if not single and all(result["status"] == "refused" for result in results):
            answer = {"detail": "every message of the batch was refused", "results": results}
            return Response(orjson.dumps(answer), 422, media_type="application/json")
        return Response(orjson.dumps(results[0] if single else results), media_type="application/json")

    @app.post("/score")
    def score(window: list[dict[str, Any]]) -> dict:
        """Stateless: the RUL estimate at the last of a window of cycles (contract bodies, in order)."""
        model = edge.slot.current
        if model is None:
            raise HTTPException(503, "no model loaded")
        if not window:
            raise HTTPException(422, "an empty window")
        engine = StreamingFeatures(model.bundle.spec)
        vector = None
        for item in window:
            try:
                message = parse_message(orjson.dumps(item), "window", {})
            except InvalidMessage as error:
                raise HTTPException(422, error.reason) from None
            if message.kind == FAILURE:
                raise HTTPException(422, "a window holds telemetry only")
            values = dict(zip(MEASUREMENTS, message.measurements, strict=True))
            vector = engine.update("window", message.cycle, values)
        point, low, high = map(float, model.bundle.predict_matrix(vector)[0])
        return {
            "cycle": message.cycle,
            "rul": {"p50": point, "p10": low, "p90": high},
            "model_version": model.reference.version,
        }

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model_loaded": edge.slot.current is not None}

    @app.get("/model")
    def model() -> dict:
        current = edge.slot.current
        if current is None:
            raise HTTPException(404, "no model loaded")
        return {
            **current.reference.__dict__,
            "loaded_at": current.loaded_at.isoformat(),
            "source": current.reference.uri,
        }

    @app.put("/admin/model")
    def put_model(reference: dict[str, str], authorization: str | None = Header(None)) -> dict:
        _admin(authorization)
        try:
            loaded = edge.set_model(ModelReference(**reference))
        except (TypeError, ModelRefused) as error:
            raise HTTPException(422, str(error)) from None
        return {"version": loaded.reference.version, "sha256": loaded.reference.sha256}

    @app.post("/admin/model/rollback")
    def rollback(authorization: str | None = Header(None)) -> dict:
        _admin(authorization)
        try:
            loaded = edge.rollback()
        except ModelRefused as error:
            raise HTTPException(409, str(error)) from None
        return {"version": loaded.reference.version, "sha256": loaded.reference.sha256}

    @app.get("/metrics")
    def metrics() -> Response:
        edge.refresh_metrics()
        return Response(generate_latest(edge.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _in_thread(function, *args):
    """Run blocking work (features, XGBoost, the fsync'd commit) off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)
