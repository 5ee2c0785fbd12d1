"""`_batch.split` (C) against what orjson and the contract's `fields_table` make of the same text.

The edge's REST endpoint splits a gateway's batch with it instead of parsing the batch: it must
refuse exactly the JSON orjson refuses, take the same fields with the same values, and find each
item's credential, message id, properties and body as they were sent.
"""

from __future__ import annotations

import random
import struct
import sys

import numpy as np
import orjson
import pytest

from edge_module import _batch
from edge_module.telemetry_endpoint import _properties
from turbofan_core import _contract
from turbofan_core.telemetry import FIELDS

ENVELOPE = ("body", "properties", "messageId", "authorization")


def reference(text: bytes) -> tuple[list, np.ndarray, np.ndarray] | None:
    """What the endpoint made of a batch before `_batch.split`: orjson's parse, the envelope checks
    and `fields_table` over the bodies; None if orjson refuses the text."""
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    assert isinstance(parsed, list)
    items, bodies = [], []
    for index, item in enumerate(parsed):
        if not isinstance(item, dict):
            raise ValueError(f"a batch holds JSON objects (bodies or envelopes); item {index} is not one")
        if "body" not in item:
            items.append((None, item, {}, None))
            bodies.append(item)
            continue
        properties = item.get("properties") or {}
        message_id, token = item.get("messageId"), item.get("authorization")
        if not isinstance(properties, dict):
            raise ValueError(f"item {index}: properties must be a JSON object")
        if message_id is not None and not isinstance(message_id, str):
            raise ValueError(f"item {index}: messageId must be a string")
        if token is not None and not isinstance(token, str):
            raise ValueError(f"item {index}: authorization must be a string")
        items.append((token, item["body"], {str(k): str(v) for k, v in properties.items()}, message_id))
        bodies.append(item["body"])
    table = np.empty((len(bodies), len(FIELDS)))
    plain = np.empty(len(bodies), dtype=bool)
    _contract.fields_table(bodies, FIELDS, table, plain)
    return items, table, plain


def outcome(function, text: bytes) -> object:
    try:
        return function(text)
    except ValueError as error:
        return ("refused", str(error))


def assert_same(text: bytes) -> None:
    """split(text) is reference(text): refusals, and each item's parts, row and plain flag."""
    expected = outcome(reference, text)
    got = outcome(lambda t: _batch.split(t, FIELDS), text)
    if expected is None or isinstance(expected, tuple) and expected[0] == "refused":
        assert got == expected, text
        return
    assert got is not None, text
    items, table, plain = expected
    split_items, split_table, split_plain = got
    assert len(split_items) == len(items), text
    rows = np.frombuffer(split_table).reshape(len(items), len(FIELDS))
    assert (np.frombuffer(split_plain, dtype=bool) == plain).all(), text
    # bit for bit, so -0.0 and 0.0 differ
    assert rows.tobytes() == table.tobytes(), (text, rows[rows != table], table[rows != table])
    for (token, body, properties, message_id), (s_token, s_body, s_properties, s_id) in zip(
        items, split_items, strict=True
    ):
        assert (s_token, s_id) == (token, message_id), text
        assert text.find(s_body) >= 0, "a body is forwarded as the bytes sent"
        depth = sys.getrecursionlimit()
        sys.setrecursionlimit(4 * depth)  # bodies nested a thousand deep are compared too
        try:
            assert orjson.loads(s_body) == body, text
        finally:
            sys.setrecursionlimit(depth)
        assert (_properties(s_properties) if s_properties else {}) == properties, text


BODY = {"CycleTime": 7, **{name: 500.0 + index / 8 for index, name in enumerate(FIELDS[1:])}}


@pytest.mark.parametrize(
    "text",
    [
        b"[]",
        b" [ ] \n",
        b"[{}]",
        b"[1, 2]",
        b'[{"body": {}}, 3]',
        b"[" + orjson.dumps(BODY) + b"]",
        orjson.dumps([{"body": BODY, "messageId": "m", "authorization": "SharedAccessSignature sr=a%2Fb"}]),
        orjson.dumps([{"body": BODY, "messageId": 5}]),
        orjson.dumps([{"body": BODY, "messageId": None, "authorization": None, "properties": None}]),
        orjson.dumps([{"body": BODY, "authorization": ["x"]}]),
        orjson.dumps([{"body": BODY, "properties": "x"}, {"body": BODY, "messageId": 1}]),
        orjson.dumps([{"body": BODY, "messageId": 1}, {"body": BODY, "properties": "x"}]),
        orjson.dumps(
            [{"body": BODY, "properties": {"type": "failure", "n": 1, "f": 1.5, "b": True, "z": None}}]
        ),
        *(
            b'[{"body": {}, "properties": %s}]' % falsy
            for falsy in (b"0", b"-0.0", b"0e7", b"1e-400", b'""', b"[]", b"[ ]", b"{}", b"{ }", b"false")
        ),
        *(b'[{"body": {}, "properties": %s}]' % truthy for truthy in (b"1", b"0.5", b'" "', b"[0]", b"true")),
        b'[{"body": 5}]',
        b'[{"body": "text"}]',
        b'[{"body": null, "messageId": "a"}]',
        b'[{"body": {"CycleTime": 1}, "body": ' + orjson.dumps(BODY) + b"}]",  # the last body counts
        b'[{"body": ' + orjson.dumps(BODY) + b', "body": {"CycleTime": 1}}]',
        orjson.dumps([{**BODY, "CycleTime": 7.0}]),
        orjson.dumps([{**BODY, "CycleTime": True}]),
        orjson.dumps([{**BODY, "Sensor3": "1"}]),
        orjson.dumps([{**BODY, "Sensor3": None}]),
        orjson.dumps([{**BODY, "Sensor3": {"a": [1, 2]}}]),
        orjson.dumps([{k: v for k, v in BODY.items() if k != "Sensor21"}]),
        orjson.dumps([{**BODY, "extra": [1, {"b": "c"}], "properties": 5, "messageId": 6}]),
        orjson.dumps([{**BODY, "CycleTime": 2**63 - 1}]),
        orjson.dumps([{**BODY, "CycleTime": 2**64 - 1}]),
        orjson.dumps([{**BODY, "CycleTime": -3, "Sensor2": -0.0}]),
        b'[{"CycleTime": 18446744073709551616, "Sensor1": 1}]',
        b'[{"CycleTime": -0, "Sensor1": -0, "Sensor2": -0.0, "Sensor3": 0e5, "Sensor4": -0E-5}]',
        b'[{"Sensor1": 1e400}]',
        b'[{"Sensor1": -1e400}]',
        b'[{"Sensor1": 1' + b"0" * 400 + b"}]",
        b'[{"Sensor1": 1' + b"0" * 300 + b"}]",
        b'[{"Sensor1": 0.' + b"0" * 400 + b"1}]",
        b'[{"Sensor1": 123456789012345678901234567890e-10}]',
        b'[{"Sensor1": 9007199254740993, "Sensor2": 9007199254740993.0, "Sensor3": 2.2250738585072011e-308}]',
        b'[{"Sensor1": 01}]',
        b'[{"Sensor1": 1.}]',
        b'[{"Sensor1": .5}]',
        b'[{"Sensor1": +1}]',
        b'[{"Sensor1": 1e}]',
        b'[{"Sensor1": 0.' + b"0" * 99999 + b"1e1000000}]",  # the exponent is read whole: infinite
        b'[{"Sensor1": 1' + b"0" * 99999 + b"e-1000000}]",
        b'[{"body": {}, "properties": 0.' + b"0" * 99999 + b"1e1000000}]",
        b'[{"body": {}, "properties": 0.' + b"0" * 99999 + b"1e-1000000}]",
        b'[{"Sensor1": NaN}]',
        b'[{"Sensor1": Infinity}]',
        b'[{"Sensor1": 1,}]',
        b"[{},]",
        b"[{}",
        b"[{}]]",
        b"[{}] x",
        b"\xef\xbb\xbf[{}]",
        b"[{}]\x0c",
        b'[{"a":"\t"}]',
        b'[{"a":"\x7f\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"}]',
        b'[{"a":"\xc0\x80"}]',
        b'[{"a":"\xed\xa0\x80"}]',
        b'[{"a":"\xf4\x90\x80\x80"}]',
        b'[{"a":"\xe2\x82"}]',
        b'[{"a":"\\ud83d\\ude00 \\u00e9 \\" \\\\ \\/ \\b \\f \\n \\r \\t \\u0000"}]',
        b'[{"a":"\\ud800"}]',
        b'[{"a":"\\udc00"}]',
        b'[{"a":"\\ud800\\u0041"}]',
        b'[{"a":"\\x"}]',
        b'[{"a":"\\u12"}]',
        b'[{"a":"\\u12G4"}]',
        b'[{"body": {}, "messageId": "\\u00e9\\ud83d\\ude00\\n", "authorization": "a\\/b"}]',
        b'[{"b\\u006fdy": {"Cycle\\u0054ime": 3}, "message\\u0049d": "m"}]',
        b'[{"\\u0062ody": {}, "properties": {"\\u0074ype": "failure"}}]',
        b'[{"body": {}, "messageId": "\xff"}]',
        b"[tru]",
        b"[true, false, null]",
        b"[nul]",
        b"[" * 1023 + b"]" * 1023,
        b"[" * 1024 + b"]" * 1024,
        b"[" * 1025 + b"]" * 1025,
        b'[{"body": ' + b'{"a": ' * 1021 + b"1" + b"}" * 1022 + b"]",
        b'[{"body": ' + b'{"a": ' * 1022 + b"1" + b"}" * 1023 + b"]",
        b'[{"body": {}, "x": ' + b"[" * 1022 + b"]" * 1022 + b"}]",
        b'[{"body": {}, "x": ' + b"[" * 1023 + b"]" * 1023 + b"}]",
    ],
)
def test_split_is_orjson_and_the_contracts_fields_table(text: bytes) -> None:
    assert_same(text)


def _number(rng: random.Random) -> str:
    """A JSON number of the kinds devices send, and the awkward ones."""
    kind = rng.randrange(6)
    if kind == 0:
        return repr(rng.uniform(-2000, 2000))
    if kind == 1:
        return str(rng.randrange(-(10 ** rng.randrange(1, 25)), 10 ** rng.randrange(1, 25)))
    if kind == 2:
        return repr(struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0])
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 30))).lstrip("0") or "0"
    fraction = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 30)))
    exponent = f"{rng.choice('eE')}{rng.choice(['', '+', '-'])}{rng.randrange(0, 330)}"
    sign = rng.choice(["", "-"])
    return sign + [f"{digits}.{fraction}", f"{digits}{exponent}", f"{digits}.{fraction}{exponent}"][kind - 3]


def _key(name: str, rng: random.Random) -> str:
    if rng.random() < 0.05:  # an escaped letter: the same key once parsed
        at = rng.randrange(len(name))
        return name[:at] + f"\\u{ord(name[at]):04x}" + name[at + 1 :]
    return name


def _body(rng: random.Random) -> str:
    names = list(FIELDS)
    if rng.random() < 0.2:
        rng.shuffle(names)
    if rng.random() < 0.1:
        names.remove(rng.choice(names))
    if rng.random() < 0.1:
        names.insert(rng.randrange(len(names) + 1), rng.choice(FIELDS))  # a repeated key
    space = rng.choice(["", " ", "\n\t "])
    pairs = []
    for name in names:
        value = (
            _number(rng) if rng.random() < 0.97 else rng.choice(['"1"', "null", "true", "[1]", '{"a": 2}'])
        )
        if name == "CycleTime" and rng.random() < 0.9:
            value = str(rng.randrange(1, 400))
        pairs.append(f'"{_key(name, rng)}"{space}:{space}{value}')
    if rng.random() < 0.2:
        pairs.insert(rng.randrange(len(pairs) + 1), '"note": {"k": ["\\u00e9", 1.5, null]}')
    return "{" + f",{space}".join(pairs) + "}"


def _item(rng: random.Random) -> str:
    body = _body(rng)
    if rng.random() < 0.2:
        return body
    parts = [f'"{_key("body", rng)}": {body}']
    if rng.random() < 0.8:
        parts.append(f'"{_key("messageId", rng)}": "dev-{rng.randrange(100)}-\\u00e9-{rng.randrange(10**6)}"')
    if rng.random() < 0.8:
        parts.append(f'"{_key("authorization", rng)}": "SharedAccessSignature sr=h%2Fdevices%2Fd&se=1"')
    if rng.random() < 0.2:
        parts.append(f'"{_key("properties", rng)}": {{"type": "telemetry", "n": {_number(rng)}}}')
    rng.shuffle(parts)
    return "{" + ", ".join(parts) + "}"


def test_random_batches_and_their_corruptions_split_as_orjson_parses_them() -> None:
    """Random batches (numbers of every kind, escaped and repeated keys, whitespace), each also with
    a byte deleted, inserted or changed: the split is orjson's parse, or both refuse the text."""
    rng = random.Random(20261129)
    for _ in range(600):
        text = ("[" + ", ".join(_item(rng) for _ in range(rng.randrange(1, 6))) + "]").encode()
        assert_same(text)
        for _ in range(5):
            at = rng.randrange(1, len(text))
            byte = bytes([rng.choice(b'{}[]",:.-+eE0123456789 \\u\x00\xc3\xff')])
            corrupted = [
                text[:at] + text[at + 1 :],
                text[:at] + byte + text[at:],
                text[:at] + byte + text[at + 1 :],
            ]
            for variant in corrupted:
                if variant.lstrip()[:1] == b"[":  # what the endpoint splits
                    assert_same(variant)


def test_a_refusal_is_its_own_exception_and_names_must_be_distinct() -> None:
    with pytest.raises(_batch.BatchRefused, match="item 1 is not one"):
        _batch.split(b"[{}, 5]", FIELDS)
    assert issubclass(_batch.BatchRefused, ValueError)
    with pytest.raises(ValueError, match="names must be distinct: 'CycleTime' twice") as refused:
        _batch.split(b"[{}]", (*FIELDS, "CycleTime"))
    assert not isinstance(refused.value, _batch.BatchRefused)  # a caller's mistake, not the batch's
