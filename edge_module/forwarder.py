"""Store-and-forward: ship the edge's outbox to the landing zone as IoT Hub capture files.

Each file holds a run of outbox records, whole requests of at least `max_records` records unless
fewer wait, and is named by the store's id and the run's first and last sequence numbers. The run
is pinned in the store before it is sent and deleted from the outbox only once the landing zone
has the file, so a crash or a lost answer at any point leads to a resend of the same records under
the same name, which create-if-absent refuses (NameTaken): the file is already there, and the
records are marked shipped. Nothing is lost and no file is doubled.
The store's id keeps two edges, or one whose state folder was wiped, from ever sharing a name.

While the landing zone is unreachable the records wait in the outbox; attempts back off
exponentially, and records older than the TTL are dropped and counted, as IoT Edge's hub does.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

from edge_module.store import EdgeStore, Queued, Shipment
from turbofan_core.capture import avro_file_of_runs
from turbofan_core.storage import NameTaken, ObjectStore

log = logging.getLogger(__name__)

BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
_SECRET = re.compile(r"(?i)\b(sig|accountkey|sharedaccesssignature|sharedaccesskey)=[^&;\s]+")


def capture_file(queued: Queued) -> bytes:
    """The landing-zone file of outbox requests, in IoT Hub's capture format."""
    return avro_file_of_runs([(queued.count, queued.records)])


def describe(error: BaseException) -> str:
    """One line for health reports: the error's type and first line, with SAS signatures and keys masked."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return _SECRET.sub(r"\1=***", text)[:300]


class Forwarder:
    """Ships the outbox of `store` to `landing`, from a daemon thread (`start`) or by `ship_once`."""

    def __init__(
        self,
        store: EdgeStore,
        landing: ObjectStore,
        hub: str = "turbofan-edge",
        max_records: int = 5000,
        max_age_seconds: float = 5.0,
        ttl_seconds: float = 7200.0,
        clock: Callable[[], float] = time.time,
        poll_seconds: float = 0.1,
    ) -> None:
        self.store = store
        self.landing = landing
        self.hub = hub
        self.max_records = max_records
        self.max_age_seconds = max_age_seconds
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.shipped_records = 0
        self.shipped_files = 0
        self.dropped = 0  # records older than the TTL, never shipped
        self.failures = 0  # failed attempts
        self.last_error: str | None = None  # of the latest failed attempt; kept after a success
        self.backoff_seconds = 0.0  # wait after the latest failure; 0 once an attempt succeeds
        self.retry_at = 0.0  # no attempt before this time (clock), unless forced
        self._lock = threading.Lock()  # one shipment at a time, whoever calls ship_once
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def file_name(self, first_seq: int, last_seq: int) -> str:
        return f"{self.hub}/edge/{self.store.store_id}/{first_seq:012d}-{last_seq:012d}"

    def backlog(self) -> tuple[int, float | None]:
        """Records waiting and when the oldest was queued."""
        return self.store.backlog()

    def ship_once(self, force: bool = False) -> int:
        """Send one file if one is due (or `force`); return how many records left the outbox.

        Due: the pinned file of an earlier attempt, or a backlog of `max_records`, or one whose
        oldest record waited `max_age_seconds`; never during backoff unless forced.
        """
        with self._lock:
            now = self.clock()
            self.dropped += self.store.expire(now - self.ttl_seconds)
            if not force and now < self.retry_at:
                return 0
            shipment = self.store.shipment()
            if shipment is None:
                count, oldest = self.store.backlog()
                due = count >= self.max_records or (
                    oldest is not None and now - oldest >= self.max_age_seconds
                )
                if count == 0 or not (due or force):
                    return 0
                queued = self.store.take(self.max_records)
                if queued is None:  # max_records below 1
                    return 0
                first, last = queued.first_seq, queued.last_seq
                shipment = Shipment(self.file_name(first, last), first, last)
                self.store.begin_shipment(shipment)
            else:
                queued = self.store.take(
                    shipment.last_seq - shipment.first_seq + 1, up_to_seq=shipment.last_seq
                )
                if queued is None:  # all of it expired meanwhile
                    self.store.mark_shipped(shipment.last_seq)
                    return 0
            records = queued.count
            try:
                self.landing.create(shipment.name, capture_file(queued))
            except NameTaken:
                pass  # sent before a crash or a lost answer: the file is there already
            except Exception as error:  # the landing zone's (OSError, AzureError, ...): retry later
                self._failed(error, now)
                return 0
            self.store.mark_shipped(shipment.last_seq)
            self.shipped_records += records
            self.shipped_files += 1
            self.backoff_seconds = 0.0
            self.retry_at = 0.0
            return records

    def _failed(self, error: BaseException, now: float) -> None:
        self.failures += 1
        self.last_error = describe(error)
        self.backoff_seconds = min(BACKOFF_MAX_SECONDS, self.backoff_seconds * 2 or BACKOFF_BASE_SECONDS)
        self.retry_at = now + self.backoff_seconds
        log.warning("forwarding failed, next attempt in %.1f s: %s", self.backoff_seconds, self.last_error)

    def start(self) -> None:
        """Ship from a daemon thread until `stop`."""
        if self._thread is not None:
            raise RuntimeError("the forwarder is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="edge-forwarder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                shipped = self.ship_once()
            except Exception as error:  # the store failed (disk full...): keep the thread, back off
                with self._lock:
                    self._failed(error, self.clock())
                shipped = 0
            if not shipped:  # otherwise more may be due at once (a backlog after an outage)
                self._stopping.wait(self.poll_seconds)

    def stop(self, flush: bool = True) -> None:
        """Stop the thread; with `flush`, one last forced attempt ships what waits (up to max_records)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if flush:
            self.ship_once(force=True)
