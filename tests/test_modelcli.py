"""`refund-gate model ...`: validate, inspect, promote/unshadow, backtest and export-decisions, on
real bundle directories, real symlinks, a real redis-server and the CLI as a real process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
import redis

from gate.backtest import (
    DECISIONS,
    LoggedDecision,
    backtest,
    decide_row,
    facts_from_record,
    parse_record,
    read_jsonl,
    read_stream,
)
from gate.bundle import Bundle, load_bundle
from gate.cli import main
from gate.decisionlog import FEATURE_SPEC, DecisionRecord
from gate.devredis import RedisProcess, free_port
from gate.features import FEATURE_INDEX, FEATURE_NAMES, FEATURES
from gate.policy import APPROVE, HOLD, REJECT, DegradedPolicy, Facts
from gate.settings import Settings
from model.synthetic import synthetic_training_set
from tests.test_bundle import edit_manifest, refresh_checksums
from tests.test_cli import run_cli

DEGRADED = DegradedPolicy(Settings().degraded_approve_below_minor)
VELOCITY = [i for i, f in enumerate(FEATURES) if f.source != "request"]
RETURNED = FEATURE_INDEX["item_returned"]
CHECK_NAMES = ("manifest", "signature", "checksums", "features", "thresholds", "model", "golden")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``refund-gate`` in this process; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out = capsys.readouterr()
    return int(exited.value.code or 0), out.out, out.err


def copy_bundle(bundle_dir: Path, dest: Path) -> Path:
    """A private copy of the session's test bundle, safe to modify."""
    shutil.copytree(bundle_dir, dest)
    return dest


def with_thresholds(bundle_dir: Path, dest: Path, hold: float, reject: float) -> Path:
    """A copy of the test bundle with other thresholds and its own version."""
    copy_bundle(bundle_dir, dest)
    edit_manifest(
        dest,
        lambda m: m.update(
            thresholds={"hold": hold, "reject": reject}, version=f"test-model-{hold}-{reject}"
        ),
    )
    refresh_checksums(dest)
    return dest


# ---------------------------------------------------------------------------------------------
# validate


def test_validate_accepts_a_good_bundle(bundle_dir: Path) -> None:
    out = run_cli("model", "validate", str(bundle_dir))
    assert out.returncode == 0, out.stderr
    assert "VALID: the gate would serve it" in out.stdout
    assert "version     test-model-1" in out.stdout
    assert "engine      compiled\n" in out.stdout
    assert "thresholds  hold >= 0.5, reject >= 0.9" in out.stdout
    for name in CHECK_NAMES:
        assert f"✓ {name} " in out.stdout
    assert "✗" not in out.stdout
    assert "rows reproduce on compiled and lightgbm" in out.stdout


def test_validate_json_verdict(bundle_dir: Path, bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "model", "validate", "--json", str(bundle_dir))
    verdict = json.loads(out)
    assert code == 0
    assert (verdict["valid"], verdict["version"], verdict["engine"]) == (True, "test-model-1", "compiled")
    assert verdict["num_trees"] == bundle.model.num_trees
    assert verdict["thresholds"] == {"hold": 0.5, "reject": 0.9}
    assert [c["name"] for c in verdict["checks"]] == list(CHECK_NAMES)
    assert all(c["ok"] is True for c in verdict["checks"])


def _corrupt_model(b: Path) -> None:
    (b / "model.txt").write_text((b / "model.txt").read_text().replace("0.", "1.", 5))


def _half_copied_so(b: Path) -> None:
    data = (b / "model.so").read_bytes()
    (b / "model.so").write_bytes(data[: len(data) // 2])


def _golden_off(b: Path) -> None:
    golden = json.loads((b / "golden.json").read_text())
    golden["scores"][3] += 1e-9
    (b / "golden.json").write_text(json.dumps(golden))
    refresh_checksums(b)


def _golden_row_too_short(b: Path) -> None:
    golden = json.loads((b / "golden.json").read_text())
    golden["rows"][0] = golden["rows"][0][:-1]
    (b / "golden.json").write_text(json.dumps(golden))
    refresh_checksums(b)


def _model_of_other_features(b: Path) -> None:
    X, y = synthetic_training_set(n=500)
    other = lgb.train(
        {"objective": "binary", "verbosity": -1, "num_leaves": 4},
        lgb.Dataset(X, y, feature_name=[f"f{i}" for i in range(X.shape[1])]),
        num_boost_round=3,
    )
    other.save_model(str(b / "model.txt"))
    refresh_checksums(b)


BAD_BUNDLES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "no manifest": (lambda b: (b / "manifest.json").unlink(), "manifest", "no manifest.json"),
    "manifest not JSON": (lambda b: (b / "manifest.json").write_text("{"), "manifest", "not valid JSON"),
    "corrupt model.txt": (_corrupt_model, "checksums", "checksum of model.txt"),
    "half-copied: golden.json missing": (
        lambda b: (b / "golden.json").unlink(),
        "checksums",
        "golden.json is missing",
    ),
    "half-copied: model.so truncated": (_half_copied_so, "checksums", "checksum of model.so"),
    "feature list of another gate": (
        lambda b: edit_manifest(b, lambda m: m["features"].reverse()),
        "features",
        "feature list differs",
    ),
    "hold above reject": (
        lambda b: edit_manifest(b, lambda m: m.update(thresholds={"hold": 0.9, "reject": 0.5})),
        "thresholds",
        "thresholds are not sane",
    ),
    "model trained on other features": (_model_of_other_features, "model", "model features differ"),
    "golden score off by 1e-9": (_golden_off, "golden", "golden row 3"),
    "golden row of the wrong length": (
        _golden_row_too_short,
        "golden",
        f"row has {len(FEATURE_NAMES) - 1} values",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_validate_refuses_a_bad_bundle_naming_the_check(case: str, bundle_dir: Path, tmp_path: Path) -> None:
    damage, failed, message = BAD_BUNDLES[case]
    b = copy_bundle(bundle_dir, tmp_path / "b")
    damage(b)
    out = run_cli("model", "validate", str(b))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "REFUSED" in out.stdout and message in out.stdout
    at = CHECK_NAMES.index(failed)
    for name in CHECK_NAMES[:at]:
        assert f"✓ {name} " in out.stdout
    assert f"✗ {failed} " in out.stdout
    for name in CHECK_NAMES[at + 1 :]:
        assert f"· {name} " in out.stdout


def test_validate_shows_the_fallback_engine_and_why(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = copy_bundle(bundle_dir, tmp_path / "b")
    (b / "model.so").write_bytes(b"not a shared object")
    refresh_checksums(b)
    code, out, _ = cli(capsys, "model", "validate", str(b))
    assert code == 0
    assert "engine      lightgbm (fallback: " in out and "cannot load" in out
    assert "rows reproduce on lightgbm (1e-12)" in out


def test_validate_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli("model", "validate").returncode == 2
    missing = run_cli("model", "validate", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not a directory" in missing.stderr


# ---------------------------------------------------------------------------------------------
# inspect

CARD = {
    "intended_use": "Real-time refund abuse scoring; HOLD_FOR_REVIEW is not an accusation.",
    "data": {
        "source": "model/simulate.py",
        "seed": 7,
        "refunds": 54755,
        "window": [1767599717.0, 1771199763.0],
        "scenarios": {"legit_normal": 900, "cashout_ring": 100},
    },
    "targets": {"legit_held_max": 0.01, "legit_rejected_max": 0.001},
    "known_blind_spots": ["trained on simulated traffic only"],
}
METRICS = {
    "test": {
        "roc_auc": 0.99848,
        "recall_by_scenario": {
            "cashout_ring": 0.9541,
            "account_farm": 1.0,
            "bnpl_cashout": 0.5,
            "account_hopping": 0.25,
        },
    },
    "train_rows": 32853,
}


def test_inspect_prints_card_metrics_and_files(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = copy_bundle(bundle_dir, tmp_path / "b")
    edit_manifest(b, lambda m: m.update(model_card=CARD, metrics=METRICS))
    code, out, _ = cli(capsys, "model", "inspect", str(b))
    assert code == 0
    lines = out.splitlines()
    assert "version     test-model-1" in lines
    assert f"features    {len(FEATURE_NAMES)} (the gate spec)" in lines
    assert "thresholds  hold >= 0.5, reject >= 0.9" in lines
    assert "  intended use: Real-time refund abuse scoring; HOLD_FOR_REVIEW is not an accusation." in lines
    assert "  data window: 2026-01-05 07:55 .. 2026-02-15 23:56 UTC (41.7 days)" in lines
    mix = lines.index("  scenario mix:")
    assert lines[mix + 1].split() == ["legit_normal", "900", "90.0%"]
    assert lines[mix + 2].split() == ["cashout_ring", "100", "10.0%"]
    assert "  targets: legit_held_max 0.0100, legit_rejected_max 0.0010" in lines
    assert "    - trained on simulated traffic only" in lines
    assert "    roc_auc:            0.9985" in lines
    nested = lines.index("    recall_by_scenario:")
    assert lines[nested + 1 : nested + 3] == ["      cashout_ring:    0.9541", "      account_farm:    1"]
    assert "  train_rows: 32,853" in lines
    for name in ("golden.json", "model.so", "model.txt"):
        assert any(line.startswith(f"  {name}") and line.endswith("✓") for line in lines)


def test_inspect_reads_a_bundle_that_fails_validation(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = copy_bundle(bundle_dir, tmp_path / "b")
    _corrupt_model(b)
    (b / "golden.json").unlink()
    (b / "notes.txt").write_text("hi")
    code, out, _ = cli(capsys, "model", "inspect", str(b))
    assert code == 0
    assert "model card\n  (none)" in out and "metrics\n  (none)" in out
    lines = out.splitlines()
    assert any(line.startswith("  model.txt") and "✗ differs" in line for line in lines)
    assert any(line.startswith("  golden.json") and line.endswith("✗ missing") for line in lines)
    assert any(line.startswith("  model.so") and line.endswith("✓") for line in lines)
    assert any(line.startswith("  notes.txt") and "(not in the manifest)" in line for line in lines)


def test_inspect_json_is_the_manifest(bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "model", "inspect", "--json", str(bundle_dir))
    assert code == 0
    assert json.loads(out) == json.loads((bundle_dir / "manifest.json").read_text())


def test_inspect_without_a_manifest_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "model", "inspect", str(tmp_path))
    assert code == 1 and "no manifest.json" in err


# ---------------------------------------------------------------------------------------------
# promote / unshadow


@pytest.fixture
def models(bundle_dir: Path, tmp_path: Path) -> Path:
    """A model directory holding two valid bundles, b1 and b2, and no links yet."""
    root = tmp_path / "models"
    copy_bundle(bundle_dir, root / "b1")
    copy_bundle(bundle_dir, root / "b2")
    return root


def test_promote_points_current_at_the_bundle_and_replaces_it(models: Path) -> None:
    first = run_cli("model", "promote", str(models / "b1"))
    assert first.returncode == 0, first.stderr
    assert os.readlink(models / "current") == "b1"
    assert "(was absent)" in first.stdout
    second = run_cli("model", "promote", str(models / "b2"))
    assert second.returncode == 0, second.stderr
    assert os.readlink(models / "current") == "b2"
    assert "(was b1)" in second.stdout
    assert f"rollback: refund-gate model promote {(models / 'b1').resolve()}" in second.stdout
    assert sorted(os.listdir(models)) == ["b1", "b2", "current"]  # no temporary link left


def test_promote_refuses_an_invalid_bundle_and_keeps_the_old_link(models: Path) -> None:
    assert run_cli("model", "promote", str(models / "b1")).returncode == 0
    _corrupt_model(models / "b2")
    out = run_cli("model", "promote", str(models / "b2"))
    assert out.returncode == 1
    assert "not promoting" in out.stderr and "checksum of model.txt" in out.stderr
    assert os.readlink(models / "current") == "b1"
    forced = run_cli("model", "promote", str(models / "b2"), "--no-validate")
    assert forced.returncode == 0 and "not validated" in forced.stdout
    assert os.readlink(models / "current") == "b2"


def with_report(bundle_dir: Path, root: Path, name: str = "b") -> Path:
    """A copy of the test bundle at root/bundles/NAME whose manifest names its report at
    root/reports/NAME/report.md (relative, as model.train records it), with a plot beside it."""
    bundle = copy_bundle(bundle_dir, root / "bundles" / name)
    reports = root / "reports" / name
    reports.mkdir(parents=True)
    (reports / "report.md").write_text("# report\n")
    (reports / "scores.png").write_bytes(b"png")
    edit_manifest(bundle, lambda m: m.update(report=f"../../reports/{name}/report.md"))
    return bundle


def test_promote_from_outside_copies_the_bundle_and_report_in_and_links_relatively(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = with_report(bundle_dir, tmp_path / "elsewhere")
    models = tmp_path / "models"
    models.mkdir()
    code, out, err = cli(capsys, "model", "promote", str(elsewhere), "--model-dir", str(models))
    assert code == 0, err
    assert os.readlink(models / "current") == "b"
    assert f"copied into {models}: b" in out
    copy = models / "b"
    assert (copy / "manifest.json").read_bytes() == (elsewhere / "manifest.json").read_bytes()
    assert (copy / "report" / "report.md").read_text() == "# report\n"
    assert (copy / "report" / "scores.png").is_file()
    assert sorted(p.name for p in models.iterdir()) == ["b", "current"]  # no temporary left
    code, out, err = cli(capsys, "model", "inspect", str(models / "current"))
    assert code == 0 and "report/report.md (copied by promote" in out and "warning" not in err


def test_promote_from_outside_refuses_a_different_bundle_of_the_same_name(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = with_report(bundle_dir, tmp_path / "elsewhere")
    models = tmp_path / "models"
    copy_bundle(bundle_dir, models / "b")
    code, _, err = cli(capsys, "model", "promote", str(elsewhere), "--model-dir", str(models))
    assert code == 1 and "exists and differs" in err
    assert not (models / "current").exists()


def test_inspect_warns_when_the_report_path_is_broken(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = copy_bundle(bundle_dir, tmp_path / "b")
    edit_manifest(b, lambda m: m.update(report="../reports/gone/report.md"))
    code, out, err = cli(capsys, "model", "inspect", str(b))
    assert code == 0
    assert "report      WARNING: broken path: ../reports/gone/report.md does not exist" in out
    assert (
        err.strip() == "refund-gate model inspect: warning: report path is broken: ../reports/gone/report.md"
    )


def test_the_rollback_hint_never_names_a_bundle_the_gate_refuses(models: Path) -> None:
    assert run_cli("model", "promote", str(models / "b1")).returncode == 0
    _corrupt_model(models / "b2")
    assert run_cli("model", "promote", str(models / "b2"), "--no-validate").returncode == 0
    back = run_cli("model", "promote", str(models / "b1"))
    assert back.returncode == 0, back.stderr
    hint = next(line for line in back.stdout.splitlines() if line.startswith("rollback:"))
    assert "no safe target" in hint and "checksum of model.txt" in hint
    assert "b2" not in hint


def test_promote_renames_a_new_link_over_the_old_one(
    models: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (models / "current").symlink_to("b1")
    made: list[tuple[str, Path, str]] = []
    real_symlink = os.symlink

    def spy(src: str, dst: Path, *args: object, **kwargs: object) -> None:
        made.append((src, Path(dst), os.readlink(models / "current")))
        real_symlink(src, dst)

    monkeypatch.setattr(os, "symlink", spy)
    code, _, err = cli(capsys, "model", "promote", str(models / "b2"))
    assert code == 0, err
    [(src, tmp, current_then)] = made
    assert (src, current_then) == ("b2", "b1")  # the old link is untouched while the new is made
    assert tmp.parent == models and tmp.name != "current"
    assert os.readlink(models / "current") == "b2"
    assert not os.path.lexists(tmp)


def test_a_failed_swap_keeps_the_old_link_and_leaves_no_temporary(
    models: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (models / "current").symlink_to("b1")

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    code, _, err = cli(capsys, "model", "promote", str(models / "b2"))
    assert code == 1 and "Permission denied" in err
    assert os.readlink(models / "current") == "b1"
    assert sorted(os.listdir(models)) == ["b1", "b2", "current"]


def test_promote_will_not_replace_a_real_directory(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (models / "current").mkdir()
    code, _, err = cli(capsys, "model", "promote", str(models / "b1"))
    assert code == 1 and "is not a symlink" in err
    assert (models / "current").is_dir() and not (models / "current").is_symlink()


def test_shadow_promote_and_unshadow(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (models / "current").symlink_to("b1")
    code, out, err = cli(capsys, "model", "promote", str(models / "b2"), "--as", "shadow")
    assert code == 0, err
    assert (os.readlink(models / "shadow"), os.readlink(models / "current")) == ("b2", "b1")
    assert "rollback: refund-gate model unshadow" in out
    code, out, _ = cli(capsys, "model", "unshadow", "--model-dir", str(models))
    assert code == 0 and "was -> b2" in out
    assert not os.path.lexists(models / "shadow")
    assert os.readlink(models / "current") == "b1"
    code, out, _ = cli(capsys, "model", "unshadow", "--model-dir", str(models))
    assert code == 0 and "no shadow" in out


def test_unshadow_defaults_to_the_directory_of_gate_model_dir(models: Path) -> None:
    (models / "current").symlink_to("b1")
    (models / "shadow").symlink_to("b2")
    out = run_cli("model", "unshadow", env={"GATE_MODEL_DIR": str(models / "current")})
    assert out.returncode == 0, out.stderr
    assert not os.path.lexists(models / "shadow")


def test_unshadow_refuses_a_real_directory(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (models / "shadow").mkdir()
    code, _, err = cli(capsys, "model", "unshadow", "--model-dir", str(models))
    assert code == 1 and "not a symlink" in err
    assert (models / "shadow").is_dir()


# ---------------------------------------------------------------------------------------------
# backtest


def logged_decisions(bundle: Bundle, n: int = 400, seed: int = 5) -> list[tuple[DecisionRecord, Facts]]:
    """Decisions as the gate logs them, made by ``bundle`` from known amounts, blocklist hits and
    degradation; returned with the Facts they were decided on (the truth a backtest rebuilds)."""
    X, _ = synthetic_training_set(n, seed)
    rng = np.random.default_rng(seed)
    out = []
    for i, row in enumerate(X):
        amount = int(rng.integers(100, 20_000))
        order = int(amount * rng.uniform(0.7, 3.0))  # some refunds exceed their order
        degraded = bool(rng.random() < 0.15)
        if degraded:
            row[VELOCITY] = np.nan
        asked = None if degraded or rng.random() < 0.3 else amount + int(rng.integers(0, order))
        row[FEATURE_INDEX["log10_amount"]] = math.log10(amount)
        row[FEATURE_INDEX["refund_order_ratio"]] = amount / order
        row[FEATURE_INDEX["order_refunded_ratio"]] = np.nan if asked is None else asked / order
        blocked = [str(rng.choice(["account", "device", "ip"]))] if rng.random() < 0.05 else []
        facts = Facts(amount, order, asked, blocked, degraded, item_returned=row[RETURNED] == 1.0)
        features = row.tolist()
        verdict = decide_row(bundle, features, facts, DEGRADED)
        score = bundle.model.score(features)
        out.append(
            (
                DecisionRecord(
                    decision_id=f"d-{i}",
                    at=1.7e9 + i,
                    refund=f"r{i}",
                    account="a",
                    merchant="m",
                    order=f"o{i}",
                    device="",
                    ip="",
                    features=features,
                    score=score,
                    model_version=bundle.version,
                    decision=verdict.decision,
                    reasons=verdict.reasons,
                    degraded=degraded,
                    latency_ms=1.0,
                ),
                facts,
            )
        )
    return out


def expected_matrix(
    logged: list[tuple[DecisionRecord, Facts]], candidate: Bundle
) -> dict[str, dict[str, int]]:
    """The transitions, decided from the true Facts (not from the rebuilt ones)."""
    counts = Counter(
        (
            r.decision,
            decide_row(candidate, r.features, facts, DEGRADED).decision,
        )
        for r, facts in logged
    )
    return {a: {b: counts[(a, b)] for b in DECISIONS} for a in DECISIONS}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def logged(bundle: Bundle) -> list[tuple[DecisionRecord, Facts]]:
    records = logged_decisions(bundle)
    mix = Counter(r.decision for r, _ in records)
    assert all(mix[d] >= 10 for d in DECISIONS), mix  # the data exercises every decision
    return records


def test_facts_are_rebuilt_from_the_logged_features(logged: list[tuple[DecisionRecord, Facts]]) -> None:
    for record, facts in logged:
        rebuilt = facts_from_record(parse_record(record.to_json()))
        assert rebuilt == facts
    assert any(f.blocked for _, f in logged) and any(f.order_amount_asked is None for _, f in logged)


def test_backtest_of_the_logging_bundle_changes_nothing(
    bundle: Bundle, bundle_dir: Path, logged: list[tuple[DecisionRecord, Facts]], tmp_path: Path
) -> None:
    lines = [r.to_json() for r, _ in logged]
    report = backtest(lines, bundle, DEGRADED)
    assert (report.replayed, report.changed, sum(report.skipped.values())) == (len(lines), 0, 0)
    assert report.matrix == expected_matrix(logged, bundle)
    out = run_cli(
        "model", "backtest", str(bundle_dir), "--jsonl", str(write_jsonl(tmp_path / "d.jsonl", lines))
    )
    assert out.returncode == 0, out.stderr
    assert f"changed: 0 of {len(lines)} (0.0%)" in out.stdout
    assert f"{len(lines)} replayed, 0 skipped" in out.stdout


@pytest.mark.parametrize(
    ("hold", "reject", "moved"), [(0.2, 0.9, (APPROVE, HOLD)), (0.5, 0.6, (HOLD, REJECT))]
)
def test_backtest_of_edited_thresholds_shows_the_expected_transitions(
    hold: float,
    reject: float,
    moved: tuple[str, str],
    bundle_dir: Path,
    tmp_path: Path,
    logged: list[tuple[DecisionRecord, Facts]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    candidate_dir = with_thresholds(bundle_dir, tmp_path / "candidate", hold, reject)
    candidate = load_bundle(candidate_dir)
    report = backtest([r.to_json() for r, _ in logged], candidate, DEGRADED)
    assert report.matrix == expected_matrix(logged, candidate)
    [(came, went, n)] = report.transitions()  # lowering one threshold moves decisions one way
    assert (came, went) == moved and n > 0 and report.changed == n
    rates = report.rates()
    assert rates["candidate"][went] == pytest.approx(rates["logged"][went] + n / len(logged))

    jsonl = write_jsonl(tmp_path / "d.jsonl", [r.to_json() for r, _ in logged])
    code, out, _ = cli(capsys, "model", "backtest", str(candidate_dir), "--jsonl", str(jsonl))
    assert code == 0
    assert f"  {came} -> {went}: {n}" in out
    assert f"changed: {n} of {len(logged)} ({n / len(logged):.1%})" in out
    code, out, _ = cli(capsys, "model", "backtest", str(candidate_dir), "--jsonl", str(jsonl), "--json")
    body = json.loads(out)
    assert body["matrix"] == report.matrix and body["changed"] == n
    assert body["transitions"] == [{"from": came, "to": went, "count": n}]


def test_backtest_skips_records_it_cannot_replay_and_says_why(
    bundle_dir: Path,
    tmp_path: Path,
    logged: list[tuple[DecisionRecord, Facts]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = [r.to_json() for r, _ in logged[:20]]
    record = json.loads(good[0])
    bad = [
        json.dumps({**record, "features": record["features"][:-1]}),  # an older gate's row
        json.dumps({**record, "features": record["features"][:-1]}),
        "{not json",
        json.dumps({**record, "decision": "MAYBE"}),
        json.dumps({**record, "features": [None] * len(FEATURE_NAMES)}),
    ]
    jsonl = write_jsonl(tmp_path / "d.jsonl", good + bad)
    code, out, err = cli(capsys, "model", "backtest", str(bundle_dir), "--jsonl", str(jsonl))
    assert code == 0, err
    assert "read 25 logged decisions: 20 replayed, 5 skipped" in out
    assert f"  skipped 2: {len(FEATURE_NAMES) - 1} features, the candidate takes {len(FEATURE_NAMES)}" in out
    assert "  skipped 1: not valid JSON" in out
    assert "  skipped 1: logged decision 'MAYBE' is not one of" in out
    assert "  skipped 1: log10_amount or refund_order_ratio unknown or out of range" in out


def test_backtest_limit_and_nothing_to_compare(
    bundle: Bundle, logged: list[tuple[DecisionRecord, Facts]]
) -> None:
    lines = [r.to_json() for r, _ in logged]
    assert backtest(lines, bundle, DEGRADED, limit=7).read == 7
    empty = backtest(["{not json"], bundle, DEGRADED)
    assert (empty.replayed, empty.to_dict()["rates"], empty.to_dict()["changed_share"]) == (0, None, None)


def test_read_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"b": 2}\n')
    assert [json.loads(line) for line in read_jsonl(path)] == [{"a": 1}, {"b": 2}]


def test_parse_record_reads_what_the_decision_log_writes() -> None:
    record = DecisionRecord(
        decision_id="d",
        at=1.0,
        refund="r",
        account="a",
        merchant="m",
        order="o",
        device="",
        ip="",
        features=[1.0, math.nan, 2.5],
        score=0.3,
        model_version="v1",
        decision=HOLD,
        reasons=("BLOCKLISTED_IP", "NEW_ACCOUNT"),
        degraded=True,
        latency_ms=1.0,
    )
    parsed = parse_record(record.to_json().encode())
    assert parsed.features[0] == 1.0 and math.isnan(parsed.features[1])
    assert (parsed.decision, parsed.reasons, parsed.degraded, parsed.model_version) == (
        HOLD,
        ("BLOCKLISTED_IP", "NEW_ACCOUNT"),
        True,
        "v1",
    )
    assert isinstance(parsed, LoggedDecision)


# ---------------------------------------------------------------------------------------------
# the decision log stream in Redis


def fill_stream(rdb: redis.Redis, key: str, lines: list[str]) -> None:
    pipe = rdb.pipeline()
    for line in lines:
        pipe.xadd(key, {"d": line})
    pipe.execute()


def test_read_stream_reads_every_entry_in_order_across_chunks(rdb: redis.Redis) -> None:
    lines = [json.dumps({"i": i}) for i in range(21)]
    fill_stream(rdb, "rg:decisions", lines)
    rdb.xadd("rg:decisions", {"other": "x"})
    for chunk in (1, 7, 20, 1000):  # 21 + 1 entries: exact multiples, a remainder, one chunk
        got = [raw.decode() for raw in islice(read_stream(rdb, "rg:decisions", chunk=chunk), 100)]
        assert got == [*lines, ""], chunk
    assert list(read_stream(rdb, "rg:nothing")) == []


def test_backtest_from_the_redis_stream(
    redis_proc: RedisProcess,
    rdb: redis.Redis,
    bundle_dir: Path,
    tmp_path: Path,
    logged: list[tuple[DecisionRecord, Facts]],
) -> None:
    candidate_dir = with_thresholds(bundle_dir, tmp_path / "candidate", 0.2, 0.9)
    fill_stream(rdb, "gate7:decisions", [r.to_json() for r, _ in logged])
    out = run_cli(
        "model",
        "backtest",
        str(candidate_dir),
        "--redis-url",
        redis_proc.url,
        "--key-prefix",
        "gate7",
        "--limit",
        "150",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["read"] == body["replayed"] == 150
    assert body["matrix"] == expected_matrix(logged[:150], load_bundle(candidate_dir))
    assert body["logged_versions"] == {"test-model-1": 150}
    assert body["candidate"]["version"] == "test-model-0.2-0.9"


def test_export_then_backtest_matches_the_stream(
    redis_proc: RedisProcess,
    rdb: redis.Redis,
    bundle_dir: Path,
    tmp_path: Path,
    logged: list[tuple[DecisionRecord, Facts]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = [r.to_json() for r, _ in logged]
    fill_stream(rdb, "rg:decisions", lines)
    rdb.hset("rg:decisions:feature_specs", FEATURE_SPEC, json.dumps(list(FEATURE_NAMES)))
    out_file = tmp_path / "export.jsonl"
    code, out, err = cli(
        capsys, "model", "export-decisions", "--redis-url", redis_proc.url, "--out", str(out_file)
    )
    assert code == 0, err
    assert f"exported {len(lines)} decisions (0 with outcomes)" in out
    expected = [
        {**body, "features": dict(zip(FEATURE_NAMES, body["features"], strict=True)), "outcomes": []}
        for body in map(json.loads, lines)
    ]
    assert [json.loads(line) for line in out_file.read_text().splitlines()] == expected
    assert os.listdir(tmp_path) == ["export.jsonl"]  # the temporary file was renamed
    from_file = cli(capsys, "model", "backtest", str(bundle_dir), "--jsonl", str(out_file), "--json")[1]
    from_redis = cli(capsys, "model", "backtest", str(bundle_dir), "--redis-url", redis_proc.url, "--json")[1]
    assert json.loads(from_file) == json.loads(from_redis)
    code, _, _ = cli(
        capsys,
        "model",
        "export-decisions",
        "--redis-url",
        redis_proc.url,
        "--out",
        str(out_file),
        "--limit",
        "5",
    )
    assert code == 0 and [json.loads(line) for line in out_file.read_text().splitlines()] == expected[:5]


def test_backtest_without_redis_is_refused_cleanly(
    bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err = cli(capsys, "model", "backtest", str(bundle_dir), "--redis-url", url)
    assert code == 1 and f"cannot read decisions from {url}" in err


def test_backtest_usage_errors(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:  # neither or both sources
        main(["model", "backtest", str(bundle_dir)])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["model", "backtest", str(bundle_dir), "--jsonl", "x", "--redis-url", "redis://h"])
    assert exited.value.code == 2
    code, _, err = cli(
        capsys, "model", "backtest", str(bundle_dir), "--jsonl", str(tmp_path / "missing.jsonl")
    )
    assert code == 2 and "no such file" in err


def test_backtest_refuses_an_invalid_candidate(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = copy_bundle(bundle_dir, tmp_path / "b")
    _corrupt_model(b)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [])
    code, _, err = cli(capsys, "model", "backtest", str(b), "--jsonl", str(jsonl))
    assert code == 1 and "candidate refused" in err and "checksum of model.txt" in err


# ---------------------------------------------------------------------------------------------
# the door stays light


def test_building_the_parser_imports_no_heavy_module() -> None:
    code = (
        "import sys, gate.cli; gate.cli.build_parser(); "
        "print(sorted(m for m in ('lightgbm', 'numpy', 'redis', 'gate.bundle') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# status / train


def test_status_shows_the_running_gates_models(redis_proc: RedisProcess, bundle_dir: Path) -> None:
    from tests.gateproc import start_gate_process

    admin = f"127.0.0.1:{free_port()}"
    gate = start_gate_process(redis_proc.url, bundle_dir, "--admin-listen", admin)
    try:
        text = run_cli("model", "status", "--target", admin)
        as_json = run_cli("model", "status", "--target", admin, "--json")
        on_main = run_cli("model", "status", "--target", gate.target, "--timeout-s", "2")
    finally:
        gate.stop()
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"gate        {admin}"
    assert lines[1].startswith("live        test-model-1  (compiled, ")
    assert "hold >= 0.5, reject >= 0.9" in lines[1]
    assert lines[2].strip().startswith("loaded ") and str(bundle_dir) not in text.stdout  # no paths
    assert "shadow      (none)" in lines and "previous    (none)" in lines
    assert "loads       1 loaded, 0 refused" in lines
    assert on_main.returncode != 0  # GateAdmin is never on the refund-facing port
    body = json.loads(as_json.stdout)
    assert body["target"] == admin
    assert body["live"]["version"] == "test-model-1" and body["live"]["hold_threshold"] == 0.5
    assert "shadow" not in body and body["reloads"] == "1"


def test_status_without_a_gate_is_refused_in_one_line() -> None:
    out = run_cli("model", "status", "--target", f"127.0.0.1:{free_port()}", "--timeout-s", "1")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "cannot get the model status from 127.0.0.1:" in out.stderr and "Traceback" not in out.stderr


def test_train_passes_its_arguments_to_model_train() -> None:
    out = run_cli("model", "train", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m model.train")
    assert "--reports" in out.stdout
