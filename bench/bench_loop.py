"""Closed-loop benchmark: from the failure event that completes the Nth trajectory to the edge serving
the model trained on it, split by stage.

Runs `turbofan live` (the edge module, `dagster dev` with its daemon, the simulator streaming FD001
train units through the gateway) on a temporary state folder with the retrain policy at N, waits
until the edge serves model v1, stops it, and reads when each stage happened from what the system
records anyway: the failure event's enqueued time (the edge's clock), the landing file's time, the
Dagster run records of the ingestion and retraining runs, the registry, the deployments table and
the edge's `GET /model`.

The baseline, measured in the same run, is the work itself: the seconds the ingestion and the
retraining runs spent executing. The rest of the latency is waiting between the stages (the edge's
forward age, the sensors' intervals, the run queue). The last line is JSON.

    .venv/bin/python bench/bench_loop.py [--units 12] [--rate 20] [--after 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import duckdb
from dagster import DagsterInstance

from turbofan_core.home import Home

WAIT_SECONDS = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def utc(value: datetime) -> float:
    """Epoch seconds of a naive-UTC (DuckDB) or aware datetime."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def run_live(home: Path, args: argparse.Namespace) -> float:
    """Run the system until the edge serves v1; the epoch time the edge says it loaded it."""
    edge_port = free_port()
    env = {**os.environ, "TURBOFAN_HOME": str(home)}
    env.pop("DAGSTER_HOME", None)
    log = home / "live.out"
    with log.open("wb") as out:
        live = subprocess.Popen(
            [str(Path(sys.executable).parent / "turbofan"), "live", "--units", f"1-{args.units}",
             "--rate", str(args.rate), "--retrain-after", str(args.after),
             "--ui-port", str(free_port()), "--edge-port", str(edge_port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not re.search(r"edge serves model v1\b", log.read_text()):
            if live.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"turbofan live did not get to serving v1:\n{log.read_text()}")
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{edge_port}/model", timeout=10) as response:
            served = json.loads(response.read())
    finally:
        os.killpg(live.pid, signal.SIGINT)
        live.wait(timeout=180)
    print(log.read_text().rstrip())
    return datetime.fromisoformat(served["loaded_at"]).timestamp()


STAGES = {  # key: what the stage is
    "forward": "edge: enqueued to landed (forward age)",
    "pickup": "landing sensor and run queue: landed to ingestion started",
    "ingest": "ingestion run",
    "policy": "automation runs, retrain policy, queue: to the retraining run started",
    "prepare": "retraining run: start, labels, features, reference fleet",
    "train": "retraining run: candidates trained (model_candidates)",
    "gate": "retraining run: promotion gate (champion_model)",
    "deploy": "evaluation, automation: promoted to deployment applied",
    "serve": "edge: applied to serving",
}


def stages(home: Path, after: int, served_at: float) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Each stage's (started, ended) in epoch seconds, when v1 was promoted, and the seconds its
    retraining run took (evaluation included)."""
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        failed_at, source = conn.execute(
            "SELECT enqueued_time_utc, source_file FROM failure_events ORDER BY enqueued_time_utc, device_id "
            "LIMIT 1 OFFSET ?",
            [after - 1],
        ).fetchone()
        ingest_run = conn.execute("SELECT run_id FROM landing_files WHERE name = ?", [source]).fetchone()[0]
        train_run, promoted_at = conn.execute(
            "SELECT run_id, stage_changed_at FROM model_registry WHERE version = 1"
        ).fetchone()
        deployed_at = utc(
            conn.execute(
                "SELECT min(deployed_at) FROM deployments WHERE model_version = 1 AND result = 'applied'"
            ).fetchone()[0]
        )
    landed_at = (home / "landing" / source).stat().st_mtime
    with DagsterInstance.from_config(str(home / "dagster")) as instance:
        ingest = instance.get_run_record_by_id(ingest_run)
        train = instance.get_run_record_by_id(train_run)
        steps = {step.step_key: step for step in instance.get_run_step_stats(train_run)}
    candidates, gate = steps["model_candidates"], steps["champion_model"]
    return (
        {
            "forward": (utc(failed_at), landed_at),
            "pickup": (landed_at, ingest.start_time),
            "ingest": (ingest.start_time, ingest.end_time),
            "policy": (ingest.end_time, train.start_time),
            "prepare": (train.start_time, candidates.start_time),
            "train": (candidates.start_time, candidates.end_time),
            "gate": (candidates.end_time, gate.end_time),
            "deploy": (gate.end_time, deployed_at),
            "serve": (deployed_at, max(served_at, deployed_at)),
        },
        utc(promoted_at),
        train.end_time - train.start_time,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=12)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--after", type=int, default=10, help="the retrain policy's N")
    args = parser.parse_args()
    os.environ.setdefault("CMAPSS_DIR", str(Home.from_env().cmapss_dir()))
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        home = Path(tmp)
        served_at = run_live(home, args)
        rows, promoted_at, retraining = stages(home, args.after, served_at)
    start, end = rows["forward"][0], rows["serve"][1]
    seconds = {key: ended - started for key, (started, ended) in rows.items()}
    work = seconds["ingest"] + retraining
    print(f"\nfrom the failure event completing trajectory {args.after} to the edge serving its model:")
    for key, label in STAGES.items():
        print(f"  {label:<62} {seconds[key]:7.1f} s")
    print(f"  {'total':<62} {end - start:7.1f} s")
    print(f"  (v1 promoted {promoted_at - start:.1f} s after the failure event)")
    ratio = (end - start) / work
    print(f"baseline, the runs' own work (ingestion + retraining): {work:.1f} s; total / work = {ratio:.2f}")
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({
        "seconds": round(end - start, 1), "work_s": round(work, 1), "ratio": round(ratio, 2),
        "stages": {key: round(value, 1) for key, value in seconds.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
