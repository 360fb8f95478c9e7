"""Training: whole-week time split, thresholds that keep their targets, and the same seed giving
the same bundle, byte for byte (simulation, replay through the gate and LightGBM included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gate.bundle import sha256_file
from model.evaluate import Targets
from model.simulate import DAY, WEEK
from model.train import choose_thresholds, main, time_split

START = 1_767_571_200.0  # Monday 2026-01-05 00:00 UTC


def test_time_split_cuts_at_whole_weeks() -> None:
    at = START + np.arange(0, 6 * WEEK, 3_600.0)
    split = time_split(at, START, 6)
    assert not (split.train & split.valid).any() and not (split.valid & split.test).any()
    assert (split.train | split.valid | split.test).all()
    assert at[split.train].max() < START + 4 * WEEK <= at[split.valid].min()
    assert at[split.valid].max() < START + 5 * WEEK <= at[split.test].min()
    assert split.weeks == {"train": (1, 4), "valid": (5, 5), "test": (6, 6)}
    late = time_split(np.array([START + 6 * WEEK + DAY]), START, 6)
    assert late.test.all()  # a refund after the last order still belongs to the last week


def test_thresholds_keep_legitimate_holds_within_their_targets() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(20_000) < 0.1).astype(int)
    scores = np.where(y == 1, rng.beta(5, 2, len(y)), rng.beta(1, 8, len(y)))
    t = choose_thresholds(scores, y, Targets(legit_held=0.01, legit_rejected=0.001))
    legit = scores[y == 0]
    assert 0.009 < (legit >= t.hold).mean() <= 0.01
    assert (legit >= t.reject).mean() <= 0.001
    assert 0 < t.hold <= t.reject <= 1


def _train(out: Path) -> Path:
    main(
        [
            "--events",
            "60000",
            "--seed",
            "5",
            "--max-trees",
            "50",
            "--out",
            str(out / "bundles"),
            "--reports",
            str(out / "reports"),
            "--no-compile",
            "--no-current",
        ]
    )
    (bundle,) = (out / "bundles").iterdir()
    return bundle


def test_same_seed_gives_the_same_bundle(tmp_path: Path) -> None:
    first, second = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert sha256_file(first / "model.txt") == sha256_file(second / "model.txt")
    assert first.name == second.name  # the version is derived from the model's checksum
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["checksum"] == sha256_file(first / "model.txt")
    assert manifest["thresholds"] == json.loads((second / "manifest.json").read_text())["thresholds"]
    report = (first / manifest["report"]).resolve()
    assert report == (tmp_path / "a" / "reports" / first.name / "report.md").resolve()
    assert "## Rules-only baseline at the same false-positive rate" in report.read_text()
    assert {p.name for p in report.parent.glob("*.png")} == {
        "curves.png",
        "scores.png",
        "scenarios.png",
        "importance.png",
    }
    card = manifest["model_card"]
    assert card["split"]["test"]["weeks"] == "week 6"
    assert card["thresholds"]["targets"] == {"legit_held_or_rejected_max": 0.01, "legit_rejected_max": 0.001}
