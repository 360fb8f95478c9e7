"""Micro-benchmark of single-row scoring: compiled engine, LightGBM's fast single-row C
API, and ``Booster.predict`` on a one-row array, per call, in the same run.

    python -m bench.scoring [--model PATH] [--out FILE.json]

Without ``--model`` it first trains a 300-tree x 63-leaf model on 45 synthetic features
and scores held-out rows of the same distribution. With ``--model`` the rows are drawn
around that model's own split thresholds (with NaNs and zeros mixed in). Either way the
model is compiled here, and gcc's time is reported too.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightgbm as lgb
import numpy as np

from gate import policy
from gate.scoring import ENGINE_COMPILED, Model, load_model
from gate.treemodel import TreeModel, load_tree_model
from model.compile import CFLAGS, compile_model

NUM_FEATURES = 45
NUM_TREES = 300
NUM_LEAVES = 63
# Tree walkers must be timed on varying rows: one row repeated keeps every branch
# predicted and every node in cache, and flatters them several times over.
NUM_ROWS = 3000
WARMUP_ROWS = 200
PASSES = 3


def synthetic(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows like the gate's: some features often missing, some mostly zero (counts)."""
    X = rng.normal(size=(n, NUM_FEATURES))
    X[rng.random(X.shape) < 0.1] = np.nan
    counts = rng.poisson(0.7, size=(n, 10)).astype(float)
    X[:, :10] = counts
    weights = rng.normal(size=NUM_FEATURES)
    y = (np.nan_to_num(X) @ weights + 2.0 * rng.normal(size=n) > 0).astype(int)
    return X, y


def train(model_txt: Path, rng: np.random.Generator) -> None:
    """Train the default benchmark model into ``model_txt``."""
    X, y = synthetic(rng, 20_000)
    params = {
        "objective": "binary",
        "num_leaves": NUM_LEAVES,
        "min_data_in_leaf": 5,
        "verbose": -1,
        "seed": 1,
    }
    names = [f"f{i}" for i in range(NUM_FEATURES)]
    booster = lgb.train(params, lgb.Dataset(X, y, feature_name=names), num_boost_round=NUM_TREES)
    booster.save_model(str(model_txt))


def rows_near_thresholds(tree_model: TreeModel, rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows for a model of unknown data: each value uniform over the span of that
    feature's thresholds (widened by a quarter each side), 10% NaN, 10% zero."""
    X = np.zeros((n, tree_model.num_features))
    for feature in range(tree_model.num_features):
        ts = [t for tree in tree_model.trees for f, t in zip(tree.split_feature, tree.threshold, strict=True)
              if f == feature and np.isfinite(t)]  # fmt: skip
        if ts:
            lo, hi = min(ts), max(ts)
            pad = (hi - lo) / 4 or 1.0
            X[:, feature] = rng.uniform(lo - pad, hi + pad, n)
    X[rng.random(X.shape) < 0.1] = np.nan
    X[rng.random(X.shape) < 0.1] = 0.0
    return X


def time_calls(
    rows: list[list[float]], calls: dict[str, Callable[[list[float]], object]], *, interleaved: bool
) -> dict[str, np.ndarray]:
    """Nanoseconds per call of each function over ``rows``, after a warm-up.

    Back to back, each function scores every row in turn, for `PASSES` passes taken in
    rotation so that drift in the machine falls on all alike: its tables stay in cache,
    as in a scorer kept busy. Interleaved, the functions take turns row by row, so each
    call finds the caches full of the others' data, as in a gate doing other work
    between two scores.
    """
    for row in rows[:WARMUP_ROWS]:
        for call in calls.values():
            call(row)
    samples: dict[str, list[int]] = {name: [] for name in calls}
    clock = time.perf_counter_ns
    if interleaved:
        for row in rows:
            for name, call in calls.items():
                started = clock()
                call(row)
                samples[name].append(clock() - started)
    else:
        for _ in range(PASSES):
            for name, call in calls.items():
                times = samples[name]
                for row in rows:
                    started = clock()
                    call(row)
                    times.append(clock() - started)
    return {name: np.array(ns) for name, ns in samples.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__)
    parser.add_argument("--model", type=Path, help="LightGBM model.txt (default: train one)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(42)

    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        model_txt: Path = args.model or Path(tmp) / "model.txt"
        if args.model is None:
            print(
                f"training a {NUM_TREES}-tree x {NUM_LEAVES}-leaf model on {NUM_FEATURES} "
                "synthetic features ...",
                flush=True,
            )
            train(model_txt, rng)
        tree_model = load_tree_model(model_txt)
        if args.model is None:
            X = synthetic(rng, NUM_ROWS)[0]
        else:
            X = rows_near_thresholds(tree_model, rng, NUM_ROWS)

        compiled_so = Path(tmp) / "model.so"
        started = time.perf_counter()
        compile_model(model_txt, compiled_so)
        compile_s = time.perf_counter() - started
        print(f"gcc {' '.join(CFLAGS)}: {compile_s:.2f} s")

        compiled = load_model(model_txt, compiled_so, feature_names=tree_model.feature_names)
        if compiled.engine != ENGINE_COMPILED:
            raise SystemExit(f"compiled engine refused: {compiled.fallback_reason}")
        fast = load_model(model_txt, feature_names=tree_model.feature_names)
        booster = lgb.Booster(model_file=str(model_txt))
        results = run(tree_model, X, compiled, fast, booster)

    report = {
        "model": str(args.model) if args.model else "synthetic",
        "num_trees": len(tree_model.trees),
        "max_leaves": max(t.num_leaves for t in tree_model.trees),
        "num_features": tree_model.num_features,
        "rows": NUM_ROWS,
        "compile_seconds": round(compile_s, 3),
        "cflags": list(CFLAGS),
        "lightgbm": lgb.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results_us": results,
    }
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def run(
    tree_model: TreeModel, X: np.ndarray, compiled: Model, fast: Model, booster: lgb.Booster
) -> dict[str, dict[str, float | None]]:
    """Check the engines agree with LightGBM on every row, then time them."""
    rows = X.tolist()
    expected = booster.predict(X)
    for model in (compiled, fast):
        got = np.array([model.score(row) for row in rows])
        worst = float(np.max(np.abs(got - expected)))
        if worst > 1e-12:
            raise SystemExit(f"{model.engine} engine differs from Booster.predict by {worst}")

    one_row = np.empty((1, tree_model.num_features))

    def booster_predict(row: list[float]) -> object:
        one_row[0] = row
        return booster.predict(one_row, num_threads=1)

    scorers: dict[str, Callable[[list[float]], object]] = {
        "compiled": compiled.score,
        "lightgbm_fast": fast.score,
        "booster_predict": booster_predict,
    }
    warm = time_calls(rows, scorers, interleaved=False)
    mixed = time_calls(rows, scorers, interleaved=True)
    # Explanations of each row's own leaves: per feature (`contributions`, what model owners'
    # tools use) and per reason code (`grouped_contributions`, what a HOLD/REJECT costs the gate).
    leaves_of: dict[int, np.ndarray] = {}
    for row in rows:
        compiled.score(row)
        leaves_of[id(row)] = compiled.last_leaves().copy()
    by_code = compiled.grouped_contributions(policy.REASON_GROUPS)
    explainers: dict[str, Callable[[list[float]], object]] = {
        "contributions": lambda row: compiled.contributions(leaves_of[id(row)]),
        "explain_by_code": lambda row: by_code(leaves_of[id(row)]),
    }
    warm.update(time_calls(rows, explainers, interleaved=False))
    among_scorers = time_calls(rows, {**scorers, **explainers}, interleaved=True)
    mixed.update({name: among_scorers[name] for name in explainers})

    def us(ns: np.ndarray, percentile: float) -> float:
        return round(float(np.percentile(ns, percentile)) / 1e3, 2)

    results: dict[str, dict[str, float | None]] = {}
    for name, ns in warm.items():
        results[name] = {
            "p50": us(ns, 50),
            "p99": us(ns, 99),
            "mean": round(float(ns.mean()) / 1e3, 2),
            "p50_interleaved": us(mixed[name], 50) if name in mixed else None,
            "p99_interleaved": us(mixed[name], 99) if name in mixed else None,
            "speedup_vs_booster_p50": (
                round(us(warm["booster_predict"], 50) / us(ns, 50), 1) if name in scorers else None
            ),
        }
    return results


def print_table(results: dict[str, dict[str, float | None]]) -> None:
    """Per-call latency table; "x faster" is Booster.predict's p50 over the engine's."""
    labels = {
        "compiled": "compiled engine (ctypes)",
        "lightgbm_fast": "LightGBM fast single-row API",
        "booster_predict": "Booster.predict, 1-row array",
        "contributions": "contributions, per feature",
        "explain_by_code": "explanation by reason code (gate)",
    }
    columns = ("p50", "p99", "mean", "p50_interleaved", "p99_interleaved", "speedup_vs_booster_p50")
    print(f"{'µs per call':<34}{'p50':>8}{'p99':>8}{'mean':>8}{'p50 mix':>9}{'p99 mix':>9}{'x faster':>10}")
    for name, r in results.items():
        cells = ["-" if r[c] is None else f"{r[c]:.1f}" if c.startswith("speedup") else f"{r[c]:.2f}"
                 for c in columns]  # fmt: skip
        widths = (8, 8, 8, 9, 9, 10)
        print(f"{labels[name]:<34}" + "".join(f"{cell:>{w}}" for cell, w in zip(cells, widths, strict=True)))
    print(
        "(mix: engines called in turn row by row, so each call starts with caches holding the others' data)"
    )


if __name__ == "__main__":
    sys.exit(main())
