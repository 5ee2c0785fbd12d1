"""The transparent gateway: devices speak IoT Hub's MQTT device protocol, over TLS, to the edge.

An unmodified `azure-iot-device` client, built from a connection string with `GatewayHostName`
and given the gateway's CA as `server_verification_cert`, connects here as it would to IoT Hub.
Its CONNECT password is the device's SAS token, verified like the REST `Authorization` header.
Telemetry published on `devices/{id}/messages/events/{properties}` enters the same path as
`POST /telemetry` (`Edge.receive`: validation, message id, scoring, store-and-forward), and
the PUBACK is sent only once the message is durable: a message the device saw acknowledged is
never lost, and one it did not is sent again and recognised by its message id. (A general
broker such as amqtt acknowledges on receipt, before the application has stored anything, and
checks credentials only after a new connection has taken over the device's session.)

The answer goes back on the device's cloud-to-device topic when it subscribed to it
(`client.on_message_received`), with the message id as correlation id; answers are sent at
most once. Twins, direct methods and module inputs are not served: subscriptions to them are
refused (SUBACK 0x80).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

import orjson

from edge_module import mqtt
from edge_module.auth import AuthError, token_expiry
from edge_module.messages import Incoming

if TYPE_CHECKING:
    from edge_module.service import Edge

log = logging.getLogger(__name__)

# IoT Hub's 256 KB message limit, plus the topic and its properties.
MAX_PACKET_BYTES = 256 * 1024 + 16 * 1024
CONNECT_SECONDS = 10.0
SESSIONS_FILENAME = "gateway_sessions.json"  # for the TLS handshake and then for the CONNECT packet
_TELEMETRY_TOPIC = re.compile(r"devices/([^/]+)/messages/events/(.*)", re.DOTALL)
_SYSTEM_PROPERTIES = {"$.mid": "message_id", "$.ct": "content_type", "$.ce": "content_encoding"}


@dataclass(frozen=True)
class GatewaySettings:
    certfile: Path  # the server certificate, naming the host devices use as GatewayHostName
    keyfile: Path
    host: str = "0.0.0.0"
    port: int = 8883

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # as IoT Hub
        context.load_cert_chain(self.certfile, self.keyfile)
        return context


def c2d_filter(device_id: str) -> str:
    """The one topic filter a device may subscribe to here: its cloud-to-device messages."""
    return f"devices/{device_id}/messages/devicebound/#"


def message_properties(encoded: str) -> tuple[dict[str, str], dict[str, str]]:
    """(system, application) properties of a telemetry topic's property bag, decoded the way
    azure-iot-device encodes them (`$.mid=...&$.ct=...&name=value`; '+' is a plus, not a space)."""
    system: dict[str, str] = {}
    application: dict[str, str] = {}
    for pair in filter(None, encoded.split("&")):
        key, _, value = pair.partition("=")
        name, value = unquote(key), unquote(value)
        if name in _SYSTEM_PROPERTIES:
            system[_SYSTEM_PROPERTIES[name]] = value
        elif not name.startswith("$."):  # other system properties (expiry, interface id) are IoT Hub's
            application[name] = value
    return system, application


class Gateway:
    """The MQTT-over-TLS listener; one `_Connection` per connected device."""

    def __init__(self, edge: Edge, settings: GatewaySettings) -> None:
        self.edge = edge
        self.settings = settings
        self._server: asyncio.Server | None = None
        self._connections: dict[str, _Connection] = {}
        self._pending: list[tuple[_Connection, Incoming, int | None]] = []  # for the next Edge.receive
        # Each device's subscriptions, kept across reconnects and restarts as IoT Hub keeps a session
        # that was not clean: the SDK subscribes once and does not subscribe again on reconnecting.
        self._sessions_path = edge.config.state_dir / SESSIONS_FILENAME
        self._sessions: dict[str, set[str]] = {}
        if self._sessions_path.exists():
            saved = json.loads(self._sessions_path.read_text())
            self._sessions = {device: set(filters) for device, filters in saved.items()}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.settings.host,
            self.settings.port,
            ssl=self.settings.ssl_context(),
            ssl_handshake_timeout=CONNECT_SECONDS,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections.values()):
                connection.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        connection = None
        try:
            connection = await asyncio.wait_for(self._connect(reader, writer, peer), CONNECT_SECONDS)
            if connection is not None:
                await connection.run()
        except (mqtt.ProtocolError, OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            log.info("gateway: connection from %s closed: %s", peer, error or type(error).__name__)
        finally:
            if connection is not None and self._connections.get(connection.device_id) is connection:
                del self._connections[connection.device_id]
            writer.close()

    async def _connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> _Connection | None:
        """The device's connection once its CONNECT is authenticated; None after a refusal."""
        packet = await mqtt.read_packet(reader, MAX_PACKET_BYTES)
        if packet.kind != mqtt.CONNECT:
            raise mqtt.ProtocolError("the first packet must be CONNECT")
        connect = mqtt.parse_connect(packet)
        try:
            expiry = self._authenticate(connect)
        except AuthError as error:
            # The reason is a fixed sentence; the token itself is never logged.
            log.warning("gateway: refused device %r from %s: %s", connect.client_id, peer, error.reason)
            self.edge.metrics.gateway_refusals.labels(error.reason).inc()
            writer.write(mqtt.connack(False, mqtt.NOT_AUTHORIZED))
            await writer.drain()
            return None
        device_id = connect.client_id
        previous = self._connections.get(device_id)
        if previous is not None:  # a device has one connection: the new one takes over
            previous.close()
        present = not connect.clean_session and device_id in self._sessions
        if connect.clean_session or not present:
            self.set_subscriptions(device_id, set())
        connection = _Connection(self, device_id, reader, writer, connect.keep_alive, expiry)
        self._connections[device_id] = connection
        writer.write(mqtt.connack(present, mqtt.ACCEPTED))
        return connection

    def _authenticate(self, connect: mqtt.Connect) -> float:
        """The token's expiry, if CONNECT names a device (client id and username) that the SAS
        password authenticates; AuthError otherwise."""
        username_device = (connect.username or "").split("/")[1:2]
        if username_device != [connect.client_id]:
            raise AuthError("username must be {hostname}/{device id}/?api-version=... for the client id")
        if not connect.password:
            raise AuthError("missing SAS token (password)")
        if self.edge.authenticate(connect.password) != connect.client_id:
            raise AuthError("token is for another device")
        return token_expiry(connect.password)

    def submit(self, connection: _Connection, incoming: Incoming, packet_id: int | None) -> None:
        """Queue a message for the next batch: what every connection read in this turn of the event
        loop is recorded in one `Edge.receive`, so many devices' messages are scored together."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._record)
        self._pending.append((connection, incoming, packet_id))

    def _record(self) -> None:
        pending, self._pending = self._pending, []
        try:
            results = self.edge.receive([incoming for _, incoming, _ in pending], durable=False)
        except (sqlite3.Error, OSError) as error:
            log.warning(
                "gateway: could not store %d messages (their devices send them again): %s",
                len(pending),
                error,
            )
            for connection in {connection for connection, _, _ in pending}:
                connection.close()  # nothing acknowledged
            return
        for (connection, _, packet_id), result in zip(pending, results, strict=True):
            connection.acknowledge_later(packet_id, result)

    def connected(self) -> int:
        return len(self._connections)

    def subscriptions(self, device_id: str) -> frozenset[str]:
        return frozenset(self._sessions.get(device_id, ()))

    def set_subscriptions(self, device_id: str, filters: set[str]) -> None:
        """Change a device's session, saved (by rename, whole) before the broker acknowledges it."""
        if self._sessions.get(device_id) == filters:
            return
        self._sessions[device_id] = filters
        staging = self._sessions_path.with_name(f".{self._sessions_path.name}.tmp")
        staging.write_text(json.dumps({device: sorted(f) for device, f in self._sessions.items()}))
        staging.replace(self._sessions_path)


class _Connection:
    """One authenticated device: its packets in order, PUBACKs once durable, answers back."""

    def __init__(
        self,
        gateway: Gateway,
        device_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep_alive: int,
        expiry: float,
    ) -> None:
        self.gateway = gateway
        self.edge = gateway.edge
        self.device_id = device_id
        self.reader = reader
        self.writer = writer
        # MQTT: a client silent for 1.5 keep-alive periods is gone. IoT Hub also ends a connection
        # when its SAS token expires (the SDK reconnects with a new one before that).
        self.idle_seconds = 1.5 * keep_alive if keep_alive else None
        self.expiry = expiry
        self._acks: asyncio.Queue[tuple[int | None, dict]] = asyncio.Queue()
        self._next_id = 0

    def close(self) -> None:
        self.writer.close()

    async def run(self) -> None:
        acknowledging = asyncio.create_task(self._acknowledge())
        try:
            while True:
                timeout = self.expiry - time.time()
                if timeout <= 0:
                    return
                if self.idle_seconds is not None:
                    timeout = min(timeout, self.idle_seconds)
                packet = await asyncio.wait_for(mqtt.read_packet(self.reader, MAX_PACKET_BYTES), timeout)
                if acknowledging.done():  # it failed: stop reading, the device will send again
                    acknowledging.result()
                if packet.kind == mqtt.PUBLISH:
                    self._publish(mqtt.parse_publish(packet))
                elif packet.kind == mqtt.SUBSCRIBE:
                    self._subscribe(*mqtt.parse_subscribe(packet))
                elif packet.kind == mqtt.UNSUBSCRIBE:
                    packet_id, filters = mqtt.parse_unsubscribe(packet)
                    self.gateway.set_subscriptions(
                        self.device_id, self.gateway.subscriptions(self.device_id) - set(filters)
                    )
                    self.writer.write(mqtt.unsuback(packet_id))
                elif packet.kind == mqtt.PINGREQ:
                    self.writer.write(mqtt.pingresp())
                elif packet.kind == mqtt.DISCONNECT:
                    return
                elif packet.kind != mqtt.PUBACK:  # a PUBACK acknowledges an answer: nothing to do
                    raise mqtt.ProtocolError(f"unexpected packet type {packet.kind}")
                await self.writer.drain()
        finally:
            acknowledging.cancel()

    def _publish(self, message: mqtt.Publish) -> None:
        """Hand the message to the gateway's next batch; its PUBACK and answer wait for the disk."""
        match = _TELEMETRY_TOPIC.fullmatch(message.topic)
        if match is None or unquote(match.group(1)) != self.device_id:
            # IoT Hub closes the connection of a device publishing where it may not.
            raise mqtt.ProtocolError(f"device {self.device_id!r} may not publish to {message.topic!r}")
        system, application = message_properties(match.group(2))
        self.gateway.submit(
            self, Incoming(self.device_id, message.payload, application, **system), message.packet_id
        )

    def acknowledge_later(self, packet_id: int | None, result: dict) -> None:
        self._acks.put_nowait((packet_id, result))

    async def _acknowledge(self) -> None:
        """PUBACK each message, in order, once the store has synced it; then send its answer."""
        while True:
            packet_id, result = await self._acks.get()
            try:
                await self.edge.store.synced()
            except OSError as error:
                log.warning("gateway: store failed to sync, closing %r: %s", self.device_id, error)
                self.close()  # nothing acknowledged: the device sends it again
                raise
            if packet_id is not None:
                self.writer.write(mqtt.puback(packet_id))
            granted = c2d_filter(self.device_id) in self.gateway.subscriptions(self.device_id)
            if granted:
                self._answer(result)

    def _answer(self, result: dict) -> None:
        self._next_id = self._next_id % 0xFFFF + 1
        properties = f"%24.cid={quote(result['message_id'], safe='')}&%24.ct=application%2Fjson&%24.ce=utf-8"
        topic = f"devices/{self.device_id}/messages/devicebound/{properties}"
        self.writer.write(mqtt.publish(topic, orjson.dumps(result), 1, self._next_id))

    def _subscribe(self, packet_id: int, filters: list[tuple[str, int]]) -> None:
        allowed = c2d_filter(self.device_id)
        codes = [
            min(qos, 1) if topic_filter == allowed else mqtt.SUBSCRIBE_FAILED for topic_filter, qos in filters
        ]
        if any(topic_filter == allowed for topic_filter, _ in filters):
            self.gateway.set_subscriptions(self.device_id, {allowed})
        self.writer.write(mqtt.suback(packet_id, codes))
