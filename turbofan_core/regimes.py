"""Operating regimes: the flight conditions a fleet flies in, learnt from the operational settings.

A sensor's value says as much about where an engine flies (altitude, Mach number, throttle) as
about its wear: in C-MAPSS FD002 the six operating conditions move most sensors far more than
degradation does. `OperatingRegimes` finds the conditions in the three operational settings of
the training data and standardises each sensor within its condition, so what remains is wear.

The number of regimes comes from the data: the fewest k-means clusters whose centres explain all
but `UNEXPLAINED` of the settings' variance (an operating point is a tight cluster: its noise is
tiny beside the distance to the next one). A fleet flying one condition (FD001) gets one regime,
where standardising is an affine map per sensor. A message whose settings lie farther than
`FAR_SIGMAS` (training spreads) from every regime's centre is flagged, and standardised with the
nearest regime all the same.

Everything is plain floats, so a model bundle carries it as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

MAX_REGIMES = 10
UNEXPLAINED = 1e-3  # share of the settings' variance the regimes' centres may leave unexplained
FAR_SIGMAS = 8.0  # training spreads (per setting) beyond which a message is far from a regime
# A setting's spread within a regime is never taken below this share of its centre (at least 1):
# a setting that is constant in training (FD001's throttle) still tolerates rounding.
SPREAD_FLOOR = 1e-3
# A regime holds at least this share of the training rows: the rows of a smaller cluster (a few
# odd readings) join the nearest regime instead of making one of their own.
MIN_REGIME_SHARE = 0.01
_RESTARTS = 4
_ROWS = ("centres", "spreads", "means", "scales")  # the per-regime rows of OperatingRegimes
_ITERATIONS = 100


def _squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return ((points[:, None, :] - centres[None]) ** 2).sum(axis=2)


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means from a k-means++ start: (centres, labels, within-cluster sum of squares)."""
    centres = points[[int(rng.integers(len(points)))]]
    while len(centres) < k:
        distance = _squared_distances(points, centres).min(axis=1)
        if distance.sum() == 0:
            break  # fewer distinct points than k
        centres = np.vstack([centres, points[rng.choice(len(points), p=distance / distance.sum())]])
    for _ in range(_ITERATIONS):
        labels = _squared_distances(points, centres).argmin(axis=1)
        # A cluster left without points keeps its centre (its mean would be NaN).
        moved = np.array(
            [
                points[labels == j].mean(axis=0) if (labels == j).any() else centres[j]
                for j in range(len(centres))
            ]
        )
        if np.array_equal(moved, centres):
            break
        centres = moved
    labels = _squared_distances(points, centres).argmin(axis=1)
    return centres, labels, float(((points - centres[labels]) ** 2).sum())


def _merge_small(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Labels with the rows of clusters under MIN_REGIME_SHARE moved to the nearest larger cluster."""
    ids, counts = np.unique(labels, return_counts=True)
    large = ids[counts >= MIN_REGIME_SHARE * len(labels)]  # never empty: k <= MAX_REGIMES
    if len(large) == len(ids):
        return labels
    centres = np.array([points[labels == j].mean(axis=0) for j in large])
    small = ~np.isin(labels, large)
    merged = labels.copy()
    merged[small] = large[_squared_distances(points[small], centres).argmin(axis=1)]
    return merged


def _place(settings: np.ndarray, centres: np.ndarray, spreads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centre, in spreads of its settings, and whether it is beyond FAR_SIGMAS
    (a row with a setting that is not finite is far from every regime)."""
    z = np.abs(settings[:, None, :] - centres[None]) / spreads[None]
    worst = z.max(axis=2)  # (rows, regimes): the farthest setting decides
    worst[~np.isfinite(settings).all(axis=1)] = np.inf
    nearest = worst.argmin(axis=1)
    return nearest, worst[np.arange(len(nearest)), nearest] > FAR_SIGMAS


def find_regimes(settings: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each row's regime (0..k-1, numbered by their centres in settings order), k found from the data."""
    scale = settings.std(axis=0)
    points = (settings - settings.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    total = float((points**2).sum())
    labels = np.zeros(len(points), dtype=np.intp)
    if total > 0:
        rng = np.random.default_rng(seed)
        for k in range(2, MAX_REGIMES + 1):
            _, labels, within = min(
                (_kmeans(points, k, rng) for _ in range(_RESTARTS)), key=lambda fit: fit[2]
            )
            if within <= UNEXPLAINED * total:
                break
        else:
            labels = np.zeros(len(points), dtype=np.intp)  # no small k explains them: one regime, noisy
    labels = _merge_small(points, labels)
    centres = np.array([settings[labels == j].mean(axis=0) for j in np.unique(labels)])
    order = np.lexsort(centres.T[::-1])  # stable numbering: by the first setting, then the next
    return np.argsort(order)[np.searchsorted(np.unique(labels), labels)]


@dataclass(frozen=True)
class OperatingRegimes:
    """Regime centres and spreads in the operational settings, and each sensor's mean and standard
    deviation within each regime (rows: regimes; columns: `settings`, then `sensors`)."""

    settings: tuple[str, ...]
    sensors: tuple[str, ...]
    centres: tuple[tuple[float, ...], ...]
    spreads: tuple[tuple[float, ...], ...]
    means: tuple[tuple[float, ...], ...]
    scales: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        for name in ("settings", "sensors"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        regimes = len(self.centres)
        for name, width in (
            ("centres", len(self.settings)),
            ("spreads", len(self.settings)),
            ("means", len(self.sensors)),
            ("scales", len(self.sensors)),
        ):
            rows = tuple(tuple(float(v) for v in row) for row in getattr(self, name))
            if len(rows) != regimes or any(len(row) != width for row in rows):
                raise ValueError(f"regimes: {name} must be {regimes} rows of {width} values")
            if not np.isfinite(rows).all():
                raise ValueError(f"regimes: {name} must be finite")
            object.__setattr__(self, name, rows)
        if regimes < 1:
            raise ValueError("regimes: at least one regime")
        if any(v <= 0 for row in (*self.spreads, *self.scales) for v in row):
            raise ValueError("regimes: spreads and scales must be positive")

    @classmethod
    def fit(
        cls, settings: np.ndarray, values: np.ndarray, setting_names: Sequence[str], sensors: Sequence[str]
    ) -> OperatingRegimes:
        """Regimes of training rows (`settings`, `values` in `sensors` order): only these rows count."""
        clusters = find_regimes(settings)
        regimes = range(int(clusters.max()) + 1)
        centres = np.array([settings[clusters == j].mean(axis=0) for j in regimes])
        floor = SPREAD_FLOOR * np.maximum(np.abs(centres), 1.0)
        spreads = np.maximum(np.array([settings[clusters == j].std(axis=0) for j in regimes]), floor)
        # Sensor statistics by the assignment scoring uses, so a training row is standardised alike
        # (a regime that assignment leaves empty keeps its cluster's rows).
        placed, _ = _place(settings, centres, spreads)
        members = [placed == j if (placed == j).any() else clusters == j for j in regimes]
        means = np.array([values[rows].mean(axis=0) for rows in members])
        deviations = np.array([values[rows].std(axis=0) for rows in members])
        # A sensor constant within a regime takes its spread within the others (1 if none), so a
        # new value there is standardised in the same units as elsewhere.
        counts = np.array([rows.sum() for rows in members])[:, None]
        pooled = np.sqrt((counts * deviations**2).sum(axis=0) / counts.sum())
        tiny = deviations <= 1e-12 * np.maximum(np.abs(means), 1.0)
        usable = pooled > 1e-12 * np.maximum(np.abs(means).max(axis=0), 1.0)
        scales = np.where(tiny, np.where(usable, pooled, 1.0), deviations)
        return cls(
            tuple(setting_names), tuple(sensors), *(a.tolist() for a in (centres, spreads, means, scales))
        )

    def only(self, sensors: Sequence[str]) -> OperatingRegimes:
        """The same regimes, standardising `sensors` only (in that order)."""
        columns = [self.sensors.index(sensor) for sensor in sensors]

        def pick(rows: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
            return tuple(tuple(row[i] for i in columns) for row in rows)

        return OperatingRegimes(
            self.settings, tuple(sensors), self.centres, self.spreads, pick(self.means), pick(self.scales)
        )

    @property
    def count(self) -> int:
        """How many regimes."""
        return len(self.centres)

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.array(rows) for rows in (self.centres, self.spreads, self.means, self.scales))

    def assign(self, settings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's nearest regime (in training spreads) and whether it is far from every regime."""
        centres, spreads, _, _ = self._arrays
        return _place(np.asarray(settings, dtype=np.float64), centres, spreads)

    def standardise(self, settings: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Sensor values (rows, `sensors`) standardised within each row's nearest regime."""
        regime, _ = self.assign(settings)
        _, _, means, scales = self._arrays
        return (np.asarray(values, dtype=np.float64) - means[regime]) / scales[regime]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for the feature spec in a model bundle."""
        return {
            "settings": list(self.settings),
            "sensors": list(self.sensors),
            **{name: [list(row) for row in getattr(self, name)] for name in _ROWS},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OperatingRegimes:
        """Inverse of `to_dict`, refusing missing or unknown keys and malformed rows."""
        keys = {"settings", "sensors", *_ROWS}
        if set(data) != keys:
            raise ValueError(f"regimes need exactly the keys {sorted(keys)}, got {sorted(data)}")
        return cls(**data)
