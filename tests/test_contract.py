"""The shared contract: every rejection reason, the capture codec, immutable stores."""

from __future__ import annotations

import base64
import io
import itertools
import json
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import fastavro
import numpy as np
import orjson
import pytest

from turbofan_core import _contract
from turbofan_core.capture import (
    AVRO_SCHEMA,
    CaptureRecord,
    CorruptCaptureFile,
    capture_name,
    device_message,
    encode_avro,
    encode_json_lines,
    format_enqueued_time,
    partition_of,
    read_capture,
)
from turbofan_core.cmapss import ChecksumMismatch, read_cmapss, read_true_rul, verify
from turbofan_core.storage import LocalStore, NameTaken, write_new
from turbofan_core.telemetry import (
    FAILURE,
    FIELDS,
    MEASUREMENTS,
    InvalidMessage,
    check_messages,
    encode_body,
    parse_message,
)

GOOD = {"CycleTime": 17, **{name: 1.0 + i for i, name in enumerate(MEASUREMENTS)}}
WHEN = datetime(2026, 11, 27, 19, 5, 42, 123456, tzinfo=UTC)


def body(**changes: object) -> bytes:
    values = {**GOOD, **changes}
    return json.dumps({k: v for k, v in values.items() if v is not ...}).encode()


def test_valid_telemetry_and_failure_event() -> None:
    message = parse_message(encode_body(GOOD), "Client_001", {})
    assert (message.device_id, message.kind, message.cycle) == ("Client_001", "telemetry", 17)
    assert message.measurements == tuple(GOOD[name] for name in MEASUREMENTS)
    failure = parse_message(b'{"CycleTime": 192}', "Client_001", {"type": FAILURE})
    assert (failure.kind, failure.cycle, failure.measurements) == (FAILURE, 192, ())


def test_integral_float_cycle_and_unknown_fields_are_accepted() -> None:
    message = parse_message(body(CycleTime=17.0, Firmware="1.2"), "Client_001", {})
    assert message.cycle == 17


# Every kind of malformed message the contract knows, with the start of its reason.
MALFORMED = [
    (body(), None, {}, "application/json", "utf-8", "no device id (connectionDeviceId is missing)"),
    (body(), "", {}, "application/json", "utf-8", "no device id (connectionDeviceId is missing)"),
    (body(), "C1", {}, "text/plain", "utf-8", "content type 'text/plain' is not 'application/json'"),
    (body(), "C1", {}, "application/json", "utf-16", "content encoding 'utf-16' is not 'utf-8'"),
    (body(), "C1", {"type": "reboot"}, None, None, "unknown message type 'reboot'"),
    (None, "C1", {}, None, None, "empty body"),
    (b"", "C1", {}, None, None, "empty body"),
    (b"\xff\xfe{}", "C1", {}, None, None, "body is not valid UTF-8"),
    (b'{"CycleTime": 1,', "C1", {}, None, None, "body is not JSON"),
    (b"[1, 2]", "C1", {}, None, None, "body is not a JSON object but a JSON list"),
    (body(CycleTime=...), "C1", {}, None, None, "missing field CycleTime"),
    (body(Sensor7=...), "C1", {}, None, None, "missing field Sensor7"),
    (body(Sensor7="553.2"), "C1", {}, None, None, "Sensor7 must be a number, got str '553.2'"),
    (body(Sensor7=None), "C1", {}, None, None, "Sensor7 must be a number, got NoneType None"),
    (body(Sensor7=True), "C1", {}, None, None, "Sensor7 must be a number, got bool True"),
    (body(Sensor7=float("nan")), "C1", {}, None, None, "Sensor7 is NaN"),
    (body(Sensor7=float("inf")), "C1", {}, None, None, "Sensor7 is infinite"),
    (body(OperationalSetting2=float("-inf")), "C1", {}, None, None, "OperationalSetting2 is infinite"),
    (body(Sensor7=-(10**400)), "C1", {}, None, None, "Sensor7 is an integer beyond a float's range"),
    # Two that cancel out, ahead of any float: an exact sum of the integers would not notice either.
    (
        body(OperationalSetting1=10**400, OperationalSetting2=-(10**400)),
        "C1",
        {},
        None,
        None,
        "OperationalSetting1 is an integer beyond a float's range",
    ),
    # Every measurement an integer, one of them too large.
    (
        body(**{**dict.fromkeys(MEASUREMENTS, 1), "Sensor21": 10**400}),
        "C1",
        {},
        None,
        None,
        "Sensor21 is an integer beyond a float's range",
    ),
    (body(CycleTime=0), "C1", {}, None, None, "CycleTime must be a positive integer, got 0"),
    (body(CycleTime=-3), "C1", {}, None, None, "CycleTime must be a positive integer, got -3"),
    (body(CycleTime=2.5), "C1", {}, None, None, "CycleTime must be a positive integer, got 2.5"),
    (body(CycleTime="7"), "C1", {}, None, None, "CycleTime must be a positive integer, got str '7'"),
    (body(CycleTime=2**63), "C1", {}, None, None, "CycleTime 9223372036854775808 is too large"),
    (b'{"Cycle": 3}', "C1", {"type": FAILURE}, None, None, "missing field CycleTime"),
]


@pytest.mark.parametrize(("raw", "device", "properties", "content_type", "encoding", "reason"), MALFORMED)
def test_every_rejection_has_a_precise_reason(
    raw: bytes | None,
    device: str | None,
    properties: dict[str, str],
    content_type: str | None,
    encoding: str | None,
    reason: str,
) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_message(raw, device, properties, content_type, encoding)
    assert caught.value.reason.startswith(reason)


def test_encode_body_keeps_contract_names_and_order() -> None:
    assert list(json.loads(encode_body({**GOOD, "Extra": 1}))) == list(FIELDS)


def records() -> list[CaptureRecord]:
    return [
        device_message("Client_001", encode_body(GOOD), WHEN, {}),
        device_message("Client_001", b'{"CycleTime": 17}', WHEN, {"type": FAILURE}),
        CaptureRecord("2026-11-27T19:05:42.0000000Z", None, {}, {}),
    ]


def test_avro_uses_iot_hub_routing_schema_and_round_trips() -> None:
    data = encode_avro(records())
    reader = fastavro.reader(io.BytesIO(data))
    assert reader.writer_schema == {
        "type": "record",
        "name": "Microsoft.Azure.Devices.Message",
        "fields": AVRO_SCHEMA["fields"],
    }
    assert read_capture(data) == records()
    first = read_capture(data)[0]
    assert first.device_id == "Client_001"
    assert first.enqueued_time_utc == "2026-11-27T19:05:42.1234560Z"
    assert first.system_properties["contentType"] == "application/json"


def test_enqueued_time_is_iot_hubs_text_in_utc() -> None:
    when = datetime(2026, 11, 28, 1, 4, 5, 60, tzinfo=timezone(timedelta(hours=2)))
    assert format_enqueued_time(when) == "2026-11-27T23:04:05.0000600Z"


def test_json_lines_round_trip_and_plain_json_bodies() -> None:
    assert read_capture(encode_json_lines(records())) == records()
    # IoT Hub writes application/json + utf-8 bodies as JSON, not base64.
    line = {"EnqueuedTimeUtc": "t", "Properties": {}, "SystemProperties": {}, "Body": {"CycleTime": 3}}
    assert read_capture(json.dumps(line).encode())[0].body == b'{"CycleTime":3}'
    encoded = {**line, "Body": base64.b64encode(b'{"CycleTime": 4}').decode()}
    assert read_capture(json.dumps(encoded).encode())[0].body == b'{"CycleTime": 4}'


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_avro_is_refused_whole(cut: float) -> None:
    data = encode_avro(records() * 500)
    with pytest.raises(CorruptCaptureFile):
        read_capture(data[: int(len(data) * cut)])


def test_garbage_and_broken_json_lines_are_refused() -> None:
    with pytest.raises(CorruptCaptureFile, match="line 2"):
        read_capture(encode_json_lines(records()[:1]) + b'{"EnqueuedTimeUtc": "t", "Bo')


def test_capture_names_and_partitions() -> None:
    assert capture_name("hub", 3, WHEN) == "hub/03/2026/11/27/19/05"
    assert partition_of("Client_001") == partition_of("Client_001")
    assert {partition_of(f"Client_{i:03d}") for i in range(1, 101)} == {0, 1, 2, 3}


def test_local_store_never_overwrites_and_hides_staging(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert write_new(store, "hub/00/x", b"one") == "hub/00/x"
    assert write_new(store, "hub/00/x", b"two") == "hub/00/x-0001"
    with pytest.raises(NameTaken):
        store.create("hub/00/x", b"three")
    assert store.read("hub/00/x") == b"one"
    assert list(store.list_names()) == ["hub/00/x", "hub/00/x-0001"]
    assert list(store.list_names("hub/01")) == []


def test_cmapss_reader_and_checksums(cmapss_dir: Path, tmp_path: Path) -> None:
    train = read_cmapss(cmapss_dir / "train_FD001.txt")
    assert train.shape == (20_631, 26) and list(train.columns[2:]) == list(MEASUREMENTS)
    assert train.groupby("unit")["CycleTime"].max().loc[1] == 192
    assert read_true_rul(cmapss_dir / "RUL_FD001.txt").loc[1] == 112
    verify(cmapss_dir / "train_FD001.txt")
    for columns in (25, 27):
        bad = tmp_path / "train_FD001.txt"
        bad.write_text(" ".join(["1"] * columns) + "\n")
        with pytest.raises(ValueError, match="expected 26 columns"):
            read_cmapss(bad)
    with pytest.raises(ChecksumMismatch, match="is not the published"):
        verify(bad)


def _agrees_with_parse_message(cases: list[tuple], parsed: list[object] | None = None) -> int:
    """Check `cases` (body, device, properties, content type, encoding) as one batch: each verdict,
    cycle, measurement and reason must be parse_message's on the message alone. How many it accepts."""
    checked = check_messages(*(list(column) for column in zip(*cases, strict=True)), parsed)
    accepted = 0
    for index, (raw, device, properties, content_type, encoding) in enumerate(cases):
        case = (raw, device, properties or {}, content_type, encoding)
        try:
            expected = parse_message(*case, None if parsed is None else parsed[index])
        except InvalidMessage as error:
            assert not checked.valid[index] and checked.reasons[index] == error.reason, case
            continue
        accepted += 1
        assert checked.valid[index] and index not in checked.reasons, case
        assert checked.cycles[index] == expected.cycle
        assert checked.failure[index] == (expected.kind == FAILURE)
        measured = checked.measurements[index]
        assert list(measured) == list(expected.measurements) or (
            expected.kind == FAILURE and all(measured != measured)
        )
    return accepted


def test_batch_checks_give_parse_messages_verdict_for_every_message() -> None:
    """check_messages, the column-at-a-time path ingestion takes, must never change a verdict."""
    cases = [
        (body(**{field: value}), device, properties, content_type, encoding)
        for field, value in itertools.product(
            ["CycleTime", "Sensor3"],
            [1, 1.0, 2.5, True, None, "x", 0, -1, float("nan"), 1e308, 2**53 + 1, 2**63, 2**64 - 1, 10**400],
        )
        for device, properties, content_type, encoding in itertools.product(
            ["Client_001", None],
            [{}, {"type": FAILURE}, {"type": "telemetry"}, {"rul_p50": "42.0"}, {"type": "reboot", "x": "1"}],
            [None, "application/json", "text/plain", "application/json; charset=utf-8"],
            [None, "utf-8", "UTF-8", "utf-16"],
        )
    ]
    cases += [(raw, "Client_002", {}, None, None) for raw in (None, b"", b"[1]", b"{", b'"x"', b"\xff")]
    cases += [case[:5] for case in MALFORMED]
    assert 0 < _agrees_with_parse_message(cases) < len(cases)
    checked = check_messages(*(list(column) for column in zip(*cases, strict=True)))

    # Bodies a transport already parsed (a gateway batch's items) get the same verdicts.
    bodies = [_parsed(case[0]) for case in cases]
    given = check_messages(*(list(column) for column in zip(*cases, strict=True)), bodies)
    assert given.reasons == checked.reasons
    for name in ("valid", "failure", "cycles", "measurements"):
        np.testing.assert_array_equal(getattr(given, name), getattr(checked, name))

    # Fields taken from the bodies' text beforehand (the edge's batch splitter), none parsed: the
    # same verdicts; the fields are fields_table's of the parsed bodies, as the splitter's test shows.
    taken = _fields_table(bodies)
    taken[0][~taken[1]] = 0.0  # what the splitter leaves in a row that is not plain
    columns = [list(column) for column in zip(*cases, strict=True)]
    unparsed = check_messages(*columns, fields=taken)
    assert unparsed.reasons == checked.reasons
    for name in ("valid", "failure", "cycles", "measurements"):
        np.testing.assert_array_equal(getattr(unparsed, name), getattr(checked, name))
    with pytest.raises(ValueError, match="a row of FIELDS and a plain flag per body"):
        check_messages(*columns, fields=(taken[0][1:], taken[1]))
    with pytest.raises(ValueError, match="float64 rows and bool flags"):
        check_messages(*columns, fields=(np.zeros(taken[0].shape, dtype=np.float32), taken[1]))

    # A message alone (an edge's single message) takes the per-message path: the same verdict.
    for index, case in enumerate(cases):
        alone = check_messages(*([value] for value in case), [bodies[index]])
        assert alone.reasons == ({0: checked.reasons[index]} if index in checked.reasons else {}), case
        for name in ("valid", "failure", "cycles", "measurements"):
            np.testing.assert_array_equal(getattr(alone, name)[0], getattr(checked, name)[index])


class _Int(int):
    pass


class _Float(float):
    pass


class _Dict(dict):
    pass


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


# Bodies a caller may hand on already parsed that no JSON parser gives: each must be refused (or
# accepted) as parse_message refuses it, never break the batch.
ODD_OBJECTS: list[object] = [
    {**GOOD, "Sensor3": 10**400},
    {**GOOD, "Sensor3": -(10**400)},
    {**GOOD, "CycleTime": 10**400},
    {**GOOD, "Sensor3": _Int(3)},
    {**GOOD, "Sensor3": _Float(2.5)},
    {**GOOD, "CycleTime": _Int(4)},
    {**GOOD, "Sensor3": [1.0]},
    {**GOOD, "Sensor3": float("inf")},
    dict(GOOD),
    [GOOD],
    "x",
    7,
]


def test_a_batch_of_usual_messages_with_every_malformed_body_gets_parse_messages_verdicts() -> None:
    """A batch where every message has a device id and the usual content type, as ingestion's and
    the edge's batches do, some with properties (failure events, information), with good bodies
    among every malformed kind: each verdict is parse_message's on the message alone."""
    raws = [case[0] for case in MALFORMED] + [
        body(**{field: value})
        for field in ("CycleTime", "Sensor3", "Sensor21")
        for value in [1, 1.0, 2.5, True, False, None, "x", [1], {}, 0, -1, 1e308, 2**53, 2**53 + 1, 2**64 - 1]
        + [2**64, 10**400, -(10**400), ...]
    ]
    raws = [raw for raw in raws if raw] + [b"[1]", b"{", b'"x"', b"\xff", b"null", b'{"CycleTime": 5}']
    good = [body(CycleTime=cycle, Sensor3=cycle / 7) for cycle in range(1, len(raws) + 1)]
    raws = [raw for pair in zip(good, raws, strict=True) for raw in pair]
    some = [None] * 4 + [
        {"type": FAILURE},
        {"rul_p50": "42.0"},
        {"type": "telemetry"},
        {"type": "reboot"},
        {},
    ]
    for properties, content_type, encoding in itertools.product(
        [[None], [{}], some], [None, "application/json"], [None, "utf-8"]
    ):
        cases = [
            (raw, "Client_001", properties[index % len(properties)], content_type, encoding)
            for index, raw in enumerate(raws)
        ]
        accepted = _agrees_with_parse_message(cases)
        assert len(cases) / 3 < accepted < len(cases)
        # Parsed by the caller: in part (None where it did not), or in whole.
        assert _agrees_with_parse_message(cases, [_parsed(raw) for raw in raws]) == accepted
        cases = [case for case in cases if _loads_or_none(case[0]) is not None]
        every = [orjson.loads(case[0]) for case in cases]
        assert len(cases) > len(good) + 30 and _agrees_with_parse_message(cases, every) > len(cases) / 3

    # Parsed by the caller into objects no JSON parser gives.
    odd = ODD_OBJECTS + [GOOD] * 8
    odd_cases = [(encode_body(GOOD), "Client_001", None, None, None)] * len(odd)
    # Accepted: the good ones, dict(GOOD), the int and float subclasses, and the three that are not
    # dicts (parse_message parses the body instead).
    assert _agrees_with_parse_message(odd_cases, odd) == 8 + 4 + 3


@pytest.mark.parametrize("count", [3, 9])
def test_batch_checks_refuse_columns_of_other_lengths(count: int) -> None:
    columns = [
        [encode_body(GOOD)] * count,
        ["Client_001"] * count,
        [None] * count,
        [None] * count,
        [None] * count,
    ]
    for column in range(5):
        for wrong in (count - 1, count + 1):
            with pytest.raises(ValueError, match="one value per body"):
                check_messages(*columns[:column], columns[column][:1] * wrong, *columns[column + 1 :])
    with pytest.raises(ValueError, match="one value per body"):
        check_messages(*columns, [None] * (count + 1))
    assert check_messages(*columns).valid.all()


def _loads_or_none(raw: bytes | None) -> object:
    try:
        return orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None


def _parsed(raw: bytes | None) -> object:
    """What a transport that parsed the body hands on: the JSON object, or None."""
    value = _loads_or_none(raw)
    return value if isinstance(value, dict) else None


def _fields_table(objects: list, names: tuple[str, ...] = FIELDS) -> tuple[np.ndarray, np.ndarray]:
    table = np.full((len(objects), len(names)), -7.0)
    plain = np.zeros(len(objects), dtype=bool)
    assert _contract.fields_table(objects, names, table, plain) is None
    return table, plain


def test_fields_table_of_plain_bodies_is_what_numpy_makes_of_them() -> None:
    extremes = [
        0,
        -1,
        2**53 + 1,
        2**63,
        2**64 - 1,
        -(2**70) - 1,
        10**300,
        1e308,
        -0.0,
        float("nan"),
        float("inf"),
    ]
    objects = [
        {**GOOD, "CycleTime": cycle, "Sensor3": value, "Sensor21": cycle / 3, "Extra": "ignored"}
        for cycle, value in zip(range(1, 200), itertools.cycle(extremes), strict=False)
    ]
    objects.append(dict.fromkeys(FIELDS, 5))  # every value an int
    table, plain = _fields_table(objects)
    assert plain.all()
    np.testing.assert_array_equal(
        table, np.array([[body[name] for name in FIELDS] for body in objects], dtype=float)
    )
    assert table[:, 0].tolist() == [float(body["CycleTime"]) for body in objects]
    # Other names, in another order; none at all in the batch.
    np.testing.assert_array_equal(
        _fields_table(objects[:3], ("CycleTime", "Sensor2"))[0], [[1, 5], [2, 5], [3, 5]]
    )
    table, plain = _fields_table([])
    assert table.shape == (0, len(FIELDS)) and plain.shape == (0,)


@pytest.mark.parametrize(
    "odd",
    [
        None,
        "x",
        [GOOD],
        tuple(GOOD.items()),
        _Dict(GOOD),
        {name: value for name, value in GOOD.items() if name != "CycleTime"},
        {name: value for name, value in GOOD.items() if name != "Sensor21"},
        {**GOOD, "CycleTime": True},
        {**GOOD, "CycleTime": 17.0},
        {**GOOD, "CycleTime": "17"},
        {**GOOD, "CycleTime": _Int(17)},
        {**GOOD, "CycleTime": 10**400},
        {**GOOD, "Sensor3": True},
        {**GOOD, "Sensor3": False},
        {**GOOD, "Sensor3": None},
        {**GOOD, "Sensor3": "1.0"},
        {**GOOD, "Sensor3": [1.0]},
        {**GOOD, "Sensor3": {"value": 1.0}},
        {**GOOD, "Sensor3": 1 + 0j},
        {**GOOD, "Sensor3": _Int(3)},
        {**GOOD, "Sensor3": _Float(3.5)},
        {**GOOD, "Sensor21": 10**400},
        {**GOOD, "Sensor21": -(10**400)},
        {**GOOD, "Sensor21": 2**1024 - 2**970},  # the smallest that rounds beyond float's maximum
        {**dict.fromkeys(FIELDS, 1), "OperationalSetting1": 10**400, "OperationalSetting2": -(10**400)},
    ],
)
def test_fields_table_flags_a_row_that_is_not_plain_and_keeps_the_others(odd: object) -> None:
    # The largest integer that rounds to a float (float's maximum), and a CycleTime beyond int64.
    before, after = {**GOOD, "Sensor3": 2**1024 - 2**970 - 1}, {**GOOD, "CycleTime": 2**64 - 1}
    table, plain = _fields_table([before, odd, after, odd])
    assert plain.tolist() == [True, False, True, False]
    assert table[1].tolist() == table[3].tolist() == [0.0] * len(FIELDS)
    assert table[0].tolist() == [float(before[name]) for name in FIELDS]
    assert table[2].tolist() == [float(after[name]) for name in FIELDS]


class _Key(str):
    """A key equal to CycleTime, with its hash, whose comparison runs Python code."""

    def __init__(self, action: object) -> None:
        self.action = action

    def __new__(cls, action: object) -> _Key:
        return super().__new__(cls, "CycleTime")

    def __hash__(self) -> int:
        return hash("CycleTime")

    def __eq__(self, other: object) -> bool:
        self.action()
        return str.__eq__(self, other)


def test_fields_table_survives_a_key_that_fails_or_changes_the_batch() -> None:
    values = {name: 1.0 for name in MEASUREMENTS}

    def fail() -> None:
        raise RuntimeError("no comparing")

    with pytest.raises(RuntimeError, match="no comparing"):
        _fields_table([GOOD, {_Key(fail): 3, **values}])

    # A key that empties the batch when compared, and one that empties its own body.
    objects: list = []
    emptied: dict = {_Key(lambda: emptied.clear()): 3, **values}
    objects += [GOOD, {_Key(objects.clear): 3, **values}, emptied, GOOD]
    table, plain = _fields_table(objects)  # its own copy of the list: the rows as given
    assert objects == [] and emptied == {} and plain.tolist() == [True, True, False, True]
    assert table[1].tolist() == [3.0, *values.values()]
    assert table[0].tolist() == table[3].tolist() == [float(GOOD[name]) for name in FIELDS]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ((), TypeError, "takes exactly 4 arguments|expected 4 arguments|function takes"),
        (((GOOD,), FIELDS), TypeError, "must be list"),
        (([GOOD], list(FIELDS)), TypeError, "must be tuple"),
        (([GOOD], ()), ValueError, "at least one name"),
        (([GOOD], ("CycleTime", 3)), TypeError, "names must be str"),
        (([GOOD], ("CycleTime", _Key(print))), TypeError, "names must be str"),
        (([GOOD], FIELDS, np.zeros((1, len(FIELDS)), np.float32)), TypeError, "format 'd'"),
        (([GOOD], FIELDS, np.zeros((1, len(FIELDS)), np.int64)), TypeError, "format 'd'"),
        (([GOOD], FIELDS, np.zeros((2, len(FIELDS)))), ValueError, "expected 25 items"),
        (([GOOD], FIELDS, np.zeros((1, len(FIELDS) - 1))), ValueError, "expected 25 items"),
        (([GOOD], FIELDS, np.zeros((len(FIELDS), 2)).T[:1]), TypeError, "C-contiguous"),
        (([GOOD], FIELDS, bytes(8 * len(FIELDS))), TypeError, "writable"),
        (([GOOD], FIELDS, _read_only(np.zeros((1, len(FIELDS))))), TypeError, "writable"),
        (([GOOD], FIELDS, None), TypeError, "writable"),
        (([GOOD], FIELDS, np.zeros((1, len(FIELDS))), np.zeros(1, np.uint8)), TypeError, "format '\\?'"),
        (([GOOD], FIELDS, np.zeros((1, len(FIELDS))), np.zeros(2, bool)), ValueError, "expected 1 items"),
        (([GOOD], FIELDS, np.zeros((1, len(FIELDS))), bytearray(1)), TypeError, "format '\\?', not 'B'"),
    ],
)
def test_fields_table_refuses_a_bad_call(arguments: tuple, error: type[Exception], message: str) -> None:
    defaults = ([GOOD], FIELDS, np.zeros((1, len(FIELDS))), np.zeros(1, dtype=bool))
    with pytest.raises(error, match=message):
        _contract.fields_table(*arguments, *defaults[len(arguments) :] if arguments else ())
    assert _fields_table([GOOD])[1].tolist() == [True]  # and it still works


def test_fields_table_keeps_no_reference() -> None:
    huge, big, name = 10**400, 2**80 + 1, "Sensor9"
    objects = [{**GOOD, "Sensor9": big}, {**GOOD, "Sensor9": huge}, {**GOOD, "CycleTime": True}, None]
    names = (*FIELDS[:-1], name)
    table, plain = np.zeros((len(objects), len(names))), np.zeros(len(objects), dtype=bool)
    watched = [huge, big, name, names, table, plain, *objects[:3]]  # None's count moves on its own
    counts = [sys.getrefcount(value) for value in watched]
    for _ in range(100):
        _contract.fields_table(objects, names, table, plain)
        with pytest.raises(ValueError):
            _contract.fields_table(objects, names, table, plain[:1])
    assert [sys.getrefcount(value) for value in watched] == counts
    assert plain.tolist() == [True, False, False, False]
