"""A LightGBM ``model.txt`` parsed into plain, validated dataclasses.

The scoring path (``gate.scoring``) and the C code generator (``model.compile``) both
work from this representation, so it only admits what they reproduce bit for bit:
a single-output ``binary`` model of numerical splits on constant-leaf trees. Anything
else (categorical splits, linear trees, other objectives, random-forest averaging) is
refused with a `ModelFormatError` rather than scored slightly wrong.

Decision semantics are LightGBM's ``Tree::NumericalDecision`` (include/LightGBM/tree.h),
applied to the row as LightGBM's C API hands it over: values with
``|x| <= kZeroThreshold`` arrive as 0.0 (``RowPairFunctionFromDenseMatric`` drops them as
sparse zeros). See `Tree` for the decision_type bits.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

# LightGBM declares `const double kZeroThreshold = 1e-35f;`: the float literal widened to
# double is 1.0000000180025095e-35, not the double nearest to 1e-35.
ZERO_THRESHOLD = 1.0000000180025095e-35

CATEGORICAL_MASK = 1
DEFAULT_LEFT_MASK = 2
MISSING_NONE = 0
MISSING_ZERO = 1
MISSING_NAN = 2

_SUPPORTED_VERSIONS = frozenset({"v4"})

_T = TypeVar("_T")


class ModelFormatError(ValueError):
    """The model text is malformed, truncated, or uses a feature the scorer does not support."""


def missing_type(decision_type: int) -> int:
    """LightGBM's missing type of a split: MISSING_NONE, MISSING_ZERO or MISSING_NAN."""
    return (decision_type >> 2) & 3


def default_left(decision_type: int) -> bool:
    """Whether a split sends missing values (per its missing type) to the left child."""
    return bool(decision_type & DEFAULT_LEFT_MASK)


@dataclass(frozen=True, slots=True)
class Tree:
    """One regression tree in LightGBM's array layout.

    Internal nodes are numbered 0..num_leaves-2 (0 is the root); a child index < 0 is
    the leaf ``~child``. ``decision_type`` bit 1 is default-left and bits 2-3 the missing
    type (`missing_type`, `default_left`). A tree with one leaf has no internal nodes and
    always outputs ``leaf_value[0]``.
    """

    num_leaves: int
    split_feature: tuple[int, ...]
    threshold: tuple[float, ...]
    decision_type: tuple[int, ...]
    left_child: tuple[int, ...]
    right_child: tuple[int, ...]
    leaf_value: tuple[float, ...]
    # LightGBM writes internal values with 6 significant digits only; good for
    # attribution, never used for scores.
    internal_value: tuple[float, ...]
    # Training rows that reached each leaf / internal node (all 0 if the file omits
    # them); the compiler lays out the likelier path first.
    leaf_count: tuple[int, ...]
    internal_count: tuple[int, ...]

    @property
    def root_value(self) -> float:
        """The value at the root: where a root-to-leaf attribution starts from."""
        return self.internal_value[0] if self.num_leaves > 1 else self.leaf_value[0]


@dataclass(frozen=True, slots=True)
class TreeModel:
    """A parsed binary LightGBM model: raw score = sum of tree outputs, in tree order."""

    feature_names: tuple[str, ...]
    max_feature_idx: int
    sigmoid: float
    trees: tuple[Tree, ...]

    @property
    def num_features(self) -> int:
        """Length of the row the model scores."""
        return self.max_feature_idx + 1


_PAUSE_S = 0.001


def yield_gil() -> None:
    """Off the main thread, give the GIL to other threads for a moment; on it, do nothing.

    The gate loads model bundles in a worker thread while its event loop serves on the main
    thread. CPython hands the GIL over only every 5 ms (``sys.getswitchinterval()``), so parsing
    a few hundred trees would take turns with the loop and halve what it serves for ~100 ms:
    long enough for a backlog to build and admission control to shed calls. A 1 ms sleep per
    tree lets the loop run whenever it has work and spreads the load's ~0.1 s of CPU over ~1 s,
    so the workers (each loads the bundle) do not take a shared machine's CPUs all at once.
    Training and tools run on the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        time.sleep(_PAUSE_S)


def load_tree_model(path: Path) -> TreeModel:
    """Read and parse a ``model.txt`` file (see `parse_model`)."""
    return parse_model(path.read_bytes())


def parse_model(text: str | bytes) -> TreeModel:
    """Parse LightGBM model text (or its UTF-8 bytes), refusing anything the exact
    scorers cannot reproduce.

    Raises `ModelFormatError` naming the offending header key or tree.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError("not a LightGBM text model: not UTF-8 text") from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != "tree":
        raise ModelFormatError("not a LightGBM text model: first line is not 'tree'")
    try:
        end = next(i for i, line in enumerate(lines) if line.strip() == "end of trees")
    except StopIteration:
        raise ModelFormatError("model text is truncated: no 'end of trees' line") from None

    blocks = _split_blocks(lines[1:end])
    header = blocks[0][1] if blocks and blocks[0][0] is None else {}
    tree_blocks = [b for b in blocks if b[0] is not None]

    version = _require(header, "version", "header")
    if version not in _SUPPORTED_VERSIONS:
        raise ModelFormatError(f"unsupported model format version {version!r} (need v4)")
    for key in ("num_class", "num_tree_per_iteration"):
        if _require(header, key, "header") != "1":
            raise ModelFormatError(f"{key}={header[key]}: only single-output models are supported")
    sigmoid = _parse_objective(_require(header, "objective", "header"))
    max_feature_idx = _parse_int(_require(header, "max_feature_idx", "header"), "max_feature_idx")
    feature_names = tuple(_require(header, "feature_names", "header").split(" "))
    if len(feature_names) != max_feature_idx + 1:
        raise ModelFormatError(
            f"feature_names lists {len(feature_names)} names but max_feature_idx is {max_feature_idx}"
        )

    if not tree_blocks:
        raise ModelFormatError("model has no trees")
    trees = []
    for expected_index, (index, fields) in enumerate(tree_blocks):
        yield_gil()
        where = f"Tree={index}"
        if index != expected_index:
            raise ModelFormatError(f"{where}: expected Tree={expected_index} (trees out of order)")
        trees.append(_parse_tree(fields, max_feature_idx, where))

    if "tree_sizes" in header and len(header["tree_sizes"].split()) != len(trees):
        raise ModelFormatError(
            f"tree_sizes lists {len(header['tree_sizes'].split())} trees but {len(trees)} were found"
        )
    return TreeModel(
        feature_names=feature_names,
        max_feature_idx=max_feature_idx,
        sigmoid=sigmoid,
        trees=tuple(trees),
    )


def _split_blocks(lines: list[str]) -> list[tuple[int | None, dict[str, str]]]:
    """Group ``key=value`` lines into the header (index None) and one block per ``Tree=i``."""
    blocks: list[tuple[int | None, dict[str, str]]] = [(None, {})]
    for raw_line in lines:
        line = raw_line.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if line == "average_output":
            raise ModelFormatError("average_output (random forest) models are not supported")
        if not sep:
            raise ModelFormatError(f"malformed model line {line[:60]!r}")
        if key == "Tree":
            blocks.append((_parse_int(value, "Tree"), {}))
        else:
            blocks[-1][1][key] = value
    return blocks


def _parse_objective(objective: str) -> float:
    name, *params = objective.split(" ")
    if name != "binary":
        raise ModelFormatError(f"objective {name!r} is not supported (only 'binary')")
    sigmoids = [p.removeprefix("sigmoid:") for p in params if p.startswith("sigmoid:")]
    if len(sigmoids) != 1:
        raise ModelFormatError(f"binary objective without a sigmoid: parameter: {objective!r}")
    sigmoid = _parse_float(sigmoids[0], "sigmoid")
    if not (math.isfinite(sigmoid) and sigmoid > 0):
        raise ModelFormatError(f"sigmoid must be finite and positive, got {sigmoid!r}")
    return sigmoid


def _parse_tree(fields: dict[str, str], max_feature_idx: int, where: str) -> Tree:
    num_leaves = _parse_int(_require(fields, "num_leaves", where), f"{where} num_leaves")
    if num_leaves < 1:
        raise ModelFormatError(f"{where}: num_leaves={num_leaves}")
    if _require(fields, "num_cat", where) != "0":
        raise ModelFormatError(f"{where}: categorical splits are not supported")
    if fields.get("is_linear", "0") != "0":
        raise ModelFormatError(f"{where}: linear trees are not supported")

    n_nodes = num_leaves - 1

    def ints(key: str, n: int) -> tuple[int, ...]:
        return _array(fields, key, n, where, int)

    def floats(key: str, n: int) -> tuple[float, ...]:
        return _array(fields, key, n, where, float)

    tree = Tree(
        num_leaves=num_leaves,
        split_feature=ints("split_feature", n_nodes),
        threshold=floats("threshold", n_nodes),
        decision_type=ints("decision_type", n_nodes),
        left_child=ints("left_child", n_nodes),
        right_child=ints("right_child", n_nodes),
        leaf_value=floats("leaf_value", num_leaves),
        internal_value=floats("internal_value", n_nodes),
        leaf_count=ints("leaf_count", num_leaves) if "leaf_count" in fields else (0,) * num_leaves,
        internal_count=(ints("internal_count", n_nodes) if "internal_count" in fields else (0,) * n_nodes),
    )
    for node in range(n_nodes):
        dt = tree.decision_type[node]
        if dt & CATEGORICAL_MASK:
            raise ModelFormatError(f"{where} node {node}: categorical splits are not supported")
        if not 0 <= dt < 16 or missing_type(dt) not in (MISSING_NONE, MISSING_ZERO, MISSING_NAN):
            raise ModelFormatError(f"{where} node {node}: invalid decision_type {dt}")
        if not 0 <= tree.split_feature[node] <= max_feature_idx:
            raise ModelFormatError(
                f"{where} node {node}: split_feature {tree.split_feature[node]} is out of range"
            )
        if math.isnan(tree.threshold[node]):
            raise ModelFormatError(f"{where} node {node}: threshold is NaN")
    if not all(math.isfinite(v) for v in tree.leaf_value + tree.internal_value):
        raise ModelFormatError(f"{where}: non-finite leaf or internal value")
    _check_structure(tree, where)
    return tree


def _check_structure(tree: Tree, where: str) -> None:
    """Every node and every leaf is reached exactly once from the root (a proper tree)."""
    n_nodes = tree.num_leaves - 1
    seen_nodes = [False] * n_nodes
    seen_leaves = [False] * tree.num_leaves
    stack = [0] if n_nodes else []
    while stack:
        node = stack.pop()
        if seen_nodes[node]:
            raise ModelFormatError(f"{where}: node {node} is reached twice")
        seen_nodes[node] = True
        for child in (tree.left_child[node], tree.right_child[node]):
            if child >= 0:
                if child >= n_nodes:
                    raise ModelFormatError(f"{where}: child node {child} is out of range")
                stack.append(child)
            else:
                leaf = ~child
                if leaf >= tree.num_leaves or seen_leaves[leaf]:
                    raise ModelFormatError(f"{where}: leaf {leaf} is out of range or reached twice")
                seen_leaves[leaf] = True
    if n_nodes and not (all(seen_nodes) and all(seen_leaves)):
        raise ModelFormatError(f"{where}: some nodes or leaves are unreachable from the root")


def _require(fields: dict[str, str], key: str, where: str) -> str:
    try:
        return fields[key]
    except KeyError:
        raise ModelFormatError(f"{where}: missing {key!r}") from None


def _array(
    fields: dict[str, str], key: str, n: int, where: str, parse: Callable[[str], _T]
) -> tuple[_T, ...]:
    raw = _require(fields, key, where).split()
    if len(raw) != n:
        raise ModelFormatError(f"{where}: {key} has {len(raw)} values, expected {n}")
    try:
        return tuple(parse(v) for v in raw)
    except ValueError:
        raise ModelFormatError(f"{where}: {key} has a malformed number") from None


def _parse_int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ModelFormatError(f"{what}: {value!r} is not an integer") from None


def _parse_float(value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ModelFormatError(f"{what}: {value!r} is not a number") from None
