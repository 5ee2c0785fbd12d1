"""The model bundle: content addressed, deterministic, verified on every load, scoring like the edge."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from azure.storage.blob import BlobServiceClient

from turbofan_core import training
from turbofan_core.bundle import (
    MANIFEST,
    BundleError,
    ModelBundle,
    bundle_name,
    load_bundle,
    read_bundle,
    write_bundle,
)
from turbofan_core.features import FeatureSpec, StreamingFeatures, compute_features
from turbofan_core.labels import label_rul
from turbofan_core.storage import BlobStore, LocalStore

SPEC = FeatureSpec(
    sensors=("Sensor2", "Sensor4", "Sensor11"),
    windows=(5,),
    statistics=("mean", "slope"),
    ewm_alphas=(0.2,),
    include_cycle=True,
)
PARAMS = {"max_depth": 3, "learning_rate": 0.1, "n_estimators": 20}
CAP = 125


def with_rul(fleet: pd.DataFrame, rul_cap: int = CAP) -> pd.DataFrame:
    """`fleet` (run-to-failure engines as devices, in their order) with each cycle's RUL, as
    `rul_labels` makes it: each lifetime ends at its last cycle."""
    failures = fleet.groupby(["device_id", "lifetime"], as_index=False)["CycleTime"].max()
    labels = label_rul(fleet, failures, cap=rul_cap)[["device_id", "lifetime", "CycleTime", "rul"]]
    return fleet.merge(labels, on=["device_id", "lifetime", "CycleTime"], how="left", validate="1:1")


def make_bundle(fleet: pd.DataFrame, rul_cap: int = CAP, spec: FeatureSpec = SPEC) -> ModelBundle:
    """A small real model on `fleet` (FD001 engines as devices), quick to train."""
    labels = with_rul(fleet, rul_cap)[["device_id", "lifetime", "CycleTime", "rul"]]
    frame = compute_features(fleet, spec).merge(labels)
    X, y = training.design_matrix(frame, spec.feature_names)
    folds = training.trajectory_folds(frame, 3, seed=0)
    fitted = training.fit_final(X, y, folds, PARAMS, seed=0, workers=1)
    return ModelBundle(
        spec=spec,
        rul_cap=rul_cap,
        quantiles=training.INTERVAL,
        point=fitted.point,
        quantile_model=fitted.quantile_model,
        quantile_offsets=fitted.quantile_offsets,
        params=PARAMS,
        watermark={"trajectories": 10, "data_sha256": "0" * 64},
        metrics={"cv_rmse": 20.0},
    )


@pytest.fixture(scope="module")
def bundle(fleet: pd.DataFrame) -> ModelBundle:
    return make_bundle(fleet)


def rezip(data: bytes, change_manifest: dict) -> bytes:
    """The same archive with manifest fields changed: a well-formed bundle that is not the original."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            payload = source.read(info)
            if info.filename == MANIFEST:
                payload = json.dumps({**json.loads(payload), **change_manifest}).encode()
            target.writestr(info, payload)
    return out.getvalue()


def test_round_trip_through_a_local_store(bundle: ModelBundle, fleet: pd.DataFrame, tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    name = write_bundle(store, bundle)
    assert name == bundle_name(bundle.sha256) == f"bundles/{bundle.sha256}.zip"
    assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == bundle.sha256

    loaded = read_bundle(store, bundle.sha256)
    assert loaded.sha256 == bundle.sha256
    assert loaded.spec == SPEC and loaded.rul_cap == CAP and loaded.quantiles == training.INTERVAL
    assert loaded.quantile_offsets == bundle.quantile_offsets
    assert (loaded.params, loaded.watermark, loaded.metrics) == (
        bundle.params,
        bundle.watermark,
        bundle.metrics,
    )
    pd.testing.assert_frame_equal(loaded.predict(fleet), bundle.predict(fleet))

    # Models are stored in XGBoost's own format, never pickled.
    members = zipfile.ZipFile(tmp_path / name).namelist()
    assert members == ["manifest.json", "point.ubj", "quantiles.ubj"]


def test_equal_content_gives_equal_bytes_and_storing_again_is_a_no_op(
    bundle: ModelBundle, fleet: pd.DataFrame, tmp_path: Path
) -> None:
    again = make_bundle(fleet)  # trained again from scratch, same data and seed
    assert again.data == bundle.data and again.sha256 == bundle.sha256
    store = LocalStore(tmp_path)
    assert write_bundle(store, bundle) == write_bundle(store, again)
    assert list(store.list_names()) == [bundle_name(bundle.sha256)]
    assert make_bundle(fleet, rul_cap=100).sha256 != bundle.sha256


def test_a_tampered_bundle_is_refused(bundle: ModelBundle, tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    path = tmp_path / write_bundle(store, bundle)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{bundle.sha256} refused: .*changed or corrupted"):
        read_bundle(store, bundle.sha256)

    # A well-formed archive with one changed field is refused just the same.
    with pytest.raises(BundleError, match="changed or corrupted"):
        load_bundle(rezip(bundle.data, {"rul_cap": 500}), bundle.sha256)
    # And once a bundle is stored under a name, different bytes cannot take that name.
    with pytest.raises(BundleError):
        write_bundle(store, bundle)


def test_a_bundle_of_another_format_is_refused(bundle: ModelBundle) -> None:
    newer = rezip(bundle.data, {"format_version": 99})
    with pytest.raises(BundleError, match="v99, this code reads turbofan-model-bundle v1"):
        load_bundle(newer, hashlib.sha256(newer).hexdigest())


def test_predictions_are_bounded_ordered_and_match_the_streaming_engine(
    bundle: ModelBundle, fleet: pd.DataFrame
) -> None:
    predicted = bundle.predict(fleet)
    assert list(predicted.columns) == ["device_id", "lifetime", "CycleTime", "rul_pred", "rul_p10", "rul_p90"]
    assert len(predicted) == len(fleet)
    values = predicted[["rul_pred", "rul_p10", "rul_p90"]].to_numpy()
    assert ((values >= 0) & (values <= CAP)).all()
    assert (predicted["rul_p10"] <= predicted["rul_p90"]).all()

    # The edge: one message at a time through the streaming engine, then the bundle's models.
    engine = StreamingFeatures(bundle.spec)
    ordered = fleet.sort_values(["device_id", "CycleTime"])
    vectors = [
        engine.update(device, cycle, values)
        for device, cycle, values in zip(
            ordered["device_id"], ordered["CycleTime"], ordered[list(SPEC.sensors)].to_numpy(), strict=True
        )
    ]
    np.testing.assert_allclose(bundle.predict_matrix(np.vstack(vectors)), values, rtol=0, atol=1e-4)

    with pytest.raises(ValueError, match=f"expected {len(SPEC.feature_names)} features"):
        bundle.predict_matrix(np.zeros((1, 3)))


def test_round_trip_through_a_blob_container(
    bundle: ModelBundle, fleet: pd.DataFrame, azurite, blob_container: str
) -> None:
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        container = service.get_container_client(blob_container)
        store = BlobStore(container, prefix="models")
        name = write_bundle(store, bundle)
        pd.testing.assert_frame_equal(read_bundle(store, bundle.sha256).predict(fleet), bundle.predict(fleet))

        tampered = rezip(bundle.data, {"rul_cap": 1})
        container.upload_blob(f"models/{name}", tampered, overwrite=True)
        with pytest.raises(BundleError, match="changed or corrupted"):
            read_bundle(store, bundle.sha256)
