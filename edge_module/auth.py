"""Device and admin authentication for the edge, the way Azure IoT Hub does it.

Devices authenticate with IoT Hub SAS tokens signed by one of their two symmetric keys, so an
unmodified azure-iot-device client (connection string with `GatewayHostName`) talks to our edge
as it would to a hub. The same `verify_sas_token` serves the REST `Authorization` header and,
later, the MQTT CONNECT password. Admin endpoints take a separate bearer key.

Secrets never leave this module in messages: every `AuthError.reason` is a fixed sentence, and
no exception raised here carries (or chains) a token, a signature or a key.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from turbofan_core.atomic_file import write_atomically
from turbofan_core.env_secrets import ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV, secret_from_env

log = logging.getLogger(__name__)

REGISTRY_FILENAME = "devices.json"

_TOKEN_PREFIX = "SharedAccessSignature "
_TOKEN_FIELDS = frozenset({"sr", "sig", "se"})
# Far above any real token (a 128-char id, fully percent-encoded, is ~400 chars): bounds the work.
_MAX_TOKEN_CHARS = 2048
_KEY_BYTES = 32
_FILE_MODE = 0o600
# IoT Hub device ids: up to 128 ASCII letters, digits and these symbols.
_DEVICE_ID = re.compile(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}")


class AuthError(Exception):
    """A refused credential; `reason` is short, human and safe to log or return to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RegistryError(ValueError):
    """An invalid device id or an unreadable registry file."""


class DeviceExistsError(RegistryError):
    """The id is already registered (HTTP 409 for the admin API)."""


class UnknownDeviceError(RegistryError):
    """The id is not registered (HTTP 404 for the admin API)."""


@dataclass(frozen=True)
class DeviceIdentity:
    """A device and its two base64 keys (two, so a key can be rotated without downtime)."""

    device_id: str
    primary_key: str = field(repr=False)
    secondary_key: str = field(repr=False)


def _check_device_id(device_id: str) -> None:
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise RegistryError(
            f"invalid device id {device_id!r}: IoT Hub allows 1 to 128 ASCII letters, digits "
            "and -.%_*?!(),:=@$'"
        )


def _decode_key(key: str) -> bytes:
    """The key's bytes; strict base64, so a mangled key fails here instead of signing garbage."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("a device key must be base64") from None
    if not raw:
        raise ValueError("a device key must not be empty")
    return raw


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode("ascii")


def _sign(key: str, message: str) -> bytes:
    return hmac.digest(_decode_key(key), message.encode("utf-8"), hashlib.sha256)


def _read_devices(path: Path) -> dict[str, DeviceIdentity]:
    """The identities the registry file at `path` holds; none when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("device registry %s is readable by others (mode %o); it should be 0600", path, mode)
    # Messages name the file only: its content is keys.
    try:
        entries = json.loads(text)["devices"]
        devices = {
            device_id: DeviceIdentity(device_id, entry["primary_key"], entry["secondary_key"])
            for device_id, entry in entries.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RegistryError(f"device registry {path} is not a valid registry file") from None
    for identity in devices.values():
        _check_device_id(identity.device_id)
        try:
            _decode_key(identity.primary_key)
            _decode_key(identity.secondary_key)
        except ValueError:
            raise RegistryError(
                f"device registry {path}: device {identity.device_id!r} has an invalid key"
            ) from None
    return devices


class DeviceRegistry:
    """Device identities in a JSON file (mode 0o600), rewritten atomically on every change.

    A change holds a lock file beside the registry and starts from the file as it is then, so
    changes made at once by several processes (`turbofan devices create` in parallel) all land.
    Readers never lock: a change builds a new dict and swaps it in after the file is written, so a
    failed write leaves the file as it was and the in-memory view as the file is.
    """

    def __init__(self, path: Path | str, devices: dict[str, DeviceIdentity] | None = None) -> None:
        self.path = Path(path)
        self._devices: dict[str, DeviceIdentity] = dict(devices or {})
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path | str) -> DeviceRegistry:
        """The registry stored at `path`; a missing file is an empty registry (created on write)."""
        return cls(path, _read_devices(Path(path)))

    def get(self, device_id: str) -> DeviceIdentity | None:
        return self._devices.get(device_id)

    def ids(self) -> list[str]:
        return sorted(self._devices)

    def create(self, device_id: str) -> DeviceIdentity:
        """Register a device with two fresh random keys."""
        _check_device_id(device_id)
        with self._changing():
            if device_id in self._devices:
                raise DeviceExistsError(f"device {device_id!r} already exists")
            identity = DeviceIdentity(device_id, _new_key(), _new_key())
            self._save({**self._devices, device_id: identity})
        return identity

    def remove(self, device_id: str) -> None:
        if self.path.exists():  # a registry never written holds no device: no folder or lock file for it
            with self._changing():
                if device_id in self._devices:
                    self._save({key: value for key, value in self._devices.items() if key != device_id})
                    return
        raise UnknownDeviceError(f"device {device_id!r} is not registered")

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the registry against this process's other threads and, by a lock file beside it,
        against other processes; then read the file again, since another process may have changed it."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.parent / f".{self.path.name}.lock", os.O_RDWR | os.O_CREAT, _FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._devices = _read_devices(self.path)
                yield
            finally:
                os.close(fd)  # and with it the lock

    def _save(self, devices: dict[str, DeviceIdentity]) -> None:
        """Replace the file whole (mode 0o600), then publish the new view."""
        document = {
            "devices": {
                device_id: {"primary_key": identity.primary_key, "secondary_key": identity.secondary_key}
                for device_id, identity in sorted(devices.items())
            }
        }
        write_atomically(self.path, (json.dumps(document, indent=2) + "\n").encode("utf-8"), _FILE_MODE)
        self._devices = devices


def connection_string(identity: DeviceIdentity, hostname: str, gateway_host: str | None = None) -> str:
    """The device's connection string (primary key); `gateway_host` routes the SDK through our edge
    while its tokens still name `hostname`, the hub."""
    for value in (hostname, gateway_host or ""):
        if ";" in value:
            raise ValueError("a host name must not contain ';'")
    parts = [
        f"HostName={hostname}",
        f"DeviceId={identity.device_id}",
        f"SharedAccessKey={identity.primary_key}",
    ]
    if gateway_host:
        parts.append(f"GatewayHostName={gateway_host}")
    return ";".join(parts)


def make_sas_token(
    hostname: str, device_id: str, key: str, ttl_seconds: int = 3600, now: float | None = None
) -> str:
    """A device SAS token, character for character what azure-iot-device builds."""
    _check_device_id(device_id)
    resource = quote(f"{hostname}/devices/{device_id}", safe="")
    expiry = int((time.time() if now is None else now) + ttl_seconds)
    signature = base64.b64encode(_sign(key, f"{resource}\n{expiry}")).decode("ascii")
    return f"{_TOKEN_PREFIX}sr={resource}&sig={quote(signature, safe='')}&se={expiry}"


def _parse_token(token: str) -> tuple[str, str, bytes, int]:
    """(raw sr, device id, signature bytes, expiry) of a syntactically valid device token."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS or not token.startswith(_TOKEN_PREFIX):
        raise AuthError("malformed token: not a SharedAccessSignature")
    fields: dict[str, str] = {}
    for part in token[len(_TOKEN_PREFIX) :].split("&"):
        name, sep, value = part.partition("=")
        if not sep or not value or name in fields:
            raise AuthError("malformed token: fields must be distinct name=value pairs")
        fields[name] = value
    if "skn" in fields:
        raise AuthError("policy tokens (skn) are not accepted, only device tokens")
    if set(fields) != _TOKEN_FIELDS:
        raise AuthError("malformed token: needs exactly sr, sig and se")
    if not re.fullmatch(r"[0-9]{1,12}", fields["se"]):
        raise AuthError("malformed token: se must be an expiry in epoch seconds")
    try:
        signature = base64.b64decode(unquote(fields["sig"], errors="strict"), validate=True)
        resource = unquote(fields["sr"], errors="strict")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise AuthError("malformed token: sig or sr is badly encoded") from None
    host, _, path = resource.partition("/")
    segments = path.split("/")
    if not host or len(segments) < 2 or segments[0] != "devices" or not segments[1]:
        raise AuthError("token is not for a device: sr must be {hostname}/devices/{device_id}")
    if len(segments) > 2:
        if segments[2] == "modules":
            raise AuthError("module tokens are not accepted, only device tokens")
        raise AuthError("token is not for a device: sr must be {hostname}/devices/{device_id}")
    return fields["sr"], segments[1], signature, int(fields["se"])


def token_expiry(token: str) -> int:
    """The expiry (`se`, epoch seconds) of a well-formed device token; AuthError otherwise."""
    return _parse_token(token)[3]


def verify_sas_token(
    token: str, registry: DeviceRegistry, now: float | None = None, expected_device: str | None = None
) -> str:
    """The device id `token` authenticates, or AuthError.

    The signature is checked over sr exactly as sent (not re-encoded), so tokens from SDKs that
    percent-encode differently still verify. Any hostname is accepted: the keys are ours.
    """
    raw_resource, device_id, signature, expiry = _parse_token(token)
    if expected_device is not None and device_id != expected_device:
        raise AuthError("token is for another device")
    if expiry < (time.time() if now is None else now):
        raise AuthError("token expired")
    identity = registry.get(device_id)
    if identity is None:
        raise AuthError("unknown device")
    message = f"{raw_resource}\n{expiry}"
    # Both keys are always checked, so timing does not tell which one matched.
    matches = [
        hmac.compare_digest(_sign(key, message), signature)
        for key in (identity.primary_key, identity.secondary_key)
    ]
    if not any(matches):
        raise AuthError("signature does not match the device's keys")
    return device_id


def device_from_authorization(
    header: str | None, registry: DeviceRegistry, now: float | None = None, expected_device: str | None = None
) -> str:
    """The device id of an HTTP `Authorization` header holding the bare SAS token, as IoT Hub's
    REST API takes it."""
    if header is None or not header.strip():
        raise AuthError("missing Authorization header")
    return verify_sas_token(header.strip(), registry, now=now, expected_device=expected_device)


def admin_key() -> str | None:
    """The admin key from `TURBOFAN_EDGE_ADMIN_KEY`, else from the file `TURBOFAN_EDGE_ADMIN_KEY_FILE`
    names (a missing file raises: a misconfiguration should not pass as "no key")."""
    return secret_from_env(ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV)


def check_admin(header_value: str | None, key: str | None) -> None:
    """Refuse unless the header is `Bearer {key}`; with no key configured, refuse everything."""
    if not key:
        raise AuthError(f"no admin key configured: set {ADMIN_KEY_ENV}")
    if header_value is None or not header_value.strip():
        raise AuthError("missing Authorization header")
    scheme, _, presented = header_value.strip().partition(" ")
    # Bytes, because compare_digest refuses non-ASCII str; the scheme is case-insensitive (RFC 7235).
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode("utf-8"), key.encode("utf-8")
    ):
        raise AuthError("invalid admin key")
