"""XGBoost models read from their files and scored without XGBoost.

XGBoost spends about 175 µs on every prediction call, whatever the number of rows, while the
trees of one row cost a few µs, and the edge scores one message at a time. XGBoost also imports
scipy, most of the edge install's size. So bundles are scored by `TreeEnsemble`: the trees of
XGBoost's own model file (UBJSON, or JSON), walked in C (`_trees.c`), with results equal to
XGBoost's bit for bit (tests/test_trees.py). XGBoost is needed only to train.

Only what our training produces is supported: gbtree boosters of numerical splits, one output per
tree, objectives whose prediction is the raw sum of the leaves. Anything else is refused with
`UnsupportedModel`, never scored differently from XGBoost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np

from turbofan_core import _trees

_NODE = np.dtype(  # Node in _trees.c
    [("left", "<i4"), ("feature", "<u2"), ("missing_right", "u1"), ("pad", "u1")]
    + [("split", "<f4"), ("leaf", "<f4")]
)
MAX_FEATURES = 1 << 16  # a node's feature is 16 bits
# From this many rows two threads walk them, taking blocks of rows in turn: the edge's gateway batches
# of 500 and the pipeline's evaluation frames. Once a batch was split in C, the event loop's thread
# was the edge's bottleneck with most of a core idle beside it: two threads walking half the rows
# each took the batch rate over HTTP from 45,800 to 49,800 msgs/s, and blocks taken in turn, each
# summed apart, a batch's walk from 2.6-2.8 to 1.9 µs a row (docs/benchmarks.md). Single messages
# walk on the calling thread.
PARALLEL_ROWS = 256
_RAW_SUM_OBJECTIVES = {"reg:squarederror", "reg:absoluteerror", "reg:quantileerror", "reg:pseudohubererror"}


class UnsupportedModel(ValueError):
    """A model file this walk cannot score exactly as XGBoost would."""


def read_model(data: bytes) -> dict[str, Any]:
    """An XGBoost model file as XGBoost's JSON model document (from UBJSON or JSON bytes)."""
    if data[:1] == b"{" and data[1:2] in (b'"', b"\n", b" ", b"\r", b"\t"):
        return json.loads(data)
    value, end = _Ubjson(data).read(0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes after the end of the model document")
    return value


class _Ubjson:
    """The subset of UBJSON (draft 12) XGBoost writes, numeric arrays as numpy arrays."""

    _NUMBERS = {
        b"i": np.dtype("i1"),
        b"U": np.dtype("u1"),
        b"I": np.dtype(">i2"),
        b"l": np.dtype(">i4"),
        b"L": np.dtype(">i8"),
        b"d": np.dtype(">f4"),
        b"D": np.dtype(">f8"),
    }

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    def read(self, pos: int, marker: bytes | None = None) -> tuple[Any, int]:
        if marker is None:
            marker, pos = self._marker(pos)
        if marker in self._NUMBERS:
            dtype = self._NUMBERS[marker]
            end = self._bounded(pos + dtype.itemsize)
            return np.frombuffer(self.data[pos:end], dtype)[0].item(), end
        if marker in (b"S", b"H"):
            return self._string(pos)
        if marker == b"C":
            end = self._bounded(pos + 1)
            return bytes(self.data[pos:end]).decode(), end
        if marker in (b"T", b"F", b"Z"):
            return {b"T": True, b"F": False, b"Z": None}[marker], pos
        if marker in (b"[", b"{"):
            return self._container(pos, marker == b"{")
        raise ValueError(f"UBJSON: unknown marker {marker!r} at byte {pos - 1}")

    def _marker(self, pos: int) -> tuple[bytes, int]:
        while True:
            marker = bytes(self.data[pos : self._bounded(pos + 1)])
            if marker != b"N":  # no-op
                return marker, pos + 1
            pos += 1

    def _bounded(self, end: int) -> int:
        if end > len(self.data):
            raise ValueError("UBJSON: truncated model document")
        return end

    def _count(self, pos: int) -> tuple[int, int]:
        count, pos = self.read(pos)
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"UBJSON: bad length {count!r}")
        return count, pos

    def _string(self, pos: int) -> tuple[str, int]:
        size, pos = self._count(pos)
        end = self._bounded(pos + size)
        return bytes(self.data[pos:end]).decode(), end

    def _container(self, pos: int, is_object: bool) -> tuple[Any, int]:
        kind, count = None, None
        marker, after = self._marker(pos)
        if marker == b"$":
            kind, pos = self._marker(after)
            marker, after = self._marker(pos)
            if marker != b"#":
                raise ValueError("UBJSON: a typed container without a count")
        if marker == b"#":
            count, pos = self._count(after)
            if count > len(self.data) - pos and kind not in self._NUMBERS:  # every item takes a byte
                raise ValueError("UBJSON: a container count larger than the document")
        if kind in (b"T", b"F", b"Z", b"N"):
            raise ValueError(f"UBJSON: a container typed {kind!r}, which XGBoost never writes")
        if not is_object and kind in self._NUMBERS and count is not None:
            dtype = self._NUMBERS[kind]
            end = self._bounded(pos + count * dtype.itemsize)
            return np.frombuffer(self.data[pos:end], dtype).astype(dtype.newbyteorder("=")), end
        items: list[Any] = []
        result: dict[str, Any] = {}
        taken = 0  # items or entries read (a repeated key does not grow `result`)
        while count is None or taken < count:
            taken += 1
            if count is None:
                marker, after = self._marker(pos)
                if marker == (b"}" if is_object else b"]"):
                    return (result if is_object else items), after
            if is_object:
                key, pos = self._string(pos)
                result[key], pos = self.read(pos, kind)
            else:
                value, pos = self.read(pos, kind)
                items.append(value)
        return (result if is_object else items), pos


class TreeEnsemble:
    """The trees of several XGBoost models in flat arrays; `predict` gives every model's outputs."""

    def __init__(self, models: Sequence[dict[str, Any]]) -> None:
        """`models`: XGBoost model documents (`read_model`), all taking the same features."""
        trees: list[dict[str, Any]] = []
        outputs: list[int] = []
        self.model_outputs: list[int] = []  # how many outputs each model gives, in order
        base_scores: list[float] = []
        widths = set()
        for model in models:
            learner = model["learner"]
            booster, objective = learner["gradient_booster"]["name"], learner["objective"]["name"]
            if booster != "gbtree":
                raise UnsupportedModel(f"a {booster} booster (only gbtree is walked)")
            if objective not in _RAW_SUM_OBJECTIVES:
                raise UnsupportedModel(f"objective {objective} (its prediction is not the sum of leaves)")
            parameters = learner["learner_model_param"]
            widths.add(int(parameters["num_feature"]))
            scores = str(parameters["base_score"]).strip("[]").split(",")
            forest = learner["gradient_booster"]["model"]
            targets = int(parameters.get("num_target", 1))
            if len(scores) != targets:
                raise UnsupportedModel(f"{len(scores)} base scores for {targets} targets")
            for tree, group in zip(forest["trees"], map(int, forest["tree_info"]), strict=True):
                if not 0 <= group < len(scores):
                    raise UnsupportedModel(f"a tree of output {group}, of {len(scores)}")
                if any(np.asarray(tree.get("split_type", ()))):
                    raise UnsupportedModel("categorical splits")
                if int(tree["tree_param"].get("size_leaf_vector", 1)) > 1:
                    raise UnsupportedModel("vector leaves (multi_output_tree)")
                trees.append(tree)
                outputs.append(len(base_scores) + group)
            base_scores.extend(float(score) for score in scores)
            self.model_outputs.append(len(scores))
        if len(widths) != 1:
            raise UnsupportedModel(f"models take different numbers of features: {sorted(widths)}")
        self.num_features = widths.pop()
        if self.num_features > MAX_FEATURES:
            raise UnsupportedModel(f"{self.num_features} features (at most {MAX_FEATURES} are walked)")
        self.num_outputs = len(base_scores)
        laid_out = [_layout(tree, self.num_features) for tree in trees]
        sizes = np.array([len(nodes) for nodes, _ in laid_out])
        self._roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
        self._nodes = np.concatenate([nodes for nodes, _ in laid_out])
        self._nodes["left"] += np.repeat(self._roots, sizes)  # indices into all trees' nodes
        self._depths = np.array([depth for _, depth in laid_out], dtype=np.int32)
        self._outputs = np.array(outputs, dtype=np.int32)
        self._base = np.array(base_scores, dtype=np.float32)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """(rows, outputs) float32: each output's base score plus its trees' leaves, summed in order."""
        x = np.ascontiguousarray(np.atleast_2d(rows), dtype=np.float32)
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features per row, got {x.shape[1]}")
        out = np.empty((len(x), self.num_outputs), dtype=np.float32)
        taken = np.zeros(1, dtype=np.int64)  # blocks of rows taken so far, by either thread
        if len(x) < PARALLEL_ROWS:
            self._walk(x, out, taken)
            return out
        other = _helper().submit(self._walk, x, out, taken)
        self._walk(x, out, taken)
        other.result()
        return out

    def _walk(self, x: np.ndarray, out: np.ndarray, taken: np.ndarray) -> None:
        _trees.predict(
            x,
            self.num_features,
            self._nodes,
            self._roots,
            self._depths,
            self._outputs,
            self._base,
            out,
            taken,
        )


@cache
def _helper() -> ThreadPoolExecutor:
    """The second thread of `predict` (the C walk lets go of the GIL, so the two run at once)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="tree-walk")


def _layout(tree: dict[str, Any], width: int) -> tuple[np.ndarray, int]:
    """One tree's nodes as `_trees.c` walks them, and its depth.

    Breadth first from the root, so each node's children are adjacent (left, then right); after
    them, each leaf's terminal pair, two copies of it whose children are the pair itself (see Node
    in _trees.c). Only nodes reached from the root are kept; a tree whose children are out of
    range, whose walk would not end (more nodes reached than the tree has: a cycle), or whose splits
    read a feature the rows do not have, is refused: the C walk trusts these indices.
    """
    left, right = np.asarray(tree["left_children"]).tolist(), np.asarray(tree["right_children"]).tolist()
    features = np.asarray(tree["split_indices"]).tolist()
    conditions = np.asarray(tree["split_conditions"], dtype=np.float32)  # a leaf's holds its value
    default_left = np.asarray(tree["default_left"]).tolist()
    order, levels, children = [0], [0], []  # old index, level, new index of the left child
    for position, node in enumerate(order):
        if not 0 <= node < len(left) or len(order) > len(left):
            raise UnsupportedModel(f"malformed tree: node {node} of {len(left)} is out of range or repeated")
        if left[node] == -1:
            children.append(-1)  # its terminal pair's, below
            continue
        if not 0 <= features[node] < width:
            raise UnsupportedModel(f"malformed tree: a split on feature {features[node]} of {width}")
        children.append(len(order))
        order += [left[node], right[node]]
        levels += [levels[position] + 1] * 2
    leaves = [position for position, child in enumerate(children) if child == -1]
    pairs = len(order) + 2 * np.arange(len(leaves))  # each leaf's pair, after the tree's nodes
    old = np.array(order + [order[position] for position in leaves for _ in range(2)])
    leaf = np.array([left[node] == -1 for node in old.tolist()])
    nodes = np.zeros(len(old), dtype=_NODE)
    nodes["left"] = children + np.repeat(pairs, 2).tolist()
    nodes["left"][leaves] = pairs
    nodes["feature"] = np.where(leaf, 0, np.asarray(features)[old])
    nodes["missing_right"] = ~np.asarray(default_left, dtype=bool)[old] & ~leaf
    nodes["split"] = np.where(leaf, 0, conditions[old])
    nodes["leaf"] = np.where(leaf, conditions[old], 0)
    return nodes, max(levels)
