"""The model bundle: one immutable, content-addressed file holding everything needed to score.

A bundle is a zip archive with a fixed layout and fixed timestamps, so the same models
and metadata always give the same bytes, and its sha256 is its name:

    manifest.json     format, feature spec (and the feature names it must produce), RUL cap,
                      quantiles and their calibration offsets, training params,
                      training-data watermark, metrics
    point.ubj         the point-estimate XGBoost model, in XGBoost's own UBJSON format
    quantiles.ubj     one multi-quantile XGBoost model (p10 and p90)

No pickle anywhere: loading a bundle never runs code from it. Every load checks the
sha256 of the whole file against the name it was asked for and refuses anything else.

Scoring: `bundle.predict(telemetry)` for raw telemetry in a batch; at the edge, one
message at a time, `StreamingFeatures(bundle.spec).update(...)` then
`bundle.predict_matrix(vector)`. Both give the same numbers (tests/test_bundle.py). Neither
needs XGBoost: the models' trees are walked by `turbofan_core.trees`, exactly as XGBoost would.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from turbofan_core.features import FeatureSpec, compute_features
from turbofan_core.storage import NameTaken, ObjectStore
from turbofan_core.trees import TreeEnsemble, UnsupportedModel, read_model

if TYPE_CHECKING:  # only `predict` (batch scoring) takes frames; the edge scores arrays
    import pandas as pd

FORMAT = "turbofan-model-bundle"
FORMAT_VERSION = 1
PREFIX = "bundles/"
SUFFIX = ".zip"
MANIFEST = "manifest.json"
POINT = "point.ubj"
QUANTILES = "quantiles.ubj"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # zip's epoch: fixed so equal content gives equal bytes
PREDICTION = "rul_pred"


class BundleError(ValueError):
    """A bundle that cannot be used: tampered, corrupted, or of a format this code does not read."""


def quantile_column(q: float) -> str:
    """Column name of a quantile prediction, e.g. 0.1 -> `rul_p10`."""
    return f"rul_p{round(q * 100):02d}"


def bundle_name(sha256: str) -> str:
    """Where a bundle lives in the model store."""
    return f"{PREFIX}{sha256}{SUFFIX}"


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A trained model as the edge and the registry see it: models plus what they were trained with."""

    spec: FeatureSpec
    rul_cap: int
    quantiles: tuple[float, ...]
    point: bytes
    """The point-estimate model: XGBoost's model file (UBJSON), as `training.model_file` saves it."""
    quantile_model: bytes
    """The quantile model (one output per quantile), in the same format."""
    quantile_offsets: tuple[float, ...]
    """Added to each quantile model output: the interval's calibration from out-of-fold residuals."""
    params: dict[str, Any] = field(default_factory=dict)
    watermark: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if list(self.quantiles) != sorted(set(self.quantiles)) or not all(0 < q < 1 for q in self.quantiles):
            raise BundleError(f"quantiles must be increasing and inside (0, 1), got {self.quantiles}")
        if len(self.quantile_offsets) != len(self.quantiles):
            raise BundleError(
                f"{len(self.quantile_offsets)} quantile offsets for {len(self.quantiles)} quantiles"
            )
        object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))
        object.__setattr__(self, "quantile_offsets", tuple(float(o) for o in self.quantile_offsets))
        width = len(self.spec.feature_names)
        if self._trees.num_features != width:  # both models take the same number (TreeEnsemble)
            raise BundleError(f"the models take {self._trees.num_features} features, the spec makes {width}")
        if self._trees.model_outputs != [1, len(self.quantiles)]:
            raise BundleError(
                f"the models give {self._trees.model_outputs} outputs, expected 1 (the point estimate) "
                f"and {len(self.quantiles)} (the quantiles)"
            )

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "feature_spec": self.spec.to_dict(),
            "feature_names": list(self.spec.feature_names),
            "rul_cap": self.rul_cap,
            "quantiles": list(self.quantiles),
            "quantile_offsets": list(self.quantile_offsets),
            "params": self.params,
            "watermark": self.watermark,
            "metrics": self.metrics,
            "xgboost_version": ".".join(map(str, self._models[0]["version"])),
        }

    @cached_property
    def data(self) -> bytes:
        """The bundle file: deterministic, so equal bundles have equal bytes and equal names."""
        members = {
            MANIFEST: json.dumps(self.manifest(), sort_keys=True, indent=2).encode(),
            POINT: self.point,
            QUANTILES: self.quantile_model,
        }
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, payload in members.items():
                info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, payload)
        return buffer.getvalue()

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def prediction_columns(self) -> list[str]:
        return [PREDICTION, *map(quantile_column, self.quantiles)]

    def predict_matrix(self, features: np.ndarray) -> np.ndarray:
        """Point estimate then each quantile, one row per feature vector (in `spec.feature_names` order).

        Quantiles get their calibration offsets; everything is clipped to [0, RUL cap], the
        range the models were trained on, and the quantiles are sorted per row so an
        interval never comes out inverted.
        """
        matrix = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if matrix.shape[1] != len(self.spec.feature_names):
            raise ValueError(
                f"expected {len(self.spec.feature_names)} features per row, got {matrix.shape[1]}"
            )
        outputs = self._trees.predict(matrix)  # equal to XGBoost's, bit for bit
        point, raw = outputs[:, :1], outputs[:, 1:]
        bounds = np.sort(raw + np.asarray(self.quantile_offsets), axis=1)
        return np.clip(np.hstack([point, bounds]), 0.0, self.rul_cap)

    @cached_property
    def _models(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both model files as XGBoost's JSON model documents."""
        try:
            return read_model(self.point), read_model(self.quantile_model)
        except (ValueError, KeyError, UnicodeDecodeError, RecursionError) as error:
            raise BundleError(f"a model file is unreadable: {type(error).__name__}: {error}") from None

    @cached_property
    def _trees(self) -> TreeEnsemble:
        """Both models' trees, walked together: outputs are the point estimate, then the quantiles."""
        try:
            return TreeEnsemble(self._models)
        except UnsupportedModel as error:
            raise BundleError(f"a model cannot be scored here: {error}") from None
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"a model file is no XGBoost model: {type(error).__name__}: {error}") from None

    def predict(self, frame: pd.DataFrame, keys: Sequence[str] = ("device_id", "lifetime")) -> pd.DataFrame:
        """Predictions for every row of raw telemetry, with features computed by the bundle's own spec.

        Returns the key columns, CycleTime, `rul_pred` and one column per quantile
        (`rul_p10`, `rul_p90`), ordered by trajectory and cycle.
        """
        features = compute_features(frame, self.spec, keys)
        predictions = self.predict_matrix(features[list(self.spec.feature_names)].to_numpy())
        out = features[[*keys, "CycleTime"]].copy()
        out[self.prediction_columns] = predictions
        return out


def load_bundle(data: bytes, expected_sha256: str) -> ModelBundle:
    """Open bundle bytes after checking they are exactly the bundle named `expected_sha256`."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise BundleError(
            f"model bundle {expected_sha256} refused: its content hashes to {actual}, "
            "so it was changed or corrupted after it was written"
        )
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        manifest = json.loads(archive.read(MANIFEST))
        if (manifest.get("format"), manifest.get("format_version")) != (FORMAT, FORMAT_VERSION):
            raise BundleError(
                f"model bundle {actual} is {manifest.get('format')} v{manifest.get('format_version')}, "
                f"this code reads {FORMAT} v{FORMAT_VERSION}"
            )
        spec = FeatureSpec.from_dict(manifest["feature_spec"])
        if list(spec.feature_names) != manifest["feature_names"]:
            raise BundleError(
                f"model bundle {actual}: this code computes different features from its spec than the "
                "code that trained it; scoring would feed the models the wrong columns"
            )
        bundle = ModelBundle(
            spec=spec,
            rul_cap=manifest["rul_cap"],
            quantiles=tuple(manifest["quantiles"]),
            quantile_offsets=tuple(manifest["quantile_offsets"]),
            point=archive.read(POINT),
            quantile_model=archive.read(QUANTILES),
            params=manifest["params"],
            watermark=manifest["watermark"],
            metrics=manifest["metrics"],
        )
    # The bytes were verified: keep them rather than re-serialising (XGBoost versions may differ).
    bundle.__dict__["data"], bundle.__dict__["sha256"] = data, actual
    return bundle


def write_bundle(store: ObjectStore, bundle: ModelBundle) -> str:
    """Store the bundle under its content hash and return its name; storing it again is a no-op."""
    name = bundle_name(bundle.sha256)
    try:
        store.create(name, bundle.data)
    except NameTaken:
        read_bundle(store, bundle.sha256)  # the same name must hold the same, intact content
    return name


def read_bundle(store: ObjectStore, sha256: str) -> ModelBundle:
    """Read and verify the bundle with this hash from the model store."""
    return load_bundle(store.read(bundle_name(sha256)), sha256)
