"""The telemetry message contract: what a device sends, and why a message is refused.

A telemetry body is a JSON object with `CycleTime` (positive integer) and the three
operational settings and 21 sensors as finite numbers, sent with content type
`application/json` and encoding `utf-8`. A failure event carries the property
`type=failure` and the body `{"CycleTime": N}`. The device id is the IoT identity,
never a body field. Unknown body fields are ignored so newer devices keep working.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from turbofan_core import _contract

OPERATIONAL_SETTINGS: tuple[str, ...] = tuple(f"OperationalSetting{i}" for i in range(1, 4))
SENSORS: tuple[str, ...] = tuple(f"Sensor{i}" for i in range(1, 22))
MEASUREMENTS: tuple[str, ...] = OPERATIONAL_SETTINGS + SENSORS
FIELDS: tuple[str, ...] = ("CycleTime", *MEASUREMENTS)

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"
TYPE_PROPERTY = "type"
FAILURE = "failure"
TELEMETRY = "telemetry"

_NUMBER = (int, float)
MAX_CYCLE = 2**63 - 1  # the warehouse stores cycles as BIGINT


class InvalidMessage(ValueError):
    """A message that breaks the contract; `reason` says which rule, for the quarantine."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """A valid message: telemetry (all FIELDS) or a failure event (CycleTime only)."""

    device_id: str
    kind: str
    cycle: int
    measurements: tuple[float | int, ...]  # in MEASUREMENTS order; empty for a failure event


def _cycle(body: Mapping[str, object]) -> int:
    if "CycleTime" not in body:
        raise InvalidMessage("missing field CycleTime")
    cycle = body["CycleTime"]
    if isinstance(cycle, bool) or not isinstance(cycle, _NUMBER):
        raise InvalidMessage(f"CycleTime must be a positive integer, got {type(cycle).__name__} {cycle!r}")
    if isinstance(cycle, float) and not cycle.is_integer() or cycle < 1:
        raise InvalidMessage(f"CycleTime must be a positive integer, got {cycle!r}")
    if cycle > MAX_CYCLE:
        raise InvalidMessage(f"CycleTime {cycle!r} is too large (at most {MAX_CYCLE})")
    return int(cycle)


_PLAIN_NUMBERS = {float, int}
_take_measurements = operator.itemgetter(*MEASUREMENTS)


def _measurements(body: Mapping[str, object]) -> tuple[float | int, ...]:
    try:  # the usual message, in a few C-level passes: every field there, plain, and finite
        values = _take_measurements(body)
        # Summed as floats: each value converted on its own, so one beyond a float's range raises
        # (an exact integer sum could cancel it out).
        if set(map(type, values)) <= _PLAIN_NUMBERS and math.isfinite(sum(values, 0.0)):
            return values
    except (KeyError, OverflowError):  # the field by field checks below name the reason
        pass
    for name in MEASUREMENTS:
        if name not in body:
            raise InvalidMessage(f"missing field {name}")
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            raise InvalidMessage(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if isinstance(value, int):
            try:  # JSON allows any integer; stored as a float (rounded, as numpy rounds it)
                float(value)
            except OverflowError:
                raise InvalidMessage(f"{name} is an integer beyond a float's range") from None
        if math.isnan(value):
            raise InvalidMessage(f"{name} is NaN")
        if math.isinf(value):
            raise InvalidMessage(f"{name} is infinite")
    return tuple(body[name] for name in MEASUREMENTS)


def _json_object(body: bytes | None, parsed: object = None) -> dict[str, object]:
    if body is None or body == b"":
        raise InvalidMessage("empty body")
    if isinstance(parsed, dict):
        return parsed
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson refuses NaN/Infinity literals; the standard parser reads them so the
        # reason can name the field instead of blaming the whole body.
        try:
            parsed = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidMessage("body is not valid UTF-8") from None
        except ValueError as error:
            raise InvalidMessage(f"body is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise InvalidMessage(f"body is not a JSON object but a JSON {type(parsed).__name__}")
    return parsed


def parse_message(
    body: bytes | None,
    device_id: str | None,
    properties: Mapping[str, str],
    content_type: str | None = CONTENT_TYPE,
    content_encoding: str | None = CONTENT_ENCODING,
    parsed: object = None,
) -> Message:
    """Validate one message as it arrived; raise InvalidMessage with a precise reason.

    `parsed` may give what orjson.loads gave for `body`, so it is not parsed again."""
    if not device_id:
        raise InvalidMessage("no device id (connectionDeviceId is missing)")
    if content_type is not None and content_type.split(";")[0].strip().lower() != CONTENT_TYPE:
        raise InvalidMessage(f"content type {content_type!r} is not {CONTENT_TYPE!r}")
    if content_encoding is not None and content_encoding.strip().lower() not in ("utf-8", "utf8"):
        raise InvalidMessage(f"content encoding {content_encoding!r} is not {CONTENT_ENCODING!r}")
    kind = properties.get(TYPE_PROPERTY, TELEMETRY)
    if kind not in (TELEMETRY, FAILURE):
        raise InvalidMessage(f"unknown message type {kind!r} (expected {TELEMETRY!r} or {FAILURE!r})")
    parsed = _json_object(body, parsed)
    cycle = _cycle(parsed)
    if kind == FAILURE:
        return Message(device_id, FAILURE, cycle, ())
    return Message(device_id, TELEMETRY, cycle, _measurements(parsed))


@dataclass(frozen=True)
class CheckedMessages:
    """The verdicts on a batch of messages, one array row per message, in input order."""

    valid: np.ndarray  # bool
    failure: np.ndarray  # bool: a valid failure event
    cycles: np.ndarray  # int64; 0 where refused
    measurements: np.ndarray  # float64 (messages, len(MEASUREMENTS)); NaN where none
    reasons: dict[int, str]  # refused message's index -> why


# The FIELDS of each of a batch's bodies, taken without parsing them: a float64 row each, and
# whether it is plain (`_contract.fields_table` says what that is; zeros where it is not).
Fields = tuple[np.ndarray, np.ndarray]

_USUAL_CONTENT_TYPES = {CONTENT_TYPE, None}
_USUAL_ENCODINGS = {CONTENT_ENCODING, None}
_EXACT_IN_FLOAT = 2**53  # a larger CycleTime is left to parse_message, which keeps it exact
# From this many messages the column checks pay off; below, numpy's fixed costs (about 50 µs a
# call) outweigh checking each message with parse_message (about 10 µs), as for an edge's single
# messages.
_COLUMNS_FROM = 8


def _loads(body: bytes) -> object:
    """What orjson.loads gives for `body`; None (not plain: parse_message names why) if it refuses it."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _usual(
    bodies: Sequence[bytes | None],
    device_ids: Sequence[str | None],
    properties: Sequence[Mapping[str, str] | None],
    content_types: Sequence[str | None],
    content_encodings: Sequence[str | None],
) -> list[bool]:
    """Whether each message is one the column path may take (else parse_message will): the usual
    message, with a device id, no `type` property but telemetry's (other properties are information),
    a body, the usual content type and encoding."""
    messages = zip(bodies, device_ids, properties, content_types, content_encodings, strict=True)
    return [
        bool(device_id)
        and (not props or props.get(TYPE_PROPERTY, TELEMETRY) == TELEMETRY)
        and bool(body)
        and content_type in _USUAL_CONTENT_TYPES
        and encoding in _USUAL_ENCODINGS
        for body, device_id, props, content_type, encoding in messages
    ]


def check_messages(
    bodies: Sequence[bytes | None],
    device_ids: Sequence[str | None],
    properties: Sequence[Mapping[str, str] | None],
    content_types: Sequence[str | None],
    content_encodings: Sequence[str | None],
    parsed: Sequence[object] | None = None,
    fields: Fields | None = None,
) -> CheckedMessages:
    """Validate a batch of messages, with parse_message's verdicts and reasons.

    `parsed` may give bodies a caller already parsed (what orjson.loads gives for the body; None
    where it did not), so they are not parsed twice; `fields` may give the FIELDS of every body,
    taken already from its JSON text as `_contract.fields_table` takes them from parsed bodies (the
    edge's batch splitter does), so the bodies are not parsed at all unless they are refused.

    Ingestion validates every message, so the usual telemetry message (a device id, no `type`
    property but telemetry's, the usual content type, a JSON body holding every field as a plain
    number) is checked a column at a time: the fields taken and their types checked by
    `_contract.fields_table` (C), NaN, infinity and cycle ranges in numpy. Anything else, and
    every message of a batch under _COLUMNS_FROM, goes through parse_message, which names the reason.
    """
    count = len(bodies)
    if parsed is None:
        parsed = [None] * count
    if any(
        len(column) != count for column in (device_ids, properties, content_types, content_encodings, parsed)
    ):
        raise ValueError("every column of check_messages needs one value per body")

    valid = np.zeros(count, dtype=bool)
    cycles = np.zeros(count, dtype=np.int64)
    measurements = np.full((count, len(MEASUREMENTS)), np.nan)
    others: Iterable[int] = range(count)
    if count >= _COLUMNS_FROM or fields is not None:
        usual = _usual(bodies, device_ids, properties, content_types, content_encodings)
        if fields is None:
            table = np.empty((count, len(FIELDS)))
            plain = np.empty(count, dtype=bool)
            objects = [
                (_loads(body) if value is None else value) if take else None
                for body, value, take in zip(bodies, parsed, usual, strict=True)
            ]
            _contract.fields_table(objects, FIELDS, table, plain)
        else:
            table, plain = fields
            if table.shape != (count, len(FIELDS)) or plain.shape != (count,):
                raise ValueError("fields must hold a row of FIELDS and a plain flag per body")
            if table.dtype != np.float64 or plain.dtype != np.bool_:
                raise ValueError("fields must be float64 rows and bool flags")
            plain = plain & np.array(usual, dtype=bool)
        accept = plain & np.isfinite(table).all(axis=1) & (table[:, 0] >= 1) & (table[:, 0] < _EXACT_IN_FLOAT)
        valid[accept] = True
        cycles[accept] = table[accept, 0]
        measurements[accept] = table[accept, 1:]
        others = np.flatnonzero(~accept).tolist()

    failure = np.zeros(count, dtype=bool)
    reasons: dict[int, str] = {}
    for index in others:
        try:
            message = parse_message(
                bodies[index],
                device_ids[index],
                properties[index] or {},
                content_types[index],
                content_encodings[index],
                parsed[index],
            )
        except InvalidMessage as error:
            reasons[index] = error.reason
            continue
        valid[index] = True
        cycles[index] = message.cycle
        if message.kind == FAILURE:
            failure[index] = True
        else:
            measurements[index] = message.measurements
    return CheckedMessages(valid, failure, cycles, measurements, reasons)


def encode_body(values: Mapping[str, float | int]) -> bytes:
    """Serialise a telemetry or failure body the way devices send it."""
    return orjson.dumps({name: values[name] for name in FIELDS if name in values})


# Physically possible values (C-MAPSS units: °R, psia, rpm, lbm/s), wide enough for every
# flight condition of the six C-MAPSS subsets; a value outside means a broken sensor or feed.
PHYSICAL_RANGES: dict[str, tuple[float, float]] = {
    "OperationalSetting1": (-0.1, 45.0),  # altitude, kft (near 0 in FD001, normalised)
    "OperationalSetting2": (-0.1, 1.0),  # Mach number
    "OperationalSetting3": (0.0, 110.0),  # throttle resolver angle, %
    **{s: (300.0, 3000.0) for s in ("Sensor1", "Sensor2", "Sensor3", "Sensor4")},  # temperatures
    **{s: (0.0, 1000.0) for s in ("Sensor5", "Sensor6", "Sensor7", "Sensor11")},  # pressures
    **{s: (0.0, 20000.0) for s in ("Sensor8", "Sensor9", "Sensor13", "Sensor14", "Sensor18", "Sensor19")},
    "Sensor10": (0.5, 3.0),  # engine pressure ratio
    "Sensor12": (0.0, 1000.0),  # fuel flow / Ps30
    "Sensor15": (0.0, 20.0),  # bypass ratio
    "Sensor16": (0.0, 0.1),  # burner fuel-air ratio
    "Sensor17": (0.0, 1000.0),  # bleed enthalpy
    "Sensor20": (0.0, 200.0),  # HPT coolant bleed
    "Sensor21": (0.0, 200.0),  # LPT coolant bleed
}
