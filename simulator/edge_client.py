"""Devices behind the edge module: each replayed message posted to its `POST /telemetry`, as IoT Hub's
REST API takes one (SAS token in `Authorization`, `iothub-messageid`, `iothub-app-*` properties).

The edge answers every message before the next is sent (scored, duplicate, refused...), so a
message is delivered once answered. Resending is safe: a message keeps its id on every attempt
and the edge answers a copy "duplicate" without counting it twice. So connection errors,
timeouts and 5xx answers (503: it could not store the message durably) are retried with the same
id, backing off exponentially, for up to `retry_seconds`: an edge restarting meanwhile loses
nothing. A 401 or 422 would come back the same on a resend: it is counted as refused instead.

Standard library only (a simulator host needs nothing more), over one keep-alive connection,
reopened after any failure: a new connection per message would cost more than the edge's answer.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from edge_module.auth import make_sas_token
from edge_module.forwarder import describe
from simulator.answers import AcknowledgedTransport, UnknownAnswer
from turbofan_core.capture import CaptureRecord

DEFAULT_HUB_HOSTNAME = "turbofan-hub.azure-devices.net"
DEFAULT_RETRY_SECONDS = 120.0
BACKOFF_FIRST_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 5.0
TOKEN_TTL_SECONDS = 3600
_TOKEN_RENEW_SECONDS = 300  # a token is renewed this long before it expires, so none expires in flight
_REFUSED = (401, 422)  # bad credentials, or a message the contract refuses: the same on every resend


class EdgeError(Exception):
    """The edge did not take a message: unreachable for the whole retry budget, or an unexpected answer."""


class EdgeClient(AcknowledgedTransport):
    """Sends replayed records to the edge at `url`, as the devices whose base64 keys `keys` holds.

    `on_retry(failure, seconds_left)` is called before each wait, for a progress display.
    """

    def __init__(
        self,
        url: str,
        keys: Mapping[str, str],
        hostname: str = DEFAULT_HUB_HOSTNAME,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        timeout: float = 10.0,
        on_retry: Callable[[str, float], None] | None = None,
        late: float = 0.0,
        seed: int = 0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL like http://127.0.0.1:8080")
        if retry_seconds < 0:
            raise ValueError(f"retry_seconds must not be negative, got {retry_seconds}")
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.url = url
        self.keys = dict(keys)
        self.hostname = hostname
        self.retry_seconds = retry_seconds
        self.on_retry = on_retry
        super().__init__(late, seed)
        self.retries = 0
        self._path = parts.path.rstrip("/") + "/telemetry"
        self._connection = connection(parts.hostname, parts.port, timeout=timeout)
        self._tokens: dict[str, tuple[str, float]] = {}  # device -> (token, expiry)

    def _send_now(self, record: CaptureRecord, device_id: str) -> None:
        """Post `record` as `device_id` until answered."""
        system = record.system_properties
        content_type = system.get("contentType", "application/json")
        encoding = system.get("contentEncoding")
        headers = {"Content-Type": f"{content_type}; charset={encoding}" if encoding else content_type}
        headers |= {f"iothub-app-{name}": value for name, value in record.properties.items()}
        if record.message_id is not None:
            headers["iothub-messageid"] = record.message_id
        status, answer = self._deliver(device_id, record.body or b"", headers)
        if status in _REFUSED:
            self.answers.refuse(f"HTTP {status}: {answer.get('detail')}")
        else:
            try:
                self.answers.count(device_id, answer)
            except UnknownAnswer as error:
                raise EdgeError(f"the edge at {self.url} gave {error}") from None

    def close(self) -> None:
        self._connection.close()

    def _token(self, device_id: str) -> str:
        """The device's SAS token, made once and renewed shortly before it expires."""
        token, expiry = self._tokens.get(device_id, ("", 0.0))
        now = time.time()
        if now > expiry - _TOKEN_RENEW_SECONDS:
            key = self.keys.get(device_id)
            if key is None:
                raise EdgeError(f"no key for device {device_id}")
            token = make_sas_token(self.hostname, device_id, key, TOKEN_TTL_SECONDS, now=now)
            self._tokens[device_id] = (token, now + TOKEN_TTL_SECONDS)
        return token

    def _deliver(self, device_id: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        """(status, JSON answer) of the first attempt the edge answers below 500, retrying the rest."""
        delay = BACKOFF_FIRST_SECONDS
        deadline: float | None = None
        while True:
            try:
                status, data = self._post(body, {**headers, "Authorization": self._token(device_id)})
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut short
                failure = describe(error)
            else:
                answer = _json(data)
                if status == 200 or status in _REFUSED:
                    return status, answer
                failure = f"HTTP {status}: {answer.get('detail', '')}".rstrip(": ")
                if status < 500:  # a wrong URL or an edge of another version: no resend fixes it
                    raise EdgeError(f"the edge at {self.url} answered {failure}")
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.retry_seconds
            if now >= deadline:
                raise EdgeError(
                    f"the edge at {self.url} did not take message {headers.get('iothub-messageid')} of "
                    f"{device_id} in {self.retry_seconds:g} s ({failure}); start it and replay again: "
                    "messages it already has are answered duplicate"
                )
            self.retries += 1
            if self.on_retry is not None:
                self.on_retry(failure, deadline - now)
            time.sleep(min(delay, deadline - now))  # the last attempt is made at the deadline
            delay = min(2 * delay, BACKOFF_MAX_SECONDS)

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        reused = self._connection.sock is not None
        try:
            return self._exchange(body, headers)
        except ConnectionError:
            if not reused:
                raise
        # The edge closed the idle keep-alive connection (after 5 s with uvicorn): not a failure.
        return self._exchange(body, headers)

    def _exchange(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            self._connection.request("POST", self._path, body, headers)
            response = self._connection.getresponse()
            return response.status, response.read()
        except BaseException:  # whatever the connection holds now is unknown: start afresh
            self._connection.close()
            raise


def _json(data: bytes) -> dict:
    """The answer's JSON object; anything else (a proxy's HTML error page) as its first characters."""
    try:
        answer = json.loads(data or b"{}")
    except ValueError:
        return {"detail": data[:200].decode("utf-8", "replace")}
    return answer if isinstance(answer, dict) else {"detail": answer}
