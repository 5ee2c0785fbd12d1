"""`POST /telemetry`: the request as IoT Hub's REST API or a gateway's batch, the answer as JSON.

It is served as a plain ASGI app (`TelemetryEndpoint`, mounted as a Starlette route) rather than
a FastAPI endpoint: at 1,000 single messages a second, FastAPI's request and response handling
was a sixth of the service's CPU (docs/benchmarks.md). The route is still described in the
OpenAPI document (`OPENAPI`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import orjson

from edge_module import _batch
from edge_module.auth import AuthError
from edge_module.messages import Arrivals
from turbofan_core.telemetry import FIELDS, Fields

if TYPE_CHECKING:
    from edge_module.service import Edge

MAX_BODY_BYTES = 1 << 20  # a batch of a few thousand messages; larger is refused, not read


class Read(NamedTuple):
    """A request's messages as read, before their devices are known: a list per field."""

    credentials: list[str | None]  # each message's SAS token; None: the request's
    bodies: list[bytes]  # as sent
    properties: list[dict[str, str]]
    message_ids: list[str | None]
    parsed: list[object]  # a body parsed when it is a JSON object, so the contract need not parse it
    fields: Fields | None  # a batch's bodies' fields (`check_messages`'s `fields`)

    def arrivals(self, devices: list[str]) -> Arrivals:
        """The messages, of the devices their credentials named, in JSON and UTF-8 (the content type
        the request was checked for)."""
        usual = [None] * len(devices)
        return Arrivals(devices, self.bodies, self.properties, self.message_ids, usual, usual, self.parsed)


class Refused(Exception):
    """A request answered with an HTTP error and its reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def answer(edge: Edge, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
    """The status and JSON answer to one request (header names in lower case, as ASGI gives them).

    The messages are recorded in the event loop itself (the work is serialised by the edge's lock
    anyway, and a hop to a worker thread costs more than it would overlap); the answer waits for
    the store's group fsync, during which the loop serves other requests."""
    started = time.perf_counter()
    try:
        _check_content_type(headers.get("content-type", "application/json"))
        if len(body) > MAX_BODY_BYTES:
            raise Refused(413, f"body of {len(body)} bytes is over {MAX_BODY_BYTES}")
        read = messages(body, headers)
        authorization = headers.get("authorization")
        # Each token once: a gateway's batch repeats each device's token for all of its messages.
        tokens = dict.fromkeys(credential or authorization for credential in read.credentials)
        if authorization is not None:
            tokens[authorization] = None  # a header given is checked, even if every item has a token
        try:
            signers = edge.authenticate_each(list(tokens))
        except AuthError as error:
            raise Refused(401, error.reason) from None
        arrivals = read.arrivals([signers[credential or authorization] for credential in read.credentials])
        try:
            results = edge.receive(arrivals, durable=False, fields=read.fields)
            await edge.store.synced()
        except (sqlite3.Error, OSError) as error:
            raise Refused(503, f"could not store the messages durably, send them again: {error}") from None
    except Refused as refused:
        return refused.status, orjson.dumps({"detail": refused.detail})
    edge.metrics.latency.observe(time.perf_counter() - started)
    single = len(results) == 1 and not _is_batch(body)
    if single and results[0]["status"] == "refused":
        return 422, orjson.dumps({"detail": results[0]["reason"]})
    if single:
        return 200, orjson.dumps(results[0])
    if all(result["status"] == "refused" for result in results):
        return 422, orjson.dumps({"detail": "every message of the batch was refused", "results": results})
    return 200, orjson.dumps(results)


def _check_content_type(value: str) -> None:
    content_type, _, parameters = value.partition(";")
    if content_type.strip().lower() != "application/json":
        raise Refused(415, f"content type {content_type.strip()!r} is not 'application/json'")
    charset = parameters.strip().removeprefix("charset=").strip().lower()
    if charset not in ("", "utf-8", "utf8"):
        raise Refused(415, f"content encoding {charset!r} is not 'utf-8'")


def messages(body: bytes, headers: Mapping[str, str]) -> Read:
    """A JSON body (one message) or a JSON list (a batch), read.

    A single message takes its id and properties from IoT Hub's REST headers. A batch item is a
    telemetry body, or an envelope {"body", "properties", "messageId", "authorization"}: a gateway
    batching many devices' messages gives each its device's SAS token; without one, the item is the
    requesting device's (credential None). A batch's bodies are forwarded as the bytes sent, and are
    not parsed here: `_batch.split` takes their fields from the text.
    """
    one: object = None
    if _is_batch(body):
        try:
            split = _batch.split(body, FIELDS)
        except _batch.BatchRefused as error:
            raise Refused(422, str(error)) from None
        if split is not None:
            return _batch_messages(*split)
    else:
        try:
            one = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # refused by the contract, with its reason
    parsed = one if isinstance(one, dict) else None
    properties, message_id = _header_properties(headers), headers.get("iothub-messageid")
    return Read([None], [body], [properties], [message_id], [parsed], None)


def _is_batch(body: bytes) -> bool:
    """A JSON list is a batch, answered with a list, even when it is not valid JSON."""
    return body.lstrip()[:1] == b"["


def _batch_messages(
    items: list[tuple[str | None, bytes, bytes | None, str | None]], table: bytes, plain: bytes
) -> Read:
    if not items:
        raise Refused(422, "an empty batch: no message to take")
    credentials, bodies, properties, message_ids = (list(column) for column in zip(*items, strict=True))
    fields = np.frombuffer(table).reshape(len(items), len(FIELDS)), np.frombuffer(plain, dtype=bool)
    read = [_properties(text) if text else {} for text in properties]
    return Read(credentials, bodies, read, message_ids, [None] * len(items), fields)


def _properties(text: bytes) -> dict[str, str]:
    """An envelope's properties (a JSON object's text), each name and value as a str."""
    return {str(name): str(value) for name, value in orjson.loads(text).items()}


def _header_properties(headers: Mapping[str, str]) -> dict[str, str]:
    """IoT Hub's REST API carries application properties as `iothub-app-NAME` headers."""
    prefix = "iothub-app-"
    return {name[len(prefix) :]: value for name, value in headers.items() if name.startswith(prefix)}


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class TelemetryEndpoint:
    """The ASGI app of `POST /telemetry`."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left mid-upload: nothing to answer
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES or not message.get("more_body"):
                break
        status, payload = await answer(self.edge, bytes(body), headers)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(payload)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


OPENAPI = {
    "post": {
        "summary": "Telemetry",
        "description": "One message (IoT Hub REST style: id and properties in `iothub-messageid` and "
        "`iothub-app-*` headers) or a batch, from the device the SAS token names, or in a gateway's "
        "batch the devices each item's token names. Each message is validated by the contract, scored "
        "and stored before the answer: its status (scored, duplicate, failure_event, accepted_unscored "
        "or refused with the contract's reason), the cycle, the RUL p50 with the p10-p90 interval and "
        "the model version.",
        "parameters": [
            {
                "name": "Authorization",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "The device's SAS token; a gateway's batch may carry one per item instead",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"type": "object", "description": "one message body"},
                            {"type": "array", "items": {"type": "object"}, "description": "a batch"},
                        ]
                    }
                }
            },
        },
        "responses": {
            "200": {"description": "each message's result (an object for one, a list for a batch)"},
            "401": {"description": "no valid SAS token"},
            "413": {"description": f"a body over {MAX_BODY_BYTES} bytes"},
            "415": {"description": "not application/json in UTF-8"},
            "422": {"description": "the message (or every message of the batch) was refused"},
            "503": {"description": "the messages could not be stored durably: send them again"},
        },
    }
}
