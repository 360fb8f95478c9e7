"""Compile a LightGBM binary model into a shared object for `gate.scoring`.

Run when a model bundle is built::

    python -m model.compile MODEL_TXT OUT_SO

Each tree becomes a C function of nested if/else that returns its leaf index;
``rg_predict`` walks all trees, writes every leaf index and sums the leaf values in tree
order, in double, exactly as LightGBM's ``GBDT::PredictRaw`` does. Splits follow
``Tree::NumericalDecision`` on the row as LightGBM's C API sees it (values with
``|x| <= kZeroThreshold`` become 0.0), so the result equals ``Booster.predict`` bit for bit.
No ``-ffast-math``: NaN tests and the order of additions must survive optimisation.

The object exports, besides ``rg_predict``, ``rg_abi_version``, ``rg_num_trees``,
``rg_num_features`` and ``rg_model_sha256`` (hex SHA-256 of the model text it was built
from) so the loader can refuse an object built for another model.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gate.treemodel import (
    MISSING_NAN,
    MISSING_NONE,
    ZERO_THRESHOLD,
    Tree,
    TreeModel,
    default_left,
    missing_type,
    parse_model,
)

# Bump when the exported functions or their meaning change; gate.scoring checks it.
ABI_VERSION = 1

# -O1 compiles a 300 x 63 model about twice as fast as -O2 and scores as fast (see
# bench.scoring); -ffp-contract=off keeps a future -march flag from fusing operations.
CFLAGS = ("-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fvisibility=hidden")

_PRELUDE = """\
#include <math.h>
#include <stdint.h>

#define RG_EXPORT __attribute__((visibility("default")))
#define RG_NOINLINE __attribute__((noinline))

/* LightGBM's kZeroThreshold (the float 1e-35f widened to double). */
static const double RG_ZERO = {zero};
"""


def compile_model(model_txt: Path, out_so: Path) -> None:
    """Generate C for the model in ``model_txt`` and build it into ``out_so``.

    Raises `gate.treemodel.ModelFormatError` for a model the generated code could not
    score exactly, and `RuntimeError` if gcc fails (see `build_shared_object`).
    """
    data = model_txt.read_bytes()
    model = parse_model(data.decode("utf-8"))
    build_shared_object(generate_c(model, hashlib.sha256(data).hexdigest()), out_so)


def build_shared_object(source: str, out_so: Path) -> None:
    """Compile C ``source`` into ``out_so`` with `CFLAGS`, atomically replacing it.

    The object is written beside ``out_so`` and renamed into place, so a concurrent
    loader never sees a half-written file. Raises `RuntimeError` with gcc's output if
    compilation fails.
    """
    out_so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rg-compile-") as tmp:
        c_file = Path(tmp) / "model.c"
        c_file.write_text(source, encoding="utf-8")
        fd, tmp_so = tempfile.mkstemp(prefix=f".{out_so.name}.", dir=out_so.parent)
        os.close(fd)
        try:
            result = subprocess.run(
                ["gcc", *CFLAGS, "-o", tmp_so, str(c_file), "-lm"],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"gcc failed ({result.returncode}):\n{result.stderr}")
            os.chmod(tmp_so, 0o755)  # mkstemp's 0600 would keep a service user from loading it
            os.replace(tmp_so, out_so)
        finally:
            Path(tmp_so).unlink(missing_ok=True)


def generate_c(model: TreeModel, model_sha256: str) -> str:
    """C source for ``model``: one static function per tree plus the exported ABI."""
    parts = [_PRELUDE.format(zero=_c_double(ZERO_THRESHOLD))]
    for index, tree in enumerate(model.trees):
        if tree.num_leaves == 1:
            continue
        parts.append(f"static const double rg_leaf_value_{index}[{tree.num_leaves}] = {{")
        parts.append(",\n".join(f"    {_c_double(v)}" for v in tree.leaf_value))
        parts.append("};")
        parts.append(f"static RG_NOINLINE int32_t rg_tree_{index}(const double* x) {{")
        _emit_node(tree, 0, 1, parts)
        parts.append("}\n")

    nf, nt = model.num_features, len(model.trees)
    parts.append(
        f"RG_EXPORT int rg_abi_version(void) {{ return {ABI_VERSION}; }}\n"
        f"RG_EXPORT int rg_num_trees(void) {{ return {nt}; }}\n"
        f"RG_EXPORT int rg_num_features(void) {{ return {nf}; }}\n"
        f'RG_EXPORT const char* rg_model_sha256(void) {{ return "{model_sha256}"; }}\n'
        "\n"
        "RG_EXPORT int rg_predict(const double* row, double* out_raw, int32_t* out_leaves) {\n"
        f"    double x[{nf}];\n"
        f"    for (int i = 0; i < {nf}; ++i) {{\n"
        "        /* LightGBM's C API drops |v| <= kZeroThreshold as a sparse zero. */\n"
        "        x[i] = fabs(row[i]) <= RG_ZERO ? 0.0 : row[i];\n"
        "    }\n"
        "    double raw = 0.0;\n"
        "    int32_t leaf;"
    )
    for index, tree in enumerate(model.trees):
        if tree.num_leaves == 1:
            parts.append(f"    out_leaves[{index}] = 0; raw += {_c_double(tree.leaf_value[0])};")
        else:
            parts.append(
                f"    leaf = rg_tree_{index}(x); out_leaves[{index}] = leaf; "
                f"raw += rg_leaf_value_{index}[leaf];"
            )
    parts.append("    *out_raw = raw;\n    return 0;\n}\n")
    return "\n".join(parts)


def _emit_node(tree: Tree, node: int, depth: int, out: list[str]) -> None:
    pad = "    " * depth
    out.append(f"{pad}if ({_go_left(tree, node)}) {{")
    _emit_child(tree, tree.left_child[node], depth + 1, out)
    out.append(f"{pad}}} else {{")
    _emit_child(tree, tree.right_child[node], depth + 1, out)
    out.append(f"{pad}}}")


def _go_left(tree: Tree, node: int) -> str:
    """``Tree::NumericalDecision`` for one node as a C condition that is true for "left".

    Decided here rather than in C: a NaN compares false, so ``!(v > t)`` is "v <= t, NaN
    goes left" and ``v <= t`` is "NaN goes right". The value is already zero-snapped, so
    LightGBM's IsZero(v) is ``v == 0.0``.
    """
    v = f"x[{tree.split_feature[node]}]"
    t = tree.threshold[node]
    tc = _c_double(t)
    nan_left = f"!({v} > {tc})"
    nan_right = f"{v} <= {tc}"
    kind = missing_type(tree.decision_type[node])
    to_left = default_left(tree.decision_type[node])
    if kind == MISSING_NONE:
        # NaN is read as 0.0, then compared like any value.
        return nan_left if t >= 0.0 else nan_right
    if kind == MISSING_NAN:
        return nan_left if to_left else nan_right
    # MISSING_ZERO: NaN is read as 0.0 and 0.0 takes the default direction; the extra
    # test is needed only where the threshold alone would send 0.0 the other way.
    if to_left:
        return nan_left if t >= 0.0 else f"{nan_left} || {v} == 0.0"
    return nan_right if t < 0.0 else f"{nan_right} && {v} != 0.0"


def _emit_child(tree: Tree, child: int, depth: int, out: list[str]) -> None:
    if child < 0:
        out.append(f"{'    ' * depth}return {~child};")
    else:
        _emit_node(tree, child, depth, out)


def _c_double(value: float) -> str:
    """A C literal that parses back to exactly ``value`` (repr round-trips)."""
    if math.isinf(value):
        return "INFINITY" if value > 0 else "(-INFINITY)"
    return repr(value)


def main(argv: list[str] | None = None) -> int:
    """CLI: compile MODEL_TXT into OUT_SO and report how long gcc took."""
    parser = argparse.ArgumentParser(prog="python -m model.compile", description=__doc__)
    parser.add_argument("model_txt", type=Path, help="LightGBM text model (model.txt)")
    parser.add_argument("out_so", type=Path, help="shared object to write")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    compile_model(args.model_txt, args.out_so)
    print(
        f"compiled {args.model_txt} -> {args.out_so} in {time.perf_counter() - started:.2f} s "
        f"(gcc {' '.join(CFLAGS)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
