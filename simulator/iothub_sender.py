"""Devices that speak IoT Hub's own protocol: each replayed message sent with `azure-iot-device`.

One `IoTHubDeviceClient` per device, from that device's connection string: to a real IoT Hub,
or through the edge's gateway when the string names it (`GatewayHostName=`, with the gateway's
CA as `server_verification_cert`). `send_message` returns once the hub (or the gateway, once the
message is durable) acknowledged it; the SDK reconnects and resends on its own, and every
message keeps its message id, so a resend is recognised as a duplicate. Through the gateway,
each message's RUL answer comes back on the device's cloud-to-device topic.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from simulator.answers import AcknowledgedTransport, UnknownAnswer
from turbofan_core.capture import CaptureRecord

if TYPE_CHECKING:
    from azure.iot.device import IoTHubDeviceClient, Message

log = logging.getLogger(__name__)
ANSWER_WAIT_SECONDS = 10.0
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.2, 5.0


def _sdk_errors() -> tuple[type[Exception], ...]:
    """What the SDK raises for a failed connect or send (timeouts and cancellations are not its
    ClientErrors)."""
    from azure.iot.device.exceptions import ClientError, OperationCancelled, OperationTimeout

    return ClientError, OperationCancelled, OperationTimeout


class IoTHubError(Exception):
    """A device could not connect or send (its reason, never its key)."""


def device_fields(connection_string: str) -> dict[str, str]:
    """The fields of a device connection string (HostName, DeviceId, SharedAccessKey, and
    GatewayHostName when it goes through a gateway); ValueError, never echoing it, when it is not one."""
    fields = dict(part.partition("=")[::2] for part in connection_string.strip().split(";") if part)
    if not fields.get("HostName") or not fields.get("DeviceId") or not fields.get("SharedAccessKey"):
        raise ValueError("a device connection string needs HostName, DeviceId and SharedAccessKey")
    return fields


class IoTHubSender(AcknowledgedTransport):
    """Sends as the devices whose connection strings it holds."""

    def __init__(
        self,
        connection_strings: Mapping[str, str],
        server_verification_cert: str | None = None,
        on_connection: Callable[[str, bool], None] | None = None,
        acknowledge_seconds: float = 120.0,
        late: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.connection_strings = dict(connection_strings)
        self.server_verification_cert = server_verification_cert
        super().__init__(late, seed)
        self.on_connection = on_connection  # (device, connected): the SDK reconnects out of sight
        self._clients: dict[str, IoTHubDeviceClient] = {}
        self.acknowledge_seconds = acknowledge_seconds  # how long one message may wait for its PUBACK
        self._sending = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iothub-send")

    def _client(self, device_id: str) -> IoTHubDeviceClient:
        client = self._clients.get(device_id)
        if client is not None:
            return client
        from azure.iot.device import IoTHubDeviceClient

        options = {}
        if self.server_verification_cert is not None:
            options["server_verification_cert"] = self.server_verification_cert
        if device_id not in self.connection_strings:
            raise IoTHubError(f"no connection string for device {device_id}")
        try:
            client = IoTHubDeviceClient.create_from_connection_string(
                self.connection_strings[device_id], **options
            )
        except ValueError as error:
            raise IoTHubError(f"device {device_id}: {error}") from None
        client.on_message_received = lambda message: self._answered(device_id, message)
        client.on_connection_state_change = lambda: self._connection_changed(device_id)
        self._clients[device_id] = client  # it connects on the first send (auto-connect)
        return client

    def _connection_changed(self, device_id: str) -> None:
        client = self._clients.get(device_id)
        if client is not None and self.on_connection is not None:
            self.on_connection(device_id, client.connected)

    def _answered(self, device_id: str, message: Message) -> None:
        """A cloud-to-device message: the gateway's answer to one of this device's messages."""
        try:
            self.answers.count(device_id, json.loads(message.data))
        except (ValueError, KeyError, TypeError, UnknownAnswer) as error:
            log.warning("device %s: a cloud-to-device message that is not an answer: %s", device_id, error)

    def _send_now(self, record: CaptureRecord, device_id: str) -> None:
        """Send `record` as `device_id`; returns once acknowledged."""
        from azure.iot.device import Message

        system = record.system_properties
        message = Message(
            record.body or b"",
            message_id=record.message_id,
            content_encoding=system.get("contentEncoding", "utf-8"),
            content_type=system.get("contentType", "application/json"),
        )
        message.custom_properties = dict(record.properties)
        client = self._client(device_id)
        self._deliver(client, device_id, message)

    def _deliver(self, client: IoTHubDeviceClient, device_id: str, message: Message) -> None:
        """Send until acknowledged, for at most `acknowledge_seconds`. The SDK alone may wait for a
        reconnection without end, or give up at once when a send meets a connection being rebuilt
        (an edge restarting); a lost connection is retried here with backoff, the message keeping its
        id, so a copy that did arrive is answered duplicate. Bad credentials fail at once."""
        from azure.iot.device.exceptions import CredentialError

        deadline = time.monotonic() + self.acknowledge_seconds
        delay = RETRY_FIRST_SECONDS
        while True:
            sending = self._sending.submit(client.send_message, message)
            try:
                sending.result(timeout=max(0.0, deadline - time.monotonic()))
                return
            except TimeoutError:
                failure = "no acknowledgement"
            except CredentialError as error:
                raise IoTHubError(f"device {device_id} was refused: {error}") from None
            except _sdk_errors() as error:
                failure = f"{type(error).__name__}: {error}"
            if time.monotonic() + delay >= deadline:
                raise IoTHubError(
                    f"device {device_id}: message {message.message_id} was not acknowledged within "
                    f"{self.acknowledge_seconds:g} s ({failure}); start the gateway (or reach the hub) "
                    "and replay again: messages it already has are answered duplicate"
                )
            if self.on_connection is not None:
                self.on_connection(device_id, False)
            time.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_SECONDS)

    def close(self) -> None:
        """Wait a little for answers still on their way (through a gateway only), then disconnect."""
        if self.answers.answered:
            self.answers.wait_for(self.sent, ANSWER_WAIT_SECONDS)
        for client in self._clients.values():
            client.shutdown()  # a send still waiting is cancelled
        self._clients.clear()
        self._sending.shutdown(wait=False)
