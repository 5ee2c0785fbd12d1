"""The tree walk scores exactly as XGBoost does, on the kinds of models training makes, and refuses
what it cannot score that way."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from test_bundle import make_bundle

from turbofan_core.bundle import BundleError
from turbofan_core.features import FeatureSpec
from turbofan_core.trees import MAX_FEATURES, PARALLEL_ROWS, TreeEnsemble, UnsupportedModel, read_model


def _data(rows: int = 600, width: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, width)) * [1, 10, 100, 1000, 0.01, 1, 1, 9000][:width]
    y = x[:, 0] * 3 + np.sin(x[:, 1]) * 20 + (x[:, 2] > 0) * 7 + rng.normal(size=rows)
    return x, y


def _train(params: dict, rounds: int = 40, seed: int = 0) -> tuple[xgb.Booster, np.ndarray]:
    x, y = _data(seed=seed)
    booster = xgb.train({"nthread": 1, "seed": seed, **params}, xgb.DMatrix(x, label=y), rounds)
    return booster, x


def _ensemble(*boosters: xgb.Booster, file_format: str = "ubj") -> TreeEnsemble:
    return TreeEnsemble([read_model(bytes(b.save_raw(file_format))) for b in boosters])


def _probes(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    """Rows from the data, plus rows whose values sit exactly on split thresholds and one float32
    step either side (where `<` and `<=`, or float64 and float32 comparison, would differ), and
    rows with missing values (which take each node's default branch)."""
    thresholds = booster.trees_to_dataframe().dropna(subset=["Split"])
    rows = [x]
    for _, split in thresholds.head(200).iterrows():
        feature = int(split["Feature"].lstrip("f"))
        value = np.float32(split["Split"])
        for probe in (value, np.nextafter(value, -np.inf), np.nextafter(value, np.inf)):
            row = x[len(rows) % len(x)].copy()
            row[feature] = probe
            rows.append(row[None, :])
    missing = x[:50].copy()
    missing[np.arange(50), np.arange(50) % x.shape[1]] = np.nan
    return np.concatenate([*rows, missing])


@pytest.mark.parametrize(
    "params",
    [
        {"max_depth": 5, "learning_rate": 0.05},
        {"max_depth": 1},  # stumps
        {"max_depth": 8, "min_child_weight": 30},  # unbalanced: leaves on many levels
        {"max_depth": 7, "grow_policy": "lossguide", "max_leaves": 12},
        {"max_depth": 4, "objective": "reg:absoluteerror"},
        {"max_depth": 4, "objective": "reg:quantileerror", "quantile_alpha": [0.1, 0.5, 0.9]},
    ],
)
def test_the_tree_walk_equals_xgboost_bit_for_bit(params: dict) -> None:
    booster, x = _train(params)
    probes = _probes(booster, x)
    expected = booster.inplace_predict(probes).reshape(len(probes), -1)
    for file_format in ("ubj", "json"):
        trees = _ensemble(booster, file_format=file_format)
        assert np.array_equal(trees.predict(probes), expected)
        assert np.array_equal(trees.predict(probes[:1]), expected[:1])
    many = np.resize(probes, (PARALLEL_ROWS + 1, probes.shape[1]))  # the probes over and over: two threads
    assert np.array_equal(trees.predict(many), np.resize(expected, (len(many), expected.shape[1])))


def test_several_boosters_give_their_outputs_in_order() -> None:
    point, x = _train({"max_depth": 3})
    quantiles, _ = _train({"max_depth": 6, "objective": "reg:quantileerror", "quantile_alpha": [0.1, 0.9]})
    trees = _ensemble(point, quantiles)
    expected = np.hstack([point.inplace_predict(x)[:, None], quantiles.inplace_predict(x)])
    assert np.array_equal(trees.predict(x), expected)


@pytest.mark.parametrize(
    "params",
    [
        {"objective": "reg:logistic"},  # the sum goes through a sigmoid
        {"booster": "dart", "rate_drop": 0.1},
        {"booster": "gblinear"},
        {"multi_strategy": "multi_output_tree", "tree_method": "hist",
         "objective": "reg:quantileerror", "quantile_alpha": [0.1, 0.9]},
    ],
)  # fmt: skip
def test_models_the_walk_would_score_differently_are_refused(params: dict) -> None:
    x, y = _data()
    label = (y > y.mean()).astype(float) if params.get("objective") == "reg:logistic" else y
    depth = {} if params.get("booster") == "gblinear" else {"max_depth": 3}
    booster = xgb.train({"nthread": 1, **depth, **params}, xgb.DMatrix(x, label=label), 5)
    with pytest.raises(UnsupportedModel):
        _ensemble(booster)


def test_a_tree_whose_walk_would_not_end_or_read_past_the_row_is_refused() -> None:
    booster, _ = _train({"max_depth": 3}, rounds=2)
    for key, bad in (("left_children", 0), ("right_children", 10_000), ("split_indices", 8)):
        model = read_model(bytes(booster.save_raw("json")))
        tree = model["learner"]["gradient_booster"]["model"]["trees"][1]
        inner = tree["left_children"].index(next(c for c in tree["left_children"] if c > 0))
        tree[key][inner] = bad  # a loop back to the root, a child outside the tree, a 9th feature
        with pytest.raises(UnsupportedModel, match="malformed tree"):
            TreeEnsemble([model])


def test_a_walk_handed_a_bad_block_count_walks_nothing_outside_its_rows() -> None:
    """The C walk takes blocks of rows from a counter two threads share: a negative count is refused,
    and one past the last block (however large) walks nothing, never rows outside the buffers."""
    booster, x = _train({"max_depth": 3}, rounds=2)
    trees = _ensemble(booster)
    rows = np.ascontiguousarray(x[:40], dtype=np.float32)
    out = np.full((len(rows), trees.num_outputs), 7.0, dtype=np.float32)
    with pytest.raises(ValueError, match="not negative"):
        trees._walk(rows, out, np.array([-1], dtype=np.int64))
    for taken in (2, 1 << 58, (1 << 63) - 1):
        trees._walk(rows, out, np.array([taken], dtype=np.int64))
        assert (out == 7.0).all()


def test_a_model_of_more_features_than_a_node_can_name_is_refused() -> None:
    booster, _ = _train({"max_depth": 2}, rounds=1)
    model = read_model(bytes(booster.save_raw("json")))
    model["learner"]["learner_model_param"]["num_feature"] = str(MAX_FEATURES + 1)
    with pytest.raises(UnsupportedModel, match="features"):
        TreeEnsemble([model])


def test_a_tree_of_an_output_the_model_does_not_have_is_refused() -> None:
    booster, _ = _train({"max_depth": 3}, rounds=2)
    model = read_model(bytes(booster.save_raw("json")))
    model["learner"]["gradient_booster"]["model"]["tree_info"][1] = 1_000_000  # would write past the output
    with pytest.raises(UnsupportedModel, match="output 1000000"):
        TreeEnsemble([model])


def test_a_ubjson_container_of_items_without_payload_is_refused() -> None:
    for kind in (b"Z", b"T"):
        with pytest.raises(ValueError, match="UBJSON: a container"):
            read_model(b"[$" + kind + b"#L" + (1 << 40).to_bytes(8, "big"))


def test_a_truncated_model_file_is_an_error_not_a_crash() -> None:
    booster, _ = _train({"max_depth": 3}, rounds=2)
    data = bytes(booster.save_raw("ubj"))
    for end in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError, match="truncated"):
            read_model(data[:end])


def test_a_bundle_of_models_the_walk_cannot_score_is_refused(fleet: pd.DataFrame) -> None:
    good = make_bundle(fleet)
    x = np.random.default_rng(0).normal(size=(50, len(good.spec.feature_names)))
    dart = xgb.train({"booster": "dart", "max_depth": 2}, xgb.DMatrix(x, label=x[:, 0]), 3)
    with pytest.raises(BundleError, match="dart"):
        dataclasses.replace(good, point=bytes(dart.save_raw("ubj")))
    narrower = FeatureSpec(sensors=("Sensor2",), windows=(5,), statistics=("mean",), ewm_alphas=())
    width, narrow = len(good.spec.feature_names), len(narrower.feature_names)
    with pytest.raises(BundleError, match=rf"take {width} features, the spec makes {narrow}"):
        dataclasses.replace(good, spec=narrower)
    with pytest.raises(BundleError, match=r"give \[2, 1\] outputs"):  # the models swapped
        dataclasses.replace(good, point=good.quantile_model, quantile_model=good.point)
