"""The feature definition: one spec, two engines that compute it the same way.

A `FeatureSpec` names the sensors, the rolling windows and statistics, and the
exponential smoothing factors; a spec fitted on training data (`fit_spec`) also holds the
fleet's operating regimes, within which each sensor is standardised before anything else
(turbofan_core/regimes.py). `compute_features` is the batch engine (training over the
warehouse); `StreamingFeatures` is the edge engine, keeping O(max window) state per device.
Both call the same `OperatingRegimes.standardise` and window statistics (`row_statistics` in
`_windows.c`: through `_window_statistics` in batch, inside the streaming update) and compute the
same smoothing recurrence, so a model never sees features computed differently from those it was
trained on.

Windows count messages, not cycles: a missed cycle is simply absent from the window.
A window that is not full yet (the start of a trajectory) uses the values so far; the
std (population, ddof=0) and the least-squares slope of a single value are 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from turbofan_core import _windows
from turbofan_core.regimes import OperatingRegimes
from turbofan_core.telemetry import MEASUREMENTS, OPERATIONAL_SETTINGS, SENSORS

if TYPE_CHECKING:  # pandas is the batch engine's: the edge, which streams, does without it
    import pandas as pd

CYCLE = "CycleTime"
STATISTICS: tuple[str, ...] = ("mean", "std", "slope", "min", "max")
# A sensor carries signal when its standardised values correlate with the (capped) RUL of the
# training rows at least this much: on FD001 that keeps the 14 sensors below, on FD002 16.
MIN_SIGNAL_CORRELATION = 0.2
# The sensors that vary in FD001; the other seven are constant there and carry no signal.
FD001_SENSORS: tuple[str, ...] = tuple(
    f"Sensor{i}" for i in (2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21)
)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _duplicates(values: Sequence[object]) -> list[object]:
    return sorted({v for v in values if values.count(v) > 1}, key=str)


def _stat_name(sensor: str, statistic: str, window: int) -> str:
    return f"{sensor}_{statistic}_{window}"


def _ewm_name(sensor: str, alpha: float) -> str:
    return f"{sensor}_ewm_{alpha!r}"


@dataclass(frozen=True)
class FeatureSpec:
    """What to compute from a trajectory; stored in model bundles so scoring matches training.

    With `regimes`, each sensor is first standardised within the operating regime its message's
    operational settings fall in; without (bundles from before regimes), raw values are used.
    """

    sensors: tuple[str, ...]
    windows: tuple[int, ...] = ()
    statistics: tuple[str, ...] = ()
    ewm_alphas: tuple[float, ...] = ()
    include_cycle: bool = False
    regimes: OperatingRegimes | None = None

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so the spec stays hashable.
        for name in ("sensors", "windows", "statistics", "ewm_alphas"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a sequence, got {type(value).__name__} {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.sensors:
            raise ValueError("sensors must name at least one measurement")
        unknown = [s for s in self.sensors if s not in MEASUREMENTS]
        if unknown:
            raise ValueError(f"unknown sensor(s) {unknown}; expected names from {MEASUREMENTS}")
        bad_windows = [w for w in self.windows if not _is_int(w) or w < 1]
        if bad_windows:
            raise ValueError(f"windows must be positive integers, got {bad_windows}")
        object.__setattr__(self, "windows", tuple(int(w) for w in self.windows))
        unknown = [s for s in self.statistics if s not in STATISTICS]
        if unknown:
            raise ValueError(f"unknown statistic(s) {unknown}; expected some of {STATISTICS}")
        if bool(self.windows) != bool(self.statistics):
            raise ValueError("windows and statistics go together: give both or neither")
        bad_alphas = [
            a
            for a in self.ewm_alphas
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < a <= 1.0
        ]
        if bad_alphas:
            raise ValueError(f"ewm_alphas must lie in (0, 1], got {bad_alphas}")
        object.__setattr__(self, "ewm_alphas", tuple(float(a) for a in self.ewm_alphas))
        if not isinstance(self.include_cycle, bool):
            raise ValueError(f"include_cycle must be a bool, got {self.include_cycle!r}")
        for name in ("sensors", "windows", "statistics", "ewm_alphas"):
            repeated = _duplicates(getattr(self, name))
            if repeated:
                raise ValueError(f"{name} repeats {repeated}")
        if self.regimes is not None and (
            self.regimes.sensors != self.sensors or self.regimes.settings != OPERATIONAL_SETTINGS
        ):
            raise ValueError("regimes must standardise the spec's sensors, from the operational settings")

    @property
    def inputs(self) -> tuple[str, ...]:
        """The measurements a message must give: the sensors, after the operational settings when
        regimes standardise them."""
        return self.sensors if self.regimes is None else (*OPERATIONAL_SETTINGS, *self.sensors)

    @property
    def max_window(self) -> int:
        """How many past values per sensor the streaming engine must keep."""
        return max(self.windows, default=1)

    @cached_property
    def feature_names(self) -> tuple[str, ...]:
        """Column order of every feature matrix: CycleTime first, then sensor by sensor."""
        names = [CYCLE] if self.include_cycle else []
        for sensor in self.sensors:
            names.append(sensor)
            names.extend(_stat_name(sensor, stat, w) for w in self.windows for stat in self.statistics)
            names.extend(_ewm_name(sensor, alpha) for alpha in self.ewm_alphas)
        return tuple(names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for the model bundle (a spec without regimes as before they existed)."""
        data: dict[str, Any] = {
            "sensors": list(self.sensors),
            "windows": list(self.windows),
            "statistics": list(self.statistics),
            "ewm_alphas": list(self.ewm_alphas),
            "include_cycle": self.include_cycle,
        }
        if self.regimes is not None:
            data["regimes"] = self.regimes.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        """Inverse of `to_dict`; refuses unknown keys so a newer bundle is not misread."""
        known = {"sensors", "windows", "statistics", "ewm_alphas", "include_cycle", "regimes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown feature spec key(s) {unknown}")
        if "sensors" not in data:
            raise ValueError("feature spec has no 'sensors'")
        regimes = data.get("regimes")
        return cls(**{**data, "regimes": None if regimes is None else OperatingRegimes.from_dict(regimes)})

    def sensor_values(self, inputs: np.ndarray) -> np.ndarray:
        """What the windows see of messages (rows of `inputs` values): the sensor values
        standardised within their regime, or as they are without regimes."""
        if self.regimes is None:
            return inputs
        settings = len(OPERATIONAL_SETTINGS)
        return self.regimes.standardise(inputs[:, :settings], inputs[:, settings:])


# Chosen by 5-fold grouped cross-validation on FD001 train (XGBoost, RUL capped at 125):
# long windows carry the degradation trend (longest window 30: CV RMSE 11.7; 120: 8.6),
# the cycle helps (about 1 RMSE without it), std adds noise, (10, 30, 120) scores as well
# as (10, 30, 60, 120) at less cost, and smoothing keeps a memory beyond 120 cycles in O(1).
DEFAULT_SPEC = FeatureSpec(
    sensors=FD001_SENSORS,
    windows=(10, 30, 120),
    statistics=("mean", "slope"),
    ewm_alphas=(0.02, 0.1),
    include_cycle=True,
)


class NoSignal(ValueError):
    """No sensor of the training rows carries signal: there is nothing to learn from them yet."""


def fit_spec(frame: pd.DataFrame, target: str, template: FeatureSpec = DEFAULT_SPEC) -> FeatureSpec:
    """The template's windows, statistics and smoothing over the sensors that carry signal in
    `frame`, standardised within the operating regimes found in its operational settings.

    `frame` holds training rows only (every measurement and the `target`): nothing else is seen,
    so the test fleet cannot leak into what is learnt. Of all the sensors, those kept are the ones
    whose standardised values correlate with the target at |r| >= MIN_SIGNAL_CORRELATION
    (NoSignal when none does).
    """
    settings = frame[list(OPERATIONAL_SETTINGS)].to_numpy(dtype=np.float64)
    values = frame[list(SENSORS)].to_numpy(dtype=np.float64)
    if not (np.isfinite(settings).all() and np.isfinite(values).all()):
        raise ValueError("measurements must be finite to fit the feature spec")
    regimes = OperatingRegimes.fit(settings, values, OPERATIONAL_SETTINGS, SENSORS)
    standardised = regimes.standardise(settings, values)
    target_values = frame[target].to_numpy(dtype=np.float64)
    kept = [
        sensor
        for i, sensor in enumerate(SENSORS)
        if _correlation(standardised[:, i], target_values) >= MIN_SIGNAL_CORRELATION
    ]
    if not kept:
        raise NoSignal(f"no sensor's values correlate with {target} at |r| >= {MIN_SIGNAL_CORRELATION}")
    return replace(template, sensors=tuple(kept), regimes=regimes.only(kept))


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    """|Pearson r|, 0 for a constant (a sensor standardised to 0 keeps rounding noise only)."""
    if x.std() < 1e-6 or y.std() == 0:
        return 0.0
    return float(abs(np.corrcoef(x, y)[0, 1]))


def _layout(spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each computed block goes in feature_names: window statistics as
    (statistics, windows, sensors), raw values as (sensors,), smoothed as (alphas, sensors);
    int64, as the streaming update in C reads them."""
    index = {name: i for i, name in enumerate(spec.feature_names)}
    shape = (len(spec.statistics), len(spec.windows), len(spec.sensors))
    stats = [
        index[_stat_name(s, stat, w)] for stat in spec.statistics for w in spec.windows for s in spec.sensors
    ]
    ewm = [index[_ewm_name(s, a)] for a in spec.ewm_alphas for s in spec.sensors]
    return (
        np.array(stats, dtype=np.int64).reshape(shape),
        np.array([index[s] for s in spec.sensors], dtype=np.int64),
        np.array(ewm, dtype=np.int64).reshape(len(spec.ewm_alphas), len(spec.sensors)),
    )


def _statistic_codes(statistics: tuple[str, ...]) -> bytes:
    """The C code of each statistic (`_windows.c`): its index in STATISTICS."""
    return bytes(STATISTICS.index(statistic) for statistic in statistics)


def _window_statistics(
    window: np.ndarray, w: int, count: np.ndarray, statistics: tuple[str, ...]
) -> np.ndarray:
    """Statistics (statistics, windows, sensors) of the last `w` slots of each window (windows, span,
    sensors, slots in time order), of which the last `count` are valid.

    The single formula both engines use, in C (`row_statistics` in `_windows.c`, which the streaming
    update calls on each device's ring: a pass per sum over a window in cache, instead of numpy's
    several passes and their temporaries); invalid slots may hold any finite value. std and slope
    work on values centred on the window mean, which stays accurate for sensors near 9000 with a
    spread of a few units (E[x^2] - E[x]^2 would not).
    """
    window = np.ascontiguousarray(window, dtype=np.float64)
    windows, span, sensors = window.shape
    out = np.empty((len(statistics), windows, sensors))
    count = np.ascontiguousarray(count, dtype=np.int64)
    _windows.statistics(window, windows, span, sensors, w, count, _statistic_codes(statistics), out)
    return out


def _trajectory_starts(ordered: pd.DataFrame, keys: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows that open a trajectory (a new key combination)."""
    start = np.zeros(len(ordered), dtype=bool)
    if len(ordered):
        start[0] = True
    for key in keys:
        column = ordered[key].to_numpy()
        start[1:] |= column[1:] != column[:-1]
    return start


# Window slots (w * rows * sensors) per block: keeps the temporaries in cache, which
# matters more than the number of numpy calls (4x faster for w = 100 on FD001).
_BLOCK_SLOTS = 1 << 18


def compute_features(
    frame: pd.DataFrame, spec: FeatureSpec = DEFAULT_SPEC, keys: Sequence[str] = ("device_id", "lifetime")
) -> pd.DataFrame:
    """Features of every row of every trajectory (a group of `keys`), ordered by keys and CycleTime.

    Returns the key columns, CycleTime and the features in `spec.feature_names` order
    (CycleTime appears once even when it is a feature), one row per input row.
    """
    import pandas as pd

    keys = list(keys)
    missing = [c for c in (*keys, CYCLE, *spec.inputs) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}")
    ordered = frame.sort_values([*keys, CYCLE], kind="stable").reset_index(drop=True)
    start = _trajectory_starts(ordered, keys)
    cycle = ordered[CYCLE].to_numpy()
    if np.any(~start[1:] & (cycle[1:] == cycle[:-1])):
        raise ValueError("a trajectory repeats a CycleTime; deduplicate the telemetry first")
    inputs = ordered[list(spec.inputs)].to_numpy(dtype=np.float64)
    if not np.isfinite(inputs).all():
        raise ValueError("sensor values must be finite (NaN or infinity would spread through windows)")
    values = spec.sensor_values(inputs)

    rows = len(ordered)
    # Column-major, as pandas stores a float block, so the frame is built without a copy.
    features = np.empty((rows, len(spec.feature_names)), order="F")
    stats_columns, raw_columns, ewm_columns = _layout(spec)
    features[:, raw_columns] = values
    if spec.include_cycle:
        features[:, 0] = cycle

    starts = np.flatnonzero(start)
    lengths = np.diff(np.append(starts, rows))
    position = np.arange(rows) - np.repeat(starts, lengths)  # 0 at each trajectory's first row

    pad = spec.max_window - 1
    padded = np.concatenate([np.zeros((pad, values.shape[1])), values])
    for j, w in enumerate(spec.windows):
        count = np.minimum(position + 1, w)
        columns = stats_columns[:, j, :].ravel()
        block_rows = max(16, _BLOCK_SLOTS // (w * values.shape[1]))
        for lo in range(0, rows, block_rows):
            hi = min(lo + block_rows, rows)
            view = np.lib.stride_tricks.sliding_window_view(padded[lo + pad - w + 1 : hi + pad], w, axis=0)
            block = _window_statistics(np.moveaxis(view, -1, 1), w, count[lo:hi], spec.statistics)
            features[lo:hi, columns] = block.transpose(1, 0, 2).reshape(hi - lo, -1)

    if spec.ewm_alphas:
        alphas = np.array(spec.ewm_alphas)[:, None, None]
        smoothed = np.empty((len(spec.ewm_alphas), rows, values.shape[1]))
        smoothed[:, starts] = values[starts]
        # One step per position along the trajectories, all trajectories at once: the
        # recurrence is sequential, but only as long as the longest trajectory.
        order = np.argsort(-lengths, kind="stable")
        by_length, from_start = lengths[order], starts[order]
        for p in range(1, int(lengths.max(initial=0))):
            live = from_start[: np.searchsorted(-by_length, -p, side="left")] + p
            smoothed[:, live] = alphas * values[live] + (1 - alphas) * smoothed[:, live - 1]
        features[:, ewm_columns] = smoothed.transpose(1, 0, 2)

    first = int(spec.include_cycle)  # CycleTime is already an identity column
    names = list(spec.feature_names[first:])
    return pd.concat([ordered[[*keys, CYCLE]], pd.DataFrame(features[:, first:], columns=names)], axis=1)


class StreamingFeatures:
    """The edge engine: per-device state, one feature vector per telemetry message.

    Every device's state lives in a row of shared arrays (its last max_window values in a ring, the
    oldest at `start`, its smoothed values, cycle and count), so that `update_many` takes a whole
    batch of messages and writes their feature rows in one call into C (`_windows.update`) instead
    of Python or numpy work per step, and a message writes its values into the ring instead of
    moving the window.
    """

    def __init__(self, spec: FeatureSpec = DEFAULT_SPEC) -> None:
        self.spec = spec
        self._stats_columns, self._raw_columns, self._ewm_columns = _layout(spec)
        # What the C update reads of the spec.
        self._alphas = np.array(spec.ewm_alphas, dtype=np.float64)
        self._windows = np.array(spec.windows, dtype=np.int64)
        self._codes = _statistic_codes(spec.statistics)
        self._rows: dict[str, int] = {}  # device -> its row in the state arrays
        self._free: list[int] = []  # rows of devices reset since
        sensors = len(spec.sensors)
        self._history = np.zeros((0, spec.max_window, sensors))  # rings of the last values
        self._start = np.zeros(0, dtype=np.int64)  # each ring's oldest slot, where the next value goes
        self._smoothed = np.zeros((0, len(spec.ewm_alphas), sensors))
        self._cycle = np.zeros(0, dtype=np.int64)
        self._count = np.zeros(0, dtype=np.int64)  # messages in the lifetime; 0: a row not in use

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.spec.feature_names

    @property
    def devices(self) -> int:
        """How many devices hold state."""
        return len(self._rows)

    def reset(self, device_id: str) -> None:
        """Forget a device, e.g. after its failure event."""
        row = self._rows.pop(device_id, None)
        if row is not None:
            self._count[row] = 0
            self._free.append(row)

    def update(self, device_id: str, cycle: int, values: Mapping[str, float] | Sequence[float]) -> np.ndarray:
        """Take one message and return its feature vector in `feature_names` order.

        `values` is a mapping holding at least the spec's inputs, or a sequence in
        `spec.inputs` order. A cycle not greater than the device's last one starts a
        new engine lifetime (CycleTime restarts at 1 after a failure), so state resets.
        """
        spec = self.spec
        if isinstance(values, Mapping):
            x = np.array([values[s] for s in spec.inputs], dtype=np.float64)
        else:
            x = np.asarray(values, dtype=np.float64)
            if x.shape != (len(spec.inputs),):
                raise ValueError(f"expected {len(spec.inputs)} values in spec.inputs order, got {x.shape}")
        return self.update_many([device_id], [cycle], x[None, :])[0]

    def update_many(self, device_ids: Sequence[str], cycles: Sequence[int], values: np.ndarray) -> np.ndarray:
        """`update` for many messages at once, one feature row per message.

        One call into C takes the messages in the order given (a device may have several) and
        computes each one's feature row, which is what lets the edge score batches from many
        devices faster than one message at a time; the result equals calling `update` for each
        in turn.
        """
        x = np.asarray(values, dtype=np.float64)
        spec = self.spec
        if x.shape != (len(device_ids), len(spec.inputs)):
            raise ValueError(f"expected ({len(device_ids)}, {len(spec.inputs)}) values, got {x.shape}")
        cycle = np.array(cycles, dtype=np.int64)
        if cycle.shape != (len(device_ids),):
            raise ValueError(f"expected {len(device_ids)} cycles, got shape {cycle.shape}")
        if not np.isfinite(x).all():
            raise ValueError("sensor values must be finite")
        x = np.ascontiguousarray(spec.sensor_values(x))
        rows = np.array([self._row(device_id) for device_id in device_ids], dtype=np.int64)
        features = np.empty((len(rows), len(self.feature_names)))
        _windows.update(
            self._history,
            spec.max_window,
            len(spec.sensors),
            self._start,
            self._count,
            self._cycle,
            self._smoothed,
            self._alphas,
            rows,
            cycle,
            x,
            self._windows,
            self._codes,
            features.shape[1],
            0 if spec.include_cycle else -1,  # CycleTime is the first column
            self._raw_columns,
            self._stats_columns,
            self._ewm_columns,
            features,
        )
        return features

    def _row(self, device_id: str) -> int:
        """The device's row in the state arrays, given one (the arrays grown) if it has none."""
        row = self._rows.get(device_id)
        if row is None:
            if not self._free:
                self._grow()
            row = self._rows[device_id] = self._free.pop()
        return row

    def _grow(self) -> None:
        """Double the state arrays (at least 64 rows), the new rows free."""
        old = len(self._count)
        extra = max(64, old)
        self._history = np.concatenate([self._history, np.zeros((extra, *self._history.shape[1:]))])
        self._start = np.concatenate([self._start, np.zeros(extra, dtype=np.int64)])
        self._smoothed = np.concatenate([self._smoothed, np.zeros((extra, *self._smoothed.shape[1:]))])
        self._cycle = np.concatenate([self._cycle, np.zeros(extra, dtype=np.int64)])
        self._count = np.concatenate([self._count, np.zeros(extra, dtype=np.int64)])
        self._free.extend(range(old + extra - 1, old - 1, -1))  # popped lowest first
