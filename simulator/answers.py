"""Transports that deliver one message at a time, and the edge's answers as the fleet sees them.

The REST client (`EdgeClient`) gets an answer per request; devices speaking IoT Hub's protocol
through the gateway (`IoTHubSender`) get theirs on their cloud-to-device topic. Both count here,
and both are `AcknowledgedTransport`s.
"""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from dataclasses import dataclass
from types import TracebackType

from turbofan_core.capture import CaptureRecord
from turbofan_core.telemetry import FAILURE, TYPE_PROPERTY

_KNOWN = ("duplicate", "scored", "accepted_unscored", "failure_event")
_LATE_BY_MESSAGES = (1, 3)  # a late message waits for this many (min, max) later messages of its device


class UnknownAnswer(ValueError):
    """An answer whose status this simulator does not know (an edge of another version)."""


@dataclass(frozen=True)
class Answer:
    """The edge's latest answer about a device's engine (no RUL: unscored, or its failure event)."""

    status: str
    cycle: int
    p50: float | None = None
    p10: float | None = None
    p90: float | None = None
    model_version: str | None = None


class Answers:
    """Counts by outcome and the latest answer per device; safe to update from several threads."""

    def __init__(self) -> None:
        self.latest: dict[str, Answer] = {}  # per device
        self.refusals: Counter[str] = Counter()  # refusal reason -> messages
        self.answered = self.scored = self.unscored = self.duplicates = self.refused = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def refuse(self, reason: str) -> None:
        with self._lock:
            self.answered += 1
            self.refused += 1
            self.refusals[reason] += 1
            self._changed.notify_all()

    def count(self, device_id: str, answer: dict) -> None:
        """Take one of the edge's JSON answers (`POST /telemetry`'s per-message result)."""
        status = answer.get("status")
        if status == "refused":
            self.refuse(str(answer.get("reason")))
            return
        if status not in _KNOWN:
            raise UnknownAnswer(f"an answer this simulator does not know: {answer}")
        with self._lock:
            self.answered += 1
            if status == "duplicate":  # an older message again: the device's latest answer stands
                self.duplicates += 1
            elif status == "scored":
                self.scored += 1
                rul = answer["rul"]
                version = answer.get("model_version")
                self._update(
                    device_id, Answer(status, answer["cycle"], rul["p50"], rul["p10"], rul["p90"], version)
                )
            else:
                self.unscored += status == "accepted_unscored"
                self._update(device_id, Answer(status, answer["cycle"]))
            self._changed.notify_all()

    def _update(self, device_id: str, answer: Answer) -> None:
        """Keep `answer` as the device's latest, unless it is about a cycle before the latest's (a
        late message) in the same lifetime: a failure event's successor is a new engine's cycle."""
        latest = self.latest.get(device_id)
        if latest is None or latest.status == "failure_event" or answer.cycle >= latest.cycle:
            self.latest[device_id] = answer

    def wait_for(self, count: int, seconds: float) -> bool:
        """Whether `count` answers arrived within `seconds`."""
        with self._changed:
            return self._changed.wait_for(lambda: self.answered >= count, seconds)

    def nearest_failure(self, count: int) -> list[tuple[str, Answer]]:
        """The `count` devices with the lowest RUL estimate."""
        with self._lock:
            scored = [(device, a) for device, a in self.latest.items() if a.p50 is not None]
        return sorted(scored, key=lambda item: item[1].p50)[:count]


class AcknowledgedTransport:
    """A `simulator.replay.Transport` whose every message is its own "file", closed once the
    receiver acknowledged it, so a replay's copies (`duplicates`) go in a later round.

    A `late` fraction of the telemetry, drawn with `seed`, is held back by its device and sent
    after 1-3 of the device's later messages, as a device resending a message that timed out
    after newer ones went through: the receiver meets messages out of order. A failure event is
    never held, and first sends whatever its device holds: a lifetime's messages all precede
    its end. Subclasses send one message now (`_send_now`) and close.
    """

    def __init__(self, late: float = 0.0, seed: int = 0) -> None:
        if not 0 <= late < 1:
            raise ValueError(f"late must be a fraction in [0, 1), got {late}")
        self.answers = Answers()
        self.sent = 0
        self.late = late
        self.late_messages = 0
        self._random = random.Random(seed)
        self._numbered: dict[str, int] = {}  # device -> messages given to send
        self._newest: dict[str, int] = {}  # device -> the highest number sent
        self._held: dict[str, list[tuple[int, int, CaptureRecord]]] = {}  # device -> (due, number, record)

    def send(self, record: CaptureRecord, device_id: str) -> int:
        """Send `record` as `device_id` (once acknowledged), or hold it to send late; returns its
        "file" number, the count of the device's messages before it."""
        number = self._numbered.get(device_id, 0)
        self._numbered[device_id] = number + 1
        held = self._held.setdefault(device_id, [])
        failure = record.properties.get(TYPE_PROPERTY) == FAILURE
        if failure:
            self._send_held(device_id, math.inf)
        if not failure and self.late and self._random.random() < self.late:
            held.append((number + self._random.randint(*_LATE_BY_MESSAGES), number, record))
        else:
            self._send_numbered(record, device_id, number)
        self._send_held(device_id, number)
        return number

    def _send_held(self, device_id: str, now: float) -> None:
        """Send the device's held messages due by its message number `now`."""
        held = self._held.get(device_id, [])
        for item in [item for item in held if item[0] <= now]:
            held.remove(item)
            self._send_numbered(item[2], device_id, item[1])

    def _send_numbered(self, record: CaptureRecord, device_id: str, number: int) -> None:
        self._send_now(record, device_id)
        self.sent += 1
        newest = self._newest.get(device_id, -1)
        self.late_messages += number < newest
        self._newest[device_id] = max(newest, number)

    def _send_now(self, record: CaptureRecord, device_id: str) -> None:
        """Send `record` as `device_id`, returning once the receiver acknowledged it."""
        raise NotImplementedError

    @property
    def files(self) -> int:
        return self.sent

    @property
    def late_files(self) -> int:
        """Messages sent after a later message of their device."""
        return self.late_messages

    def closed_files(self, device_id: str) -> int:
        """The number of the device's oldest message not yet sent: every one below it was acknowledged."""
        held = self._held.get(device_id)
        return min(number for _, number, _ in held) if held else self._numbered.get(device_id, 0)

    def flush(self) -> None:
        """Send every held message."""
        for device_id in list(self._held):
            self._send_held(device_id, math.inf)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> AcknowledgedTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
