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
from edge_module.messages import Arrivals, Incoming
from turbofan_core.atomic_file import write_atomically

if TYPE_CHECKING:
    from edge_module.service import Edge

log = logging.getLogger(__name__)

# IoT Hub's 256 KB message limit, plus the topic and its properties.
MAX_PACKET_BYTES = 256 * 1024 + 16 * 1024
# A CONNECT holds a client id (128 characters at most), a username and a SAS token (2 kB at most):
# before a device is authenticated, the gateway reads no more than this from it.
MAX_CONNECT_BYTES = 4096
MAX_CONNECTING = 64  # connections between the TLS handshake and an authenticated CONNECT
CONNECT_SECONDS = 10.0  # for the TLS handshake and then for the CONNECT packet
# IoT Hub's longest keep-alive is 1,177 s; a client that asked for none is still dropped after this.
MAX_IDLE_SECONDS = 1.5 * 1177
SESSIONS_FILENAME = "gateway_sessions.json"
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
        self._connecting = 0
        # Each device's session: the QoS of its cloud-to-device subscription (the only one served),
        # kept across reconnects and restarts as IoT Hub keeps a session that was not clean: the
        # SDK subscribes once and does not subscribe again when it reconnects.
        self._sessions_path = edge.config.state_dir / SESSIONS_FILENAME
        self._sessions = self._load_sessions()

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

    def _load_sessions(self) -> dict[str, int]:
        """The saved sessions of devices still registered; an unreadable file is no sessions (devices
        then subscribe again when told their session is gone), never a gateway that cannot start."""
        try:
            saved = json.loads(self._sessions_path.read_text())
            return {device: min(int(qos), 1) for device, qos in saved.items() if self.edge.registered(device)}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as error:
            log.warning(
                "gateway: %s is unreadable, starting without sessions: %s", self._sessions_path, error
            )
            return {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        connection = None
        if self._connecting >= MAX_CONNECTING:  # before authentication, a client costs the gateway
            log.warning("gateway: %d connections waiting to authenticate; closing %s", self._connecting, peer)
            writer.close()
            return
        try:
            self._connecting += 1
            try:
                connection = await asyncio.wait_for(self._connect(reader, writer, peer), CONNECT_SECONDS)
            finally:
                self._connecting -= 1
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
        packet = await mqtt.read_packet(reader, MAX_CONNECT_BYTES)
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
        if connect.clean_session:
            self.set_session(device_id, None)
        present = device_id in self._sessions
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
            results = self.edge.receive(Arrivals.of([incoming for _, incoming, _ in pending]), durable=False)
        except Exception as error:  # nothing is acknowledged: the devices send the messages again
            if isinstance(error, (sqlite3.Error, OSError)):
                log.warning("gateway: could not store %d messages: %s", len(pending), error)
            else:
                log.exception("gateway: %d messages failed", len(pending))
            for connection in {connection for connection, _, _ in pending}:
                connection.close()
            return
        for (connection, _, packet_id), result in zip(pending, results, strict=True):
            connection.acknowledge_later(packet_id, result)

    def connected(self) -> int:
        return len(self._connections)

    def answer_qos(self, device_id: str) -> int | None:
        """The QoS the device's cloud-to-device subscription was granted; None: not subscribed."""
        return self._sessions.get(device_id)

    def set_session(self, device_id: str, qos: int | None) -> None:
        """Change a device's session (None: none), saved whole before the device is answered."""
        if self._sessions.get(device_id) == qos:
            return
        if qos is None:
            del self._sessions[device_id]
        else:
            self._sessions[device_id] = qos
        write_atomically(self._sessions_path, json.dumps(self._sessions, sort_keys=True).encode(), 0o600)


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
        self.idle_seconds = min(1.5 * keep_alive, MAX_IDLE_SECONDS) if keep_alive else MAX_IDLE_SECONDS
        self.expiry = expiry
        self._acks: asyncio.Queue[tuple[int | None, dict]] = asyncio.Queue()
        self._next_id = 0

    def close(self) -> None:
        self.writer.close()

    async def run(self) -> None:
        acknowledging = asyncio.create_task(self._acknowledge())
        try:
            while True:
                timeout = min(self.expiry - time.time(), self.idle_seconds)
                if timeout <= 0:
                    return
                packet = await asyncio.wait_for(mqtt.read_packet(self.reader, MAX_PACKET_BYTES), timeout)
                if acknowledging.done():  # the store failed: stop reading, the device sends again
                    return
                if not self.edge.registered(self.device_id):
                    log.warning("gateway: device %r was removed from the registry; closing", self.device_id)
                    return
                if packet.kind == mqtt.PUBLISH:
                    self._publish(mqtt.parse_publish(packet))
                elif packet.kind == mqtt.SUBSCRIBE:
                    self._subscribe(*mqtt.parse_subscribe(packet))
                elif packet.kind == mqtt.UNSUBSCRIBE:
                    packet_id, filters = mqtt.parse_unsubscribe(packet)
                    if c2d_filter(self.device_id) in filters:
                        self.gateway.set_session(self.device_id, None)
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
                return
            if packet_id is not None:
                self.writer.write(mqtt.puback(packet_id))
            qos = self.gateway.answer_qos(self.device_id)
            if qos is not None:
                self._answer(result, qos)

    def _answer(self, result: dict, qos: int) -> None:
        self._next_id = self._next_id % 0xFFFF + 1
        properties = f"%24.cid={quote(result['message_id'], safe='')}&%24.ct=application%2Fjson&%24.ce=utf-8"
        topic = f"devices/{self.device_id}/messages/devicebound/{properties}"
        self.writer.write(mqtt.publish(topic, orjson.dumps(result), qos, self._next_id if qos else None))

    def _subscribe(self, packet_id: int, filters: list[tuple[str, int]]) -> None:
        allowed = c2d_filter(self.device_id)
        codes = [
            min(qos, 1) if topic_filter == allowed else mqtt.SUBSCRIBE_FAILED for topic_filter, qos in filters
        ]
        for (topic_filter, _), granted in zip(filters, codes, strict=True):
            if topic_filter == allowed:
                self.gateway.set_session(self.device_id, granted)
        self.writer.write(mqtt.suback(packet_id, codes))
