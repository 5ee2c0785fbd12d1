"""A local HTTPS server standing in for Azure IoT Hub's service REST API, for tests.

No IoT Hub emulator exists, so this double checks requests the way the service does: the
`Authorization` header is a shared-access-policy token (`SharedAccessSignature sr=&sig=&se=&skn=`)
signed with the policy key (HMAC-SHA256 over the URL-encoded `sr`, a newline and the expiry) and
not expired; the `api-version` is the one azure-iot-hub 2.7.0 sends; device identities have
IoT Hub's shape; `applyConfigurationContent` holds `$edgeAgent` and `$edgeHub` desired properties
valid against the published IoT Edge JSON schemas of their `schemaVersion` (read from
`../shared/schemas/iotedge`, or `IOTEDGE_SCHEMAS_DIR`). Refusals are IoT Hub's status codes and
error bodies: `{"Message": "ErrorCode:Code;text", "ExceptionMessage": "Tracking ID:..."}`.

It keeps device identities in memory (create, get, list, update, delete, with ETag/If-Match as
IoT Hub does) and the configuration content last applied to each edge device. Anything else it
answers 501, so a test reaching past what is modelled here fails loudly.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jsonschema
import pytest

from edge_module.certs import write_certs

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR_ENV = "IOTEDGE_SCHEMAS_DIR"
DEFAULT_SCHEMAS_DIR = REPO_ROOT.parent / "shared" / "schemas" / "iotedge"
# What azure-iot-hub 2.7.0 sends (azure/iot/hub/protocol/version.py); others are refused.
API_VERSION = "2021-04-12"
POLICY_NAME = "iothubowner"
# The published schema of each system module's desired properties, by their schemaVersion.
SCHEMA_FILES = {
    "$edgeAgent": {
        "1.0": "azure-iot-edgeagent-deployment-1.0.json",
        "1.1": "azure-iot-edgeagent-deployment-1.1.json",
    },
    "$edgeHub": {
        "1.0": "azure-iot-edgehub-deployment-1.0.json",
        "1.2": "azure-iot-edgehub-deployment-1.2.json",
    },
}
_DEVICE_ID = re.compile(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}")
_DEVICE_PATH = re.compile(r"/devices/([^/]+)")
_APPLY_PATH = re.compile(r"/devices/([^/]+)/applyConfigurationContent")
_KEY_BYTES = (16, 64)  # IoT Hub's bounds for a symmetric key
_NEVER = "0001-01-01T00:00:00Z"


@dataclass(frozen=True)
class Received:
    """One request as the stand-in saw it, and the status it answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any  # the parsed JSON, or None
    status: int


class Refused(Exception):
    """An IoT Hub error answer: HTTP status, IoT Hub's error code, its message."""

    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


def load_schemas(folder: Path) -> dict[str, dict[str, Any]]:
    """A validator per system module and schemaVersion; a missing folder fails the test."""
    validators: dict[str, dict[str, Any]] = {}
    for module, files in SCHEMA_FILES.items():
        for version, name in files.items():
            path = folder / name
            if not path.is_file():
                pytest.fail(
                    f"IoT Edge schema {path} is missing: set {SCHEMAS_DIR_ENV} to the folder holding "
                    "the published IoT Edge deployment schemas (azure-iot-edgeagent-deployment-1.1.json...)",
                    pytrace=False,
                )
            schema = json.loads(path.read_text(encoding="utf-8"))
            kind = jsonschema.validators.validator_for(schema)
            kind.check_schema(schema)
            validators.setdefault(module, {})[version] = kind(schema)
    return validators


@dataclass
class IoTHubStandIn:
    """The running stand-in: what a client needs (`connection_string`, `ca_cert`) and what it saw."""

    hostname: str  # localhost:PORT, the HostName of the connection string
    key: str = field(repr=False)  # the iothubowner policy's key (base64)
    ca_cert: Path  # the CA the client must trust (REQUESTS_CA_BUNDLE)
    schemas: dict[str, dict[str, Any]] = field(repr=False)
    requests: list[Received] = field(default_factory=list)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # as IoT Hub returns them
    applied: dict[str, dict[str, Any]] = field(default_factory=dict)  # content per edge device
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _etags: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    @property
    def connection_string(self) -> str:
        return f"HostName={self.hostname};SharedAccessKeyName={POLICY_NAME};SharedAccessKey={self.key}"

    # --- the checks IoT Hub makes --------------------------------------------------------------

    def authorize(self, header: str | None) -> None:
        """Accept only a policy token for this hub, signed with the policy key, not expired."""
        unauthorized = Refused(401, "IotHubUnauthorizedAccess", "Unauthorized")
        prefix = "SharedAccessSignature "
        if not header or not header.startswith(prefix):
            raise unauthorized
        fields = dict(part.partition("=")[::2] for part in header[len(prefix) :].split("&"))
        if set(fields) != {"sr", "sig", "se", "skn"} or fields["skn"] != POLICY_NAME:
            raise unauthorized
        if unquote(fields["sr"]).lower().rstrip("/") != self.hostname.lower():
            raise unauthorized
        if not fields["se"].isdigit() or int(fields["se"]) < time.time():
            raise unauthorized
        expected = hmac.digest(
            base64.b64decode(self.key), f"{fields['sr']}\n{fields['se']}".encode(), hashlib.sha256
        )
        try:
            presented = base64.b64decode(unquote(fields["sig"]), validate=True)
        except (binascii.Error, ValueError):
            raise unauthorized from None
        if not hmac.compare_digest(expected, presented):
            raise unauthorized

    @staticmethod
    def check_api_version(query: dict[str, list[str]]) -> None:
        versions = query.get("api-version", [])
        if versions != [API_VERSION]:
            raise Refused(
                400,
                "InvalidProtocolVersion",
                f"Invalid protocol version {versions[0] if versions else None!r}; "
                f"this hub serves {API_VERSION}",
            )

    # --- the device registry -------------------------------------------------------------------

    def get_device(self, device_id: str) -> dict[str, Any]:
        device = self.devices.get(device_id)
        if device is None:
            raise Refused(404, "DeviceNotFound", f"Device {device_id} not registered.")
        return device

    @staticmethod
    @staticmethod
    def _precondition(if_match: str | None, device: dict[str, Any]) -> None:
        """No If-Match: unconditional; `*` (azure-iot-hub sends it quoted) or the quoted current
        ETag: go; an unquoted or other ETag: 412, as IoT Hub answers."""
        if if_match is None or if_match.strip() in ("*", '"*"'):
            return
        tag = if_match.strip()
        if len(tag) < 2 or tag[0] != '"' or tag[-1] != '"':
            raise Refused(412, "PreconditionFailed", "Precondition failed: Invalid ETag")
        if tag[1:-1] != device["etag"]:
            raise Refused(412, "PreconditionFailed", "Precondition failed: Device version did not match")

    def put_device(self, device_id: str, body: Any, if_match: str | None) -> dict[str, Any]:
        """Create (no If-Match; 409 when it exists) or update (If-Match; 404 when it does not)."""
        identity = _device_identity(device_id, body)
        existing = self.devices.get(device_id)
        if if_match is None and existing is not None:
            raise Refused(
                409, "DeviceAlreadyExists", f"A device with ID '{device_id}' is already registered."
            )
        if if_match is not None:
            self._precondition(if_match, self.get_device(device_id))
        now = _now()
        generation = existing["generationId"] if existing else str(secrets.randbelow(10**18))
        edge = identity["iotEdge"]
        device = {
            "deviceId": device_id,
            "generationId": generation,
            "etag": base64.b64encode(str(next(self._etags)).encode()).decode(),
            "connectionState": "Disconnected",
            "status": identity["status"],
            "statusReason": identity["statusReason"],
            "connectionStateUpdatedTime": _NEVER,
            "statusUpdatedTime": now
            if existing is None or existing["status"] != identity["status"]
            else existing["statusUpdatedTime"],
            "lastActivityTime": _NEVER,
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "symmetricKey": {
                    "primaryKey": identity["primaryKey"],
                    "secondaryKey": identity["secondaryKey"],
                },
                "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
                "type": "sas",
            },
            "capabilities": {"iotEdge": edge},
            "deviceScope": f"ms-azure-iot-edge://{device_id}-{generation}" if edge else None,
            "parentScopes": [],
        }
        self.devices[device_id] = device
        return device

    def delete_device(self, device_id: str, if_match: str | None) -> None:
        self._precondition(if_match, self.get_device(device_id))
        del self.devices[device_id]
        self.applied.pop(device_id, None)

    def apply_configuration(self, device_id: str, body: Any) -> None:
        """Validate the edge deployment as IoT Hub does, then keep it as the device's content."""
        device = self.get_device(device_id)
        if not device["capabilities"]["iotEdge"]:
            raise Refused(400, "ArgumentInvalid", f"Device {device_id} is not an IoT Edge device.")
        invalid = "The content provided for configuration is invalid. Please check and try again"
        if not isinstance(body, dict) or not isinstance(body.get("modulesContent"), dict):
            raise Refused(400, "InvalidConfigurationContent", f"{invalid}: modulesContent is required")
        modules = body["modulesContent"]
        for module, versions in SCHEMA_FILES.items():
            content = modules.get(module)
            if not isinstance(content, dict):
                raise Refused(400, "InvalidConfigurationContent", f"{invalid}: {module} is required")
            desired = content.get("properties.desired")
            version = desired.get("schemaVersion") if isinstance(desired, dict) else None
            if version not in versions:
                raise Refused(
                    400,
                    "InvalidConfigurationContent",
                    f"{invalid}: {module} schemaVersion {version!r} is not one of {sorted(versions)}",
                )
            errors = sorted(self.schemas[module][version].iter_errors({module: content}), key=str)
            if errors:
                where = "/".join(str(part) for part in errors[0].absolute_path)
                raise Refused(400, "InvalidConfigurationContent", f"{invalid}: {where}: {errors[0].message}")
        for module, content in modules.items():
            if not isinstance(content, dict) or not all(k.startswith("properties.desired") for k in content):
                raise Refused(
                    400, "InvalidConfigurationContent", f"{invalid}: {module} must hold properties.desired"
                )
        self.applied[device_id] = body


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def _device_identity(device_id: str, body: Any) -> dict[str, Any]:
    """The fields of a device identity body that IoT Hub checks; 400 ArgumentInvalid otherwise."""

    def invalid(text: str) -> Refused:
        return Refused(400, "ArgumentInvalid", text)

    if not _DEVICE_ID.fullmatch(device_id):
        raise invalid(f"Invalid device id '{device_id}'")
    if not isinstance(body, dict):
        raise invalid("The request body must be a device identity (a JSON object)")
    if body.get("deviceId") != device_id:
        raise invalid("DeviceId in the request body does not match the deviceId in the url")
    status = body.get("status", "enabled")
    if status not in ("enabled", "disabled"):
        raise invalid(f"Invalid device status {status!r}: enabled or disabled")
    authentication = body.get("authentication") or {"type": "sas"}
    if not isinstance(authentication, dict) or authentication.get("type") != "sas":
        raise invalid("The stand-in models sas authentication only (authentication.type must be 'sas')")
    symmetric = authentication.get("symmetricKey") or {}
    keys = [symmetric.get("primaryKey"), symmetric.get("secondaryKey")]
    if keys == [None, None]:  # IoT Hub generates both when none is given
        keys = [base64.b64encode(secrets.token_bytes(32)).decode() for _ in keys]
    for key in keys:
        try:
            raw = base64.b64decode(key, validate=True) if isinstance(key, str) else b""
        except (binascii.Error, ValueError):
            raw = b""
        if not _KEY_BYTES[0] <= len(raw) <= _KEY_BYTES[1]:
            raise invalid("The symmetric keys must be base64 values of 16 to 64 bytes, primary and secondary")
    capabilities = body.get("capabilities") or {}
    edge = capabilities.get("iotEdge", False) if isinstance(capabilities, dict) else None
    if not isinstance(edge, bool):
        raise invalid("capabilities.iotEdge must be true or false")
    return {
        "status": status,
        "statusReason": body.get("statusReason"),
        "primaryKey": keys[0],
        "secondaryKey": keys[1],
        "iotEdge": edge,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as IoT Hub; every answer has a Content-Length
    timeout = 30  # a client that stalls mid-request frees its thread
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Silent: tests read `requests` instead."""

    def _serve(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = ...  # not JSON: refused below, once the caller is known to be authorised
        status, answer = 500, None
        try:
            with hub.lock:
                hub.authorize(self.headers.get("Authorization"))
                hub.check_api_version(query)
                if body is ...:
                    raise Refused(400, "ArgumentInvalid", "The request body is not valid JSON")
                status, answer = self._route(hub, url.path, body)
        except Refused as refused:
            status = refused.status
            answer = {
                "Message": f"ErrorCode:{refused.code};{refused.text}",
                "ExceptionMessage": f"Tracking ID:{uuid.uuid4().hex}-G:0-TimeStamp:"
                f"{dt.datetime.now(dt.UTC):%m/%d/%Y %H:%M:%S}",
            }
            self._record(query, body, status)
            self._answer(status, answer, {"iothub-errorcode": refused.code})
            return
        self._record(query, body, status)
        etag = answer.get("etag") if isinstance(answer, dict) else None
        self._answer(status, answer, {"ETag": f'"{etag}"'} if etag else {})

    def _route(self, hub: IoTHubStandIn, path: str, body: Any) -> tuple[int, Any]:
        if_match = self.headers.get("If-Match")
        if path == "/devices" and self.command == "GET":
            top = parse_qs(urlsplit(self.path).query).get("top", ["1000"])[0]
            count = int(top) if top.isdigit() and 1 <= int(top) <= 1000 else 1000
            return 200, list(hub.devices.values())[:count]
        if match := _APPLY_PATH.fullmatch(path):
            if self.command == "POST":
                hub.apply_configuration(unquote(match[1]), body)
                return 204, None
        elif match := _DEVICE_PATH.fullmatch(path):
            device_id = unquote(match[1])
            if self.command == "GET":
                return 200, hub.get_device(device_id)
            if self.command == "PUT":
                return 200, hub.put_device(device_id, body, if_match)
            if self.command == "DELETE":
                hub.delete_device(device_id, if_match)
                return 204, None
        raise Refused(501, "NotImplemented", f"the IoT Hub stand-in does not model {self.command} {path}")

    def _record(self, query: dict[str, list[str]], body: Any, status: int) -> None:
        self.server.hub.requests.append(
            Received(
                self.command,
                urlsplit(self.path).path,
                query,
                dict(self.headers.items()),
                None if body is ... else body,
                status,
            )
        )

    def _answer(self, status: int, answer: Any, headers: dict[str, str]) -> None:
        data = b"" if answer is None else json.dumps(answer).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    """TLS per connection, in the connection's own thread, so a silent client blocks nobody."""

    daemon_threads = True

    def __init__(self, hub: IoTHubStandIn, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a client that does not trust our CA hangs up during the handshake
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


@contextmanager
def running_iothub_standin(folder: Path) -> Iterator[IoTHubStandIn]:
    """The stand-in on a free port of 127.0.0.1, reached as `localhost:PORT` over TLS with a
    certificate from a fresh test CA in `folder`; stopped on exit."""
    schemas = load_schemas(Path(os.environ.get(SCHEMAS_DIR_ENV) or DEFAULT_SCHEMAS_DIR))
    certs = write_certs(folder, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    hub = IoTHubStandIn(
        hostname="",
        key=base64.b64encode(secrets.token_bytes(32)).decode(),
        ca_cert=certs.ca_cert,
        schemas=schemas,
    )
    server = _Server(hub, context)
    hub.hostname = f"localhost:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="iothub-standin", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
