"""The feature definition: hand-computed values, batch/streaming parity on all of FD001 and of the
FD002 subset (six operating regimes), the spec contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_bundle import with_rul

from turbofan_core import _windows
from turbofan_core.cmapss import read_cmapss
from turbofan_core.features import (
    DEFAULT_SPEC,
    FD001_SENSORS,
    STATISTICS,
    FeatureSpec,
    StreamingFeatures,
    compute_features,
    fit_spec,
)
from turbofan_core.telemetry import MEASUREMENTS

# Every statistic, a window of 1, a window longer than most warm-ups, alpha 1 (no smoothing),
# and constant sensors and operational settings: the corners DEFAULT_SPEC does not reach.
FULL_SPEC = FeatureSpec(
    sensors=MEASUREMENTS,
    windows=(1, 7, 50),
    statistics=STATISTICS,
    ewm_alphas=(0.05, 1.0),
    include_cycle=True,
)


def units_as_devices(folder: Path, subset: str) -> pd.DataFrame:
    """A subset's train and test units, each a device of its own (train `t1`.., test `s1`..), lifetime 1."""
    frames = []
    for name, prefix in ((f"train_{subset}.txt", "t"), (f"test_{subset}.txt", "s")):
        frame = read_cmapss(folder / name)
        frame.insert(0, "device_id", prefix + frame.pop("unit").astype(str))
        frame.insert(1, "lifetime", 1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def fitted_on_train(fleet: pd.DataFrame) -> FeatureSpec:
    """The spec fitted on the train units (their capped RUL as the target), as training fits it."""
    train = with_rul(fleet[fleet["device_id"].str.startswith("t")])
    return fit_spec(train, "rul")


@pytest.fixture(scope="module")
def fd001(cmapss_dir: Path) -> pd.DataFrame:
    return units_as_devices(cmapss_dir, "FD001")


@pytest.fixture(scope="module")
def fd002(cmapss_fd002_dir: Path) -> pd.DataFrame:
    return units_as_devices(cmapss_fd002_dir, "FD002")


@pytest.mark.parametrize(
    ("subset", "spec"),
    [("fd001", DEFAULT_SPEC), ("fd001", FULL_SPEC), ("fd001", None), ("fd002", None)],
    ids=["fd001-default", "fd001-full", "fd001-fitted", "fd002-fitted"],
)
def test_streaming_equals_batch_on_every_cycle(
    subset: str, spec: FeatureSpec | None, request: pytest.FixtureRequest
) -> None:
    """Every cycle of every train and test unit; `None`: the spec fitted on the train units (with
    operating regimes: one on FD001, six on FD002)."""
    fleet = request.getfixturevalue(subset)
    spec = spec or fitted_on_train(fleet)
    batch = compute_features(fleet, spec)
    assert len(batch) == len(fleet) == {"fd001": 20631 + 13096, "fd002": 17049 + 17040}[subset]
    assert list(batch.columns) == ["device_id", "lifetime", *spec.feature_names]

    # Messages arrive as from a live fleet: cycle by cycle, the devices interleaved.
    live = fleet.sort_values(["CycleTime", "device_id"], kind="stable")
    engine = StreamingFeatures(spec)
    inputs = list(spec.inputs)
    rows = zip(live["device_id"], live["CycleTime"], live[inputs].to_numpy(), strict=True)
    streamed = np.array([engine.update(device, int(cycle), values) for device, cycle, values in rows])
    assert engine.devices == fleet["device_id"].nunique()

    # Put the streamed vectors in the batch engine's row order (device, cycle).
    order = np.lexsort((live["CycleTime"].to_numpy(), live["device_id"].to_numpy()))
    expected = batch[list(spec.feature_names)].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(streamed[order], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("subset", "spec"),
    [("fd001", DEFAULT_SPEC), ("fd001", FULL_SPEC), ("fd002", None)],
    ids=["fd001-default", "fd001-full", "fd002-fitted"],
)
def test_many_devices_at_once_equal_one_at_a_time(
    subset: str, spec: FeatureSpec | None, request: pytest.FixtureRequest
) -> None:
    """The edge's batch path: one call takes many devices' messages in arrival order, a device's
    several messages among them (its later ones see its earlier ones, a cycle not after the last
    starting a new lifetime), and gives what one call a message gives."""
    fleet = request.getfixturevalue(subset)
    spec = spec or fitted_on_train(fleet)
    live = fleet.sort_values(["CycleTime", "device_id"], kind="stable")
    sensors = list(spec.inputs)
    one, many = StreamingFeatures(spec), StreamingFeatures(spec)
    for start in range(0, len(live), 250):  # a few cycles of every device a call
        chunk = live.iloc[start : start + 250]
        devices, cycles = chunk["device_id"].tolist(), chunk["CycleTime"].tolist()
        values = chunk[sensors].to_numpy()
        assert len(set(devices)) < len(devices)
        together = many.update_many(devices, cycles, values)
        alone = np.array([one.update(d, c, v) for d, c, v in zip(devices, cycles, values, strict=True)])
        np.testing.assert_allclose(together, alone, rtol=1e-12, atol=1e-12)
    device = str(live["device_id"].iloc[0])
    values = live[sensors].to_numpy()[:3]
    together = many.update_many([device, device, device], [900, 1, 2], values)  # a new lifetime at 1
    alone = np.array([one.update(device, c, v) for c, v in zip([900, 1, 2], values, strict=True)])
    np.testing.assert_allclose(together, alone, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(together[1], StreamingFeatures(spec).update(device, 1, values[1]), rtol=1e-12)


def _trajectory(values: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "device_id": "d",
            "lifetime": 1,
            "CycleTime": range(1, len(values) + 1),
            "Sensor2": values,
            "Sensor3": 5.0,
        }
    )


def test_hand_computed_window_statistics_and_smoothing() -> None:
    spec = FeatureSpec(
        sensors=("Sensor2", "Sensor3"),
        windows=(3,),
        statistics=STATISTICS,
        ewm_alphas=(0.5,),
        include_cycle=True,
    )
    assert spec.feature_names[:8] == (
        "CycleTime",
        "Sensor2",
        "Sensor2_mean_3",
        "Sensor2_std_3",
        "Sensor2_slope_3",
        "Sensor2_min_3",
        "Sensor2_max_3",
        "Sensor2_ewm_0.5",
    )
    # Columns: cycle, value, mean, std, slope, min, max, ewm. The first two rows are partial
    # windows (1 and 2 values); slope is the least-squares slope against position 0, 1, 2.
    expected = np.array(
        [
            [1, 1, 1, 0, 0, 1, 1, 1],
            [2, 2, 1.5, 0.5, 1, 1, 2, 1.5],
            [3, 4, 7 / 3, math.sqrt(14) / 3, 1.5, 1, 4, 2.75],
            [4, 8, 14 / 3, math.sqrt(56) / 3, 3, 2, 8, 5.375],
        ]
    )
    constant = [5.0, 5.0, 0.0, 0.0, 5.0, 5.0, 5.0]  # Sensor3: value, mean, std, slope, min, max, ewm

    batch = compute_features(_trajectory([1.0, 2.0, 4.0, 8.0]), spec)
    np.testing.assert_allclose(batch[list(spec.feature_names[:8])].to_numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(batch[list(spec.feature_names[8:])].to_numpy(), [constant] * 4, rtol=1e-12)

    engine = StreamingFeatures(spec)
    for row, value in zip(expected, [1.0, 2.0, 4.0, 8.0], strict=True):
        features = engine.update("d", int(row[0]), {"Sensor2": value, "Sensor3": 5.0, "Sensor4": 1.0})
        np.testing.assert_allclose(features, [*row, *constant], rtol=1e-12)


def test_streaming_resets_when_the_cycle_restarts_and_keeps_devices_apart(fd001: pd.DataFrame) -> None:
    sensors = list(DEFAULT_SPEC.sensors)
    first = fd001[fd001["device_id"] == "t1"][sensors].to_numpy()
    second = fd001[fd001["device_id"] == "t2"][sensors].to_numpy()

    def alone(values: np.ndarray) -> np.ndarray:
        engine = StreamingFeatures()
        return np.array([engine.update("x", cycle, row) for cycle, row in enumerate(values, start=1)])

    engine = StreamingFeatures()
    for cycle, row in enumerate(first[:40], start=1):
        engine.update("A", cycle, row)
    # The engine failed and was replaced: CycleTime starts at 1 again.
    replaced = np.array([engine.update("A", cycle, row) for cycle, row in enumerate(second[:40], start=1)])
    np.testing.assert_array_equal(replaced, alone(second[:40]))
    assert engine.devices == 1

    # A repeated cycle is also a restart (CycleTime, the first feature, aside), and reset() forgets a device.
    engine.update("A", 40, first[0])
    np.testing.assert_array_equal(engine.update("A", 41, first[1])[1:], alone(first[:2])[1][1:])
    engine.reset("A")
    engine.reset("never seen")
    assert engine.devices == 0

    # Two devices interleaved message by message see exactly what each would see alone.
    both = StreamingFeatures()
    out: dict[str, list[np.ndarray]] = {"A": [], "B": []}
    for cycle, (a, b) in enumerate(zip(first[:60], second[:60], strict=True), start=1):
        out["A"].append(both.update("A", cycle, a))
        out["B"].append(both.update("B", cycle, b))
    assert both.devices == 2
    np.testing.assert_array_equal(np.array(out["A"]), alone(first[:60]))
    np.testing.assert_array_equal(np.array(out["B"]), alone(second[:60]))


def test_a_refused_update_leaves_no_device_state() -> None:
    engine = StreamingFeatures()
    values = np.zeros((1, len(DEFAULT_SPEC.sensors)))
    with pytest.raises(ValueError, match="finite"):
        engine.update_many(["x"], [1], values + np.nan)
    with pytest.raises(OverflowError):
        engine.update_many(["x"], [2**64], values)
    with pytest.raises(ValueError, match="expected 2 cycles"):
        engine.update_many(["x", "y"], [1], np.zeros((2, len(DEFAULT_SPEC.sensors))))
    assert engine.devices == 0


def _update_arguments(**changes: object) -> dict[str, object]:
    """A valid `_windows.update` call, in its argument order: one message of device 1 of 2 (rings of 3
    slots, 2 sensors), windows of 2 and 3 with mean and slope, one smoothing factor; `changes` made."""
    arguments: dict[str, object] = {
        "history": np.zeros((2, 3, 2)),
        "span": 3,
        "sensors": 2,
        "start": np.zeros(2, dtype=np.int64),
        "count": np.zeros(2, dtype=np.int64),
        "cycle": np.zeros(2, dtype=np.int64),
        "smoothed": np.zeros((2, 1, 2)),
        "alphas": np.array([0.5]),
        "rows": np.array([1], dtype=np.int64),
        "cycles": np.array([7], dtype=np.int64),
        "values": np.full((1, 2), 4.0),
        "windows": np.array([2, 3], dtype=np.int64),
        "codes": bytes([STATISTICS.index("mean"), STATISTICS.index("slope")]),
        "features": 13,
        "cycle_column": 0,
        "raw_columns": np.array([1, 2], dtype=np.int64),
        "stats_columns": np.arange(3, 11, dtype=np.int64),  # statistics x windows x sensors
        "ewm_columns": np.array([11, 12], dtype=np.int64),
        "out": np.zeros((1, 13)),
    }
    return {**arguments, **changes}


def test_the_c_update_writes_the_state_and_every_column() -> None:
    arguments = _update_arguments()
    _windows.update(*arguments.values())
    np.testing.assert_array_equal(arguments["out"], [[7, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4]])
    np.testing.assert_array_equal(arguments["history"], [[[0, 0]] * 3, [[4, 4], [0, 0], [0, 0]]])
    for name, expected in (("start", [0, 1]), ("count", [0, 1]), ("cycle", [0, 7])):
        np.testing.assert_array_equal(arguments[name], expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": np.array([2], dtype=np.int64)}, r"rows\[0\] = 2 out of range"),
        ({"rows": np.array([-1], dtype=np.int64)}, r"rows\[0\] = -1 out of range"),
        ({"windows": np.array([2, 4], dtype=np.int64)}, r"windows\[1\] = 4 out of range"),
        ({"windows": np.array([0, 3], dtype=np.int64)}, r"windows\[0\] = 0 out of range"),
        ({"codes": bytes([0, 5])}, "unknown statistic code 5"),
        ({"cycle_column": 13}, "cycle_column out of range"),
        ({"raw_columns": np.array([1, 13], dtype=np.int64)}, r"raw_columns\[1\] = 13"),
        ({"stats_columns": np.arange(-1, 7, dtype=np.int64)}, r"stats_columns\[0\] = -1"),
        ({"ewm_columns": np.array([11, 13], dtype=np.int64)}, r"ewm_columns\[1\] = 13"),
        ({"start": np.array([0, 3], dtype=np.int64)}, "row 0: start or count out of range"),
        ({"count": np.array([0, -1], dtype=np.int64)}, "row 0: start or count out of range"),
        # One more message would overflow the count, and a wrapped count reads outside the ring.
        ({"count": np.array([0, 2**63 - 1], dtype=np.int64)}, "row 0: start or count out of range"),
        # The update writes `start` while it reads `rows`: a checked row must not change under it.
        ({"start": (shared := np.zeros(2, dtype=np.int64)), "rows": shared[1:]}, "start and rows share"),
        ({"history": np.zeros((2, 2, 2))}, "history holds 64 bytes"),
        ({"smoothed": np.zeros((2, 2, 2))}, "smoothed holds"),
        ({"values": np.zeros((1, 3))}, "values holds"),
        ({"cycles": np.zeros(2, dtype=np.int64)}, "cycles holds"),
        ({"out": np.zeros((1, 12))}, "out holds"),
        # 2 x (3 + 2**59) x 2 x 8 bytes wraps round to the history's 96: the size must not be a product.
        ({"span": 3 + 2**59}, "history holds 96 bytes"),
    ],
    ids=[
        "row-beyond",
        "row-negative",
        "window-beyond-span",
        "window-empty",
        "unknown-statistic",
        "cycle-column",
        "raw-column",
        "stats-column",
        "ewm-column",
        "ring-start",
        "negative-count",
        "count-at-its-largest",
        "aliased-buffers",
        "history-size",
        "smoothed-size",
        "values-size",
        "cycles-size",
        "out-size",
        "size-product-wraps",
    ],
)
def test_the_c_update_refuses_what_would_reach_outside_its_arrays(
    change: dict[str, object], message: str
) -> None:
    """Every size, index and column is checked before anything is written: a ValueError, never a
    write outside the arrays (nor into them)."""
    arguments = _update_arguments(**change)
    written = ("history", "start", "count", "cycle", "smoothed", "out")
    before = {name: np.copy(arguments[name]) for name in written}
    with pytest.raises(ValueError, match=message):
        _windows.update(*arguments.values())
    for name in written:
        np.testing.assert_array_equal(arguments[name], before[name])


def test_batch_handles_lifetimes_of_one_device_and_unsorted_input(fd001: pd.DataFrame) -> None:
    def unit(device: str, rows: int) -> pd.DataFrame:
        return fd001[fd001["device_id"] == device].head(rows)

    frame = pd.concat(
        [
            unit("t1", 45).assign(device_id="dev", lifetime=1),
            unit("t2", 35).assign(device_id="dev", lifetime=2),
            unit("t3", 25).assign(device_id="other", lifetime=1),
        ],
        ignore_index=True,
    )
    shuffled = frame.sample(frac=1.0, random_state=7)
    shuffled.index = shuffled.index * 10 + 3  # a non-default index must not leak into the result
    out = compute_features(shuffled)

    assert out.index.equals(pd.RangeIndex(len(frame)))
    keys = ["device_id", "lifetime", "CycleTime"]
    pd.testing.assert_frame_equal(out[keys], out[keys].sort_values(keys).reset_index(drop=True))
    sizes = out.groupby(["device_id", "lifetime"]).size().to_dict()
    assert sizes == {("dev", 1): 45, ("dev", 2): 35, ("other", 1): 25}

    # Each lifetime starts afresh: the same as computing it alone, and as the streaming engine
    # sees it, one device whose CycleTime restarts at 1.
    names = list(DEFAULT_SPEC.feature_names)
    for (device, lifetime), part in frame.groupby(["device_id", "lifetime"]):
        alone = compute_features(part)[names].to_numpy()
        together = out[(out["device_id"] == device) & (out["lifetime"] == lifetime)][names].to_numpy()
        np.testing.assert_array_equal(together, alone)
    engine = StreamingFeatures()
    dev = frame[frame["device_id"] == "dev"]
    rows = zip(dev["CycleTime"], dev[list(FD001_SENSORS)].to_numpy(), strict=True)
    streamed = [engine.update("dev", int(cycle), values) for cycle, values in rows]
    expected = out[out["device_id"] == "dev"][names].to_numpy()
    np.testing.assert_allclose(streamed, expected, rtol=1e-9, atol=1e-12)


def test_batch_refuses_what_streaming_could_not_match() -> None:
    spec = FeatureSpec(sensors=("Sensor2",), windows=(3,), statistics=("mean",))
    frame = _trajectory([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="lacks column"):
        compute_features(frame.drop(columns="Sensor2"), spec)
    with pytest.raises(ValueError, match="repeats a CycleTime"):
        compute_features(frame.assign(CycleTime=[1, 2, 2]), spec)
    with pytest.raises(ValueError, match="finite"):
        compute_features(frame.assign(Sensor2=[1.0, np.nan, 3.0]), spec)
    empty = compute_features(frame.head(0), spec)
    assert list(empty.columns) == ["device_id", "lifetime", "CycleTime", "Sensor2", "Sensor2_mean_3"]
    assert empty.empty
    with pytest.raises(ValueError, match="1 values"):
        StreamingFeatures(spec).update("d", 1, [1.0, 2.0])


@pytest.mark.parametrize("spec", [DEFAULT_SPEC, FULL_SPEC], ids=["default", "full"])
def test_spec_round_trips_through_json(spec: FeatureSpec) -> None:
    restored = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec
    assert hash(restored) == hash(spec)
    assert restored.feature_names == spec.feature_names
    assert len(set(spec.feature_names)) == len(spec.feature_names)


def test_default_spec_stays_small() -> None:
    assert DEFAULT_SPEC.sensors == FD001_SENSORS
    assert len(DEFAULT_SPEC.feature_names) <= 300


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"statistics": ("mean", "median")}, "unknown statistic"),
        ({"windows": (5, 0)}, "positive integers"),
        ({"windows": (-3,)}, "positive integers"),
        ({"windows": (2.5,)}, "positive integers"),
        ({"windows": (True,)}, "positive integers"),
        ({"ewm_alphas": (0.0,)}, r"\(0, 1\]"),
        ({"ewm_alphas": (1.5,)}, r"\(0, 1\]"),
        ({"ewm_alphas": (-0.1,)}, r"\(0, 1\]"),
        ({"sensors": ("Sensor2", "Sensor22")}, "unknown sensor"),
        ({"sensors": ()}, "at least one"),
        ({"sensors": "Sensor2"}, "must be a sequence"),
        ({"windows": (5, 5)}, "repeats"),
        ({"windows": ()}, "go together"),
        ({"statistics": ()}, "go together"),
        ({"include_cycle": "yes"}, "bool"),
    ],
)
def test_spec_validation_names_the_problem(fields: dict[str, object], message: str) -> None:
    data = {**DEFAULT_SPEC.to_dict(), **fields}
    with pytest.raises(ValueError, match=message):
        FeatureSpec.from_dict(data)


def test_from_dict_refuses_unknown_and_missing_keys() -> None:
    with pytest.raises(ValueError, match="unknown feature spec key"):
        FeatureSpec.from_dict({**DEFAULT_SPEC.to_dict(), "normalise": True})
    with pytest.raises(ValueError, match="no 'sensors'"):
        FeatureSpec.from_dict({"windows": [5], "statistics": ["mean"]})
