"""Write a model bundle the gate will accept: model.txt, compiled model.so, golden vectors and a
manifest with checksums. The gate's own loader (gate.bundle.load_bundle) verifies the result
before this returns, so a bundle that leaves here has already passed the checks it will face.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from gate.bundle import GOLDEN, MANIFEST, MODEL_SO, MODEL_TXT, encode_row, load_bundle, sha256_file
from gate.features import FEATURE_NAMES
from model.compile import compile_model


def golden_rows(X: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Rows to pin the model's behaviour: sampled real rows plus NaN, inf and extreme edits."""
    rng = np.random.default_rng(seed)
    base = X[rng.choice(len(X), size=min(n, len(X)), replace=False)].copy()
    edited = base[: max(1, len(base) // 4)].copy()
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e300, -1e300, 1e-40])
    for row in edited:
        cols = rng.choice(row.shape[0], size=4, replace=False)
        row[cols] = rng.choice(specials, size=4)
    return np.vstack([base, edited, np.full((1, X.shape[1]), np.nan)])


def write_bundle(
    out_dir: Path,
    booster: lgb.Booster,
    *,
    version: str,
    thresholds: dict[str, float],
    golden_X: np.ndarray,
    metrics: dict[str, Any],
    card: dict[str, Any],
    report: str | None = None,
    compile_so: bool = True,
    feature_names: Sequence[str] = FEATURE_NAMES,
) -> Path:
    """Create ``out_dir`` (replacing it) with a verified bundle; returns its path.

    ``report`` is the evaluation report's path relative to the bundle directory, recorded in the
    manifest so the model card's numbers can be traced to their plots and tables.
    """
    if list(booster.feature_name()) != list(feature_names):
        raise ValueError("booster features differ from the gate's feature spec")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    booster.save_model(str(tmp / MODEL_TXT))
    scores = np.asarray(booster.predict(golden_X))
    (tmp / GOLDEN).write_text(
        json.dumps({"rows": [encode_row(r) for r in golden_X.tolist()], "scores": scores.tolist()})
    )
    files = [MODEL_TXT, GOLDEN]
    if compile_so:
        started = time.monotonic()
        compile_model(tmp / MODEL_TXT, tmp / MODEL_SO)
        print(f"compiled {MODEL_SO} in {time.monotonic() - started:.1f} s", file=sys.stderr)
        files.append(MODEL_SO)
    digests = {name: sha256_file(tmp / name) for name in files}
    manifest = {
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "features": list(feature_names),
        "thresholds": thresholds,
        "checksum": digests[MODEL_TXT],
        "files": digests,
        "num_trees": booster.num_trees(),
        "metrics": metrics,
        "model_card": card,
    }
    if report is not None:
        manifest["report"] = report
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    load_bundle(tmp, feature_names=feature_names)  # the gate's own checks, before anyone sees it
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
