"""Model benchmark: a C-MAPSS train file in, test figures out, from a fresh state folder.

Replays the training engines (FD001 unless `--train` names another file) as devices into the
landing zone of a new temporary TURBOFAN_HOME, materialises the whole pipeline with the default
training config (regimes and sensors fitted on the training rows, trajectory-grouped CV over
the grid, refit, calibrated p10-p90 quantile model) and reports the new model on the last cycle
of each test engine (`--test`, `--rul`: the reference test fleet's configuration, nothing else
changes). `train_seconds` is model selection and fitting inside `model_candidates`. The last
line is JSON.

    .venv/bin/python bench/bench_model.py
    .venv/bin/python bench/bench_model.py --train ../shared/data/cmapss-fd002/train_FD002.txt \
        --test ../shared/data/cmapss-fd002/test_FD002.txt --rul ../shared/data/cmapss-fd002/RUL_FD002.txt
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=data / "train_FD001.txt")
    parser.add_argument("--test", type=Path, default=data / "test_FD001.txt")
    parser.add_argument("--rul", type=Path, default=data / "RUL_FD001.txt")
    args = parser.parse_args()
    # The fresh home has no imported copy of the data: point it at the one we found.
    os.environ["CMAPSS_DIR"] = str(data)
    fleet = {"test_file": str(args.test.resolve()), "rul_file": str(args.rul.resolve())}
    run_config = {**QUIET, "ops": {"reference_test_fleet": {"config": fleet}}}
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        home = Home(Path(tmp) / "home")
        with CaptureWriter(LocalStore(home.landing)) as writer:
            stats = replay(read_cmapss(args.train), writer)
        print(
            f"replayed {stats.devices} engines of {args.train.name} as devices: {stats.messages:,} messages"
        )

        start = time.perf_counter()
        result = (
            build_definitions(home).resolve_job_def(PIPELINE_JOB).execute_in_process(run_config=run_config)
        )
        pipeline_seconds = time.perf_counter() - start
        metadata = {
            event.asset_key: {
                k: v.value for k, v in event.event_specific_data.materialization.metadata.items()
            }
            for event in result.get_asset_materialization_events()
        }
    training = metadata[AssetKey("model_candidates")]
    features = metadata[AssetKey("training_features")]
    test = metadata[AssetKey("model_evaluation")]
    print(
        f"feature spec fitted on the training rows: {features['operating_regimes']} operating regimes, "
        f"{features['features']} features from the sensors {features['sensors']}"
    )
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
        f"{args.test.name}, last cycle of {test['engines']} engines, truth capped at the label cap: "
        f"RMSE {test['rmse']:.2f}  MAE {test['mae']:.2f}  PHM08 {test['phm08']:.1f}  "
        f"p10-p90 coverage {test['coverage_p10_p90']:.2f}"
    )
    print(
        f"{args.test.name}, uncapped truth: RMSE {test['rmse_uncapped']:.2f}  "
        f"PHM08 {test['phm08_uncapped']:.1f}  p10-p90 coverage {test['coverage_p10_p90_uncapped']:.2f}"
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
    print(test["errors_by_regime"])
    print(test["errors_by_rul_band"])
    print(json.dumps({key: round(value, 3) for key, value in figures.items()}))


if __name__ == "__main__":
    main()
