"""The edge store's cost per message, against a row per message (its format 2) in the same run.

Requests of 500 telemetry messages from 100 devices, message ids random UUIDs as `azure-iot-device`
makes them, on a store already holding `--prefill` messages: `EdgeStore.record` (format 3: one
outbox row and one `accepted` row per request, dedupe and lifetimes in memory), against the same
entries written the way format 2 did (a `seen` row with its time index, a `history` row with its
key and an outbox row per message, the dedupe lookup a join on `seen`). Neither waits for the disk
after a commit; the store's own threads (its WAL sync and checkpointer) run meanwhile, and the
baseline has none, so the comparison favours the baseline. The last line is JSON.

    .venv/bin/python bench/bench_edge_store.py [--requests 60] [--prefill 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import struct
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from edge_module.store import EdgeStore, HistoryEntry
from turbofan_core.capture import device_message, encode_record
from turbofan_core.telemetry import MEASUREMENTS, encode_body

DEVICES = 100
BATCH = 500
_VALUES = struct.Struct(f"={len(MEASUREMENTS)}d")
ROW_PER_MESSAGE = """
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, record BLOB NOT NULL, queued_at REAL NOT NULL);
CREATE TABLE seen (device_id TEXT NOT NULL, message_id TEXT NOT NULL, seen_at REAL NOT NULL,
    PRIMARY KEY (device_id, message_id)) WITHOUT ROWID;
CREATE INDEX seen_at ON seen (seen_at);
CREATE TABLE history (device_id TEXT NOT NULL, message_id TEXT NOT NULL, cycle INTEGER NOT NULL,
    vals BLOB NOT NULL, PRIMARY KEY (device_id, message_id));
"""

Entry = tuple[bytes, HistoryEntry]  # a record Avro-encoded, as the edge records it


def requests(count: int, first_cycle: int) -> list[list[Entry]]:
    """`count` requests of BATCH messages, DEVICES devices each sending BATCH // DEVICES cycles."""
    when = datetime(2026, 11, 28, tzinfo=UTC)
    made = []
    for r in range(count):
        batch = []
        for k in range(BATCH // DEVICES):
            cycle = first_cycle + r * (BATCH // DEVICES) + k
            for d in range(DEVICES):
                device, message_id = f"Bench_{d:03d}", uuid.uuid4().hex
                values = tuple(500.0 + cycle / 7 + d + i for i in range(len(MEASUREMENTS)))
                body = encode_body({"CycleTime": cycle, **dict(zip(MEASUREMENTS, values, strict=True))})
                batch.append((encode_record(device_message(device, body, when, {}, message_id)),
                              HistoryEntry.telemetry(device, message_id, cycle, values)))  # fmt: skip
        made.append(batch)
    return made


def row_per_message(conn: sqlite3.Connection, batch: list[Entry]) -> None:
    """One request the way format 2 stored it (its dedupe lookup included)."""
    keys = [entry.key for _, entry in batch]
    pairs = ", ".join("(?, ?)" for _ in keys)
    conn.execute(
        f"SELECT s.device_id FROM (VALUES {pairs}) AS v JOIN seen AS s "
        "ON s.device_id = v.column1 AND s.message_id = v.column2",
        [part for key in keys for part in key],
    ).fetchall()
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO seen VALUES (?, ?, ?)", [(*key, now) for key in keys])
    conn.executemany(
        "INSERT INTO history VALUES (?, ?, ?, ?)",
        [(e.device_id, e.message_id, e.cycle, _VALUES.pack(*e.values)) for _, e in batch],
    )
    conn.executemany("INSERT INTO outbox (record, queued_at) VALUES (?, ?)", [(r, now) for r, _ in batch])
    conn.execute("COMMIT")


def per_message_us(write, batches: list[list[Entry]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        write(batch)
    return (time.perf_counter() - started) / (len(batches) * BATCH) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--prefill", type=int, default=100_000)
    args = parser.parse_args()
    prefill = requests(args.prefill // BATCH, 1)
    measured = requests(args.requests, 1 + len(prefill) * BATCH // DEVICES)
    with tempfile.TemporaryDirectory(prefix="bench-edge-store-") as tmp:
        conn = sqlite3.connect(Path(tmp) / "rows.sqlite", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")  # the group sync is the same for both: left out
        conn.executescript(ROW_PER_MESSAGE)
        with EdgeStore(Path(tmp) / "edge.sqlite") as store:
            for batch in prefill:
                row_per_message(conn, batch)
                store.record(batch, durable=False)
            baseline = per_message_us(lambda batch: row_per_message(conn, batch), measured)
            ours = per_message_us(lambda batch: store.record(batch, durable=False), measured)
        conn.close()
    print(f"{args.requests} requests of {BATCH} messages, random ids, on {len(prefill) * BATCH:,} stored")
    print(f"a row per message (format 2): {baseline:.2f} µs a message")
    print(f"a row per request (format 3, EdgeStore.record): {ours:.2f} µs a message")
    print(f"ratio: {baseline / ours:.1f}x")
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({"row_per_message_us": round(baseline, 2), "row_per_request_us": round(ours, 2),
                      "ratio": round(baseline / ours, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
