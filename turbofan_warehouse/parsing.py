"""Validating one capture file: the CPU-bound half of ingestion.

Kept apart from the warehouse code and light to import (no pandas, no DuckDB), because it
runs in worker processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import orjson

from turbofan_core.capture import CaptureColumns, CorruptCaptureFile, read_columns
from turbofan_core.telemetry import check_messages


@dataclass
class ParsedFile:
    """One capture file's valid messages as arrays, and its quarantined records.

    Arrays, not lists of Python objects: a worker process sends this back to the writer,
    and arrays cross a process boundary as plain bytes.
    """

    name: str
    sha256: str  # of the whole file, so a file copied again unchanged is recognised
    records: int
    devices: list[str]
    message_ids: list[str | None]
    failure: np.ndarray  # bool, one per valid message
    cycles: np.ndarray  # int64
    measurements: np.ndarray  # float64, (messages, len(MEASUREMENTS)); NaN for failure events
    times: list[str]
    positions: np.ndarray  # int64, the record's position in the file
    quarantine: list[tuple]


def parse_file(name: str, data: bytes) -> ParsedFile | CorruptCaptureFile:
    """Validate every record of a whole file; an unreadable file comes back as its error."""
    try:
        columns = read_columns(data)
    except CorruptCaptureFile as error:
        return error  # nothing of the file is kept: it is retried whole, or quarantined whole
    checked = check_messages(
        columns.bodies,
        columns.device_ids,
        columns.properties,
        columns.content_types,
        columns.content_encodings,
    )
    positions = np.flatnonzero(checked.valid)
    kept = positions.tolist()
    return ParsedFile(
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        records=len(columns),
        devices=[columns.device_ids[i] for i in kept],
        message_ids=[columns.message_ids[i] for i in kept],
        failure=checked.failure[positions],
        cycles=checked.cycles[positions],
        measurements=checked.measurements[positions],
        times=[columns.enqueued_time_utc[i] for i in kept],
        positions=positions,
        quarantine=quarantine_rows(name, columns, checked.reasons),
    )


def quarantine_rows(name: str, columns: CaptureColumns, reasons: dict[int, str]) -> list[tuple]:
    """`telemetry_quarantine` rows (but the time) for the records at `reasons`' positions: raw, with why."""
    return [
        (
            name,
            position,
            columns.device_ids[position],
            columns.message_ids[position],
            columns.enqueued_time_utc[position],
            orjson.dumps(columns.properties[position] or {}).decode(),
            columns.bodies[position],
            reason,
        )
        for position, reason in reasons.items()
    ]
