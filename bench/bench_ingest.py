"""Ingestion throughput: landing-zone capture files into the DuckDB warehouse.

Generates about 1,000,000 messages of IoT Hub-style Avro files (FD001 train replayed as
48 fleets of 100 engines), ingests them with the pipeline's incremental loader; then a
second batch of as many messages from other devices, with 5% of the first batch delivered
again, into the warehouse that holds the first (duplicate detection and lifetimes work
against stored data); and, in the same run, a naive loader on a sample (record by record
into a growing DataFrame, as the original IoT Edge sample's notebook did). Prints figures;
the last line is JSON.

    .venv/bin/python bench/bench_ingest.py [--messages 1000000] [--naive-sample 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import duckdb
import pandas as pd

from simulator.capture_writer import CaptureWriter
from simulator.replay import replay
from turbofan_core.capture import read_capture
from turbofan_core.cmapss import UNIT, read_cmapss
from turbofan_core.home import Home
from turbofan_core.storage import LocalStore
from turbofan_warehouse.ingest import ingest_new_files


def build_landing_zone(store: LocalStore, train: pd.DataFrame, messages: int, first_unit: int = 0) -> int:
    """Replay enough copies of the fleet to reach `messages`; units are renumbered per copy."""
    copies = max(1, round(messages / len(train)))
    fleets = [train.assign(**{UNIT: train[UNIT] + first_unit + 1000 * copy}) for copy in range(copies)]
    with CaptureWriter(store, hub=f"hub{first_unit}", max_records=50_000) as writer:
        stats = replay(pd.concat(fleets, ignore_index=True), writer)
    return stats.messages + stats.failure_events


def redeliver(store: LocalStore, names: list[str], fraction: float) -> int:
    """Deliver a seeded `fraction` of the records of `names` again, unchanged, in new files."""
    rng = random.Random(0)
    again = [record for name in names for record in read_capture(store.read(name)) if rng.random() < fraction]
    with CaptureWriter(store, hub="redelivered", max_records=50_000) as writer:
        for record in again:
            writer.send(record, record.device_id)
    return len(again)


def naive_load(store: LocalStore, sample: int) -> tuple[int, float]:
    """The baseline: decode each record and append it to a DataFrame one row at a time."""
    frame = pd.DataFrame()
    done = 0
    start = time.perf_counter()
    for name in store.list_names():
        for record in read_capture(store.read(name)):
            row = {"device_id": record.device_id, **json.loads(record.body)}
            frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
            done += 1
            if done == sample:
                return done, time.perf_counter() - start
    return done, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--naive-sample", type=int, default=5_000)
    args = parser.parse_args()
    train = read_cmapss(Home.from_env().cmapss_dir() / "train_FD001.txt")

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        store = LocalStore(Path(tmp) / "landing")
        start = time.perf_counter()
        generated = build_landing_zone(store, train, args.messages)
        files = len(list(store.list_names()))
        size = sum(f.stat().st_size for f in store.root.rglob("*") if f.is_file())
        print(
            f"generated {generated:,} messages in {files} files ({size / 1e6:.0f} MB) "
            f"in {time.perf_counter() - start:.1f} s"
        )

        with duckdb.connect(str(Path(tmp) / "warehouse.duckdb")) as conn:
            start = time.perf_counter()
            report = ingest_new_files(store, conn)
            seconds = time.perf_counter() - start
            again = time.perf_counter()
            rerun = ingest_new_files(store, conn)
            rerun_seconds = time.perf_counter() - again
            assert report.records == generated and rerun.records == 0
            rate = report.records / seconds
            print(
                f"first batch: {report.records:,} messages in {seconds:.2f} s = {rate:,.0f} msgs/s "
                f"({report.telemetry:,} telemetry, {report.failure_events:,} failure events, "
                f"{report.quarantined} quarantined); rerun with nothing new: {rerun_seconds:.2f} s"
            )

            first_files = list(store.list_names())
            second_new = build_landing_zone(store, train, args.messages, first_unit=500)
            second_again = redeliver(store, first_files, 0.05)
            start = time.perf_counter()
            second = ingest_new_files(store, conn)
            second_seconds = time.perf_counter() - start
            assert (second.records, second.duplicates) == (second_new + second_again, second_again)
            second_rate = second.records / second_seconds
            print(
                f"second batch: {second.records:,} messages ({second.duplicates:,} of them duplicates of "
                f"the first, dropped) into a warehouse of {report.records:,} in {second_seconds:.2f} s "
                f"= {second_rate:,.0f} msgs/s"
            )

        naive_done, naive_seconds = naive_load(store, args.naive_sample)
        naive_rate = naive_done / naive_seconds
        print(
            f"naive: {naive_done:,} messages in {naive_seconds:.2f} s = {naive_rate:,.0f} msgs/s "
            f"(on a sample: its cost per row grows with the frame, so this flatters it)"
        )
        machine = f"{os.cpu_count()} cores, {platform.machine()}"
        print(f"ratio: {rate / naive_rate:,.0f}x on {machine}")
        print(
            json.dumps(
                {
                    "messages": report.records,
                    "seconds": round(seconds, 3),
                    "msgs_per_s": round(rate),
                    "naive_msgs_per_s": round(naive_rate),
                    "ratio": round(rate / naive_rate, 1),
                    "second_batch_msgs_per_s": round(second_rate),
                }
            )
        )


if __name__ == "__main__":
    main()
