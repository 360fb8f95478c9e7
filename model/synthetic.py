"""A small synthetic model bundle for tests and benchmarks: real LightGBM, real packaging, no
simulation. Labels depend on a few request and velocity features, and NaNs are sprinkled in, so
the trees exercise missing-value routing."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np

from gate.features import FEATURE_INDEX, FEATURE_NAMES, FEATURES
from model.package import golden_rows, write_bundle


def synthetic_training_set(n: int = 6000, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label depends on 'not received but delivered' and recent refunds."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(FEATURE_NAMES)))
    X[rng.random(X.shape) < 0.1] = np.nan
    inr = rng.random(n) < 0.2
    X[:, FEATURE_INDEX["not_received_but_delivered"]] = inr
    refunds = rng.poisson(1.0, n).astype(float)
    X[:, FEATURE_INDEX["acct_refunds_24h"]] = refunds
    X[:, FEATURE_INDEX["refund_order_ratio"]] = rng.uniform(0.1, 1.0, n)
    logit = -4 + 2.5 * inr + 1.2 * refunds
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return X, y


def build_synthetic_bundle(
    out: Path, version: str, thresholds: dict[str, float] | None = None, *, velocity: bool = True
) -> Path:
    """A verified bundle (40 trees x 15 leaves, compiled too) at ``out``; ``thresholds``
    replace the usual hold 0.5 / reject 0.9; ``velocity=False`` trains on the request features
    alone (every velocity feature NaN), so only request context can explain its scores."""
    X, y = synthetic_training_set()
    if not velocity:
        X[:, [f.source != "request" for f in FEATURES]] = np.nan
    params = {
        "objective": "binary",
        "num_leaves": 15,
        "learning_rate": 0.1,
        "verbosity": -1,
        "seed": 1,
        "deterministic": True,
        "num_threads": 1,
    }
    booster = lgb.train(params, lgb.Dataset(X, y, feature_name=list(FEATURE_NAMES)), num_boost_round=40)
    return write_bundle(
        out,
        booster,
        version=version,
        thresholds=thresholds or {"hold": 0.5, "reject": 0.9},
        golden_X=golden_rows(X, 50, seed=1),
        metrics={},
        card={},
    )
