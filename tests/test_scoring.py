"""The single-row scorer against LightGBM itself: both engines must equal
``Booster.predict`` for every input, including the split edges where bugs hide."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gate.scoring import ENGINE_COMPILED, ENGINE_LIGHTGBM, Model, load_model
from gate.treemodel import (
    MISSING_NAN,
    MISSING_NONE,
    MISSING_ZERO,
    ZERO_THRESHOLD,
    ModelFormatError,
    TreeModel,
    default_left,
    missing_type,
    parse_model,
)
from model.compile import build_shared_object, compile_model, generate_c
from model.compile import main as compile_main

NUM_FEATURES = 12
FEATURE_NAMES = tuple(f"feat_{i}" for i in range(NUM_FEATURES))
TOLERANCE = 1e-12
SPECIAL_VALUES = (
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    1e-40,
    -1e-40,
    1e308,
    -1e308,
    ZERO_THRESHOLD,
    -ZERO_THRESHOLD,
    math.nextafter(ZERO_THRESHOLD, math.inf),
    math.nextafter(-ZERO_THRESHOLD, -math.inf),
)
PARAMS = {
    "objective": "binary",
    "num_leaves": 31,
    "use_missing": True,
    "min_data_in_leaf": 10,
    "num_threads": 1,
    "deterministic": True,
    "verbose": -1,
    "seed": 7,
}


@dataclass(frozen=True)
class Trained:
    model_txt: Path
    compiled_so: Path
    booster: lgb.Booster
    tree_model: TreeModel
    X: np.ndarray


def _synthetic(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    X = rng.normal(size=(n, NUM_FEATURES))
    for j in (1, 3, 6):  # features with NaN: missing type NaN
        X[rng.random(n) < 0.2, j] = np.nan
    for j in (2, 4, 5):  # zero-heavy features
        X[rng.random(n) < 0.8, j] = 0.0
    logit = X[:, 0] + np.nan_to_num(X[:, 1]) + 2 * X[:, 2] - X[:, 4] + X[:, 5] - np.isnan(X[:, 3])
    y = (logit + rng.normal(size=n) > 0).astype(int)
    return X, y


def _train(X: np.ndarray, y: np.ndarray) -> lgb.Booster:
    """60 trees: the first 20 with zero_as_missing (splits of missing type Zero), the rest
    with NaN as missing (missing types NaN and None), all in one model."""
    zero_params = {**PARAMS, "zero_as_missing": True}
    first = lgb.train(
        zero_params,
        lgb.Dataset(X, y, feature_name=list(FEATURE_NAMES), params=zero_params),
        num_boost_round=20,
    )
    return lgb.train(
        PARAMS,
        lgb.Dataset(X, y, feature_name=list(FEATURE_NAMES), params=PARAMS),
        num_boost_round=40,
        init_model=first,
    )


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("scoring")
    X, y = _synthetic(np.random.default_rng(0), 3000)
    booster = _train(X, y)
    model_txt = tmp / "model.txt"
    booster.save_model(str(model_txt))
    compiled_so = tmp / "model.so"
    compile_model(model_txt, compiled_so)
    reference = lgb.Booster(model_file=str(model_txt))
    assert reference.num_trees() == 60
    return Trained(model_txt, compiled_so, reference, parse_model(model_txt.read_text()), X)


@pytest.fixture(scope="session")
def compiled(trained: Trained) -> Model:
    model = load_model(trained.model_txt, trained.compiled_so, feature_names=FEATURE_NAMES)
    assert model.engine == ENGINE_COMPILED, model.fallback_reason
    return model


@pytest.fixture(scope="session")
def fallback(trained: Trained) -> Model:
    model = load_model(trained.model_txt, feature_names=FEATURE_NAMES)
    assert model.engine == ENGINE_LIGHTGBM
    assert model.fallback_reason is None
    return model


def _load(trained: Trained, engine: str) -> Model:
    """A fresh model on ``engine`` (fresh per-thread state, unlike the session fixtures)."""
    compiled_so = trained.compiled_so if engine == ENGINE_COMPILED else None
    model = load_model(trained.model_txt, compiled_so, feature_names=FEATURE_NAMES)
    assert model.engine == engine, model.fallback_reason
    return model


def _rows(tree_model: TreeModel) -> st.SearchStrategy[list[float]]:
    """Rows mixing special values, the model's own thresholds and their neighbouring
    doubles, and arbitrary floats."""
    thresholds: list[list[float]] = [[] for _ in range(tree_model.num_features)]
    for tree in tree_model.trees:
        for feature, threshold in zip(tree.split_feature, tree.threshold, strict=True):
            thresholds[feature].append(threshold)

    def near(ts: list[float]) -> st.SearchStrategy[float]:
        return st.tuples(st.sampled_from(ts), st.sampled_from((-1, 0, 1))).map(
            lambda pair: pair[0] if pair[1] == 0 else math.nextafter(pair[0], pair[1] * math.inf)
        )

    def value(ts: list[float]) -> st.SearchStrategy[float]:
        options = [st.sampled_from(SPECIAL_VALUES), st.floats(allow_nan=True, allow_infinity=True)]
        if ts:
            options.insert(0, near(ts))
        return st.one_of(*options)

    return st.tuples(*(value(ts) for ts in thresholds)).map(list)


def _check_against_booster(model: Model, booster: lgb.Booster, row: list[float]) -> None:
    probability, leaves = model.score_with_leaves(row)
    X = np.array([row], dtype=np.float64)
    expected = booster.predict(X)[0]
    assert abs(probability - expected) <= TOLERANCE, (row, probability, expected)
    np.testing.assert_array_equal(leaves, booster.predict(X, pred_leaf=True)[0], err_msg=str(row))


def test_trained_model_has_every_split_kind(trained: Trained) -> None:
    kinds = {
        (missing_type(dt), default_left(dt)) for tree in trained.tree_model.trees for dt in tree.decision_type
    }
    assert {k for k, _ in kinds} == {MISSING_NONE, MISSING_ZERO, MISSING_NAN}
    # Both default directions for the missing types that have one.
    for kind in (MISSING_ZERO, MISSING_NAN):
        assert {(kind, True), (kind, False)} <= kinds
    # LightGBM writes threshold=inf for a split of NaN against every number.
    assert any(math.isinf(t) for tree in trained.tree_model.trees for t in tree.threshold)


def test_compiled_engine_equals_booster(trained: Trained, compiled: Model) -> None:
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(row=_rows(trained.tree_model))
    def check(row: list[float]) -> None:
        _check_against_booster(compiled, trained.booster, row)

    check()


def test_lightgbm_engine_equals_booster(trained: Trained, fallback: Model) -> None:
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(row=_rows(trained.tree_model))
    def check(row: list[float]) -> None:
        _check_against_booster(fallback, trained.booster, row)

    check()


@pytest.mark.parametrize("engine", [ENGINE_COMPILED, ENGINE_LIGHTGBM])
def test_engines_equal_booster_on_data_rows(trained: Trained, engine: str) -> None:
    model = _load(trained, engine)
    X = trained.X[:500]
    expected = trained.booster.predict(X)
    expected_leaves = trained.booster.predict(X, pred_leaf=True)
    for row, want, want_leaves in zip(X.tolist(), expected, expected_leaves, strict=True):
        assert abs(model.score(row) - want) <= TOLERANCE
        np.testing.assert_array_equal(model.last_leaves(), want_leaves)
    np.testing.assert_allclose(model.predict_many(X), expected, rtol=0, atol=TOLERANCE)


def test_grouped_contributions_are_the_per_feature_ones_summed_by_group(trained: Trained) -> None:
    model = _load(trained, ENGINE_COMPILED)
    rng = np.random.default_rng(3)
    groups = (rng.random((len(FEATURE_NAMES), 5)) < 0.3).astype(float)
    grouped = model.grouped_contributions(groups)
    for row in trained.X[:100].tolist():
        _, leaves = model.score_with_leaves(row)
        np.testing.assert_allclose(grouped(leaves), model.contributions(leaves) @ groups, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        model.grouped_contributions(groups[:-1])


def test_portable_twin_scores_on_lightgbm_and_shares_what_was_loaded(trained: Trained) -> None:
    model = _load(trained, ENGINE_COMPILED)
    twin = model.portable()
    assert twin.engine == ENGINE_LIGHTGBM and model.engine == ENGINE_COMPILED
    X = trained.X[:200]
    expected = trained.booster.predict(X)
    for row, want in zip(X.tolist(), expected, strict=True):
        assert abs(twin.score(row) - want) <= TOLERANCE
        np.testing.assert_array_equal(
            twin.contributions(twin.last_leaves()), model.contributions(model.score_with_leaves(row)[1])
        )
    assert twin._saabas_table is model._saabas_table  # one table, not a second load
    assert twin.portable() is twin


def _saabas_reference(booster: lgb.Booster, leaves: np.ndarray, num_features: int) -> np.ndarray:
    """Saabas attribution straight from LightGBM's own JSON dump of the trees."""

    def path_to(node: dict[str, Any], leaf: int) -> list[dict[str, Any]] | None:
        if "leaf_index" in node:
            return [node] if node["leaf_index"] == leaf else None
        for side in ("left_child", "right_child"):
            below = path_to(node[side], leaf)
            if below is not None:
                return [node, *below]
        return None

    out = np.zeros(num_features)
    for info, leaf in zip(booster.dump_model()["tree_info"], leaves, strict=True):
        path = path_to(info["tree_structure"], int(leaf))
        assert path is not None
        for parent, child in itertools.pairwise(path):
            child_value = child["leaf_value"] if "leaf_index" in child else child["internal_value"]
            out[parent["split_feature"]] += child_value - parent["internal_value"]
    return out


@pytest.mark.parametrize("engine", [ENGINE_COMPILED, ENGINE_LIGHTGBM])
def test_contributions_are_saabas_and_sum_to_raw_score(trained: Trained, engine: str) -> None:
    model = _load(trained, engine)
    X = trained.X[:50]
    raw = trained.booster.predict(X, raw_score=True)
    used = {f for tree in trained.tree_model.trees for f in tree.split_feature}
    for row, want_raw in zip(X.tolist(), raw, strict=True):
        model.score(row)
        leaves = model.last_leaves()
        contributions = model.contributions(leaves)
        assert contributions.shape == (NUM_FEATURES,)
        assert abs(model.bias + contributions.sum() - want_raw) <= 1e-9
        np.testing.assert_allclose(
            contributions,
            _saabas_reference(trained.booster, leaves, NUM_FEATURES),
            rtol=0,
            atol=1e-9,
        )
        assert all(contributions[f] == 0.0 for f in set(range(NUM_FEATURES)) - used)


def test_feature_order_mismatch_is_refused(trained: Trained) -> None:
    swapped = list(FEATURE_NAMES)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    with pytest.raises(ModelFormatError, match="position 3: model has 'feat_3', expected 'feat_4'"):
        load_model(trained.model_txt, trained.compiled_so, feature_names=swapped)
    with pytest.raises(ModelFormatError, match="position 11: model has 'feat_11', expected None"):
        load_model(trained.model_txt, feature_names=FEATURE_NAMES[:-1])


def _edit(text: str, pattern: str, replacement: str | Callable[[re.Match[str]], str]) -> str:
    edited, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert count == 1, pattern
    return edited


CORRUPTIONS: dict[str, tuple[Callable[[str], str], str]] = {
    "truncated": (lambda t: t[: len(t) * 2 // 3], "truncated"),
    "empty": (lambda t: "", "not a LightGBM text model"),
    "binary": (lambda t: "tree\n\udcff", "not UTF-8"),
    "bad number": (lambda t: _edit(t, r"^(threshold=)\S+", r"\g<1>1.5x"), "malformed number"),
    "short array": (lambda t: _edit(t, r"^(leaf_value=\S+) \S+", r"\1"), "leaf_value has"),
    "missing field": (lambda t: _edit(t, r"^left_child=.*\n", ""), "missing 'left_child'"),
    "categorical": (
        lambda t: _edit(t, r"^(decision_type=)(\d+)", lambda m: f"{m[1]}{int(m[2]) | 1}"),
        "categorical splits are not supported",
    ),
    "linear": (lambda t: _edit(t, r"^is_linear=0", "is_linear=1"), "linear trees"),
    "regression": (
        lambda t: _edit(t, r"^objective=.*", "objective=regression"),
        "objective 'regression' is not supported",
    ),
    "no sigmoid": (lambda t: _edit(t, r"^objective=.*", "objective=binary"), "sigmoid"),
    "multiclass": (lambda t: _edit(t, r"^num_class=1", "num_class=3"), "single-output"),
    "bad child": (lambda t: _edit(t, r"^(left_child=)\S+", r"\g<1>999"), "out of range"),
    "cycle": (lambda t: _edit(t, r"^(left_child=)\S+", r"\g<1>0"), "reached twice"),
    "bad feature": (lambda t: _edit(t, r"^(split_feature=)\S+", r"\g<1>12"), "out of range"),
    "random forest": (
        lambda t: _edit(t, r"^(objective=.*)$", "\\1\naverage_output"),
        "average_output",
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_or_unsupported_model_is_refused(trained: Trained, tmp_path: Path, corruption: str) -> None:
    corrupt, message = CORRUPTIONS[corruption]
    bad = tmp_path / "model.txt"
    bad.write_bytes(corrupt(trained.model_txt.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(ModelFormatError, match=message):
        load_model(bad, trained.compiled_so, feature_names=FEATURE_NAMES)
    with pytest.raises(ModelFormatError, match=message):
        compile_model(bad, tmp_path / "model.so")


def _assert_falls_back(trained: Trained, compiled_so: Path, reason: str) -> None:
    model = load_model(trained.model_txt, compiled_so, feature_names=FEATURE_NAMES)
    assert model.engine == ENGINE_LIGHTGBM
    assert model.fallback_reason is not None
    assert reason in model.fallback_reason
    row = trained.X[7].tolist()
    assert abs(model.score(row) - trained.booster.predict(trained.X[7:8])[0]) <= TOLERANCE


def test_object_built_for_fewer_trees_is_refused(trained: Trained, tmp_path: Path) -> None:
    other_txt = tmp_path / "other.txt"
    trained.booster.save_model(str(other_txt), num_iteration=30)
    compile_model(other_txt, tmp_path / "other.so")
    _assert_falls_back(trained, tmp_path / "other.so", "number of trees is 30, need 60")


def test_object_built_for_same_shape_other_model_is_refused(trained: Trained, tmp_path: Path) -> None:
    other_txt = tmp_path / "other.txt"
    other_txt.write_text(trained.model_txt.read_text() + "\n")  # same trees, other bytes
    compile_model(other_txt, tmp_path / "other.so")
    _assert_falls_back(trained, tmp_path / "other.so", "model SHA-256")


def test_object_that_scores_wrong_is_refused_by_self_check(trained: Trained, tmp_path: Path) -> None:
    tree0 = trained.tree_model.trees[0]
    wrong = dataclasses.replace(
        trained.tree_model,
        trees=(
            dataclasses.replace(tree0, leaf_value=tuple(v + 0.5 for v in tree0.leaf_value)),
            *trained.tree_model.trees[1:],
        ),
    )
    sha256 = hashlib.sha256(trained.model_txt.read_bytes()).hexdigest()
    build_shared_object(generate_c(wrong, sha256), tmp_path / "wrong.so")
    _assert_falls_back(trained, tmp_path / "wrong.so", "self-check failed")


@pytest.mark.parametrize("content", [None, b"not an ELF object"])
def test_unloadable_object_is_refused(trained: Trained, tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "model.so"
    if content is not None:
        path.write_bytes(content)
    _assert_falls_back(trained, path, "cannot load")


@pytest.mark.parametrize("engine", [ENGINE_COMPILED, ENGINE_LIGHTGBM])
def test_concurrent_threads_each_get_their_own_results(trained: Trained, engine: str) -> None:
    model = _load(trained, engine)
    threads = 8
    X = trained.X[: threads * 100]
    expected = trained.booster.predict(X)
    expected_leaves = trained.booster.predict(X, pred_leaf=True)
    barrier = threading.Barrier(threads)
    failures: list[str] = []

    def hammer(worker: int) -> None:
        mine = range(worker, len(X), threads)  # every thread scores different rows
        barrier.wait()
        for _ in range(5):
            for i in mine:
                probability = model.score(X[i].tolist())
                leaves = model.last_leaves()
                wrong = abs(probability - expected[i]) > TOLERANCE
                if wrong or not np.array_equal(leaves, expected_leaves[i]):
                    failures.append(f"thread {worker} row {i}: {probability} != {expected[i]}")

    workers = [threading.Thread(target=hammer, args=(w,)) for w in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures, failures[:5]


def test_bad_input_is_rejected(trained: Trained, compiled: Model) -> None:
    row = trained.X[0].tolist()
    with pytest.raises(ValueError, match="row has 11 values, the model takes 12"):
        compiled.score(row[:-1])
    with pytest.raises(ValueError, match="row has 13 values"):
        compiled.score([*row, 0.0])
    with pytest.raises(TypeError, match="real numbers"):
        compiled.score([*row[:-1], "1.0"])  # type: ignore[list-item]
    leaves = compiled.score_with_leaves(row)[1]
    with pytest.raises(ValueError, match="60 integer leaf indices"):
        compiled.contributions(leaves[:-1])
    with pytest.raises(ValueError, match="out of range"):
        compiled.contributions(np.full(60, 31))
    with pytest.raises(ValueError, match=r"shape \(n, 12\)"):
        compiled.predict_many(trained.X[:, :-1])


def test_last_leaves_needs_a_scored_row(compiled: Model) -> None:
    errors: list[BaseException] = []

    def fresh_thread() -> None:
        try:
            compiled.last_leaves()
        except RuntimeError as exc:
            errors.append(exc)

    worker = threading.Thread(target=fresh_thread)
    worker.start()
    worker.join()
    assert len(errors) == 1


def test_model_metadata(trained: Trained, compiled: Model) -> None:
    assert compiled.num_trees == 60
    assert compiled.num_features == NUM_FEATURES
    assert compiled.feature_names == FEATURE_NAMES
    roots = [t.internal_value[0] if t.num_leaves > 1 else t.leaf_value[0] for t in
             trained.tree_model.trees]  # fmt: skip
    assert compiled.bias == pytest.approx(sum(roots), abs=1e-12)


def _rewrite(text: str, tree_leaf_values: Callable[[int, list[str]], list[str]]) -> str:
    """Model text with each tree's leaf values replaced (and tree_sizes dropped, since the
    byte sizes change; LightGBM then parses the trees sequentially)."""
    lines = [line for line in text.splitlines() if not line.startswith("tree_sizes=")]
    tree = -1
    for i, line in enumerate(lines):
        if line.startswith("Tree="):
            tree = int(line.removeprefix("Tree="))
        elif line.startswith("leaf_value="):
            values = line.removeprefix("leaf_value=").split()
            lines[i] = "leaf_value=" + " ".join(tree_leaf_values(tree, values))
    return "\n".join(lines) + "\n"


def test_extreme_raw_scores_saturate_like_lightgbm(trained: Trained, tmp_path: Path) -> None:
    # Leaves of +-1000 push exp() past overflow in one direction and to 0 in the other.
    extreme = tmp_path / "extreme.txt"
    extreme.write_text(
        _rewrite(
            trained.model_txt.read_text(),
            lambda tree, values: (
                [("1000" if i % 2 else "-1000") for i in range(len(values))] if tree == 0 else values
            ),
        )
    )
    compile_model(extreme, tmp_path / "extreme.so")
    booster = lgb.Booster(model_file=str(extreme))
    expected = np.asarray(booster.predict(trained.X[:200]))
    assert {0.0, 1.0} <= set(expected.tolist())
    for model in (
        load_model(extreme, tmp_path / "extreme.so", feature_names=FEATURE_NAMES),
        load_model(extreme, feature_names=FEATURE_NAMES),
    ):
        got = [model.score(row) for row in trained.X[:200].tolist()]
        np.testing.assert_array_equal(got, expected)


def test_one_leaf_trees(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    X, y = _synthetic(rng, 300)
    params = {**PARAMS, "min_data_in_leaf": 1000}  # nothing can split
    booster = lgb.train(params, lgb.Dataset(X, y, feature_name=list(FEATURE_NAMES)), 3)
    model_txt = tmp_path / "model.txt"
    booster.save_model(str(model_txt))
    tree_model = parse_model(model_txt.read_text())
    assert [t.num_leaves for t in tree_model.trees] == [1] * booster.num_trees()
    compile_model(model_txt, tmp_path / "model.so")
    model = load_model(model_txt, tmp_path / "model.so", feature_names=FEATURE_NAMES)
    assert model.engine == ENGINE_COMPILED
    probability, leaves = model.score_with_leaves(X[0].tolist())
    assert abs(probability - booster.predict(X[:1])[0]) <= TOLERANCE
    np.testing.assert_array_equal(leaves, np.zeros(booster.num_trees()))
    np.testing.assert_array_equal(model.contributions(leaves), np.zeros(NUM_FEATURES))
    assert model.bias == pytest.approx(booster.predict(X[:1], raw_score=True)[0], abs=1e-12)


def test_compile_cli_reports_time(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "cli.so"
    assert compile_main([str(trained.model_txt), str(out)]) == 0
    assert re.search(r"compiled .* in \d+\.\d\d s", capsys.readouterr().out)
    assert out.stat().st_mode & 0o444 == 0o444
    model = load_model(trained.model_txt, out, feature_names=FEATURE_NAMES)
    assert model.engine == ENGINE_COMPILED


ONE_THREAD_PROBE = """
import os, sys
from pathlib import Path
import numpy as np
from gate.bundle import load_bundle
from gate.features import FEATURE_NAMES
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
bundle = load_bundle(Path(sys.argv[1]))  # the compiled engine's self-check runs Booster.predict
model = bundle.model
rows = np.random.default_rng(1).normal(size=(256, model.num_features))
model.predict_many(rows)
from gate.scoring import load_model
fallback = load_model(Path(sys.argv[1]) / "model.txt", feature_names=FEATURE_NAMES)
for row in rows:
    fallback.score(row.tolist())
    fallback.last_leaves()
print(threads() - before)
"""


def test_the_gates_lightgbm_calls_start_no_thread_team(bundle_dir: Path) -> None:
    """Every Booster the gate uses (the compiled engine's self-check, predict_many and the
    LightGBM fallback engine) runs on the calling thread: no OpenMP team is started, even with
    OMP_NUM_THREADS unset on a machine with several cores."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", ONE_THREAD_PROBE, str(bundle_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert int(done.stdout.strip().splitlines()[-1]) == 0, done.stdout
