"""The edge's answers as a simulated fleet sees them: each device's latest RUL, and counts by outcome.

The REST client (`EdgeClient`) gets an answer per request; devices speaking IoT Hub's protocol
through the gateway (`IoTHubSender`) get theirs on their cloud-to-device topic. Both count here.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

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
