"""Training: whole-week time split back from the labels' horizon, thresholds that keep their
targets (on the validation weeks and on a shifted world), the same seed giving the same bundle,
training from a history file equal to training from the simulator, and no tracked file touched
unless asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gate.bundle import sha256_file
from model.evaluate import Targets
from model.simulate import DAY, WEEK, SimConfig
from model.simulate import main as simulate_main
from model.train import HELD_OUT_BEHAVIOURS, choose_thresholds, main, point_current, time_split

START = 1_767_571_200.0  # Monday 2026-01-05 00:00 UTC
END = START + 6 * WEEK


def test_time_split_cuts_at_whole_weeks_back_from_the_horizon() -> None:
    at = START + np.arange(0, 6 * WEEK, 3_600.0)
    split = time_split(at, END, 6)
    assert not (split.train & split.valid).any() and not (split.valid & split.test).any()
    assert (split.train | split.valid | split.test).all()
    assert at[split.train].max() < START + 4 * WEEK <= at[split.valid].min()
    assert at[split.valid].max() < START + 5 * WEEK <= at[split.test].min()
    assert split.weeks == {"train": (1, 4), "valid": (5, 5), "test": (6, 6)}
    assert split.start_s == START


def test_refunds_after_the_horizon_are_in_no_part() -> None:
    late = time_split(np.array([END - DAY, END + DAY]), END, 6)
    assert late.test.tolist() == [True, False]
    assert not (late.train | late.valid)[1]


def test_thresholds_keep_legitimate_holds_within_their_targets() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(20_000) < 0.1).astype(int)
    scores = np.where(y == 1, rng.beta(5, 2, len(y)), rng.beta(1, 8, len(y)))
    t = choose_thresholds(scores, y, Targets(legit_held=0.01, legit_rejected=0.001))
    legit = scores[y == 0]
    assert 0.009 < (legit >= t.hold).mean() <= 0.01
    assert (legit >= t.reject).mean() <= 0.001
    assert 0 < t.hold <= t.reject <= 1


def test_a_shifted_world_makes_the_lines_stricter_where_it_needs() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random(20_000) < 0.1).astype(int)
    scores = np.where(y == 1, rng.beta(5, 2, len(y)), rng.beta(1, 8, len(y)))
    targets = Targets(legit_held=0.01, legit_rejected=0.001)
    plain = choose_thresholds(scores, y, targets)
    # A shifted world with one honest segment that scores high: the line must spare it too.
    s_y = np.zeros(5_000, dtype=int)
    s_scores = rng.beta(1, 8, 5_000)
    segment = np.where(np.arange(5_000) < 500, "legit_bracketing", "legit_normal")
    s_scores[:500] = rng.beta(3, 3, 500)
    strict = choose_thresholds(scores, y, targets, (s_scores, s_y, segment))
    assert strict.hold > plain.hold
    assert (s_scores[:500] >= strict.hold).mean() <= 0.03
    assert (s_scores >= strict.hold).mean() <= 0.01


def _train(out: Path, *extra: str) -> Path:
    main(
        [
            "--events",
            "60000",
            "--seed",
            "5",
            "--max-trees",
            "50",
            "--shifted-events",
            "0",
            "--out",
            str(out / "bundles"),
            "--reports",
            str(out / "reports"),
            "--no-compile",
            *extra,
        ]
    )
    (bundle,) = (p for p in (out / "bundles").iterdir() if p.name.startswith("rg-"))
    return bundle


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("a"))


def test_same_seed_gives_the_same_bundle(trained: Path, tmp_path: Path) -> None:
    first, second = trained, _train(tmp_path / "b")
    assert sha256_file(first / "model.txt") == sha256_file(second / "model.txt")
    assert first.name == second.name  # the version is derived from the model's checksum
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["checksum"] == sha256_file(first / "model.txt")
    assert manifest["thresholds"] == json.loads((second / "manifest.json").read_text())["thresholds"]


def test_the_report_and_card_state_data_labels_and_split(trained: Path) -> None:
    manifest = json.loads((trained / "manifest.json").read_text())
    report = (trained / manifest["report"]).resolve()
    assert report == (trained.parent.parent / "reports" / trained.name / "report.md").resolve()
    text = report.read_text()
    assert "## Rules-only baseline at the same false-positive rate" in text
    assert "**Labels from outcomes**" in text and "Selection bias" in text
    assert {p.name for p in report.parent.glob("*.png")} == {
        "curves.png",
        "scores.png",
        "scenarios.png",
        "importance.png",
    }
    card = manifest["model_card"]
    assert card["split"]["test"]["weeks"] == "week 9"  # 3 weeks of history, then the 6-week window
    assert card["thresholds"]["targets"] == {"legit_held_or_rejected_max": 0.01, "legit_rejected_max": 0.001}
    labels = card["data"]["labels"]
    assert labels["abusive"] > 0 and labels["legitimate"] > 0 and labels["maturity_days"] == 60
    assert set(labels["by_source"]) <= {
        "CHARGEBACK",
        "CONFIRMED_ABUSE",
        "REVIEW_REJECTED",
        "PAID",
        "REVIEW_APPROVED",
        "no_outcome",
        "not_mature",
    }
    assert card["data"]["held_out"] == list(HELD_OUT_BEHAVIOURS)
    assert card["training"]["monotone_constraints"]["item_returned"]["direction"] == -1


def test_training_from_a_simulator_history_file_equals_training_from_the_simulator(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = tmp_path / "history.jsonl.gz"
    simulate_main(
        ["--events", "60000", "--seed", "5", "--out", str(history), "--exclude", *HELD_OUT_BEHAVIOURS]
    )
    export_at = SimConfig.scaled(60000, seed=5, exclude=HELD_OUT_BEHAVIOURS).export_at
    from_file = _train(tmp_path / "c", "--records", str(history), "--as-of", str(export_at))
    assert from_file.name == trained.name
    assert sha256_file(from_file / "model.txt") == sha256_file(trained / "model.txt")
    card = json.loads((from_file / "manifest.json").read_text())["model_card"]
    assert card["data"]["source"] == "history files" and card["data"]["history"]["bad"] == 0


def test_training_touches_no_existing_bundle_unless_asked(trained: Path, tmp_path: Path) -> None:
    bundles = trained.parent
    point_current(bundles, trained.name)
    before = {p: p.stat().st_mtime_ns for p in trained.iterdir()}
    again = _train(bundles.parent)  # same seed, same version: already there
    assert again == trained
    assert {p: p.stat().st_mtime_ns for p in trained.iterdir()} == before
    assert (bundles / "current").resolve() == trained.resolve()
