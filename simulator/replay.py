"""Replays C-MAPSS engines as devices: unit 7 becomes device `Client_007`, one message per cycle.

All selected devices run concurrently, as a fleet does: round k sends the k-th cycle of every
device that still has one. A run-to-failure unit ends with a failure event, which is what later
lets the pipeline label its trajectory with remaining useful life. With `engines_per_device` K > 1
an engine is replaced after its failure: a device flies K units one after another, and devices are
numbered `Client_001`, `Client_002`... in unit order.

Delivery is at least once, as with IoT Hub: each message carries a message id that is the same
whenever it is replayed, a `duplicates` fraction is delivered twice (a device resend) and the
writer can publish a fraction of its files late, so the pipeline meets what a real fleet sends.

Messages go through a `Transport`: a `CaptureWriter` (capture files, as IoT Hub routing writes
them) or an `EdgeClient` (each message posted to the edge module, as devices behind a gateway).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import pandas as pd

from turbofan_core.capture import CaptureRecord, device_message
from turbofan_core.cmapss import UNIT
from turbofan_core.telemetry import FAILURE, FIELDS, TYPE_PROPERTY, encode_body

_FAILURE_PROPERTIES = {TYPE_PROPERTY: FAILURE}


class Transport(Protocol):
    """Where a replay sends: what it needs of a `CaptureWriter`, so an `EdgeClient` can stand in.

    Messages are delivered in "files": `send` returns the number of the device's file a message
    went in, and a copy (`duplicates`) is only resent once `closed_files` has passed it.
    """

    @property
    def files(self) -> int:
        """Files published so far."""

    @property
    def late_files(self) -> int:
        """Files published after a later one."""

    def send(self, record: CaptureRecord, device_id: str) -> int: ...

    def closed_files(self, device_id: str) -> int: ...

    def flush(self) -> None: ...


class UnknownUnits(ValueError):
    """Units were asked for that the file does not hold."""


@dataclass(frozen=True)
class ReplayStats:
    """What a replay sent: `messages` counts telemetry only; failure events and copies are counted apart."""

    devices: int
    messages: int
    failure_events: int
    files: int
    seconds: float
    duplicates: int = 0  # messages of either kind delivered a second time
    late_files: int = 0  # files published after files closed later than them


class ReplayInterrupted(KeyboardInterrupt):
    """Ctrl-C during a replay, carrying what had been sent (and written whole) until then."""

    def __init__(self, stats: ReplayStats) -> None:
        super().__init__(stats)
        self.stats = stats


@dataclass(frozen=True)
class _Engine:
    unit: int
    cycles: list[int]
    bodies: list[bytes]


@dataclass(frozen=True)
class _Device:
    device_id: str
    engines: list[_Engine]

    @property
    def rounds(self) -> int:
        return sum(len(engine.cycles) for engine in self.engines)


@dataclass(frozen=True)
class _Message:
    message_id: str
    body: bytes
    failure: bool


def device_id_of(unit: int) -> str:
    return f"Client_{unit:03d}"


def device_ids(units: Sequence[int], engines_per_device: int = 1) -> list[str]:
    """The devices a replay of `units` (in order) sends as: what the edge's registry must hold."""
    if engines_per_device == 1:
        return [device_id_of(unit) for unit in units]
    return [device_id_of(number) for number in range(1, -(-len(units) // engines_per_device) + 1)]


def planned_messages(rows: int, engines: int, failure_events: bool, duplicates: float) -> tuple[int, int]:
    """(originals, copies) a replay sends: a message per row (and a failure event per engine if
    asked), then `duplicates` of them again."""
    originals = rows + (engines if failure_events else 0)
    return originals, round(duplicates * originals)


def utc_now() -> datetime:
    return datetime.now(UTC)


def select_units(frame: pd.DataFrame, units: Iterable[int] | None = None) -> pd.DataFrame:
    """The rows of `units` (all when None), ordered by unit and cycle; UnknownUnits if any is absent."""
    if units is not None:
        wanted = set(units)
        missing = sorted(wanted - set(frame[UNIT].unique().tolist()))
        if missing:
            raise UnknownUnits(f"units not in the file: {format_units(missing)}")
        frame = frame[frame[UNIT].isin(wanted)]
    return frame.sort_values([UNIT, "CycleTime"], kind="stable")


def format_units(units: Iterable[int]) -> str:
    """Units as compact ranges, e.g. `1-3,7`, for messages people read."""
    parts: list[str] = []
    ordered = sorted(set(units))
    start = 0
    for i, unit in enumerate(ordered):
        if i + 1 == len(ordered) or ordered[i + 1] != unit + 1:
            parts.append(str(ordered[start]) if start == i else f"{ordered[start]}-{unit}")
            start = i + 1
    return ",".join(parts)


def _engines(frame: pd.DataFrame) -> list[_Engine]:
    """Encode every body up front from plain Python lists: per-row pandas access would be 100x slower."""
    columns = [frame[name].tolist() for name in FIELDS]  # keeps each column's int/float type
    engines: dict[int, _Engine] = {}
    for unit, *values in zip(frame[UNIT].tolist(), *columns, strict=True):
        engine = engines.get(unit)
        if engine is None:
            engine = engines[unit] = _Engine(unit, [], [])
        engine.cycles.append(values[0])
        engine.bodies.append(encode_body(dict(zip(FIELDS, values, strict=True))))
    return [engines[unit] for unit in sorted(engines)]


def _devices(engines: list[_Engine], engines_per_device: int) -> list[_Device]:
    """One engine per device keeps the unit's number (`Client_007`); more are numbered by chunk."""
    ids = device_ids([engine.unit for engine in engines], engines_per_device)
    return [
        _Device(device_id, engines[i * engines_per_device : (i + 1) * engines_per_device])
        for i, device_id in enumerate(ids)
    ]


def _rounds(device: _Device, failure_events: bool) -> Iterator[list[_Message]]:
    """What a device sends round by round: a cycle, with the failure event after an engine's last one.

    Message ids are built from the unit and cycle only, so a replay of the same units repeats them.
    """
    for engine in device.engines:
        prefix = f"{device.device_id}-u{engine.unit:03d}"
        for i, (cycle, body) in enumerate(zip(engine.cycles, engine.bodies, strict=True)):
            messages = [_Message(f"{prefix}-c{cycle:04d}", body, False)]
            if failure_events and i + 1 == len(engine.cycles):
                messages.append(_Message(f"{prefix}-failure", encode_body({"CycleTime": cycle}), True))
            yield messages


def replay(
    frame: pd.DataFrame,
    writer: Transport,
    units: Iterable[int] | None = None,
    rate: float | None = None,
    failure_events: bool = True,
    clock: Callable[[], datetime] = utc_now,
    on_message: Callable[[CaptureRecord], None] | None = None,
    engines_per_device: int = 1,
    duplicates: float = 0.0,
    seed: int = 0,
) -> ReplayStats:
    """Send every selected unit's cycles as its device, all devices concurrently, then flush `writer`.

    `rate` is rounds (cycles) per second per device (None: as fast as possible). `clock` stamps
    EnqueuedTimeUtc. `engines_per_device` units fly one after another on each device, the next
    engine's cycle 1 in the round after the previous one's failure event. Exactly
    round(`duplicates` x messages) of the messages, drawn with `seed`, are delivered again with a
    new EnqueuedTimeUtc in the first round after the file of the original is closed (at the end
    at the latest), so a copy never shares a file with its original. `on_message` sees every
    record sent, copies included. On KeyboardInterrupt the messages already sent are written whole
    and ReplayInterrupted (a KeyboardInterrupt) is raised with the stats so far; copies not yet
    sent are dropped, as they never reached the hub.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if engines_per_device < 1:
        raise ValueError(f"engines_per_device must be at least 1, got {engines_per_device}")
    if not 0 <= duplicates < 1:
        raise ValueError(f"duplicates must be a fraction in [0, 1), got {duplicates}")
    start = time.monotonic()
    selected = select_units(frame, units)
    engines = _engines(selected)
    devices = _devices(engines, engines_per_device)
    total, copies_planned = planned_messages(len(selected), len(engines), failure_events, duplicates)
    resent = set(random.Random(seed).sample(range(total), copies_planned))
    pending: dict[str, deque[tuple[int, _Message]]] = {}  # per device: (file of the original, message)
    files_before, late_before = writer.files, writer.late_files
    messages = failures = copies = 0

    def deliver(device_id: str, message: _Message) -> tuple[CaptureRecord, int]:
        """Send `message` now; return its record and the number of the file it went in."""
        properties = _FAILURE_PROPERTIES if message.failure else {}
        record = device_message(device_id, message.body, clock(), properties, message.message_id)
        return record, writer.send(record, device_id)

    def send(device_id: str, message: _Message) -> None:
        nonlocal messages, failures
        index = messages + failures
        record, file = deliver(device_id, message)
        # Counted before the callback, which may raise KeyboardInterrupt: the record is already sent.
        if message.failure:
            failures += 1
        else:
            messages += 1
        if index in resent:
            pending.setdefault(device_id, deque()).append((file, message))
        if on_message is not None:
            on_message(record)

    def resend_closed() -> None:
        """Deliver again the copies whose original is in a closed file (a device's files close in order)."""
        nonlocal copies
        for device_id, held in pending.items():
            while held and held[0][0] < writer.closed_files(device_id):
                record, _ = deliver(device_id, held.popleft()[1])
                copies += 1
                if on_message is not None:
                    on_message(record)

    def stats() -> ReplayStats:
        files = writer.files - files_before
        seconds = time.monotonic() - start
        late = writer.late_files - late_before
        return ReplayStats(len(devices), messages, failures, files, seconds, copies, late)

    try:
        first_round = time.monotonic()
        active = [(device, _rounds(device, failure_events)) for device in devices]
        round_ = 0
        while active:
            if rate is not None:
                time.sleep(max(0.0, first_round + round_ / rate - time.monotonic()))
            resend_closed()
            for device, rounds in active:
                for message in next(rounds):
                    send(device.device_id, message)
            round_ += 1
            active = [(device, rounds) for device, rounds in active if round_ < device.rounds]
        writer.flush()
        resend_closed()  # every original's file is closed now
        writer.flush()
    except KeyboardInterrupt:
        writer.flush()
        raise ReplayInterrupted(stats()) from None
    return stats()
