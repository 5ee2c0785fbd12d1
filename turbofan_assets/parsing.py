"""Validating one capture file, record by record: the CPU-bound half of ingestion.

Kept apart from the warehouse code and light to import (no pandas, no DuckDB), because it
runs in worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import orjson

from turbofan_core.capture import DEVICE_ID, CorruptCaptureFile, read_capture
from turbofan_core.telemetry import FAILURE, MEASUREMENTS, InvalidMessage, parse_message

_NO_MEASUREMENTS = (np.nan,) * len(MEASUREMENTS)


@dataclass
class ParsedFile:
    """One capture file's records, validated, as columns (cheap to send between processes)."""

    name: str
    records: int
    devices: list[str] = field(default_factory=list)
    failure: list[bool] = field(default_factory=list)
    cycles: list[int] = field(default_factory=list)
    measurements: list[tuple[float, ...]] = field(default_factory=list)
    times: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    quarantine: list[tuple] = field(default_factory=list)

    @property
    def failure_events(self) -> int:
        return sum(self.failure)

    @property
    def telemetry(self) -> int:
        return len(self.devices) - self.failure_events

    def ledger_row(self) -> tuple[str, int, int, int, int]:
        return (self.name, self.records, self.telemetry, self.failure_events, len(self.quarantine))


def parse_file(name: str, data: bytes) -> ParsedFile | CorruptCaptureFile:
    """Validate every record of a whole file; an unreadable file comes back as its error."""
    try:
        records = read_capture(data)
    except CorruptCaptureFile as error:
        return error
    parsed = ParsedFile(name, len(records))
    for position, record in enumerate(records):
        system = record.system_properties
        try:
            message = parse_message(
                record.body,
                system.get(DEVICE_ID),
                record.properties,
                system.get("contentType"),
                system.get("contentEncoding"),
            )
        except InvalidMessage as error:
            parsed.quarantine.append(
                (
                    name,
                    position,
                    system.get(DEVICE_ID),
                    record.enqueued_time_utc,
                    orjson.dumps(record.properties).decode(),
                    record.body,
                    error.reason,
                )
            )
            continue
        is_failure = message.kind == FAILURE
        parsed.devices.append(message.device_id)
        parsed.failure.append(is_failure)
        parsed.cycles.append(message.cycle)
        parsed.measurements.append(_NO_MEASUREMENTS if is_failure else message.measurements)
        parsed.times.append(record.enqueued_time_utc)
        parsed.positions.append(position)
    return parsed
