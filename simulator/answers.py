"""Transports that deliver one message at a time, and the edge's answers as the fleet sees them.

The REST client (`EdgeClient`) gets an answer per request; devices speaking IoT Hub's protocol
through the gateway (`IoTHubSender`) get theirs on their cloud-to-device topic. Both count here,
and both are `AcknowledgedTransport`s.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from types import TracebackType

_KNOWN = ("duplicate", "scored", "accepted_unscored", "failure_event")


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
                self.latest[device_id] = Answer(
                    status, answer["cycle"], rul["p50"], rul["p10"], rul["p90"], answer.get("model_version")
                )
            else:
                self.unscored += status == "accepted_unscored"
                self.latest[device_id] = Answer(status, answer["cycle"])
            self._changed.notify_all()

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
    receiver acknowledged it, so a replay's copies (`duplicates`) go in the next round.
    Subclasses send (calling `_acknowledged` for each message taken) and close."""

    def __init__(self) -> None:
        self.answers = Answers()
        self.sent = 0
        self._taken: dict[str, int] = {}  # device -> messages acknowledged

    def _acknowledged(self, device_id: str) -> int:
        """Count one more message of `device_id` taken; returns its "file" number."""
        number = self._taken.get(device_id, 0)
        self._taken[device_id] = number + 1
        self.sent += 1
        return number

    @property
    def files(self) -> int:
        return self.sent

    @property
    def late_files(self) -> int:
        """Never: each message is acknowledged before the next is sent."""
        return 0

    def closed_files(self, device_id: str) -> int:
        return self._taken.get(device_id, 0)

    def flush(self) -> None:
        """Nothing waits here: a message is sent once acknowledged."""

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
