"""`turbofan demo`: the whole spine on the embedded default, headless, in one command.

Imports C-MAPSS FD001 into TURBOFAN_HOME when it is not there yet, replays the training
fleet as devices into the landing zone, materialises every asset through the Dagster
instance the UI reads, and prints what happened.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from turbofan_cli import CommandError
from turbofan_cli.dagster_home import ensure_dagster_home
from turbofan_core import cmapss
from turbofan_core.home import Home

TRAIN_FILE = "train_FD001.txt"
DEMO_DUPLICATES = 0.01
DEMO_LATE = 0.2
DEMO_FILE_RECORDS = 1_000  # small files, so that some can arrive late


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--units", default=None, help="train units to replay, e.g. 1-20 (default: all 100)")
    parser.set_defaults(run=run)


def import_data(home: Home) -> Path:
    """Make the state folder self-contained: copy FD001 in (checksums verified) unless it is there."""
    from turbofan_cli.data import check_files, install

    target = home.imported_data
    if not any(check_files(target).values()):
        return target
    source = home.cmapss_dir()
    if source == target:
        raise CommandError(
            f"no C-MAPSS FD001 files in {target}: run `turbofan data fetch` (download from NASA) "
            "or `turbofan data import DIR`, or set CMAPSS_DIR"
        )
    install(source, target)
    print(f"0/3 imported C-MAPSS FD001 from {source} into {target} (sha256 verified)")
    return target


def run(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from simulator.capture_writer import CaptureWriter
    from simulator.replay import replay
    from turbofan_assets.definitions import PIPELINE_JOB, build_definitions
    from turbofan_cli.simulate import parse_units
    from turbofan_core.storage import LocalStore

    home = Home.from_env()
    data = import_data(home)
    ensure_dagster_home(home)
    started = time.monotonic()

    print(f"1/3 replaying {TRAIN_FILE} as devices into {home.landing}", flush=True)
    units = parse_units(args.units) if args.units else None
    # Delivery as a real fleet has it: a few messages twice, a few files late.
    with CaptureWriter(LocalStore(home.landing), max_records=DEMO_FILE_RECORDS, late=DEMO_LATE) as writer:
        stats = replay(cmapss.read_cmapss(data / TRAIN_FILE), writer, units=units, duplicates=DEMO_DUPLICATES)
    print(
        f"    {stats.devices} devices sent {stats.messages:,} messages and "
        f"{stats.failure_events} failure events in {stats.files} files "
        f"({stats.duplicates} delivered twice, {stats.late_files} of the files published late)"
    )

    print(f"2/3 materialising every asset (job {PIPELINE_JOB}) into {home.warehouse}", flush=True)
    definitions = build_definitions(home)
    with DagsterInstance.get() as instance:
        result = definitions.resolve_job_def(PIPELINE_JOB).execute_in_process(
            instance=instance,
            raise_on_error=False,
            # The summary below is the demo's output; warnings and errors still show.
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
    if not result.success:
        print("    the run failed; open the UI (below) to see which step and why", file=sys.stderr)
    _summary(home)
    print(f"3/3 done in {time.monotonic() - started:.0f} s. Browse the lineage and the run:")
    print("    make ui   (or: turbofan ui)  then open http://127.0.0.1:3000")
    return 0 if result.success else 1


def _summary(home: Home) -> None:
    from turbofan_warehouse import registry
    from turbofan_warehouse.snapshot import read_snapshot

    with read_snapshot(home.warehouse) as conn:

        def scalar(sql: str) -> int:
            return conn.execute(sql).fetchone()[0]

        ingested = scalar("SELECT count(*) FROM telemetry")
        duplicates = scalar("SELECT coalesce(sum(duplicates), 0) FROM landing_files")
        quarantined = scalar("SELECT count(*) FROM telemetry_quarantine")
        labelled = scalar("SELECT count(DISTINCT (device_id, lifetime)) FROM rul_labels")
        trajectories = scalar("SELECT count(DISTINCT (device_id, lifetime)) FROM telemetry")
        latest = registry.latest(conn) if registry.exists(conn) else None
        champion = registry.champion(conn) if latest else None
    print(f"    rows ingested:          {ingested:,}")
    print(f"    duplicates dropped:     {duplicates:,}")
    print(f"    records quarantined:    {quarantined:,}")
    print(f"    labelled trajectories:  {labelled} of {trajectories} (the rest are censored)")
    if latest is not None:
        print(f"    latest model:           v{latest.version}, {latest.stage} ({latest.reason})")
    if champion is not None and champion.test_rmse is not None:
        print(
            f"    champion on FD001 test: v{champion.version}, RMSE {champion.test_rmse:.2f}, "
            f"PHM08 {champion.test_phm08:.1f}, p10-p90 coverage {champion.test_coverage_p10_p90:.2f}"
        )
