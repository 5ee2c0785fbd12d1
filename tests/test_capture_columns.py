"""The columnar capture reader that ingestion uses, and its C block decoder.

It must read what the record-by-record reader reads, and refuse malformed data with an
error: never a crash, a hang or a read outside the block.
"""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime

import fastavro
import pytest

from turbofan_core._iothub_avro import decode_records
from turbofan_core._iothub_avro import encode_records as _encode_records
from turbofan_core.capture import (
    AVRO_SCHEMA,
    DEVICE_ID,
    CaptureColumns,
    CaptureRecord,
    CorruptCaptureFile,
    device_message,
    encode_avro,
    encode_device_messages,
    encode_json_lines,
    encode_record,
    format_enqueued_time,
    read_capture,
    read_columns,
)

WHEN = datetime(2026, 11, 27, 19, 5, 42, 123456, tzinfo=UTC)
RECORDS = [
    device_message("Client_001", b'{"CycleTime": 1, "Sensor2": 641.82}', WHEN, {}),
    device_message("Client_001", b'{"CycleTime": 192}', WHEN, {"type": "failure"}, message_id="m-192"),
    device_message(
        "Motor_\u00e9\u6a5f", '{"Note": "\u00e9"}'.encode(), WHEN, {"type": "telemetry", "v": "1.2"}
    ),
    CaptureRecord("2026-11-27T19:05:42.0000000Z", None, {}, {}),
    CaptureRecord("", b"", {}, {"contentType": "text/plain", "contentEncoding": "utf-16", "other": "x"}),
]


def columns_of(records: list[CaptureRecord]) -> CaptureColumns:
    """What read_columns must give: the record reader's content, transposed."""
    return CaptureColumns(
        [r.enqueued_time_utc for r in records],
        [r.properties or None for r in records],
        [r.system_properties.get(DEVICE_ID) for r in records],
        [r.system_properties.get("contentType") for r in records],
        [r.system_properties.get("contentEncoding") for r in records],
        [r.message_id for r in records],
        [r.body for r in records],
    )


@pytest.mark.parametrize("codec", ["deflate", "null"])
def test_avro_columns_hold_what_the_record_reader_reads(codec: str) -> None:
    data = encode_avro(RECORDS * 700, codec=codec)  # many blocks
    columns = read_columns(data)
    assert len(columns) == len(RECORDS) * 700
    assert columns == columns_of(read_capture(data))
    assert columns.properties[0] is None and columns.properties[2] == {"type": "telemetry", "v": "1.2"}
    assert columns.message_ids[:2] == [None, "m-192"]


def test_records_are_encoded_byte_for_byte_as_fastavro_encodes_them() -> None:
    unusual = CaptureRecord("2026-11-27T08:00:00.0000000Z", None, {"ünï": "çødé" * 40}, {})
    for record in [*RECORDS, unusual]:
        expected = io.BytesIO()
        fastavro.schemaless_writer(
            expected,
            fastavro.parse_schema(AVRO_SCHEMA),
            {
                "EnqueuedTimeUtc": record.enqueued_time_utc,
                "Properties": record.properties,
                "SystemProperties": record.system_properties,
                "Body": record.body,
            },
        )
        assert encode_record(record) == expected.getvalue()


def test_many_device_messages_are_encoded_as_each_record_is() -> None:
    """The edge's batch encoder writes the bytes of `encode_record(device_message(...))`."""
    enqueued = format_enqueued_time(WHEN)
    messages = [
        ("Client_001", b'{"CycleTime": 1}', {}, None, None, None),
        ("Client_002", b'{"CycleTime": 2}', {"type": "failure", "rul_p50": "1.5"}, "m-2", None, None),
        (
            "Motor_\u00e9\u6a5f",
            "\u00e9".encode(),
            {"\u00fcn": "\u00e7" * 300},
            "m-\u00e9",
            "text/plain",
            "utf-16",
        ),
        ("Client_003", b"", {}, "", "application/json", "utf-8"),
    ]
    expected = [encode_record(device_message(d, b, enqueued, p, m, t, e)) for d, b, p, m, t, e in messages]
    assert encode_device_messages(enqueued, messages) == expected
    assert encode_device_messages(enqueued, []) == []


def test_the_batch_encoder_refuses_what_it_cannot_write() -> None:
    with pytest.raises(TypeError, match="body must be bytes"):
        encode_device_messages("t", [("Client_001", "text", {}, None, None, None)])
    with pytest.raises(TypeError, match="a property value"):
        encode_device_messages("t", [("Client_001", b"{}", {"p": 1}, None, None, None)])
    with pytest.raises(TypeError, match="a property value"):
        encode_device_messages("t", [(7, b"{}", {}, None, None, None)])  # a device id that is not text
    with pytest.raises(ValueError, match="2 system values for 3 names"):
        _encode_records("t", ("a", "b", "c"), [({}, ("x", "y"), b"")])
    with pytest.raises(TypeError, match="a message is"):
        _encode_records("t", ("a",), [({}, ["x"], b"")])
    with pytest.raises(TypeError, match="a message is .* not NoneType"):
        _encode_records("t", ("a",), [None])


def test_json_lines_columns_hold_what_the_record_reader_reads() -> None:
    data = encode_json_lines(RECORDS)
    assert read_columns(data) == columns_of(read_capture(data))
    assert len(read_columns(b"")) == 0


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_avro_is_refused_whole(cut: float) -> None:
    data = encode_avro(RECORDS * 500)
    # Inside a block: Avro has no end marker, so a file cut just after a block's sync marker is
    # a shorter, whole file to every reader.
    blocks = list(fastavro.block_reader(io.BytesIO(data)))
    block = blocks[int(len(blocks) * cut)]
    with pytest.raises(CorruptCaptureFile, match="unreadable Avro capture"):
        read_columns(data[: block.offset + block.size // 2])


def test_a_file_with_another_record_schema_is_refused() -> None:
    schema = {"type": "record", "name": "Other", "fields": [{"name": "Body", "type": "bytes"}]}
    buffer = io.BytesIO()
    fastavro.writer(buffer, schema, [{"Body": b"{}"}])
    with pytest.raises(CorruptCaptureFile, match="record schema"):
        read_columns(buffer.getvalue())


def long(value: int) -> bytes:
    """Avro's zig-zag varint."""
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return long(len(raw)) + raw


def test_map_blocks_with_byte_sizes_and_repeated_keys() -> None:
    """Writers may give a map block's size in bytes (negative count); a repeated key keeps its last value."""
    entry = text("type") + text("failure")
    record = (
        text("t")
        + long(-1) + long(len(entry)) + entry + long(0)
        + long(2) + text(DEVICE_ID) + text("A") + text(DEVICE_ID) + text("B") + long(0)
        + long(1) + text(b'{"CycleTime": 3}')
    )  # fmt: skip
    times, properties, devices, content_types, encodings, ids, bodies = decode_records(record * 2, 2, {})
    assert times == ["t", "t"] and properties == [{"type": "failure"}] * 2 and devices == ["B", "B"]
    assert content_types == encodings == ids == [None, None] and bodies == [b'{"CycleTime": 3}'] * 2
    assert devices[0] is devices[1]  # one object per device id, whatever the message count


EMPTY = text("t") + long(0) + long(0) + long(0)


@pytest.mark.parametrize(
    ("block", "count", "problem"),
    [
        (EMPTY[:-1], 1, "truncated number"),
        (b"\xff" * 11, 1, "longer than ten bytes"),
        (long(100) + b"short" + EMPTY, 1, "length outside the block"),
        (long(-3) + EMPTY, 1, "length outside the block"),
        (text("t") + long(0) + long(0) + long(2), 1, "neither null nor bytes"),
        (EMPTY + b"\x00", 1, "bytes left after"),
        (EMPTY, 2, "record count does not fit"),
        (EMPTY, -1, "record count does not fit"),
        (text("t") + long(-(2**63)) + EMPTY, 1, "map count out of range"),
        (text("t") + long(10**6) + EMPTY, 1, "map count larger than the block"),
    ],
)
def test_malformed_blocks_are_refused_with_where_and_why(block: bytes, count: int, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decode_records(block, count, {})


def test_invalid_utf8_in_a_string_is_refused() -> None:
    with pytest.raises(UnicodeDecodeError):
        decode_records(text(b"\xff\xfe") + long(0) + long(0) + long(0), 1, {})


def test_corrupted_blocks_never_crash_the_decoder() -> None:
    """Seeded fuzzing: flipped bytes, cuts and wrong counts give a ValueError or records, never a crash."""
    data = encode_avro(RECORDS * 4, codec="null")
    block = next(iter(fastavro.block_reader(io.BytesIO(data))))
    good, count = bytes(block.bytes_.getbuffer()), block.num_records
    assert len(decode_records(good, count, {})[0]) == count
    rng = random.Random(20261127)
    refused = 0
    for _ in range(5000):
        mutated = bytearray(good)
        for _ in range(rng.choice([1, 2, 8])):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.3:
            del mutated[rng.randrange(len(mutated)) :]
        try:
            decoded = decode_records(bytes(mutated), count + rng.choice([0, 0, 0, -1, 1]), {})
        except ValueError:
            refused += 1
        else:
            assert all(len(column) == len(decoded[0]) for column in decoded)
    assert refused > 1000  # most corruption is caught inside the block
