"""Writes device messages the way IoT Hub message routing does: Avro files per partition per minute.

The landing zone must look like a real hub's routing container, so the pipeline can be pointed
at either. Files are created whole through `write_new` and never overwritten, so a reader (or an
interrupted run) only ever sees complete files.
"""

from __future__ import annotations

from datetime import datetime
from types import TracebackType

from turbofan_core.capture import DEFAULT_PARTITIONS, CaptureRecord, capture_name, encode_avro, partition_of
from turbofan_core.storage import ObjectStore, write_new


class CaptureWriter:
    """Buffers records per partition and writes one Avro file per partition per minute window.

    A partition's buffer is written when the next record falls in another minute, when it holds
    `max_records`, on `flush()` and on close (also when closing because of an exception such as
    KeyboardInterrupt: whatever was sent is written whole).
    """

    def __init__(
        self,
        store: ObjectStore,
        hub: str = "turbofan-hub",
        partitions: int = DEFAULT_PARTITIONS,
        max_records: int = 20_000,
    ) -> None:
        if partitions < 1 or max_records < 1:
            raise ValueError("partitions and max_records must be at least 1")
        self.store = store
        self.hub = hub
        self.partitions = partitions
        self.max_records = max_records
        self.files = 0
        self.messages = 0
        self._buffers: dict[int, list[CaptureRecord]] = {}
        self._windows: dict[int, datetime] = {}
        self._partition_of: dict[str, int] = {}

    def send(self, record: CaptureRecord, device_id: str) -> None:
        """Route one record to its device's partition, writing that partition's previous minute first."""
        partition = self._partition_of.get(device_id)
        if partition is None:
            partition = self._partition_of[device_id] = partition_of(device_id, self.partitions)
        window = datetime.fromisoformat(record.enqueued_time_utc).replace(second=0, microsecond=0)
        buffer = self._buffers.setdefault(partition, [])
        if buffer and self._windows[partition] != window:
            self._flush(partition)
        if not buffer:
            self._windows[partition] = window
        buffer.append(record)
        if len(buffer) >= self.max_records:
            self._flush(partition)

    def flush(self) -> None:
        """Write every partition's buffered records now."""
        for partition in sorted(self._buffers):
            self._flush(partition)

    def _flush(self, partition: int) -> None:
        buffer = self._buffers[partition]
        if not buffer:
            return
        name = capture_name(self.hub, partition, self._windows[partition])
        write_new(self.store, name, encode_avro(buffer))
        # Cleared only once the file exists: an interrupted write leaves the records to the next flush.
        self.files += 1
        self.messages += len(buffer)
        buffer.clear()

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
