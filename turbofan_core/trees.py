"""XGBoost tree ensembles as numpy arrays, for scoring a few rows at a time.

XGBoost spends about 75 µs in its C library and 100 µs in its Python wrapper on every
prediction call, whatever the number of rows, while the trees of one row cost a few µs. The
edge scores one message at a time, so that overhead was most of its latency. `TreeArrays`
walks the same trees with numpy: every tree padded to a complete binary tree of the ensemble's
depth, all trees of all models one level at a time. Its results equal XGBoost's bit for bit
(tests/test_trees.py): features are rounded to float32 as XGBoost does, a row goes right when
`value >= split` (left when `<`), and each output sums its trees' leaves in float32, in tree
order, from the base score. Past a few dozen rows XGBoost's own loop is faster (figures in
docs/benchmarks.md), so `ModelBundle.predict_matrix` uses these arrays only for small batches.

Only what our training produces is supported: gbtree boosters of numerical splits, one output
per tree, objectives whose prediction is the raw sum. `compile_trees` returns None otherwise,
and for rows with a missing value (NaN) callers use XGBoost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import xgboost as xgb

MAX_DEPTH = 10  # deeper trees would make the padded arrays large; XGBoost scores those
_RAW_SUM_OBJECTIVES = {"reg:squarederror", "reg:absoluteerror", "reg:quantileerror", "reg:pseudohubererror"}


class TreeArrays:
    """Several boosters' trees, padded to one depth; `predict` gives every output of every booster."""

    def __init__(
        self,
        features: np.ndarray,
        thresholds: np.ndarray,
        leaves: np.ndarray,
        outputs: list[np.ndarray],
        base_scores: np.ndarray,
    ) -> None:
        self.depth = int(np.log2(leaves.shape[1]))
        self._features = features.ravel()  # (trees * inner): feature index of each padded split
        self._thresholds = thresholds.ravel()  # float32; +inf where padding always goes left
        self._leaves = leaves.ravel()  # (trees * 2**depth): float32 leaf values
        self._tree_inner = np.arange(len(features)) * features.shape[1]  # where each tree's splits start
        self._tree_leaves = np.arange(len(features)) * leaves.shape[1]
        self._outputs = outputs  # per output, its trees in order
        self._base_scores = base_scores.astype(np.float32)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """(rows, outputs) float32: each output's base score plus its trees' leaves, summed in order."""
        x = np.ascontiguousarray(rows, dtype=np.float32)
        width = x.shape[1]
        flat = x.ravel()
        row_start = (np.arange(len(x)) * width)[:, None]
        position = np.zeros((len(x), len(self._tree_inner)), dtype=np.intp)  # within each tree's level
        for level in range(self.depth):
            node = self._tree_inner + (2**level - 1) + position
            right = flat[row_start + self._features[node]] >= self._thresholds[node]
            position = 2 * position + right
        values = self._leaves[self._tree_leaves + position]
        out = np.empty((len(x), len(self._outputs)), dtype=np.float32)
        for index, trees in enumerate(self._outputs):
            terms = np.empty((len(x), len(trees) + 1), dtype=np.float32)
            terms[:, 0] = self._base_scores[index]
            terms[:, 1:] = values[:, trees]
            out[:, index] = np.cumsum(terms, axis=1, dtype=np.float32)[:, -1]  # sequential, as XGBoost
        return out


def compile_trees(boosters: Sequence[xgb.Booster]) -> TreeArrays | None:
    """The boosters' trees as one `TreeArrays` (outputs in booster order), or None if unsupported."""
    trees: list[dict] = []
    outputs: list[np.ndarray] = []
    base_scores: list[float] = []
    for booster in boosters:
        learner = json.loads(booster.save_raw("json"))["learner"]
        if learner["gradient_booster"]["name"] != "gbtree":
            return None
        if learner["objective"]["name"] not in _RAW_SUM_OBJECTIVES:
            return None
        model = learner["gradient_booster"]["model"]
        scores = learner["learner_model_param"]["base_score"].strip("[]").split(",")
        groups = np.asarray(model["tree_info"], dtype=np.intp)
        for tree in model["trees"]:
            if any(tree.get("split_type", ())) or int(tree["tree_param"].get("size_leaf_vector", 1)) > 1:
                return None  # categorical splits, or vector leaves
        for group, score in enumerate(scores):
            outputs.append(len(trees) + np.flatnonzero(groups == group))
            base_scores.append(float(score))
        trees.extend(model["trees"])
    depth = max(_depth(tree) for tree in trees)
    if depth > MAX_DEPTH:
        return None
    depth = max(depth, 1)
    features = np.zeros((len(trees), 2**depth - 1), dtype=np.intp)
    thresholds = np.full((len(trees), 2**depth - 1), np.inf, dtype=np.float32)
    leaves = np.zeros((len(trees), 2**depth), dtype=np.float32)
    for index, tree in enumerate(trees):
        _pad(tree, index, depth, features, thresholds, leaves)
    return TreeArrays(features, thresholds, leaves, outputs, np.array(base_scores))


def _depth(tree: dict) -> int:
    left, right = tree["left_children"], tree["right_children"]
    deepest, stack = 0, [(0, 0)]
    while stack:
        node, level = stack.pop()
        if left[node] == -1:
            deepest = max(deepest, level)
        else:
            stack += [(left[node], level + 1), (right[node], level + 1)]
    return deepest


def _pad(
    tree: dict, index: int, depth: int, features: np.ndarray, thresholds: np.ndarray, leaves: np.ndarray
) -> None:
    """Lay one tree out as a complete tree: a leaf above the last level fills every leaf slot below
    it, and the padding splits under it (threshold +inf) send every row left, into that range."""
    left, right = tree["left_children"], tree["right_children"]
    splits, conditions = tree["split_indices"], tree["split_conditions"]  # a leaf's condition is its value
    stack = [(0, 0, 0)]  # node, level, position within the level
    while stack:
        node, level, position = stack.pop()
        if left[node] == -1:
            span = 2 ** (depth - level)
            leaves[index, position * span : (position + 1) * span] = conditions[node]
            continue
        slot = 2**level - 1 + position
        features[index, slot], thresholds[index, slot] = splits[node], conditions[node]
        stack += [(left[node], level + 1, 2 * position), (right[node], level + 1, 2 * position + 1)]
