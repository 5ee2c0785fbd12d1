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
import gc
import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Header, HTTPException, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from edge_module import telemetry_endpoint
from edge_module.auth import (
    REGISTRY_FILENAME,
    AuthError,
    DeviceRegistry,
    admin_key,
    check_admin,
    device_from_authorization,
    token_expiry,
)
from edge_module.forwarder import Forwarder
from edge_module.gateway import Gateway, GatewaySettings
from edge_module.messages import Arrivals
from edge_module.model_slot import LoadedModel, ModelReference, ModelRefused, ModelSlot, load
from edge_module.scoring import DeviceFeatures
from edge_module.store import DEFAULT_DEDUPE_WINDOW_SECONDS, EdgeStore, HistoryEntry, pack_entries
from edge_module.telemetry_endpoint import TelemetryEndpoint
from turbofan_core.atomic_file import write_atomically
from turbofan_core.capture import encode_device_messages, format_enqueued_time
from turbofan_core.features import StreamingFeatures
from turbofan_core.storage import ObjectStore
from turbofan_core.telemetry import (
    FAILURE,
    MEASUREMENTS,
    Fields,
    InvalidMessage,
    check_messages,
    parse_message,
)

log = logging.getLogger(__name__)
DESIRED_MODEL = "desired_model.json"  # the last model reference set, so a restart serves it again
PURGE_SECONDS = 3600.0
MAX_VERIFIED_TOKENS = 100_000  # remembered verified SAS tokens; forgotten all at once past this
YOUNG_COLLECTION_THRESHOLD = 20_000  # objects allocated (net) between the collector's young passes


@dataclass(frozen=True)
class EdgeConfig:
    state_dir: Path
    landing: ObjectStore | None = None  # where the outbox is shipped; None: nothing is forwarded
    model: ModelReference | None = None  # served at start unless the state folder names a newer one
    forward_max_age_seconds: float = 5.0
    ttl_seconds: float = 7200.0
    gateway: GatewaySettings | None = None  # the MQTT-over-TLS listener for devices; None: REST only
    dedupe_window_seconds: float = DEFAULT_DEDUPE_WINDOW_SECONDS  # see EdgeStore


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
        self.devices = Gauge(
            "edge_devices", "Devices with telemetry in their current engine lifetime", registry=self.registry
        )
        self.gateway_connections = Gauge(
            "edge_gateway_connections", "Devices connected to the MQTT gateway", registry=self.registry
        )
        self.gateway_refusals = Counter(
            "edge_gateway_refusals", "MQTT connections refused, by reason", ["reason"], registry=self.registry
        )
        self.unknown_regime = Counter(
            "edge_unknown_operating_regime",
            "Messages scored although their operational settings lie far from every regime the model knows",
            registry=self.registry,
        )
        self.dropped = Gauge(
            "edge_forward_dropped",
            "Messages dropped after waiting longer than the TTL",
            registry=self.registry,
        )


@dataclass
class _Request:
    """A request's messages on their way through `Edge.receive`, a list per column, a message being
    its place in them: one object per request, where an object per message cost more than its work."""

    arrivals: Arrivals
    ids: list[str]  # each message's own id, or one derived from its bytes
    results: list[dict[str, Any]]  # the answers
    properties: list[dict[str, str]]  # forwarded with each: the device's, and once scored, the score
    entries: list[HistoryEntry | None]  # a valid, new message's, else None
    forward: list[bool]  # False for a duplicate: forwarded the first time
    measurements: np.ndarray  # a row each, NaN where refused or a failure event


class Edge:
    """The module's state: devices, durable store, model, features, forwarder, metrics."""

    def __init__(self, config: EdgeConfig) -> None:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.devices = DeviceRegistry.load(config.state_dir / REGISTRY_FILENAME)
        self._devices_version = self._registry_version()
        self._verified: dict[str, tuple[str, float]] = {}  # SAS token -> (device, expiry)
        self.admin_key = admin_key()  # read once: a missing key file fails the start, not a request
        self.store = EdgeStore(config.state_dir / "edge.sqlite", config.dedupe_window_seconds)
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

    def _registry_version(self) -> int | None:
        try:
            return self.devices.path.stat().st_mtime_ns  # one system call: this runs on every request
        except FileNotFoundError:
            return None

    def _current_devices(self) -> DeviceRegistry:
        """The registry, read again whenever its file changed (`turbofan devices create | remove`,
        another process), forgetting every token verified under the old one: a removed device is
        refused at once."""
        version = self._registry_version()
        if version != self._devices_version:
            self.devices, self._devices_version = DeviceRegistry.load(self.devices.path), version
            self._verified.clear()
        return self.devices

    def registered(self, device_id: str) -> bool:
        return self._current_devices().get(device_id) is not None

    def authenticate(self, authorization: str | None) -> str:
        """The device the SAS token names, in the registry as it is now."""
        return self.authenticate_each([authorization])[authorization]

    def authenticate_each(self, tokens: list[str | None]) -> dict[str | None, str]:
        """The device each SAS token names, in the registry as it is now (read once for all of them);
        AuthError for the first token refused.

        A verified token is remembered until it expires (or the registry changes): a device sends
        thousands of messages with one token, and each check is an HMAC.
        """
        now = time.time()
        devices = self._current_devices()
        found: dict[str | None, str] = {}
        for authorization in tokens:
            known = self._verified.get(authorization or "")
            if known is not None and known[1] > now:
                found[authorization] = known[0]
                continue
            device = device_from_authorization(authorization, devices, now=now)
            if len(self._verified) > MAX_VERIFIED_TOKENS:
                self._verified.clear()
            self._verified[authorization] = (device, token_expiry(authorization.strip()))
            found[authorization] = device
        return found

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
        write_atomically(
            self.config.state_dir / DESIRED_MODEL, json.dumps(reference.__dict__).encode(), 0o644
        )
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

    def receive(self, arrivals: Arrivals, durable: bool = True, fields: Fields | None = None) -> list[dict]:
        """Validate, score and durably record messages, each of the device its credential named
        (with `durable` False, durable once `store.synced()` returns; `fields`: their bodies' fields,
        taken already, see `check_messages`).

        In-order telemetry (the usual case) is scored as a batch: features for many devices at once
        and one model call, then one commit. A batch with a failure event or a late message is taken
        one message at a time, each committed before the next, so a replay sees what came before it.
        """
        if not arrivals.bodies:
            return []
        with self._lock:
            model = self.slot.current
            request = self._check(arrivals, fields)
            entries = request.entries
            new = [index for index, entry in enumerate(entries) if entry is not None]
            telemetry = [index for index in new if not entries[index].failure]
            telemetry_entries = [entries[index] for index in telemetry]
            everything = range(len(entries))
            if model is None or self._features is None:
                self._record(request, everything, durable)
            elif len(telemetry) == len(new) and self._features.in_order(telemetry_entries):
                if telemetry:
                    values = request.measurements[telemetry]
                    vectors = self._features.features_many(telemetry_entries, values)
                    self._score(request, telemetry, vectors, model)
                self._record(request, everything, durable)
            else:
                for index in everything:
                    entry = entries[index]
                    if entry is not None and entry.failure:
                        self._features.failure(entry.device_id)
                    elif entry is not None:  # telemetry
                        self._score(request, [index], self._features.features(entry), model)
                    self._record(request, [index], durable)
        for status, count in Tally(result["status"] for result in request.results).items():
            self.metrics.messages.labels(status).inc(count)
        return request.results

    def _score(self, request: _Request, indices: list[int], vectors: np.ndarray, model: LoadedModel) -> None:
        """Score the telemetry messages at `indices` (`vectors`: their feature rows): each one's answer
        and forwarded properties, and its operating regime when the model knows regimes."""
        version = model.reference.version
        rows = model.bundle.predict_matrix(vectors).tolist()
        results, properties, ids, entries = request.results, request.properties, request.ids, request.entries
        for index, (point, low, high) in zip(indices, rows, strict=True):
            results[index] = {
                "message_id": ids[index],
                "cycle": entries[index].cycle,
                "status": "scored",
                "rul": {"p50": point, "p10": low, "p90": high},
                "model_version": version,
            }
            properties[index] = {**properties[index], "rul_p50": f"{point:.3f}", "model_version": version}
        self._place_in_regimes(request, indices, model)

    def _place_in_regimes(self, request: _Request, indices: list[int], model: LoadedModel) -> None:
        """Name each scored message's operating regime, flagging (and counting) one whose settings lie
        far from every regime the model learnt: it is scored all the same."""
        regimes = model.bundle.spec.regimes
        if regimes is None:
            return
        columns = [MEASUREMENTS.index(name) for name in regimes.settings]
        nearest, far = regimes.assign(request.measurements[np.ix_(indices, columns)])
        for index, regime, unknown in zip(indices, nearest.tolist(), far.tolist(), strict=True):
            request.results[index]["operating_regime"] = {"nearest": regime, "known": not unknown}
        self.metrics.unknown_regime.inc(int(far.sum()))

    def _check(self, arrivals: Arrivals, fields: Fields | None) -> _Request:
        """Validate (the contract's batch checks) and deduplicate, without changing any state."""
        devices, bodies, properties, message_ids, types, encodings, parsed = arrivals
        ids = [m or _derived_id(d, b) for m, d, b in zip(message_ids, devices, bodies, strict=True)]
        verdicts = check_messages(bodies, devices, properties, types, encodings, parsed, fields)
        keys = list(zip(devices, ids, strict=True))
        seen = self.store.seen_many(keys)
        results: list[dict[str, Any]] = []
        entries: list[HistoryEntry | None] = []
        # Python lists: a numpy element read one at a time costs more than the whole conversion.
        columns = zip(
            keys,
            verdicts.valid.tolist(),
            verdicts.cycles.tolist(),
            verdicts.failure.tolist(),
            pack_entries(verdicts.cycles, verdicts.measurements),
            strict=True,
        )
        for index, (key, valid, cycle, failure, packed) in enumerate(columns):
            if not valid:
                reason = verdicts.reasons[index]
                self.metrics.rejections.labels(_rule(reason)).inc()
                results.append({"message_id": key[1], "status": "refused", "reason": reason})
                entries.append(None)
            elif key in seen:
                results.append({"message_id": key[1], "cycle": cycle, "status": "duplicate"})
                entries.append(None)
            else:
                seen.add(key)
                status = "failure_event" if failure else "accepted_unscored"
                results.append({"message_id": key[1], "cycle": cycle, "status": status})
                entries.append(HistoryEntry(*key, cycle, b"" if failure else packed, failure))
        forward = [result["status"] != "duplicate" for result in results]
        return _Request(arrivals, ids, results, list(properties), entries, forward, verdicts.measurements)

    def _record(self, request: _Request, indices: range | list[int], durable: bool) -> None:
        """Commit the messages at `indices` that are to be forwarded (and the history they add) in
        one transaction."""
        forwarded = [index for index in indices if request.forward[index]]
        devices, bodies, _, _, types, encodings, _ = request.arrivals
        properties, ids, entries = request.properties, request.ids, request.entries
        try:
            records = encode_device_messages(
                format_enqueued_time(datetime.now(UTC)),  # one enqueued time for the request
                [(devices[i], bodies[i], properties[i], ids[i], types[i], encodings[i]) for i in forwarded],
            )
            self.store.record(list(zip(records, [entries[i] for i in forwarded], strict=True)), durable)
        except Exception:
            for index in forwarded:  # each device's state moved on for a message now lost
                entry = entries[index]
                if entry is not None and self._features is not None:
                    self._features.forget(entry.device_id)
            raise

    def refresh_metrics(self) -> None:
        self.metrics.devices.set(len(self.store.devices()))
        count, oldest = self.store.backlog()
        self.metrics.backlog.set(count)
        self.metrics.backlog_age.set(0 if oldest is None else time.time() - oldest)
        if self.forwarder is not None:
            self.metrics.dropped.set(self.forwarder.dropped)


def _derived_id(device_id: str, body: bytes) -> str:
    """An id for a message that came without one: the same bytes from the same device are a repeat."""
    return "edge-" + hashlib.sha256(device_id.encode() + b"\0" + body).hexdigest()[:32]


def _rule(reason: str) -> str:
    """A refusal reason without its values, so the metric has one series per rule, not per message."""
    return re.sub(r"'[^']*'|-?\d[\d.e+-]*|\b(?:str|int|float|bool|NoneType|list|dict)\b.*", "_", reason)[:80]


def create_app(config: EdgeConfig) -> FastAPI:
    edge = Edge(config)

    async def purge_hourly() -> None:
        """Forget message ids older than the dedupe window, so the store stays bounded."""
        while True:
            try:
                await run_in_threadpool(edge.store.purge)
            except (sqlite3.Error, OSError) as error:  # a full disk: tried again in an hour
                log.warning("purging the edge store failed: %s", error)
            await asyncio.sleep(PURGE_SECONDS)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        purging = asyncio.create_task(purge_hourly())
        if edge.forwarder is not None:
            edge.forwarder.start()
        gateway = Gateway(edge, config.gateway) if config.gateway is not None else None
        if gateway is not None:
            await gateway.start()
            edge.metrics.gateway_connections.set_function(gateway.connected)
        # What is loaded by now (modules, the app, the model) lives as long as the process: frozen,
        # it is left out of the collector's full passes, each of which walked all of it (tens of
        # thousands of objects, tens of ms holding the event loop) every few thousand batch messages.
        gc.freeze()
        # A batch keeps thousands of young objects alive at once (entries, records, results): at the
        # default threshold of 700 the collector ran every ~60 messages (in-process, 500-message
        # batches: 548 young collections over 30,000 messages, 36 ms); at this one, none.
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD)
        yield
        if gateway is not None:
            await gateway.stop()
        purging.cancel()
        if edge.forwarder is not None:
            edge.forwarder.stop(flush=True)

    # FastAPI's native OpenTelemetry looks up the global providers on every request; the edge
    # reports through its own Prometheus metrics instead.
    app = FastAPI(
        title="turbofan edge module",
        version="1",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.edge = edge

    def _admin(authorization: str | None) -> None:
        try:
            check_admin(authorization, edge.admin_key)
        except AuthError as error:
            raise HTTPException(401, error.reason) from None

    app.router.routes.insert(0, Route("/telemetry", TelemetryEndpoint(edge), methods=["POST"]))

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the telemetry route it does not serve itself."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)  # builds and keeps app.openapi_schema
            schema["paths"] = {"/telemetry": telemetry_endpoint.OPENAPI, **schema["paths"]}
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

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
