"""Train a refund-abuse model and write a bundle the gate serves: ``make train``.

    simulate → replay through the gate (point-in-time rows) → time split → train with velocity
    dropout → thresholds on validation weeks → evaluate on test weeks → bundle (+ compiled .so)

Same seed, same data, same bundle checksum: LightGBM runs deterministic with fixed threads.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from gate.devredis import start_redis
from gate.features import FEATURE_NAMES, FEATURES
from model.dataset import Dataset, build_dataset
from model.package import golden_rows, write_bundle
from model.simulate import SimConfig, simulate

BUNDLES = Path(__file__).resolve().parent / "bundles"
VELOCITY_COLUMNS = np.array([f.source != "request" for f in FEATURES])
TARGET_HOLD_RATE = 0.01  # share of legitimate refunds held (or rejected) at most
TARGET_REJECT_RATE = 0.001  # share of legitimate refunds rejected at most


def time_split(at: np.ndarray, fractions: tuple[float, float] = (0.6, 0.8)) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """Masks for train (earliest), validation and test (latest) by request time."""
    lo, hi = np.quantile(at, fractions)
    return at < lo, (at >= lo) & (at < hi), at >= hi


def mask_velocity(X: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Copy of X with every velocity feature NaN in a random ``rate`` of rows (Redis down)."""
    out = X.copy()
    rows = rng.random(len(X)) < rate
    out[np.ix_(rows, VELOCITY_COLUMNS)] = np.nan
    return out


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic, ties averaged)."""
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def choose_thresholds(scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Hold and reject lines that keep legitimate hold/reject rates within their targets."""
    legit = np.sort(scores[y == 0])
    hold = float(legit[int(np.ceil(len(legit) * (1 - TARGET_HOLD_RATE))) - 1])
    reject = float(legit[int(np.ceil(len(legit) * (1 - TARGET_REJECT_RATE))) - 1])
    hold = float(np.nextafter(hold, 1.0))  # strictly above the legit quantile
    reject = max(float(np.nextafter(reject, 1.0)), hold)
    return {"hold": min(hold, 1.0), "reject": min(reject, 1.0)}


def evaluate(scores: np.ndarray, data: Dataset, mask: np.ndarray,
             t: dict[str, float]) -> dict[str, Any]:
    """Metrics on the rows of ``mask``: AUC, legit hold/reject rates, recall per scenario."""
    y, s, scen = data.y[mask], scores, data.scenario[mask]
    legit, abuse = y == 0, y == 1
    flagged = s >= t["hold"]
    out: dict[str, Any] = {
        "rows": int(mask.sum()),
        "abuse_share": float(abuse.mean()),
        "roc_auc": roc_auc(y, s),
        "legit_held_or_rejected": float(flagged[legit].mean()),
        "legit_rejected": float((s[legit] >= t["reject"]).mean()),
        "abuse_recall": float(flagged[abuse].mean()) if abuse.any() else float("nan"),
        "recall_by_scenario": {},
    }
    for name in sorted(set(scen[abuse].tolist())):
        sel = abuse & (scen == name)
        out["recall_by_scenario"][name] = round(float(flagged[sel].mean()), 4)
    return out


def train(data: Dataset, *, seed: int, max_trees: int, dropout: float) -> tuple[
        lgb.Booster, dict[str, float], dict[str, Any]]:
    """Fit on the earliest weeks, stop early on the next, set thresholds there, test on the last."""
    rng = np.random.default_rng(seed)
    tr, va, te = time_split(data.at)
    X_tr = mask_velocity(data.X[tr], dropout, rng)
    params = {
        "objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "max_depth": 8,
        "min_data_in_leaf": 40, "feature_fraction": 0.9, "bagging_fraction": 0.8,
        "bagging_freq": 1, "lambda_l2": 1.0, "seed": seed, "deterministic": True,
        "num_threads": 2, "verbosity": -1, "use_missing": True, "force_col_wise": True,
    }
    train_set = lgb.Dataset(X_tr, data.y[tr], feature_name=list(FEATURE_NAMES), free_raw_data=False)
    valid_set = lgb.Dataset(data.X[va], data.y[va], reference=train_set)
    booster = lgb.train(params, train_set, num_boost_round=max_trees, valid_sets=[valid_set],
                        callbacks=[lgb.early_stopping(30, verbose=False)])
    booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=booster.best_iteration))
    thresholds = choose_thresholds(booster.predict(data.X[va]), data.y[va])
    X_te = data.X[te]
    degraded = X_te.copy()
    degraded[:, VELOCITY_COLUMNS] = np.nan
    metrics = {
        "trees": booster.num_trees(),
        "train_rows": int(tr.sum()),
        "valid": evaluate(booster.predict(data.X[va]), data, va, thresholds),
        "test": evaluate(booster.predict(X_te), data, te, thresholds),
        "test_degraded": evaluate(booster.predict(degraded), data, te, thresholds),
        "velocity_dropout": dropout,
    }
    return booster, thresholds, metrics


def main(argv: list[str] | None = None) -> None:
    """Command line of ``make train``."""
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__)
    parser.add_argument("--events", type=int, default=400_000, help="simulated records")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-trees", type=int, default=300)
    parser.add_argument("--dropout", type=float, default=0.2,
                        help="share of training rows with every velocity feature masked")
    parser.add_argument("--out", type=Path, default=BUNDLES)
    parser.add_argument("--redis-url", default=os.environ.get("TRAIN_REDIS_URL"),
                        help="a scratch Redis (default: start a throw-away redis-server)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-current", action="store_true",
                        help="do not point <out>/current at the new bundle")
    args = parser.parse_args(argv)

    started = time.monotonic()
    cfg = SimConfig.scaled(events=args.events, seed=args.seed)
    redis = None if args.redis_url else start_redis()
    url = args.redis_url or (redis.url if redis else "")
    try:
        print(f"simulating ~{args.events:,} records and replaying them through the gate",
              file=sys.stderr)
        data = asyncio.run(build_dataset(simulate(cfg, progress=True), url))
    finally:
        if redis is not None:
            redis.stop()
    print(f"dataset: {len(data):,} refunds, {int(data.y.sum()):,} abusive", file=sys.stderr)
    booster, thresholds, metrics = train(data, seed=args.seed, max_trees=args.max_trees,
                                         dropout=args.dropout)
    model_txt = booster.model_to_string()
    version = "rg-" + hashlib.sha256(model_txt.encode()).hexdigest()[:12]
    _, _, te = time_split(data.at)
    card = {
        "intended_use": "Real-time refund abuse scoring behind refund-gate; HOLD_FOR_REVIEW "
                        "sends a refund to a human, it is not an accusation.",
        "data": {"source": "model/simulate.py", "seed": args.seed, "records": args.events,
                 "refunds": len(data), "abuse_share": float(data.y.mean()),
                 "window": [float(data.at.min()), float(data.at.max())],
                 "scenarios": {k: int(v) for k, v in zip(*np.unique(data.scenario,
                                                                    return_counts=True),
                                                          strict=True)}},
        "targets": {"legit_held_max": TARGET_HOLD_RATE, "legit_rejected_max": TARGET_REJECT_RATE},
        "known_blind_spots": [
            "trained on simulated traffic only: recalibrate thresholds on real labels",
            "first refund of a fresh account with no shared device/IP has little signal",
        ],
    }
    out = write_bundle(args.out / version, booster, version=version, thresholds=thresholds,
                       golden_X=golden_rows(data.X[te], 200, args.seed), metrics=metrics,
                       card=card, compile_so=not args.no_compile)
    if not args.no_current:
        current = args.out / "current"
        tmp = args.out / ".current.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(version)
        tmp.replace(current)
    test = metrics["test"]
    print(f"bundle {out} ({booster.num_trees()} trees) in {time.monotonic() - started:.0f} s\n"
          f"test: AUC {test['roc_auc']:.4f}, abuse held/rejected {test['abuse_recall']:.3f}, "
          f"legit held {test['legit_held_or_rejected']:.4f}, "
          f"legit rejected {test['legit_rejected']:.4f}\n"
          f"degraded: abuse held {metrics['test_degraded']['abuse_recall']:.3f}, legit held "
          f"{metrics['test_degraded']['legit_held_or_rejected']:.4f}\n"
          f"recall by scenario: {test['recall_by_scenario']}\nthresholds: {thresholds}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
