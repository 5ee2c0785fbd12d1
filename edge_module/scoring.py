"""Per-device streaming features for the current model, rebuilt exactly from the durable history.

The edge keeps every device's telemetry of its current engine lifetime in its store, so the
state a model needs can always be recomputed: after a restart (lazily, at a device's next
message), after a swap to a model whose feature spec differs, and when a message arrives out
of cycle order (it is placed where it belongs and the lifetime replayed). A duplicate never
reaches here, and a failure event starts the next lifetime from nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from edge_module.store import HistoryEntry
from turbofan_core.features import FeatureSpec, StreamingFeatures
from turbofan_core.telemetry import MEASUREMENTS


class DeviceFeatures:
    """Feature vectors per device for one feature spec; `history(device)` is the stored lifetime."""

    def __init__(self, spec: FeatureSpec, history: Callable[[str], list[HistoryEntry]]) -> None:
        self.spec = spec
        self._history = history
        self._engine = StreamingFeatures(spec)
        self._columns = [MEASUREMENTS.index(name) for name in spec.inputs]
        self._last_cycle: dict[str, int] = {}  # devices whose state is loaded; 0: a new lifetime

    def features(self, entry: HistoryEntry) -> np.ndarray:
        """The feature vector of a telemetry message, given the device's lifetime so far."""
        device = entry.device_id
        if device not in self._last_cycle:
            self._replay(device, self._history(device))
        if entry.cycle > self._last_cycle[device]:
            self._last_cycle[device] = entry.cycle
            return self._engine.update(device, entry.cycle, self._values(entry))
        # Late within its lifetime: replay the lifetime with the message in its place.
        return self._replay(device, [*self._history(device), entry])[entry.cycle]

    def in_order(self, entries: list[HistoryEntry]) -> bool:
        """Whether `entries` (telemetry, arrival order) each follow their device's last cycle, so that
        `features_many` can take them; loads the state of devices not seen since the start."""
        last: dict[str, int] = {}
        for entry in entries:
            device = entry.device_id
            if device not in last:
                if device not in self._last_cycle:
                    self._replay(device, self._history(device))
                last[device] = self._last_cycle[device]
            if entry.cycle <= last[device]:
                return False
            last[device] = entry.cycle
        return True

    def features_many(self, entries: list[HistoryEntry], values: np.ndarray) -> np.ndarray:
        """Feature rows of in-order telemetry from many devices (see `in_order`; `values`: their
        measurements, a row each), in one call that takes them in arrival order: the batch path,
        several times faster per message."""
        devices = [entry.device_id for entry in entries]
        cycles = [entry.cycle for entry in entries]
        vectors = self._engine.update_many(devices, cycles, values[:, self._columns])
        self._last_cycle.update(zip(devices, cycles, strict=True))  # a device's last message wins
        return vectors

    def failure(self, device_id: str) -> None:
        """The engine failed: the next message starts a new lifetime."""
        self._engine.reset(device_id)
        self._last_cycle[device_id] = 0

    def forget(self, device_id: str) -> None:
        """Drop a device's state (its update was not recorded): the next message rebuilds it from history."""
        self._last_cycle.pop(device_id, None)

    def _values(self, entry: HistoryEntry) -> list[float]:
        values = entry.values  # unpacked from the entry's bytes on each read
        return [values[i] for i in self._columns]

    def _replay(self, device: str, entries: Iterable[HistoryEntry]) -> dict[int, np.ndarray]:
        """Rebuild a device's state from its lifetime in cycle order (a repeated cycle counts once,
        the first stored); returns each cycle's feature vector."""
        self._engine.reset(device)
        vectors: dict[int, np.ndarray] = {}
        for entry in sorted(entries, key=lambda e: e.cycle):  # stable: the stored copy of a cycle first
            if entry.cycle not in vectors:
                vectors[entry.cycle] = self._engine.update(device, entry.cycle, self._values(entry))
        self._last_cycle[device] = max(vectors, default=0)
        return vectors
