"""Replays C-MAPSS engines as devices: unit 7 becomes device `Client_007`, one message per cycle.

All selected devices run concurrently, as a fleet does: round k sends cycle k of every device
that still has one. A run-to-failure unit ends with a failure event, which is what later lets
the pipeline label its trajectory with remaining useful life.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd

from simulator.capture_writer import CaptureWriter
from turbofan_core.capture import CaptureRecord, device_message
from turbofan_core.cmapss import UNIT
from turbofan_core.telemetry import FAILURE, FIELDS, TYPE_PROPERTY, encode_body

_FAILURE_PROPERTIES = {TYPE_PROPERTY: FAILURE}


class UnknownUnits(ValueError):
    """Units were asked for that the file does not hold."""


@dataclass(frozen=True)
class ReplayStats:
    """What a replay sent: `messages` counts telemetry only, failure events are counted apart."""

    devices: int
    messages: int
    failure_events: int
    files: int
    seconds: float


class ReplayInterrupted(KeyboardInterrupt):
    """Ctrl-C during a replay, carrying what had been sent (and written whole) until then."""

    def __init__(self, stats: ReplayStats) -> None:
        super().__init__(stats)
        self.stats = stats


@dataclass(frozen=True)
class _Device:
    device_id: str
    bodies: list[bytes]
    last_cycle: int


def device_id_of(unit: int) -> str:
    return f"Client_{unit:03d}"


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


def _devices(frame: pd.DataFrame) -> list[_Device]:
    """Encode every body up front from plain Python lists: per-row pandas access would be 100x slower."""
    columns = [frame[name].tolist() for name in FIELDS]  # keeps each column's int/float type
    bodies: dict[int, list[bytes]] = {}
    last: dict[int, int] = {}
    for unit, *values in zip(frame[UNIT].tolist(), *columns, strict=True):
        bodies.setdefault(unit, []).append(encode_body(dict(zip(FIELDS, values, strict=True))))
        last[unit] = values[0]
    return [_Device(device_id_of(unit), bodies[unit], last[unit]) for unit in sorted(bodies)]


def replay(
    frame: pd.DataFrame,
    writer: CaptureWriter,
    units: Iterable[int] | None = None,
    rate: float | None = None,
    failure_events: bool = True,
    clock: Callable[[], datetime] = utc_now,
    on_message: Callable[[CaptureRecord], None] | None = None,
) -> ReplayStats:
    """Send every selected unit's cycles as its device, all devices concurrently, then flush `writer`.

    `rate` is cycles per second per device (None: as fast as possible). `clock` stamps
    EnqueuedTimeUtc. On KeyboardInterrupt the messages already sent are written whole and
    ReplayInterrupted (a KeyboardInterrupt) is raised with the stats so far.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    start = time.monotonic()
    devices = _devices(select_units(frame, units))
    files_before = writer.files
    messages = failures = 0

    def send(device_id: str, body: bytes, failure: bool) -> None:
        nonlocal messages, failures
        record = device_message(device_id, body, clock(), _FAILURE_PROPERTIES if failure else {})
        writer.send(record, device_id)
        # Counted before the callback, which may raise KeyboardInterrupt: the record is already sent.
        if failure:
            failures += 1
        else:
            messages += 1
        if on_message is not None:
            on_message(record)

    def stats() -> ReplayStats:
        files = writer.files - files_before
        return ReplayStats(len(devices), messages, failures, files, time.monotonic() - start)

    try:
        first_round = time.monotonic()
        active = devices
        cycle = 0
        while active:
            if rate is not None:
                time.sleep(max(0.0, first_round + cycle / rate - time.monotonic()))
            for device in active:
                send(device.device_id, device.bodies[cycle], failure=False)
                if failure_events and cycle + 1 == len(device.bodies):
                    send(device.device_id, encode_body({"CycleTime": device.last_cycle}), failure=True)
            cycle += 1
            active = [device for device in active if cycle < len(device.bodies)]
        writer.flush()
    except KeyboardInterrupt:
        writer.flush()
        raise ReplayInterrupted(stats()) from None
    return stats()
