"""Single-row scoring of the refund model in a few microseconds, equal to LightGBM.

`load_model` returns a `Model` that scores one feature row with one of two engines:

* ``"compiled"``: the shared object built by ``model.compile`` for exactly this
  ``model.txt`` (checked by ABI version, tree and feature counts, the model text's
  SHA-256, and a self-check against LightGBM on probe rows at load);
* ``"lightgbm"``: LightGBM's own single-row fast C API, the portable fallback whenever
  no compiled object is given or it is refused (the reason is logged and kept in
  `Model.fallback_reason`).

Both return what ``lightgbm.Booster.predict`` returns for the same row (the compiled
engine reproduces its arithmetic exactly; the tests hold both to 1e-12).

Attribution is deferred: `Model.score` keeps the leaf indices of the last row scored in
the calling thread, so a caller that decides HOLD or REJECT asks for
`Model.contributions` of `Model.last_leaves` without scoring again, and an APPROVE pays
nothing for it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import logging
import math
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import lightgbm
import numpy as np
from lightgbm.basic import (
    _C_API_DTYPE_FLOAT64,
    _C_API_PREDICT_LEAF_INDEX,
    _C_API_PREDICT_NORMAL,
    _LIB,
    _safe_call,
)

from gate.treemodel import ZERO_THRESHOLD, ModelFormatError, TreeModel, parse_model, yield_gil

__all__ = ["ENGINE_COMPILED", "ENGINE_LIGHTGBM", "Model", "ModelFormatError", "load_model"]

ENGINE_COMPILED = "compiled"
ENGINE_LIGHTGBM = "lightgbm"

# The ABI of model.compile's shared objects that this loader speaks.
COMPILED_ABI_VERSION = 1

# Engines must agree with Booster.predict to this much on the load-time self-check.
_SELF_CHECK_TOLERANCE = 1e-12
_SELF_CHECK_ROWS = 128

_log = logging.getLogger(__name__)

ONE_THREAD = "num_threads=1"
"""Every LightGBM call the gate makes runs on the calling thread alone. LightGBM's default is an
OpenMP team of one thread per core whose idle threads spin after each call: on a shared machine
that burns the CPUs the event loop, Redis and the callers need (measured 2.5-4x slower serving).
Scoring one row gains nothing from more threads."""


def load_model(model_txt: Path, compiled_so: Path | None = None, *, feature_names: Sequence[str]) -> Model:
    """Load ``model_txt`` for scoring rows laid out as ``feature_names``.

    Uses the compiled engine when ``compiled_so`` loads and matches this model, otherwise
    LightGBM's fast single-row API (see the module docstring). Raises `ModelFormatError`
    when the model is malformed or unsupported, or when its features are not exactly
    ``feature_names`` in that order: a silently misaligned row would score garbage.
    """
    data = model_txt.read_bytes()
    tree_model = parse_model(data)
    _check_feature_names(tree_model.feature_names, tuple(feature_names))
    try:
        _one_openmp_thread()  # LightGBM parses the trees in an OpenMP loop of its own
        booster = lightgbm.Booster(model_str=data.decode("utf-8"))
    except lightgbm.basic.LightGBMError as exc:
        raise ModelFormatError(f"LightGBM cannot load {model_txt}: {exc}") from exc
    if booster.num_trees() != len(tree_model.trees):
        raise ModelFormatError(
            f"LightGBM reads {booster.num_trees()} trees, the parser {len(tree_model.trees)}"
        )

    lightgbm_engine = _LightGBMEngine(booster, tree_model.num_features, len(tree_model.trees))
    if compiled_so is None:
        return Model(tree_model, booster, lightgbm_engine, fallback_reason=None)
    try:
        compiled = _CompiledEngine.load(compiled_so, tree_model, hashlib.sha256(data).hexdigest())
        _self_check(compiled, tree_model, booster)
    except _CompiledRefused as exc:
        reason = f"{compiled_so}: {exc}"
        _log.warning("not using compiled scorer (%s); scoring with LightGBM instead", reason)
        return Model(tree_model, booster, lightgbm_engine, fallback_reason=reason)
    return Model(tree_model, booster, compiled, fallback_reason=None)


class Model:
    """A loaded refund model; build it with `load_model`.

    Thread safety: every thread gets its own input/output buffers (and, for the LightGBM
    engine, its own FastConfig) through `threading.local`, created on its first call.
    Per-thread state rather than one buffer behind a lock because the C call releases
    the GIL: threads score truly in parallel and never wait on each other, and the
    uncontended path stays lock-free. The asyncio server calls `score` from its single
    loop thread, where `last_leaves` refers to the latest `score` as long as no ``await``
    separates the two.
    """

    def __init__(
        self,
        tree_model: TreeModel,
        booster: lightgbm.Booster,
        engine: _Engine[Any],
        *,
        fallback_reason: str | None,
    ) -> None:
        self._tree_model = tree_model
        self._booster = booster
        self._engine = engine
        self._num_features = tree_model.num_features
        self._pack_row = struct.Struct(f"={self._num_features}d").pack_into
        self._local = threading.local()
        self._leaf_offsets, self._saabas_table, self._bias = _saabas_table(tree_model)
        self._num_leaves = np.array([t.num_leaves for t in tree_model.trees], dtype=np.int64)
        self._fallback_reason = fallback_reason

    def portable(self) -> Model:
        """This model on LightGBM's engine (the portable fallback), sharing the parsed trees,
        the booster and the attribution table instead of loading them again: a bundle
        verifies both engines, and loading costs the serving process CPU and GIL."""
        if self._engine.name == "lightgbm":
            return self
        model = copy.copy(self)
        model._engine = _LightGBMEngine(self._booster, self._num_features, self.num_trees)
        model._local = threading.local()
        return model

    @property
    def engine(self) -> str:
        """``"compiled"`` or ``"lightgbm"``: which engine `score` runs."""
        return self._engine.name

    @property
    def fallback_reason(self) -> str | None:
        """Why the ``compiled_so`` given to `load_model` was refused; None if it was not."""
        return self._fallback_reason

    @property
    def num_trees(self) -> int:
        """Number of trees; the length of a leaf-index array."""
        return len(self._tree_model.trees)

    @property
    def num_features(self) -> int:
        """Length of a row."""
        return self._num_features

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Feature names in row order."""
        return self._tree_model.feature_names

    @property
    def bias(self) -> float:
        """Sum of the trees' root values: raw score = bias + sum(contributions(leaves))."""
        return self._bias

    def score(self, row: Sequence[float]) -> float:
        """Probability of the positive class for one row of `num_features` floats.

        Equal to ``Booster.predict`` on that row, NaN meaning missing. The row's leaf
        indices stay available through `last_leaves` until this thread scores again.
        Raises ValueError for a row of the wrong length, TypeError for a non-number.
        """
        if len(row) != self._num_features:
            raise ValueError(f"row has {len(row)} values, the model takes {self._num_features}")
        try:
            state = self._local.state
        except AttributeError:
            state = self._local.state = self._engine.new_state()
        try:
            self._pack_row(state.row, 0, *row)
        except struct.error as exc:
            raise TypeError(f"row values must be real numbers: {exc}") from None
        return self._engine.probability(state)

    def last_leaves(self) -> np.ndarray:
        """Leaf index per tree (int32, length `num_trees`) of this thread's last `score`.

        Free for the compiled engine (it records leaves while scoring); the LightGBM
        engine walks the trees once more, for this row only. Raises RuntimeError if this
        thread has not scored yet.
        """
        try:
            state = self._local.state
        except AttributeError:
            raise RuntimeError("no row has been scored in this thread") from None
        return self._engine.leaves(state)

    def score_with_leaves(self, row: Sequence[float]) -> tuple[float, np.ndarray]:
        """`score` and `last_leaves` of ``row`` together."""
        probability = self.score(row)
        return probability, self.last_leaves()

    def contributions(self, leaves: np.ndarray) -> np.ndarray:
        """Per-feature path attribution (Saabas) of the row that reached ``leaves``.

        On each tree's root-to-leaf path every split credits its feature with the change
        of node value it caused (internal values for internal nodes, the leaf value at the
        end), so ``bias + contributions(leaves).sum()`` is the raw score. A table per
        (tree, leaf) precomputed at load makes this one gather and one sum.
        """
        leaves = np.asarray(leaves)
        if leaves.shape != (self.num_trees,) or leaves.dtype.kind not in "iu":
            raise ValueError(f"leaves must be {self.num_trees} integer leaf indices")
        if ((leaves < 0) | (leaves >= self._num_leaves)).any():
            raise ValueError("leaf index out of range for its tree")
        result: np.ndarray = self._saabas_table[self._leaf_offsets + leaves].sum(axis=0)
        return result

    def grouped_contributions(self, groups: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """`contributions` summed into groups of features, for the hot path.

        ``groups`` is an (n_features, n_groups) matrix, 1 where a feature counts for a group.
        The table is summed into groups once, here, so a call gathers one row of n_groups
        values per tree instead of n_features (in situ the gather is memory-bound: the rows are
        cold in cache) and skips `contributions`' checks of the leaves: pass only leaves this
        model's engine produced (`last_leaves`).
        """
        groups = np.asarray(groups, dtype=np.float64)
        if groups.ndim != 2 or groups.shape[0] != self._num_features:
            raise ValueError(f"groups must have shape ({self._num_features}, n)")
        table = np.ascontiguousarray(self._saabas_table @ groups)
        offsets = self._leaf_offsets

        def grouped(leaves: np.ndarray) -> np.ndarray:
            result: np.ndarray = table[offsets + leaves].sum(axis=0)
            return result

        return grouped

    def predict_many(self, rows: np.ndarray) -> np.ndarray:
        """Probabilities for a 2-D batch of rows, with ``Booster.predict`` (for golden
        vectors and evaluation, where per-call latency does not matter)."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self._num_features:
            raise ValueError(f"rows must have shape (n, {self._num_features}), got {rows.shape}")
        return np.asarray(self._booster.predict(rows, num_threads=1), dtype=np.float64)


_StateT = TypeVar("_StateT")


class _Engine(Protocol[_StateT]):
    """Scores the row packed into a per-thread state's ``row`` buffer."""

    name: str

    def new_state(self) -> _StateT: ...

    def probability(self, state: _StateT) -> float: ...

    def leaves(self, state: _StateT) -> np.ndarray: ...


class _CompiledRefused(Exception):
    """The compiled object cannot be used for this model; the message says why."""


class _CompiledState:
    __slots__ = ("leaves", "raw", "row")

    def __init__(self, num_features: int, num_trees: int) -> None:
        self.row = (ctypes.c_double * num_features)()
        self.raw = (ctypes.c_double * 1)()
        self.leaves = (ctypes.c_int32 * num_trees)()


class _CompiledEngine:
    name = ENGINE_COMPILED

    def __init__(self, predict: Callable[..., int], tree_model: TreeModel) -> None:
        self._predict = predict
        self._sigmoid = tree_model.sigmoid
        self._num_features = tree_model.num_features
        self._num_trees = len(tree_model.trees)

    @classmethod
    def load(cls, path: Path, tree_model: TreeModel, model_sha256: str) -> _CompiledEngine:
        """Load ``path`` and check it was built by model.compile for this very model.

        dlopen reuses an already loaded object of the same path even if the file was
        replaced since; the SHA-256 check turns that into a refusal, so give each model
        version its own path.
        """
        try:
            lib = ctypes.CDLL(str(path))
            abi = lib.rg_abi_version
            num_trees = lib.rg_num_trees
            num_features = lib.rg_num_features
            sha256 = lib.rg_model_sha256
            predict = lib.rg_predict
        except (OSError, AttributeError) as exc:
            raise _CompiledRefused(f"cannot load: {exc}") from exc
        sha256.restype = ctypes.c_char_p
        found = (abi(), num_trees(), num_features(), sha256().decode("ascii"))
        wanted = (
            COMPILED_ABI_VERSION,
            len(tree_model.trees),
            tree_model.num_features,
            model_sha256,
        )
        for what, got, want in zip(
            ("ABI version", "number of trees", "number of features", "model SHA-256"),
            found,
            wanted,
            strict=True,
        ):
            if got != want:
                raise _CompiledRefused(f"built for another model: {what} is {got}, need {want}")
        predict.restype = ctypes.c_int
        return cls(predict, tree_model)

    def new_state(self) -> _CompiledState:
        return _CompiledState(self._num_features, self._num_trees)

    def probability(self, state: _CompiledState) -> float:
        self._predict(state.row, state.raw, state.leaves)
        try:
            return 1.0 / (1.0 + math.exp(-self._sigmoid * state.raw[0]))
        except OverflowError:
            # LightGBM's C++ gets exp() = inf here, hence exactly 0.0.
            return 0.0

    def leaves(self, state: _CompiledState) -> np.ndarray:
        return np.ctypeslib.as_array(state.leaves).copy()


class _FastConfig:
    """A LightGBM single-row FastConfig handle, freed when garbage collected."""

    __slots__ = ("_booster", "_free", "handle")

    def __init__(self, booster: lightgbm.Booster, predict_type: int, num_features: int) -> None:
        self._booster = booster  # the handle points into the booster: keep it alive
        self._free = _LIB.LGBM_FastConfigFree
        self.handle = ctypes.c_void_p()
        _safe_call(
            _LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                booster._handle,
                ctypes.c_int(predict_type),
                ctypes.c_int(0),  # start_iteration
                ctypes.c_int(-1),  # num_iteration: all trees
                ctypes.c_int(_C_API_DTYPE_FLOAT64),
                ctypes.c_int32(num_features),
                ctypes.c_char_p(ONE_THREAD.encode()),
                ctypes.byref(self.handle),
            )
        )

    def __del__(self) -> None:
        if self.handle:
            self._free(self.handle)


class _LightGBMState:
    __slots__ = ("fast", "fast_leaf", "leaf_out", "out", "out_len", "row")

    def __init__(self, fast: _FastConfig, num_features: int, num_trees: int) -> None:
        self.row = (ctypes.c_double * num_features)()
        self.out = (ctypes.c_double * 1)()
        self.out_len = (ctypes.c_int64 * 1)()
        self.fast = fast
        self.fast_leaf: _FastConfig | None = None
        self.leaf_out = (ctypes.c_double * num_trees)()


class _LightGBMEngine:
    name = ENGINE_LIGHTGBM

    def __init__(self, booster: lightgbm.Booster, num_features: int, num_trees: int) -> None:
        self._booster = booster
        self._num_features = num_features
        self._num_trees = num_trees
        self._predict = _LIB.LGBM_BoosterPredictForMatSingleRowFast

    def new_state(self) -> _LightGBMState:
        fast = _FastConfig(self._booster, _C_API_PREDICT_NORMAL, self._num_features)
        return _LightGBMState(fast, self._num_features, self._num_trees)

    def probability(self, state: _LightGBMState) -> float:
        _safe_call(self._predict(state.fast.handle, state.row, state.out_len, state.out))
        return state.out[0]

    def leaves(self, state: _LightGBMState) -> np.ndarray:
        if state.fast_leaf is None:
            state.fast_leaf = _FastConfig(self._booster, _C_API_PREDICT_LEAF_INDEX, self._num_features)
        _safe_call(self._predict(state.fast_leaf.handle, state.row, state.out_len, state.leaf_out))
        # LightGBM reports leaf indices as doubles.
        return np.ctypeslib.as_array(state.leaf_out).astype(np.int32)


def _one_openmp_thread() -> None:
    """Make OpenMP regions started from this thread use one thread (see ONE_THREAD), for the
    LightGBM calls that take no ``num_threads`` (loading a model from its text). LightGBM
    itself sets this per call wherever it takes ``num_threads``, so this changes nothing else."""
    with contextlib.suppress(OSError, AttributeError):  # another OpenMP runtime: no-op
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)


def _check_feature_names(model_names: tuple[str, ...], expected: tuple[str, ...]) -> None:
    if model_names == expected:
        return
    for index in range(max(len(model_names), len(expected))):
        got = model_names[index] if index < len(model_names) else None
        want = expected[index] if index < len(expected) else None
        if got != want:
            raise ModelFormatError(
                f"model features differ from the expected ones at position {index}: "
                f"model has {got!r}, expected {want!r} "
                f"(model has {len(model_names)} features, expected {len(expected)})"
            )


def _saabas_table(tree_model: TreeModel) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-(tree, leaf) Saabas contributions: (first row of each tree, table, bias).

    Row ``offsets[t] + leaf`` of the table is what tree ``t`` credits each feature when
    a row lands in ``leaf``.
    """
    trees = tree_model.trees
    offsets = np.cumsum([0] + [t.num_leaves for t in trees[:-1]], dtype=np.int64)
    table = np.zeros((sum(t.num_leaves for t in trees), tree_model.num_features))
    rows: list[int] = []
    cols: list[int] = []
    deltas: list[float] = []
    for tree, offset in zip(trees, offsets.tolist(), strict=True):
        yield_gil()
        if tree.num_leaves == 1:
            continue
        # (node, path so far as (feature, delta) pairs)
        stack: list[tuple[int, list[tuple[int, float]]]] = [(0, [])]
        while stack:
            node, path = stack.pop()
            parent_value = tree.internal_value[node]
            feature = tree.split_feature[node]
            for child in (tree.left_child[node], tree.right_child[node]):
                if child >= 0:
                    step = (feature, tree.internal_value[child] - parent_value)
                    stack.append((child, [*path, step]))
                else:
                    step = (feature, tree.leaf_value[~child] - parent_value)
                    for f, delta in (*path, step):
                        rows.append(offset + ~child)
                        cols.append(f)
                        deltas.append(delta)
    np.add.at(table, (np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)), deltas)
    bias = math.fsum(t.root_value for t in trees)
    return offsets, table, bias


def _probe_rows(tree_model: TreeModel, count: int) -> np.ndarray:
    """Rows that exercise every split's edge: each value is, with equal odds, a special
    (NaN, signed zeros, values around LightGBM's zero threshold, infinities, extremes) or
    a split threshold of that feature or one of its two neighbouring doubles."""
    specials = np.array(
        [math.nan, 0.0, -0.0, math.inf, -math.inf, 1e-40, -1e-40, ZERO_THRESHOLD, -ZERO_THRESHOLD, 1e308]
    )
    edges: list[list[float]] = [[] for _ in range(tree_model.num_features)]
    for tree in tree_model.trees:
        for feature, threshold in zip(tree.split_feature, tree.threshold, strict=True):
            below, above = math.nextafter(threshold, -math.inf), math.nextafter(threshold, math.inf)
            edges[feature].extend((below, threshold, above))
    rng = np.random.default_rng(0)
    columns = []
    for feature_edges in edges:
        column = specials[rng.integers(len(specials), size=count)]
        if feature_edges:
            at_edge = rng.random(count) < 0.5
            column[at_edge] = np.array(feature_edges)[rng.integers(len(feature_edges), size=at_edge.sum())]
        columns.append(column)
    return np.column_stack(columns)


def _self_check(engine: _CompiledEngine, tree_model: TreeModel, booster: lightgbm.Booster) -> None:
    """Refuse a compiled engine that disagrees with LightGBM on edge-case probe rows."""
    probes = _probe_rows(tree_model, _SELF_CHECK_ROWS)
    expected = booster.predict(probes, num_threads=1)
    expected_leaves = np.asarray(booster.predict(probes, pred_leaf=True, num_threads=1)).reshape(
        len(probes), -1
    )
    state = engine.new_state()
    for i, (row, want, want_leaves) in enumerate(zip(probes, expected, expected_leaves, strict=True)):
        if i % 8 == 0:
            yield_gil()
        state.row[:] = row.tolist()
        got = engine.probability(state)
        if not abs(got - want) <= _SELF_CHECK_TOLERANCE or not np.array_equal(
            engine.leaves(state), want_leaves
        ):
            raise _CompiledRefused(
                f"self-check failed: scores {got!r} where LightGBM scores {want!r} for row {row.tolist()!r}"
            )
