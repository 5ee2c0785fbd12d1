"""Operating regimes: found from the training data (six on FD002, one on FD001), standardisation
fitted on training rows only, carried in the bundle as JSON, far-off settings flagged; and the
same assets training on FD002 replayed as devices as on FD001."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey
from test_bundle import make_bundle, with_rul
from test_training import SMALL_GRID, _values

from simulator.capture_writer import CaptureWriter
from simulator.replay import replay
from turbofan_assets.definitions import PIPELINE_JOB, build_definitions
from turbofan_core.bundle import MANIFEST, read_bundle, write_bundle
from turbofan_core.cmapss import read_cmapss
from turbofan_core.features import (
    DEFAULT_SPEC,
    FD001_SENSORS,
    FeatureSpec,
    NoSignal,
    StreamingFeatures,
    fit_spec,
)
from turbofan_core.home import Home
from turbofan_core.regimes import FAR_SIGMAS, OperatingRegimes
from turbofan_core.storage import LocalStore
from turbofan_core.telemetry import OPERATIONAL_SETTINGS, SENSORS

# FD002's six flight conditions (altitude in kft, Mach number, throttle resolver angle), per its README.
FD002_CONDITIONS = [
    (0, 0.0, 100),
    (10, 0.25, 100),
    (20, 0.7, 100),
    (25, 0.62, 60),
    (35, 0.84, 100),
    (42, 0.84, 100),
]


def train_units(path: Path) -> pd.DataFrame:
    """A train file's units as devices with their capped RUL: the rows training fits on."""
    frame = read_cmapss(path)
    frame["device_id"] = frame.pop("unit").map(lambda unit: f"Client_{unit:03d}")
    frame["lifetime"] = 1
    return with_rul(frame)


@pytest.fixture(scope="module")
def fd002_train(cmapss_fd002_dir: Path) -> pd.DataFrame:
    return train_units(cmapss_fd002_dir / "train_FD002.txt")


@pytest.fixture(scope="module")
def fd002_spec(fd002_train: pd.DataFrame) -> FeatureSpec:
    return fit_spec(fd002_train, "rul")


def test_six_regimes_are_found_on_fd002_and_one_on_fd001(
    fd002_spec: FeatureSpec, cmapss_dir: Path, cmapss_fd002_dir: Path
) -> None:
    regimes = fd002_spec.regimes
    assert regimes is not None and regimes.count == 6
    np.testing.assert_allclose(regimes.centres, FD002_CONDITIONS, atol=0.01)
    # Every test engine flies the same six conditions: each message is placed, none is far.
    test = read_cmapss(cmapss_fd002_dir / "test_FD002.txt")
    nearest, far = regimes.assign(test[list(OPERATIONAL_SETTINGS)].to_numpy())
    assert set(nearest.tolist()) == set(range(6)) and not far.any()

    fd001 = fit_spec(train_units(cmapss_dir / "train_FD001.txt"), "rul")
    assert fd001.regimes is not None and fd001.regimes.count == 1
    # The sensors chosen from the data are the 14 that vary in FD001; FD002 adds two that vary
    # within its conditions (sensor 6, and sensor 16, which is constant on FD001).
    assert fd001.sensors == FD001_SENSORS
    assert set(fd002_spec.sensors) == {*FD001_SENSORS, "Sensor6", "Sensor16"}


def test_each_sensor_is_standardised_within_its_regime_on_training_rows_only(
    fd002_train: pd.DataFrame, fd002_spec: FeatureSpec, cmapss_fd002_dir: Path
) -> None:
    regimes = fd002_spec.regimes
    settings = fd002_train[list(OPERATIONAL_SETTINGS)].to_numpy()
    standardised = regimes.standardise(settings, fd002_train[list(fd002_spec.sensors)].to_numpy())
    nearest, _ = regimes.assign(settings)
    for regime in range(6):
        rows = standardised[nearest == regime]
        np.testing.assert_allclose(rows.mean(axis=0), 0, atol=1e-9)
        spread = rows.std(axis=0)  # 1, or 0 for a sensor constant within this regime
        assert (np.isclose(spread, 1, atol=1e-9) | (spread < 1e-9)).all(), spread
    # Raw, the conditions dominate a sensor; standardised, they no longer separate it.
    raw = fd002_train["Sensor2"].to_numpy()
    assert np.ptp([raw[nearest == r].mean() for r in range(6)]) > 10 * raw[nearest == 0].std()

    # Fitted on the rows it is given and nothing else: the same training rows give the same spec,
    # and test engines' rows would change it (so the pipeline never passes them: see below).
    test = read_cmapss(cmapss_fd002_dir / "test_FD002.txt")
    assert (
        fit_spec(fd002_train, "rul")
        == fd002_spec
        != fit_spec(pd.concat([fd002_train, test.assign(device_id="Test", lifetime=1, rul=125)]), "rul")
    )


def test_a_bundle_carries_its_regimes_as_json_and_scores_the_same_after_a_round_trip(
    fd002_train: pd.DataFrame, fd002_spec: FeatureSpec, tmp_path: Path
) -> None:
    fleet = fd002_train[fd002_train["device_id"] <= "Client_012"].drop(columns="rul")
    bundle = make_bundle(fleet, spec=fd002_spec)
    store = LocalStore(tmp_path)
    name = write_bundle(store, bundle)
    with zipfile.ZipFile(io.BytesIO(store.read(name))) as archive:
        manifest = json.loads(archive.read(MANIFEST))
        assert not [n for n in archive.namelist() if n.endswith((".pkl", ".pickle"))]
    assert OperatingRegimes.from_dict(manifest["feature_spec"]["regimes"]) == fd002_spec.regimes
    loaded = read_bundle(store, bundle.sha256)
    assert loaded.spec == fd002_spec
    pd.testing.assert_frame_equal(loaded.predict(fleet), bundle.predict(fleet))

    # A spec from before regimes reads and writes as it always did.
    old = DEFAULT_SPEC.to_dict()
    assert "regimes" not in old and FeatureSpec.from_dict(old) == DEFAULT_SPEC
    assert DEFAULT_SPEC.regimes is None and DEFAULT_SPEC.inputs == DEFAULT_SPEC.sensors


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"centres": [[0.0, 0.0]]}, "centres must be 1 rows of 3 values"),
        ({"scales": [[0.0] * 16] * 6}, "spreads and scales must be positive"),
        ({"settings": ["OperationalSetting1"]}, "centres must be 6 rows of 1 values"),
        ({"unexpected": 1}, "regimes need exactly the keys"),
    ],
    ids=["short-centre", "zero-scale", "settings", "unknown-key"],
)
def test_malformed_regimes_in_a_bundle_are_refused(
    fd002_spec: FeatureSpec, change: dict, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        FeatureSpec.from_dict({**fd002_spec.to_dict(), "regimes": {**fd002_spec.regimes.to_dict(), **change}})


def test_settings_far_from_every_regime_are_flagged_and_still_scored(
    fd002_train: pd.DataFrame, fd002_spec: FeatureSpec
) -> None:
    regimes = fd002_spec.regimes
    known = fd002_train[list(OPERATIONAL_SETTINGS)].to_numpy()[:3]
    far_off = np.array([[60.0, 0.9, 100.0], [20.0, 0.7, 80.0], [20.5, 0.7, 100.0]])
    assert not regimes.assign(known)[1].any()
    nearest, far = regimes.assign(far_off)
    assert far.tolist() == [True, True, True] and nearest[1] == nearest[2] == 2
    row = fd002_train.iloc[0]
    inputs = [*far_off[0], *row[list(fd002_spec.sensors)]]
    features = StreamingFeatures(fd002_spec).update("Client_001", 1, inputs)
    assert np.isfinite(features).all()
    # Just inside: within FAR_SIGMAS training spreads of a regime's centre.
    inside = np.array(regimes.centres[2]) + (FAR_SIGMAS - 0.5) * np.array(regimes.spreads[2])
    assert not regimes.assign(inside[None])[1].any()


@pytest.fixture(scope="module")
def fd002_home(tmp_path_factory: pytest.TempPathFactory, cmapss_fd002_dir: Path) -> Home:
    """FD002's train units replayed as devices into a fresh landing zone, as a fleet would send them."""
    home = Home(tmp_path_factory.mktemp("fd002") / "home")
    with CaptureWriter(LocalStore(home.landing)) as writer:
        replay(read_cmapss(cmapss_fd002_dir / "train_FD002.txt"), writer)
    return home


def test_the_same_assets_train_and_evaluate_on_fd002(fd002_home: Home, cmapss_fd002_dir: Path) -> None:
    """Nothing in the pipeline names a data set: only the reference fleet's files are configured."""
    fleet_files = {
        "test_file": str(cmapss_fd002_dir / "test_FD002.txt"),
        "rul_file": str(cmapss_fd002_dir / "RUL_FD002.txt"),
    }
    run_config = {
        "ops": {
            "model_candidates": {"config": {**SMALL_GRID, "workers": 1}},
            "reference_test_fleet": {"config": fleet_files},
        }
    }
    job = build_definitions(fd002_home).resolve_job_def(PIPELINE_JOB)
    result = job.execute_in_process(run_config=run_config)
    assert result.success
    features = _values(result, "training_features")
    assert (features["operating_regimes"], features["trajectories"]) == (6, 85)
    evaluation = _values(result, "model_evaluation")
    assert evaluation["engines"] == 128 and evaluation["rmse"] < 25  # a reduced grid
    by_regime = evaluation["errors_by_regime"]
    assert [int(row.split("|")[1]) for row in by_regime.splitlines()[2:]] == list(range(6)), by_regime
    assert "100+" in evaluation["errors_by_rul_band"]
    with duckdb.connect(str(fd002_home.warehouse), read_only=True) as conn:
        [(spec,)] = conn.execute("SELECT spec FROM training_feature_spec").fetchall()
        regimes = conn.execute(
            "SELECT count(DISTINCT regime), count(DISTINCT rul_band) FROM evaluation_errors"
        ).fetchone()
    assert regimes == (6, 5)

    # Another reference fleet changes what is evaluated, never what is learnt.
    other = {"test_file": "test_FD001.txt", "rul_file": "RUL_FD001.txt"}
    again = job.execute_in_process(
        asset_selection=[AssetKey("reference_test_fleet"), AssetKey("training_features")],
        run_config={"ops": {"reference_test_fleet": {"config": other}}},
    )
    assert again.success and _values(again, "reference_test_fleet")["engines"] == 100
    with duckdb.connect(str(fd002_home.warehouse), read_only=True) as conn:
        assert conn.execute("SELECT spec FROM training_feature_spec").fetchall() == [(spec,)]


def test_rows_where_no_sensor_carries_signal_fit_nothing(fd002_train: pd.DataFrame) -> None:
    """Engines whose sensors never move teach nothing: a clear refusal, not a spec of noise."""
    flat = fd002_train.head(400).copy()
    flat[list(SENSORS)] = flat[list(SENSORS)].iloc[0].to_numpy()
    with pytest.raises(NoSignal, match="no sensor's values correlate with rul"):
        fit_spec(flat, "rul")


def test_a_few_odd_rows_join_a_regime_and_odd_settings_are_flagged(fd002_train: pd.DataFrame) -> None:
    """Five rows at an altitude nobody else flies are noise, not a seventh operating condition."""
    odd = fd002_train.head(5).assign(OperationalSetting1=60.0)
    spec = fit_spec(pd.concat([fd002_train, odd], ignore_index=True), "rul")
    assert spec.regimes.count == 6
    nearest, far = spec.regimes.assign(np.array([[np.nan, 0.84, 100.0], [42.0, 0.84, 100.0]]))
    assert far.tolist() == [True, False] and nearest[1] == 5


def test_a_sensor_constant_in_one_regime_is_standardised_in_the_units_of_the_others(
    fd002_train: pd.DataFrame,
) -> None:
    rows = fd002_train.copy()
    settings = rows[list(OPERATIONAL_SETTINGS)].to_numpy()
    first, _ = fit_spec(rows, "rul").regimes.assign(settings)
    rows.loc[first == 0, "Sensor4"] = rows.loc[first == 0, "Sensor4"].iloc[0]  # stuck in regime 0
    regimes = fit_spec(rows, "rul").regimes
    column = regimes.sensors.index("Sensor4")
    assert regimes.scales[0][column] == pytest.approx(
        np.sqrt(np.mean(np.square([s[column] for s in regimes.scales[1:]]))), rel=0.2
    )
    moved = rows.loc[first == 0, list(regimes.sensors)].head(1).to_numpy()
    moved[0, column] += 30.0  # a new value in that regime: a few standard deviations, not raw units
    value = regimes.standardise(settings[first == 0][:1], moved)[0, column]
    assert 1 < value < 10
