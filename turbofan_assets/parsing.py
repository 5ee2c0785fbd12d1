"""Validating one capture file, record by record: the CPU-bound half of ingestion.

Kept apart from the warehouse code and light to import (no pandas, no DuckDB), because it
runs in worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from turbofan_core.capture import DEVICE_ID, CorruptCaptureFile, iter_capture
from turbofan_core.telemetry import FAILURE, MEASUREMENTS, InvalidMessage, parse_message

_NO_MEASUREMENTS = (np.nan,) * len(MEASUREMENTS)


@dataclass
class ParsedFile:
    """One capture file's valid messages as arrays, and its quarantined records.

    Arrays, not lists of Python objects: a worker process sends this back to the writer,
    and arrays cross a process boundary as plain bytes.
    """

    name: str
    records: int
    devices: list[str]
    failure: np.ndarray  # bool, one per valid message
    cycles: np.ndarray  # int64
    measurements: np.ndarray  # float64, (messages, len(MEASUREMENTS)); NaN for failure events
    times: list[str]
    positions: np.ndarray  # int64, the record's position in the file
    quarantine: list[tuple]

    @property
    def failure_events(self) -> int:
        return int(self.failure.sum())

    @property
    def telemetry(self) -> int:
        return len(self.devices) - self.failure_events

    def ledger_row(self) -> tuple[str, int, int, int, int]:
        return (self.name, self.records, self.telemetry, self.failure_events, len(self.quarantine))


def parse_file(name: str, data: bytes) -> ParsedFile | CorruptCaptureFile:
    """Validate every record of a whole file; an unreadable file comes back as its error."""
    devices: list[str] = []
    failure: list[bool] = []
    cycles: list[int] = []
    measurements: list[tuple[float, ...]] = []
    times: list[str] = []
    positions: list[int] = []
    quarantine: list[tuple] = []
    interned: dict[str, str] = {}  # one string object per device: cheaper to send
    position = -1
    try:
        for position, record in enumerate(iter_capture(data)):
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
                quarantine.append(
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
            devices.append(interned.setdefault(message.device_id, message.device_id))
            failure.append(is_failure)
            cycles.append(message.cycle)
            measurements.append(_NO_MEASUREMENTS if is_failure else message.measurements)
            times.append(record.enqueued_time_utc)
            positions.append(position)
    except CorruptCaptureFile as error:
        return error  # nothing of the file is kept: it is retried whole on the next run
    return ParsedFile(
        name=name,
        records=position + 1,
        devices=devices,
        failure=np.array(failure, dtype=bool),
        cycles=np.array(cycles, dtype=np.int64),
        measurements=np.array(measurements, dtype=np.float64).reshape(-1, len(MEASUREMENTS)),
        times=times,
        positions=np.array(positions, dtype=np.int64),
        quarantine=quarantine,
    )
