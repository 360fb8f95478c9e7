"""Bundles: a good one loads; every kind of bad one is refused with a reason."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from gate import policy
from gate.bundle import BundleError, load_bundle, sha256_file
from gate.features import FEATURE_NAMES
from model.synthetic import synthetic_training_set


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle_dir, out)
    return out


def edit_manifest(path: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def refresh_checksums(path: Path) -> None:
    def update(m: dict) -> None:
        m["files"] = {name: sha256_file(path / name) for name in m["files"]}
        m["checksum"] = m["files"]["model.txt"]

    edit_manifest(path, update)


def test_good_bundle_loads_with_the_compiled_engine(copy: Path) -> None:
    b = load_bundle(copy)
    assert (b.version, b.model.engine) == ("test-model-1", "compiled")
    assert (b.thresholds.hold, b.thresholds.reject) == (0.5, 0.9)


def test_a_bundle_explains_by_reason_code(copy: Path) -> None:
    b = load_bundle(copy)
    rows = synthetic_training_set(50, seed=5)[0]
    for row in rows.tolist():
        b.model.score(row)
        leaves = b.model.last_leaves()
        np.testing.assert_allclose(
            b.explain(leaves), policy.code_weights(b.model.contributions(leaves)), rtol=0, atol=1e-12
        )


def test_corrupt_model_is_refused(copy: Path) -> None:
    (copy / "model.txt").write_text((copy / "model.txt").read_text().replace("0.", "1.", 5))
    with pytest.raises(BundleError, match="checksum of model.txt"):
        load_bundle(copy)


def test_truncated_model_is_refused(copy: Path) -> None:
    data = (copy / "model.txt").read_bytes()
    (copy / "model.txt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="checksum of model.txt"):
        load_bundle(copy)


def test_half_copied_bundle_is_refused(copy: Path) -> None:
    (copy / "golden.json").unlink()
    with pytest.raises(BundleError, match="golden.json is missing"):
        load_bundle(copy)


def test_missing_manifest_is_refused(copy: Path) -> None:
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(copy)


def test_feature_list_mismatch_is_refused(copy: Path) -> None:
    edit_manifest(copy, lambda m: m["features"].reverse())
    with pytest.raises(BundleError, match="feature list differs.*position 0"):
        load_bundle(copy)


def test_model_trained_on_other_features_is_refused(copy: Path) -> None:
    X, y = synthetic_training_set(n=500)
    names = [f"f{i}" for i in range(len(FEATURE_NAMES))]
    other = lgb.train(
        {"objective": "binary", "verbosity": -1, "num_leaves": 4},
        lgb.Dataset(X, y, feature_name=names),
        num_boost_round=3,
    )
    other.save_model(str(copy / "model.txt"))
    refresh_checksums(copy)
    with pytest.raises(BundleError, match="test-model-1"):
        load_bundle(copy)


def test_golden_vectors_that_do_not_reproduce_are_refused(copy: Path) -> None:
    golden = json.loads((copy / "golden.json").read_text())
    golden["scores"][3] += 1e-9
    (copy / "golden.json").write_text(json.dumps(golden))
    refresh_checksums(copy)
    with pytest.raises(BundleError, match="golden row 3"):
        load_bundle(copy)


@pytest.mark.parametrize(
    "thresholds",
    [{"hold": 0.9, "reject": 0.5}, {"hold": 0.5}, {"hold": "x", "reject": 1}, {"hold": 0, "reject": 0.5}],
)
def test_insane_thresholds_are_refused(copy: Path, thresholds: dict) -> None:
    edit_manifest(copy, lambda m: m.update(thresholds=thresholds))
    with pytest.raises(BundleError, match="thresholds"):
        load_bundle(copy)


def test_compiled_model_of_another_bundle_falls_back_to_the_portable_engine(
    copy: Path, tmp_path: Path
) -> None:
    from model.compile import compile_model

    X, y = synthetic_training_set(n=500)
    other = lgb.train(
        {"objective": "binary", "verbosity": -1, "num_leaves": 4},
        lgb.Dataset(X, y, feature_name=list(FEATURE_NAMES)),
        num_boost_round=3,
    )
    other.save_model(str(tmp_path / "other.txt"))
    compile_model(tmp_path / "other.txt", copy / "model.so")
    refresh_checksums(copy)
    b = load_bundle(copy)
    assert b.model.engine == "lightgbm"
    assert b.model.fallback_reason
