"""IoT Hub message-routing capture files: the landing zone's format.

IoT Hub routing to Blob storage writes Avro container files whose records follow
`Microsoft.Azure.Devices.Message`, named `{hub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}`.
With JSON encoding it writes one JSON record per line, `Body` base64-encoded (or, for
`application/json` + `utf-8` messages, the JSON body itself). Both are read here so the
pipeline can be pointed at a real hub's container: record by record (`iter_capture`, for
tools and tests) or column by column (`read_columns`, for bulk ingestion).
"""

from __future__ import annotations

import base64
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import fastavro
import orjson

from turbofan_core._iothub_avro import decode_records
from turbofan_core._iothub_avro import encode_record as _encode_record
from turbofan_core._iothub_avro import encode_records as _encode_records

AVRO_SCHEMA: dict = {
    "type": "record",
    "name": "Message",
    "namespace": "Microsoft.Azure.Devices",
    "fields": [
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "Properties", "type": {"type": "map", "values": "string"}},
        {"name": "SystemProperties", "type": {"type": "map", "values": "string"}},
        {"name": "Body", "type": ["null", "bytes"]},
    ],
}
_PARSED_SCHEMA = fastavro.parse_schema(AVRO_SCHEMA)
_BLOCK_BYTES = 16_000  # fastavro's sync interval
AVRO_MAGIC = b"Obj\x01"
DEVICE_ID = "connectionDeviceId"
MESSAGE_ID = "messageId"  # set by the device (azure-iot-device's Message.message_id); IoT Hub keeps it
DEFAULT_PARTITIONS = 4
_SAS_AUTH = '{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}'
# The system properties IoT Hub gives a device's message, in its order (`_system_values`).
_SYSTEM_KEYS = (
    DEVICE_ID,
    "connectionAuthMethod",
    "connectionDeviceGenerationId",
    "contentType",
    "contentEncoding",
    "enqueuedTime",
    MESSAGE_ID,
)


class CorruptCaptureFile(ValueError):
    """A capture file that cannot be read whole (truncated, or not Avro nor JSON lines)."""


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """One routed message, as IoT Hub writes it."""

    enqueued_time_utc: str
    body: bytes | None
    properties: dict[str, str] = field(default_factory=dict)
    system_properties: dict[str, str] = field(default_factory=dict)

    @property
    def device_id(self) -> str | None:
        return self.system_properties.get(DEVICE_ID)

    @property
    def message_id(self) -> str | None:
        return self.system_properties.get(MESSAGE_ID)


def format_enqueued_time(when: datetime) -> str:
    """IoT Hub's EnqueuedTimeUtc text: ISO 8601 with seven fractional digits and Z."""
    # isoformat: the same text as strftime("%Y-%m-%dT%H:%M:%S.%f"), a tenth of the cost
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "0Z"


def device_message(
    device_id: str,
    body: bytes,
    when: datetime | str,
    properties: dict[str, str],
    message_id: str | None = None,
    content_type: str | None = None,
    content_encoding: str | None = None,
) -> CaptureRecord:
    """The record IoT Hub routes for a message sent by an authenticated device.

    `when` is the enqueued time, or its text (`format_enqueued_time`) when many messages share
    it. `message_id` is the device's own id for the message (kept across resends), when it set one.
    The content type and encoding are the device's (default: JSON in UTF-8).
    """
    enqueued = when if isinstance(when, str) else format_enqueued_time(when)
    values = _system_values(device_id, enqueued, message_id, content_type, content_encoding)
    system = dict(zip(_SYSTEM_KEYS, values, strict=True))
    if message_id is None:
        del system[MESSAGE_ID]
    return CaptureRecord(
        enqueued_time_utc=enqueued, body=body, properties=dict(properties), system_properties=system
    )


def encode_device_messages(
    enqueued: str,
    messages: Iterable[tuple[str, bytes, dict[str, str], str | None, str | None, str | None]],
) -> list[bytes]:
    """`encode_record(device_message(...))` of each message (device id, body, properties, message
    id, content type, content encoding), all enqueued at `enqueued` (`format_enqueued_time`): the
    edge's batch path, without a record object per message."""
    return _encode_records(
        enqueued,
        _SYSTEM_KEYS,
        [
            (properties, _system_values(device_id, enqueued, message_id, content_type, encoding), body)
            for device_id, body, properties, message_id, content_type, encoding in messages
        ],
    )


def _system_values(
    device_id: str,
    enqueued: str,
    message_id: str | None,
    content_type: str | None,
    content_encoding: str | None,
) -> tuple[str | None, ...]:
    """A device message's system properties, in `_SYSTEM_KEYS` order; the message id is None when
    the device set none (and then left out)."""
    return (
        device_id,
        _SAS_AUTH,
        "0",
        content_type or "application/json",
        content_encoding or "utf-8",
        enqueued,
        message_id,
    )


def partition_of(device_id: str, partitions: int = DEFAULT_PARTITIONS) -> int:
    """A device's messages always go to one partition, so their order is kept."""
    return zlib.crc32(device_id.encode()) % partitions


def capture_name(hub: str, partition: int, when: datetime) -> str:
    """IoT Hub's default routing file name for a partition's batch starting at `when`."""
    return f"{hub}/{partition:02d}/{when.astimezone(UTC):%Y/%m/%d/%H/%M}"


def encode_record(record: CaptureRecord) -> bytes:
    """One record in Avro's binary encoding, as it sits in a capture block (what the edge's outbox keeps)."""
    return _encode_record(record.enqueued_time_utc, record.properties, record.system_properties, record.body)


def avro_file(encoded: Iterable[bytes], codec: str = "deflate") -> bytes:
    """An Avro container file of records already encoded (`encode_record`), in blocks of about
    16 kB as fastavro writes them; `codec` is "deflate" or "null"."""
    return avro_file_of_runs(((1, record) for record in encoded), codec)


def avro_file_of_runs(runs: Iterable[tuple[int, bytes]], codec: str = "deflate") -> bytes:
    """`avro_file` of runs of records: each a count of records and their encodings one after another
    (the edge's outbox keeps a request's records so). Runs are joined into blocks of about 16 kB
    and never split, so a block may be larger."""
    if codec not in ("deflate", "null"):
        raise ValueError(f"codec {codec!r} is not 'deflate' or 'null'")
    sync = os.urandom(16)
    metadata = {"avro.schema": json.dumps(AVRO_SCHEMA).encode(), "avro.codec": codec.encode()}
    parts = [AVRO_MAGIC, _long(len(metadata))]
    for key, value in metadata.items():
        parts += [_long(len(key)), key.encode(), _long(len(value)), value]
    parts += [_long(0), sync]
    block: list[bytes] = []
    count = size = 0

    def flush() -> None:
        data = b"".join(block)
        if codec == "deflate":
            compressor = zlib.compressobj(1, zlib.DEFLATED, -15)  # raw deflate, fastest level
            data = compressor.compress(data) + compressor.flush()
        parts.extend([_long(count), _long(len(data)), data, sync])

    for records, encoded in runs:
        block.append(encoded)
        count += records
        size += len(encoded)
        if size >= _BLOCK_BYTES:
            flush()
            block, count, size = [], 0, 0
    if block:
        flush()
    return b"".join(parts)


def encode_avro(records: Iterable[CaptureRecord], codec: str = "deflate") -> bytes:
    """A capture file of `records`, as IoT Hub's routing writes it."""
    return avro_file((encode_record(r) for r in records), codec)


def _long(value: int) -> bytes:
    """Avro's long: zig-zag, then seven bits a byte, low bits first."""
    zigzag, out = (value << 1) ^ (value >> 63), bytearray()
    while True:
        byte, zigzag = zigzag & 0x7F, zigzag >> 7
        out.append(byte | (0x80 if zigzag else 0))
        if not zigzag:
            return bytes(out)


def encode_json_lines(records: Iterable[CaptureRecord]) -> bytes:
    """JSON encoding as IoT Hub writes it: Body base64, one record per line."""
    return b"".join(
        orjson.dumps(
            {
                "EnqueuedTimeUtc": r.enqueued_time_utc,
                "Properties": r.properties,
                "SystemProperties": r.system_properties,
                "Body": None if r.body is None else base64.b64encode(r.body).decode("ascii"),
            }
        )
        + b"\n"
        for r in records
    )


def read_capture(data: bytes) -> list[CaptureRecord]:
    """Read a whole capture file, Avro or JSON lines; raise CorruptCaptureFile if it is not whole.

    All or nothing on purpose: a truncated file is reported and retried later rather
    than half-ingested.
    """
    return list(iter_capture(data))


def iter_capture(data: bytes) -> Iterator[CaptureRecord]:
    """Records one by one (no list of the whole file in memory); CorruptCaptureFile may come
    after some records, so a caller that must not half-ingest keeps them until the end."""
    return _iter_avro(data) if data.startswith(AVRO_MAGIC) else _iter_json_lines(data)


# What fastavro and the block decoder raise on a file that is truncated or not Avro.
_AVRO_ERRORS = (EOFError, ValueError, TypeError, KeyError, zlib.error, StopIteration)


def _unreadable(error: Exception) -> CorruptCaptureFile:
    return CorruptCaptureFile(f"unreadable Avro capture: {type(error).__name__}: {error}")


def _iter_avro(data: bytes) -> Iterator[CaptureRecord]:
    try:
        for r in fastavro.reader(io.BytesIO(data)):
            yield CaptureRecord(r["EnqueuedTimeUtc"], r["Body"], r["Properties"], r["SystemProperties"])
    except _AVRO_ERRORS as error:
        raise _unreadable(error) from None


@dataclass(frozen=True, slots=True)
class CaptureColumns:
    """A whole capture file column by column, keeping only what the contract reads.

    `properties` is None for a message without application properties (the usual
    telemetry), so most messages cost no dict.
    """

    enqueued_time_utc: list[str] = field(default_factory=list)
    properties: list[dict[str, str] | None] = field(default_factory=list)
    device_ids: list[str | None] = field(default_factory=list)
    content_types: list[str | None] = field(default_factory=list)
    content_encodings: list[str | None] = field(default_factory=list)
    message_ids: list[str | None] = field(default_factory=list)
    bodies: list[bytes | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.bodies)

    def extend(self, parts: Iterable[list]) -> None:
        """Append columns given in field order, as `decode_records` returns them."""
        own = (
            self.enqueued_time_utc,
            self.properties,
            self.device_ids,
            self.content_types,
            self.content_encodings,
            self.message_ids,
            self.bodies,
        )
        for column, part in zip(own, parts, strict=True):
            column.extend(part)


_RECORD_FIELDS = [(f["name"], f["type"]) for f in AVRO_SCHEMA["fields"]]


def read_columns(data: bytes) -> CaptureColumns:
    """Read a whole capture file into columns; raise CorruptCaptureFile if it is not whole.

    For Avro, fastavro reads the container (codec, sync markers, so truncation is caught)
    and a C decoder turns each block's records into columns without a dict per record.
    """
    columns = CaptureColumns()
    if not data.startswith(AVRO_MAGIC):
        rows = [
            (
                r.enqueued_time_utc,
                r.properties or None,
                s.get(DEVICE_ID),
                s.get("contentType"),
                s.get("contentEncoding"),
                s.get(MESSAGE_ID),
                r.body,
            )
            for r in _iter_json_lines(data)
            for s in [r.system_properties]
        ]
        if rows:
            columns.extend(map(list, zip(*rows, strict=True)))
        return columns
    try:
        blocks = fastavro.block_reader(io.BytesIO(data))
        fields = [(f["name"], f["type"]) for f in blocks.writer_schema.get("fields", [])]
        if blocks.writer_schema.get("name") != _PARSED_SCHEMA["name"] or fields != _RECORD_FIELDS:
            raise CorruptCaptureFile(f"not IoT Hub's {_PARSED_SCHEMA['name']} record schema: {fields}")
        strings: dict[str, str] = {}  # one object per device id in the whole file
        for block in blocks:
            columns.extend(decode_records(block.bytes_.getbuffer(), block.num_records, strings))
    except CorruptCaptureFile:
        raise
    except _AVRO_ERRORS as error:
        raise _unreadable(error) from None
    return columns


def _json_body(body: object) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, str):
        try:
            return base64.b64decode(body, validate=True)
        except ValueError:
            return body.encode("utf-8")
    return orjson.dumps(body)


def _iter_json_lines(data: bytes) -> Iterator[CaptureRecord]:
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = orjson.loads(line)
            record = CaptureRecord(
                str(raw["EnqueuedTimeUtc"]),
                _json_body(raw.get("Body")),
                dict(raw.get("Properties") or {}),
                dict(raw.get("SystemProperties") or {}),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CorruptCaptureFile(
                f"not an Avro file, and line {number} is not a JSON capture record: {error}"
            ) from None
        yield record
