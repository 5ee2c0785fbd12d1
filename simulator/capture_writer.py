"""Writes device messages the way IoT Hub message routing does: Avro files per partition per minute.

The landing zone must look like a real hub's routing container, so the pipeline can be pointed
at either. Files are created whole through `write_new` and never overwritten, so a reader (or an
interrupted run) only ever sees complete files.

A real landing zone also receives some files late (an upload retried after later files went
through), under the name of their own minute; `late` reproduces that so ingestion meets it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

from turbofan_core.capture import DEFAULT_PARTITIONS, CaptureRecord, capture_name, encode_avro, partition_of
from turbofan_core.storage import ObjectStore, write_new

_LATE_BY_FILES = (1, 3)  # a late file waits for this many (min, max) later files of its partition


@dataclass(frozen=True)
class _Held:
    """A complete file held back to be published late."""

    name: str
    data: bytes
    records: int
    partition: int
    sequence: int  # its place in closing order, all partitions: published after a higher one, it is late
    due: int  # published once its partition has closed this many files


class CaptureWriter:
    """Buffers records per partition and writes one Avro file per partition per minute window.

    A partition's buffer is closed into a file when the next record falls in another minute, when
    it holds `max_records`, on `flush()` and on close (also when closing because of an exception
    such as KeyboardInterrupt: whatever was sent is written whole). A `late` fraction of the files,
    drawn with `seed`, is held back and published after 1-3 later files of its partition, so even a
    reader of one partition sees it appear after a later name; `flush()` and close publish every
    held file, so nothing is lost. A held file is published before a later file of its own name,
    which then takes the `-0001` suffix: the late file keeps its place in name order.
    """

    def __init__(
        self,
        store: ObjectStore,
        hub: str = "turbofan-hub",
        partitions: int = DEFAULT_PARTITIONS,
        max_records: int = 20_000,
        late: float = 0.0,
        seed: int = 0,
    ) -> None:
        if partitions < 1 or max_records < 1:
            raise ValueError("partitions and max_records must be at least 1")
        if not 0 <= late < 1:
            raise ValueError(f"late must be a fraction in [0, 1), got {late}")
        self.store = store
        self.hub = hub
        self.partitions = partitions
        self.max_records = max_records
        self.late = late
        self.files = 0
        self.messages = 0
        self.late_files = 0
        self._random = random.Random(seed)
        self._buffers: dict[int, list[CaptureRecord]] = {}
        self._windows: dict[int, datetime] = {}
        self._closed: dict[int, int] = {}
        self._sequence = 0  # files closed, all partitions
        self._newest_published = -1  # the highest sequence published
        self._partition_of: dict[str, int] = {}
        self._held: list[_Held] = []

    def send(self, record: CaptureRecord, device_id: str) -> int:
        """Route one record to its device's partition, closing that partition's previous minute first.

        Returns the number of the partition's file the record goes in (0, 1, ... in closing order):
        it is in a closed file once `closed_files(device_id)` exceeds that number.
        """
        partition = self._partition(device_id)
        window = datetime.fromisoformat(record.enqueued_time_utc).replace(second=0, microsecond=0)
        buffer = self._buffers.setdefault(partition, [])
        if buffer and self._windows[partition] != window:
            self._flush(partition)
        if not buffer:
            self._windows[partition] = window
        buffer.append(record)
        file = self._closed.get(partition, 0)
        if len(buffer) >= self.max_records:
            self._flush(partition)
        return file

    def closed_files(self, device_id: str) -> int:
        """How many files of `device_id`'s partition are closed (published, or held to be published late)."""
        return self._closed.get(self._partition(device_id), 0)

    def flush(self) -> None:
        """Write every partition's buffered records now, then every held file."""
        for partition in sorted(self._buffers):
            self._flush(partition)
        self._publish_held(lambda held: True)

    def _partition(self, device_id: str) -> int:
        partition = self._partition_of.get(device_id)
        if partition is None:
            partition = self._partition_of[device_id] = partition_of(device_id, self.partitions)
        return partition

    def _flush(self, partition: int) -> None:
        buffer = self._buffers[partition]
        if not buffer:
            return
        name = capture_name(self.hub, partition, self._windows[partition])
        data = encode_avro(buffer)
        self._publish_held(lambda held: held.name == name)
        closed = self._closed.get(partition, 0)
        if self.late and self._random.random() < self.late:
            due = closed + 1 + self._random.randint(*_LATE_BY_FILES)
            self._held.append(_Held(name, data, len(buffer), partition, self._sequence, due))
        else:
            self._publish(name, data, len(buffer), self._sequence)
        # Cleared only once the file exists or is held: an interrupted write leaves them to the next flush.
        buffer.clear()
        self._closed[partition] = closed + 1
        self._sequence += 1
        self._publish_held(lambda held: self._closed[held.partition] >= held.due)

    def _publish(self, name: str, data: bytes, records: int, sequence: int) -> None:
        write_new(self.store, name, data)
        self.files += 1
        self.messages += records
        self._newest_published = max(self._newest_published, sequence)

    def _publish_held(self, chosen: Callable[[_Held], bool]) -> None:
        for held in [held for held in self._held if chosen(held)]:
            late = self._newest_published > held.sequence
            self._publish(held.name, held.data, held.records, held.sequence)
            self._held.remove(held)
            if late:
                self.late_files += 1

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
