"""Model benchmark: FD001 train in, FD001 test figures out, from a fresh state folder.

Replays NASA's FD001 training engines as devices into the landing zone of a new
temporary TURBOFAN_HOME, materialises the whole pipeline with the default training
config (trajectory-grouped CV over the grid, refit, calibrated p10-p90 quantile model)
and reports the new model on the last cycle of each of the 100 FD001 test engines.
`train_seconds` is model selection and fitting inside `model_candidates`. The last
line is JSON.

    .venv/bin/python bench/bench_model.py
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

from dagster import AssetKey

from simulator.capture_writer import CaptureWriter
from simulator.replay import replay
from turbofan_assets.definitions import PIPELINE_JOB, build_definitions
from turbofan_core.cmapss import read_cmapss
from turbofan_core.home import Home
from turbofan_core.storage import LocalStore

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def main() -> None:
    data = Home.from_env().cmapss_dir()
    # The fresh home has no imported copy of the data: point it at the one we found.
    os.environ["CMAPSS_DIR"] = str(data)
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        home = Home(Path(tmp) / "home")
        with CaptureWriter(LocalStore(home.landing)) as writer:
            stats = replay(read_cmapss(data / "train_FD001.txt"), writer)
        print(f"replayed {stats.devices} FD001 engines as devices: {stats.messages:,} messages")

        start = time.perf_counter()
        result = build_definitions(home).resolve_job_def(PIPELINE_JOB).execute_in_process(run_config=QUIET)
        pipeline_seconds = time.perf_counter() - start
        metadata = {
            event.asset_key: {
                k: v.value for k, v in event.event_specific_data.materialization.metadata.items()
            }
            for event in result.get_asset_materialization_events()
        }
    training = metadata[AssetKey("model_candidates")]
    test = metadata[AssetKey("model_evaluation")]
    print(
        f"selected {training['selected']} by {training['cv_folds']}-fold trajectory-grouped CV: "
        f"RMSE {training['cv_rmse']:.2f} +/- {training['cv_rmse_std']:.2f} "
        f"(ridge baseline {training['baseline_cv_rmse']:.2f})"
    )
    print(
        f"trained in {training['train_seconds']:.1f} s, {training['train_cpu_seconds']:.1f} CPU s "
        f"(whole pipeline {pipeline_seconds:.1f} s) on {os.cpu_count()} cores, {platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"FD001 test, last cycle of {test['engines']} engines, truth capped at the label cap: "
        f"RMSE {test['rmse']:.2f}  MAE {test['mae']:.2f}  PHM08 {test['phm08']:.1f}  "
        f"p10-p90 coverage {test['coverage_p10_p90']:.2f}"
    )
    print(
        f"FD001 test, uncapped truth: RMSE {test['rmse_uncapped']:.2f}  PHM08 {test['phm08_uncapped']:.1f}  "
        f"p10-p90 coverage {test['coverage_p10_p90_uncapped']:.2f}"
    )
    figures = {
        "rmse": test["rmse"],
        "phm08": test["phm08"],
        "mae": test["mae"],
        "coverage_p10_p90": test["coverage_p10_p90"],
        "train_seconds": training["train_seconds"],
        "train_cpu_seconds": training["train_cpu_seconds"],
        "rmse_uncapped": test["rmse_uncapped"],
        "phm08_uncapped": test["phm08_uncapped"],
        "coverage_p10_p90_uncapped": test["coverage_p10_p90_uncapped"],
        "cv_rmse": training["cv_rmse"],
        "pipeline_seconds": pipeline_seconds,
    }
    print(json.dumps({key: round(value, 3) for key, value in figures.items()}))


if __name__ == "__main__":
    main()
