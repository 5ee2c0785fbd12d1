"""The MQTT 3.1.1 packets of IoT Hub's device protocol: read from a stream, parsed, and built.

Only what a device client uses (CONNECT, PUBLISH at QoS 0 or 1, PUBACK, SUBSCRIBE, UNSUBSCRIBE,
PINGREQ, DISCONNECT; IoT Hub has no QoS 2). Anything malformed raises ProtocolError, and the
gateway closes the connection, as the MQTT specification asks.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

# CONNACK return codes.
ACCEPTED, NOT_AUTHORIZED = 0, 5
SUBSCRIBE_FAILED = 0x80

# The fixed-header flags the specification requires for each client packet; others are malformed.
_REQUIRED_FLAGS = {CONNECT: 0, PUBACK: 0, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0}


class ProtocolError(Exception):
    """A packet that breaks the protocol (or that IoT Hub does not support)."""


@dataclass(frozen=True)
class Packet:
    kind: int
    flags: int
    body: bytes


@dataclass(frozen=True)
class Connect:
    client_id: str
    username: str | None
    password: str | None = field(default=None, repr=False)  # the SAS token
    clean_session: bool = True
    keep_alive: int = 0


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int | None


async def read_packet(reader: asyncio.StreamReader, max_bytes: int) -> Packet:
    """The next packet; asyncio.IncompleteReadError at the end of the stream."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        raise ProtocolError("remaining length longer than four bytes")
    if length > max_bytes:
        raise ProtocolError(f"packet of {length} bytes is over the limit of {max_bytes}")
    kind, flags = first >> 4, first & 0x0F
    if _REQUIRED_FLAGS.get(kind, flags) != flags:
        raise ProtocolError(f"packet type {kind} with reserved flags {flags:#x}")
    return Packet(kind, flags, await reader.readexactly(length))


class _Fields:
    """Reads the fields of a packet body in order."""

    def __init__(self, body: bytes) -> None:
        self.body, self.at = body, 0

    def take(self, count: int) -> bytes:
        if self.at + count > len(self.body):
            raise ProtocolError("packet shorter than its fields")
        chunk = self.body[self.at : self.at + count]
        self.at += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("a string field is not UTF-8") from None

    def rest(self) -> bytes:
        chunk = self.body[self.at :]
        self.at = len(self.body)
        return chunk

    @property
    def done(self) -> bool:
        return self.at == len(self.body)


def parse_connect(packet: Packet) -> Connect:
    """CONNECT; anything but MQTT 3.1.1 is a ProtocolError (the connection is closed)."""
    fields = _Fields(packet.body)
    if fields.text() != "MQTT" or fields.u8() != 4:
        raise ProtocolError("only MQTT 3.1.1 is spoken here")
    flags, keep_alive = fields.u8(), fields.u16()
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag set")
    client_id = fields.text()
    if flags & 0x04:  # a will: IoT Hub ignores it, and so does the gateway
        fields.text()
        fields.binary()
    username = fields.text() if flags & 0x80 else None
    password = fields.binary().decode("utf-8", errors="replace") if flags & 0x40 else None
    if not fields.done:
        raise ProtocolError("CONNECT longer than its fields")
    return Connect(client_id, username, password, bool(flags & 0x02), keep_alive)


def parse_publish(packet: Packet) -> Publish:
    qos = (packet.flags >> 1) & 0x03
    if qos > 1:
        raise ProtocolError(f"QoS {qos}: IoT Hub supports QoS 0 and 1 only")
    fields = _Fields(packet.body)
    topic = fields.text()
    packet_id = fields.u16() if qos else None
    return Publish(topic, fields.rest(), qos, packet_id)


def parse_subscribe(packet: Packet) -> tuple[int, list[tuple[str, int]]]:
    """(packet id, [(topic filter, requested QoS)])."""
    fields = _Fields(packet.body)
    packet_id, filters = fields.u16(), []
    while not fields.done:
        topic_filter, options = fields.text(), fields.u8()
        if options > 2:
            raise ProtocolError(f"SUBSCRIBE with requested QoS byte {options:#x}")
        filters.append((topic_filter, options))
    if not filters:
        raise ProtocolError("SUBSCRIBE without a topic filter")
    return packet_id, filters


def parse_unsubscribe(packet: Packet) -> tuple[int, list[str]]:
    fields = _Fields(packet.body)
    packet_id, filters = fields.u16(), []
    while not fields.done:
        filters.append(fields.text())
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")
    return packet_id, filters


def packet_id(packet: Packet) -> int:
    """The packet id of a PUBACK."""
    return _Fields(packet.body).u16()


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([kind << 4 | flags]) + bytes(encoded) + body


def connack(session_present: bool, code: int) -> bytes:
    return _packet(CONNACK, 0, bytes([int(session_present), code]))


def puback(packet_id: int) -> bytes:
    return _packet(PUBACK, 0, struct.pack(">H", packet_id))


def suback(packet_id: int, codes: list[int]) -> bytes:
    return _packet(SUBACK, 0, struct.pack(">H", packet_id) + bytes(codes))


def unsuback(packet_id: int) -> bytes:
    return _packet(UNSUBACK, 0, struct.pack(">H", packet_id))


def pingresp() -> bytes:
    return _packet(PINGRESP, 0, b"")


def publish(topic: str, payload: bytes, qos: int, packet_id: int | None = None) -> bytes:
    name = topic.encode("utf-8")
    header = struct.pack(">H", len(name)) + name
    if qos:
        header += struct.pack(">H", packet_id)
    return _packet(PUBLISH, qos << 1, header + payload)
