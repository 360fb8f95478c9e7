"""Evaluate a trained model the way the gate will use it, and write the report.

Every decision here is made by the gate's own code: ``Model.score`` on the feature row, then
``gate.policy.decide`` with the guard rules' facts and, for HOLD and REJECT, reasons from the
per-code attribution of ``Model.last_leaves()`` — exactly what ``gate.service`` asks of
``Bundle.explain``. So the
recall, the hold rates and the reason codes in the report are what serving would have answered.

    evaluate()      valid and test weeks: full features, degraded (every velocity feature NaN),
                    the rules-only baseline (model/baseline.py) at the same false-positive rate,
                    reason codes per scenario, feature importance  →  Evaluation (.metrics: JSON)
    write_report()  report.md + PNG plots (matplotlib, Agg) in one directory
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gate import policy
from gate.features import FEATURE_INDEX, FEATURE_NAMES, FEATURES
from gate.scoring import Model
from model.baseline import RULES, rule_hits
from model.dataset import Dataset
from model.simulate import ABUSE_SCENARIOS, LEGIT_SCENARIOS

VELOCITY_COLUMNS = np.array([f.source != "request" for f in FEATURES])
_RETURNED = FEATURE_INDEX["item_returned"]
# Reason codes that name each abuse scenario's own signal (model/README.md, Scenarios). A cashout
# ring is fresh accounts on a few shared devices refunding every gift card they buy, within the
# hour, at a colluding shop: shared devices and an all-refund history are its signal as much as
# the quick refunds. For BNPL cashout the pair counts
# too: the shop's honest buyers share its merchant counters, and what singles out a cashout refund
# is the same mule accounts ordering and refunding there again.
SCENARIO_SIGNALS: dict[str, frozenset[str]] = {
    "serial_inr_delivered": frozenset({"NOT_RECEIVED_BUT_DELIVERED", "SERIAL_NOT_RECEIVED"}),
    "cashout_ring": frozenset(
        {
            "MANY_ACCOUNTS_ON_DEVICE",  # a ring packs its fresh accounts onto a few devices
            "HIGH_REFUND_RATE",  # ... and every one of them refunds every purchase
            "DIGITAL_GOODS_QUICK_REFUND",
            "REPEATED_QUICK_DIGITAL_REFUNDS",
            "MERCHANT_COLLUSION",
        }
    ),
    "account_farm": frozenset({"MANY_ACCOUNTS_ON_DEVICE", "MANY_ACCOUNTS_ON_IP"}),
    "account_hopping": frozenset({"IP_CITY_HOPPING"}),
    "bnpl_cashout": frozenset({"BNPL_CASHOUT", "MERCHANT_REFUND_SPIKE", "MERCHANT_COLLUSION"}),
    "refund_exceeds_order": frozenset({"REFUND_EXCEEDS_ORDER", "SPLIT_REFUNDS"}),
    "serial_changed_mind": frozenset({"ITEM_NOT_RETURNED", "REPEATED_UNRETURNED"}),
}


@dataclass(frozen=True)
class Targets:
    """Largest shares of legitimate refunds the thresholds may hold (or reject) and reject."""

    legit_held: float
    legit_rejected: float


@dataclass(frozen=True)
class Decisions:
    """The gate's answer for a set of rows: score, decision and reason codes per row."""

    score: np.ndarray
    decision: np.ndarray
    reasons: list[tuple[str, ...]]
    attribution: dict[int, np.ndarray]  # per-feature contributions the policy was given, by row

    @property
    def flagged(self) -> np.ndarray:
        """Held for review or rejected."""
        return np.asarray(self.decision != policy.APPROVE)

    @property
    def rejected(self) -> np.ndarray:
        """Rejected."""
        return np.asarray(self.decision == policy.REJECT)


@dataclass(frozen=True)
class Part:
    """One evaluated set of rows (validation or test weeks) with its decisions."""

    X: np.ndarray
    y: np.ndarray
    scenario: np.ndarray
    full: Decisions  # every feature, as served when Redis answers
    degraded: Decisions  # velocity NaN, the model alone at its thresholds (+ guard rules)
    degraded_gate: Decisions  # velocity NaN, what the gate answers: + the degraded policy
    rules_fired: np.ndarray  # baseline: number of rules that fire
    rules_fired_degraded: np.ndarray  # ... on the rows with velocity NaN
    guard: np.ndarray  # the gate's guard rule (refund exceeds order) fires
    guard_degraded: np.ndarray


@dataclass(frozen=True)
class Evaluation:
    """Everything the report shows: ``metrics`` is the JSON-ready summary for the manifest,
    ``details`` the longer tables only the report prints."""

    thresholds: policy.Thresholds
    targets: Targets
    test: Part
    gain: np.ndarray
    baseline_k: int
    metrics: dict[str, Any]
    details: dict[str, Any]


def decide_rows(
    model: Model,
    thresholds: policy.Thresholds,
    data: Dataset,
    rows: np.ndarray,
    *,
    velocity: bool,
    degraded_policy: policy.DegradedPolicy | None,
) -> Decisions:
    """Decide ``rows`` of ``data`` exactly as ``gate.service`` does.

    ``velocity=False`` makes every velocity feature NaN and gives the guard rules no order
    total, as when Redis is down; ``degraded_policy`` then also applies the gate's degraded
    policy (None: judge the model alone at its thresholds).
    """
    scores = np.empty(len(rows))
    decisions = np.empty(len(rows), dtype=object)
    reasons: list[tuple[str, ...]] = []
    attribution: dict[int, np.ndarray] = {}
    by_code = model.grouped_contributions(policy.REASON_GROUPS)  # as Bundle.explain
    fallback = policy.DegradedPolicy(0)
    for k, i in enumerate(rows):
        row = data.X[i].copy()
        if not velocity:
            row[VELOCITY_COLUMNS] = math.nan
        score = model.score(row.tolist())
        facts = policy.Facts(
            amount_minor=int(data.amount[i]),
            order_amount_minor=int(data.order_amount[i]),
            order_amount_asked=int(data.order_asked[i]) if velocity else None,
            blocked=(),
            degraded=not velocity and degraded_policy is not None,
            item_returned=bool(row[_RETURNED] == 1.0),
        )
        verdict = policy.decide(
            score,
            thresholds,
            facts,
            degraded_policy or fallback,
            explain=partial(_explain, model, by_code, attribution, k),
        )
        scores[k], decisions[k] = score, verdict.decision
        reasons.append(verdict.reasons)
    return Decisions(scores, decisions.astype(str), reasons, attribution)


def _explain(
    model: Model, by_code: Callable[[np.ndarray], np.ndarray], store: dict[int, np.ndarray], key: int
) -> list[float]:
    """The gate's ``explain`` of the row just scored (weights per reason code); its
    per-feature attribution is kept for the report."""
    leaves = model.last_leaves()
    store[key] = model.contributions(leaves)
    weights: list[float] = by_code(leaves).tolist()
    return weights


def guard_fires(data: Dataset, rows: np.ndarray, *, velocity: bool) -> np.ndarray:
    """The gate's guard rule: this request, or all requests against the order, exceed it."""
    asked = np.maximum(data.amount[rows], data.order_asked[rows] if velocity else 0)
    return np.asarray(asked > data.order_amount[rows])


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, precision) at every distinct score, high first."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]  # last row of each distinct score
    tps = np.cumsum(y_sorted == 1)[last].astype(float)
    fps = (last + 1) - tps
    pos, neg = max(tps[-1], 1.0), max(fps[-1], 1.0)
    return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos], np.r_[1.0, tps / (tps + fps)]


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (ties counted half)."""
    fpr, tpr, _ = roc_curve(y, s)
    return float(np.trapezoid(tpr, fpr))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the precision-recall curve as a step function (sum of precision x recall step)."""
    _, tpr, precision = roc_curve(y, s)
    return float(np.sum(np.diff(tpr) * precision[1:]))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion k / n: honest error bars for small scenarios."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def threshold_at_rate(scores: np.ndarray, rate: float) -> float:
    """Lowest threshold that flags at most ``rate`` of ``scores`` (flag = score >= threshold)."""
    ranked = np.sort(scores)[::-1]
    allowed = math.floor(rate * len(ranked) + 1e-9)
    if allowed >= len(ranked):
        return -math.inf
    return float(np.nextafter(ranked[allowed], math.inf))


def summarize(y: np.ndarray, scen: np.ndarray, decisions: Decisions) -> dict[str, Any]:
    """Headline numbers and per-scenario rates of one set of decisions on labelled rows."""
    legit, abuse = y == 0, y == 1
    flagged, rejected = decisions.flagged, decisions.rejected
    out: dict[str, Any] = {
        "rows": len(y),
        "abusive": int(abuse.sum()),
        "roc_auc": roc_auc(y, decisions.score),
        "average_precision": average_precision(y, decisions.score),
        "abuse_held_or_rejected": float(flagged[abuse].mean()),
        "abuse_rejected": float(rejected[abuse].mean()),
        "legit_held_or_rejected": float(flagged[legit].mean()),
        "legit_rejected": float(rejected[legit].mean()),
        "by_scenario": {},
    }
    for name in (*ABUSE_SCENARIOS, *LEGIT_SCENARIOS):
        sel = scen == name
        n = int(sel.sum())
        if n:
            k = int(flagged[sel].sum())
            out["by_scenario"][name] = {
                "rows": n,
                "held_or_rejected": k / n,
                "rejected": float(rejected[sel].mean()),
                "ci95": [round(v, 4) for v in wilson(k, n)],
            }
    return out


def baseline_flags(part: Part, k: int, *, velocity: bool = True) -> np.ndarray:
    """The rules-only gate: hold when at least ``k`` rules fire; guard rules as in the gate."""
    if velocity:
        return np.asarray((part.rules_fired >= k) | part.guard)
    return np.asarray((part.rules_fired_degraded >= k) | part.guard_degraded)


def choose_baseline_k(part: Part, target: float) -> int:
    """Fewest rules that must fire for the baseline to hold at most ``target`` of legit refunds."""
    legit = part.y == 0
    for k in range(1, len(RULES) + 1):
        if baseline_flags(part, k)[legit].mean() <= target:
            return k
    return len(RULES) + 1


def model_at_same_fpr(part: Part, fpr: float) -> tuple[float, float]:
    """Model recall (and the legit rate it actually reaches) when its hold line is set so that it
    holds ``fpr`` of the legitimate refunds: a comparison point only, never shipped."""
    legit, abuse = part.y == 0, part.y == 1
    line = threshold_at_rate(part.full.score[legit], fpr)
    flagged = (part.full.score >= line) | part.guard
    return float(flagged[abuse].mean()), float(flagged[legit].mean())


def compare_baseline(part: Part, k_chosen: int) -> list[dict[str, Any]]:
    """Baseline and model side by side at every baseline operating point (k rules or more)."""
    legit, abuse = part.y == 0, part.y == 1
    rows = []
    for k in range(1, len(RULES) + 1):
        flags = baseline_flags(part, k)
        fpr, recall = float(flags[legit].mean()), float(flags[abuse].mean())
        model_recall, model_fpr = model_at_same_fpr(part, fpr)
        rows.append(
            {
                "k": k,
                "chosen": k == k_chosen,
                "legit_held": fpr,
                "baseline_recall": recall,
                "model_recall": model_recall,
                "model_legit_held": model_fpr,
                "ratio": model_recall / recall if recall > 0 else math.inf,
            }
        )
    return rows


def reason_table(scenario: np.ndarray, decisions: Decisions) -> dict[str, dict[str, Any]]:
    """Per scenario, over its held or rejected refunds: first reason codes and codes anywhere."""
    out: dict[str, dict[str, Any]] = {}
    for name in (*ABUSE_SCENARIOS, *LEGIT_SCENARIOS):
        sel = np.flatnonzero((scenario == name) & decisions.flagged)
        if len(sel) == 0:
            continue
        first = Counter(decisions.reasons[i][0] for i in sel if decisions.reasons[i])
        anywhere = Counter(code for i in sel for code in decisions.reasons[i])
        out[name] = {
            "flagged": len(sel),
            "first": [[c, n / len(sel)] for c, n in first.most_common(3)],
            "anywhere": [[c, n / len(sel)] for c, n in anywhere.most_common(3)],
        }
    return out


def top_reason(table: dict[str, dict[str, Any]], scenario: str) -> str | None:
    """Most frequent first reason code on the scenario's held or rejected refunds."""
    entry = table.get(scenario)
    return str(entry["first"][0][0]) if entry and entry["first"] else None


def reason_sources(part: Part, decisions: Decisions) -> list[dict[str, Any]]:
    """For every model reason code cited on held or rejected refunds: the feature that carries
    most of it (of the code's features, whose attributions the policy sums, the largest), with the
    feature's median value when cited against its median over legitimate refunds. A code whose
    cited values look like the legitimate ones asserts something the row does not show."""
    codes = [f.reason for f in FEATURES]
    cited: dict[tuple[str, int], list[int]] = {}
    for k, attribution in decisions.attribution.items():
        for code in decisions.reasons[k]:
            if code not in codes:
                continue  # a guard-rule or degraded-policy code, not the model's
            j = max((j for j, c in enumerate(codes) if c == code), key=lambda j: attribution[j])
            cited.setdefault((code, j), []).append(k)
    legit = part.y == 0
    out = []
    for (code, j), rows in sorted(cited.items(), key=lambda item: -len(item[1])):
        with np.errstate(all="ignore"):
            out.append(
                {
                    "code": code,
                    "feature": FEATURE_NAMES[j],
                    "cited": len(rows),
                    "median_cited": float(np.nanmedian(part.X[rows, j])),
                    "median_legit": float(np.nanmedian(part.X[legit, j])),
                }
            )
    return out


def evaluate_part(
    model: Model,
    thresholds: policy.Thresholds,
    data: Dataset,
    mask: np.ndarray,
    degraded_policy: policy.DegradedPolicy,
) -> Part:
    """Decide every row of ``mask`` in the three modes and run the baseline rules on them."""
    rows = np.flatnonzero(mask)
    X = data.X[rows]
    degraded_X = X.copy()
    degraded_X[:, VELOCITY_COLUMNS] = math.nan
    return Part(
        X=X,
        y=data.y[rows],
        scenario=data.scenario[rows],
        full=decide_rows(model, thresholds, data, rows, velocity=True, degraded_policy=None),
        degraded=decide_rows(model, thresholds, data, rows, velocity=False, degraded_policy=None),
        degraded_gate=decide_rows(
            model, thresholds, data, rows, velocity=False, degraded_policy=degraded_policy
        ),
        rules_fired=rule_hits(X).sum(axis=1),
        rules_fired_degraded=rule_hits(degraded_X).sum(axis=1),
        guard=guard_fires(data, rows, velocity=True),
        guard_degraded=guard_fires(data, rows, velocity=False),
    )


def evaluate(
    model: Model,
    thresholds: policy.Thresholds,
    data: Dataset,
    *,
    valid: np.ndarray,
    test: np.ndarray,
    gain: np.ndarray,
    targets: Targets,
    degraded_policy: policy.DegradedPolicy,
) -> Evaluation:
    """Evaluate on the validation and test weeks; the baseline's k is chosen on validation."""
    v = evaluate_part(model, thresholds, data, valid, degraded_policy)
    t = evaluate_part(model, thresholds, data, test, degraded_policy)
    k = choose_baseline_k(v, targets.legit_held)
    comparison = compare_baseline(t, k)
    chosen = next((row for row in comparison if row["chosen"]), None)
    legit, abuse = t.y == 0, t.y == 1
    hits = rule_hits(t.X)
    reasons = reason_table(t.scenario, t.full)
    metrics = {
        "valid": summarize(v.y, v.scenario, v.full),
        "test": summarize(t.y, t.scenario, t.full),
        "test_degraded_model": summarize(t.y, t.scenario, t.degraded),
        "test_degraded_gate": summarize(t.y, t.scenario, t.degraded_gate),
        "test_at_target": dict(
            zip(
                ("abuse_held_or_rejected", "legit_held_or_rejected"),
                model_at_same_fpr(t, targets.legit_held),
                strict=True,
            )
        ),
        "baseline": {
            "k_chosen_on_valid": k,
            "test_at_k": chosen,
            "test_any_rule": comparison[0],
            "test_degraded_at_k": {
                "legit_held": float(baseline_flags(t, k, velocity=False)[legit].mean()),
                "recall": float(baseline_flags(t, k, velocity=False)[abuse].mean()),
            },
        },
        "reasons_test": reasons,
        "top_reason_test": {name: top_reason(reasons, name) for name in ABUSE_SCENARIOS},
    }
    details = {
        "baseline_by_k": comparison,
        "rules": {
            rule.name: {
                "text": rule.text,
                "legit_hit": float(hits[legit, j].mean()),
                "abuse_hit": float(hits[abuse, j].mean()),
            }
            for j, rule in enumerate(RULES)
        },
        "reason_sources": reason_sources(t, t.full),
    }
    return Evaluation(thresholds, targets, t, gain, k, metrics, details)


def shifted_world(
    model: Model,
    thresholds: policy.Thresholds,
    data: Dataset,
    mask: np.ndarray,
    *,
    baseline_k: int,
    degraded_policy: policy.DegradedPolicy,
    description: dict[str, Any],
) -> dict[str, Any]:
    """The same decisions on a world the model never trained on (another seed, shifted mixes and
    parameters, behaviours held out of training): summary, per-segment rates, and the rules
    baseline at the k chosen on validation, on the same rows."""
    part = evaluate_part(model, thresholds, data, mask, degraded_policy)
    legit, abuse = part.y == 0, part.y == 1
    flags = baseline_flags(part, baseline_k)
    summary = summarize(part.y, part.scenario, part.full)
    for name, v in summary["by_scenario"].items():
        v["baseline_flagged"] = float(flags[part.scenario == name].mean())
    reasons = reason_table(part.scenario, part.full)
    return {
        **summary,
        "world": description,
        "baseline": {
            "k": baseline_k,
            "recall": float(flags[abuse].mean()),
            "legit_held": float(flags[legit].mean()),
        },
        "reasons": reasons,
        "top_reason": {name: top_reason(reasons, name) for name in ABUSE_SCENARIOS},
    }


def shifted_targets(shifted: dict[str, Any], targets: Targets, segment_max: float) -> dict[str, bool]:
    """The detection targets on the shifted world (model/README.md): each met or not."""
    legit_segments = [v for s, v in shifted["by_scenario"].items() if s in LEGIT_SCENARIOS]
    base = shifted["baseline"]
    return {
        "abuse_held_or_rejected_ge_90pct": shifted["abuse_held_or_rejected"] >= 0.9,
        "legit_held_le_target": shifted["legit_held_or_rejected"] <= targets.legit_held,
        "legit_rejected_le_target": shifted["legit_rejected"] <= targets.legit_rejected,
        "no_legit_segment_above_max": all(v["held_or_rejected"] <= segment_max for v in legit_segments),
        "baseline_beaten_on_recall_and_fp": shifted["abuse_held_or_rejected"] > base["recall"]
        and shifted["legit_held_or_rejected"] < base["legit_held"],
    }


def blind_spots(ev: Evaluation) -> list[str]:
    """Weak spots the test weeks show: abuse caught least, honest customers held most, and what
    is left without velocity features. Goes into the model card."""
    m = ev.metrics
    out = []
    abuse = {s: v for s, v in m["test"]["by_scenario"].items() if s in ABUSE_SCENARIOS}
    weakest = min(abuse, key=lambda s: abuse[s]["held_or_rejected"])
    out.append(
        f"weakest abuse scenario on the test weeks: {weakest}, "
        f"{_pct(abuse[weakest]['held_or_rejected'])} held or rejected"
    )
    for s, code in m["top_reason_test"].items():
        if code not in SCENARIO_SIGNALS[s]:
            out.append(
                f"{s} refunds are most often explained as {code}, not by the scenario's "
                f"own signal ({', '.join(sorted(SCENARIO_SIGNALS[s]))})"
            )
    for s, v in m["test"]["by_scenario"].items():
        if s in LEGIT_SCENARIOS and v["held_or_rejected"] > 2 * ev.targets.legit_held:
            code = top_reason(m["reasons_test"], s) or "-"
            out.append(
                f"honest {s} refunds: {_pct(v['held_or_rejected'])} held or rejected "
                f"(most often for {code}), against {_pct(ev.targets.legit_held)} overall"
            )
    alone, gate = m["test_degraded_model"], m["test_degraded_gate"]
    out.append(
        f"with velocity features missing (Redis down) the model alone catches "
        f"{_pct(alone['abuse_held_or_rejected'])} of abuse at "
        f"{_pct(alone['legit_held_or_rejected'], 2)} legitimate held; the gate's degraded "
        f"policy catches {_pct(gate['abuse_held_or_rejected'])} but holds "
        f"{_pct(gate['legit_held_or_rejected'])} of legitimate refunds"
    )
    return out


# ---------------------------------------------------------------------------------------------
# Report


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg backend (no pyplot, no display, no global state)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _pct(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.{digits}f} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """Markdown table; ``align`` has one letter per column, l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _plot_curves(ev: Evaluation, out: Path) -> None:
    t = ev.test
    fig = _figure(12, 5)
    ax_pr, ax_roc = fig.subplots(1, 2)
    for label, dec, style in (("model", t.full, "-"), ("model, velocity missing", t.degraded, "--")):
        fpr, tpr, precision = roc_curve(t.y, dec.score)
        ax_pr.plot(tpr, precision, style, label=f"{label} (AP {average_precision(t.y, dec.score):.3f})")
        ax_roc.plot(np.maximum(fpr, 1e-4), tpr, style, label=f"{label} (AUC {roc_auc(t.y, dec.score):.4f})")
    legit, abuse = t.y == 0, t.y == 1
    points = [
        (
            baseline_flags(t, k)[legit].mean(),
            baseline_flags(t, k)[abuse].mean(),
            baseline_flags(t, k)[abuse].sum() / max(baseline_flags(t, k).sum(), 1),
            k,
        )
        for k in range(1, len(RULES) + 1)
    ]
    ax_roc.plot(
        [max(p[0], 1e-4) for p in points],
        [p[1] for p in points],
        "o:",
        color="grey",
        label="rules baseline (≥ k rules)",
    )
    ax_pr.plot(
        [p[1] for p in points], [p[2] for p in points], "o:", color="grey", label="rules baseline (≥ k rules)"
    )
    op_fpr, op_tpr = t.full.flagged[legit].mean(), t.full.flagged[abuse].mean()
    ax_roc.plot([max(op_fpr, 1e-4)], [op_tpr], "r*", markersize=14, label="shipped hold line")
    ax_roc.axvline(ev.targets.legit_held, color="red", lw=0.8, ls=":")
    ax_pr.plot(
        [op_tpr],
        [t.full.flagged[abuse].sum() / max(t.full.flagged.sum(), 1)],
        "r*",
        markersize=14,
        label="shipped hold line",
    )
    ax_pr.set(
        xlabel="recall (abusive refunds held or rejected)",
        ylabel="precision",
        title="Precision-recall, test weeks",
        ylim=(0, 1.02),
    )
    ax_roc.set(
        xscale="log",
        xlabel="legitimate refunds held (false-positive rate, log)",
        ylabel="abusive refunds held (recall)",
        title="ROC, test weeks",
        xlim=(1e-4, 1),
    )
    for ax in (ax_pr, ax_roc):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


def _plot_scores(ev: Evaluation, out: Path) -> None:
    """Score distributions in probability units (a logit axis, so both tails are readable), with
    the hold and reject lines labelled with their values."""
    t = ev.test
    fig = _figure(12, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    edges = 1 / (1 + np.exp(-np.linspace(-14, 14, 81)))  # bins even in log-odds, shown as p
    for ax, dec, title in (
        (axes[0], t.full, "all features"),
        (axes[1], t.degraded, "velocity features missing (degraded)"),
    ):
        drawn = False
        for label, sel, colour in (("legitimate", t.y == 0, "tab:blue"), ("abusive", t.y == 1, "tab:red")):
            scores = np.clip(dec.score[sel], edges[0], edges[-1])
            if len(scores):
                ax.hist(scores, bins=edges, color=colour, alpha=0.55, label=label)
                drawn = True
        for name, line in (("hold", ev.thresholds.hold), ("reject", ev.thresholds.reject)):
            ax.axvline(
                line,
                color="black",
                ls="--" if name == "hold" else "-",
                lw=1,
                label=f"{name} at score ≥ {line:.3g}",
            )
        ax.set_xscale("logit")
        ax.set_xlim(edges[0], edges[-1])
        if drawn:
            ax.set_yscale("symlog", linthresh=1)
        ax.set(xlabel="model score (probability of abuse)", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("refunds (log scale)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)


def _plot_scenarios(ev: Evaluation, out: Path) -> None:
    """Per scenario, in percent on both panels: abuse held or rejected, honest refunds held or
    rejected against the target; legends below the axes, never over the bars."""
    t = ev.test
    fig = _figure(13, 5.4)
    ax_a, ax_l = fig.subplots(1, 2)
    abuse = [s for s in ABUSE_SCENARIOS if (t.scenario == s).any()]
    legit = [s for s in LEGIT_SCENARIOS if (t.scenario == s).any()]
    series = (
        ("model", t.full.flagged, "tab:red"),
        ("velocity missing (model alone)", t.degraded.flagged, "tab:orange"),
        (f"rules baseline (≥ {ev.baseline_k} rules)", baseline_flags(t, ev.baseline_k), "grey"),
    )
    width = 0.27
    tallest = 100 * ev.targets.legit_held
    for j, (label, flags, colour) in enumerate(series):
        ax_a.bar(
            np.arange(len(abuse)) + (j - 1) * width,
            [100 * flags[t.scenario == s].mean() for s in abuse],
            width,
            label=label,
            color=colour,
        )
        heights = [100 * flags[t.scenario == s].mean() for s in legit]
        tallest = max(tallest, *heights)
        ax_l.bar(np.arange(len(legit)) + (j - 1) * width, heights, width, label=label, color=colour)
    ax_a.set_xticks(range(len(abuse)), abuse, rotation=30, ha="right", fontsize=8)
    ax_a.set(ylim=(0, 105), ylabel="% held or rejected", title="Abuse scenarios: recall (test week)")
    ax_l.set_xticks(range(len(legit)), legit, rotation=30, ha="right", fontsize=8)
    ax_l.axhline(
        100 * ev.targets.legit_held,
        color="red",
        ls=":",
        lw=1,
        label=f"target: at most {_pct(ev.targets.legit_held)} of honest refunds held",
    )
    ax_l.set(
        ylim=(0, tallest * 1.1),
        ylabel="% held or rejected",
        title="Honest customers: who do we hold? (test week)",
    )
    for ax in (ax_a, ax_l):
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "scenarios.png", dpi=110)


def _plot_importance(ev: Evaluation, out: Path, top: int = 25) -> None:
    order = np.argsort(-ev.gain)[:top][::-1]
    total = max(float(ev.gain.sum()), 1e-12)
    fig = _figure(8, 7)
    ax = fig.subplots()
    colours = ["tab:blue" if FEATURES[i].source == "request" else "tab:green" for i in order]
    ax.barh(
        [f"{FEATURE_NAMES[i]} ({FEATURES[i].reason})" for i in order],
        100 * ev.gain[order] / total,
        color=colours,
    )
    ax.set(
        xlabel="% of total split gain (blue: request feature, green: velocity)",
        title=f"Feature importance (gain), top {top}",
    )
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "importance.png", dpi=110)


def _headline_rows(m: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for label, key in (
        ("validation weeks", "valid"),
        ("test weeks", "test"),
        ("test, velocity missing: model alone", "test_degraded_model"),
        ("test, velocity missing: gate (degraded policy)", "test_degraded_gate"),
    ):
        s = m[key]
        rows.append(
            [
                label,
                f"{s['rows']:,} ({s['abusive']:,})",
                f"{s['roc_auc']:.4f}",
                f"{s['average_precision']:.3f}",
                _pct(s["abuse_held_or_rejected"]),
                _pct(s["abuse_rejected"]),
                _pct(s["legit_held_or_rejected"], 2),
                _pct(s["legit_rejected"], 2),
            ]
        )
    return rows


def _shifted_section(ev: Evaluation) -> list[str]:
    """The shifted world's tables: abuse recall and honest segments, baseline beside."""
    sh = ev.metrics.get("shifted")
    if not sh:
        return []
    world, base, met = sh["world"], sh["baseline"], sh["targets_met"]
    rows = []
    for s, v in sh["by_scenario"].items():
        abusive = s in ABUSE_SCENARIOS
        rows.append(
            [
                s + ("" if abusive or s not in world["held_out"] else " (held out of training)"),
                "abuse" if abusive else "honest",
                f"{v['rows']:,}",
                _pct(v["held_or_rejected"], 1 if abusive else 2),
                _pct(v["rejected"], 2),
                _pct(v["baseline_flagged"], 2),
                (sh["top_reason"].get(s) or "-") if abusive else "",
            ]
        )
    return [
        "## Shifted world: traffic the model never trained on",
        "",
        f"Another world (`SimConfig.shifted`, seed {world['seed']}, {world['refunds']:,} refunds in "
        f"{world['weeks']} weeks after {world['warmup_weeks']} weeks of history): every population "
        "count, rate and range moved at random (counts x0.67-1.5, rates +-25 %), and honest behaviours "
        f"the model never saw: {', '.join(world['held_out'])}. The hold and reject lines were chosen "
        f"so that a second such world (seed {world['calibration_seed']}) meets the targets with a "
        "margin; this one is only measured.",
        "",
        _table(
            ["", "abuse held/rejected", "legit held/rejected", "legit rejected"],
            [
                [
                    "model at the shipped thresholds",
                    _pct(sh["abuse_held_or_rejected"]),
                    _pct(sh["legit_held_or_rejected"], 2),
                    _pct(sh["legit_rejected"], 3),
                ],
                [
                    f"rules baseline (≥ {base['k']} rules)",
                    _pct(base["recall"]),
                    _pct(base["legit_held"], 2),
                    "-",
                ],
            ],
        ),
        "",
        "Targets on this world: "
        + ", ".join(f"{name.replace('_', ' ')}: **{'met' if ok else 'not met'}**" for name, ok in met.items())
        + ".",
        "",
        _table(
            ["segment", "kind", "refunds", "held or rejected", "rejected", "rules baseline", "top reason"],
            rows,
            align="llrrrrl",
        ),
        "",
    ]


def plain_summary(metrics: dict[str, Any], hold: float, reject: float) -> str:
    """Three sentences for a business owner, from the report's metrics alone."""
    test, shifted = metrics["test"], metrics.get("shifted")
    world = shifted or test
    where = "on traffic it never trained on (a shifted simulated world)" if shifted else "on its test week"
    return (
        f"**In plain words.** {where.capitalize()}, this model sends "
        f"{_pct(world['abuse_held_or_rejected'], 0)} of abusive refunds to a reviewer or refuses them, "
        f"while it pays {_pct(1 - world['legit_held_or_rejected'], 2)} of honest customers at once "
        f"and refuses {_pct(world['legit_rejected'], 2)} of them. "
        f"A refund is held for a person when its score reaches {hold:.3g}; it is refused at "
        f"{reject:.3g}, and then only when the account, device, IP or merchant has behaved "
        "suspiciously before, never because of who the customer is alone. "
        f"On its own test week it catches {_pct(test['abuse_held_or_rejected'], 0)} of abuse and holds "
        f"{_pct(test['legit_held_or_rejected'], 2)} of honest refunds; the tables below say where it "
        "does well and where it does not."
    )


def _data_line(data: dict[str, Any]) -> str:
    where = (
        f"`model/simulate.py`, seed {data['seed']}"
        + (f", without {', '.join(data['held_out'])}" if data.get("held_out") else "")
        if data["source"] == "model/simulate.py"
        else "history files " + ", ".join(f"`{f}`" for f in data["history"]["files"])
        if data["source"] == "history files"
        else f"the gate's decision log ({data['decisions']['from']}) joined with its outcomes"
    )
    return (
        f"- **Data**: {where}, {data['records']:,} records, {data['refunds']:,} refund requests "
        f"({_pct(data['abuse_share'])} abusive by {data['judged_by']}), "
        f"{data['period'][0]} → {data['period'][1]}."
    )


def _labels_line(data: dict[str, Any]) -> str:
    lab = data["labels"]
    sources = ", ".join(f"{k} {v:,}" for k, v in lab["by_source"].items())
    return (
        f"- **Labels from outcomes** (`model/labels.py`, maturity {lab['maturity_days']:g} days): "
        f"{lab['abusive']:,} abusive, {lab['legitimate']:,} legitimate, {lab['left_out']:,} left out "
        f"(by source: {sources}). Training and the thresholds use these labels; "
        + (
            "the tables judge by the simulator's ground truth, so undetected abuse labelled PAID "
            "still counts as abuse there."
            if data["judged_by"] != "outcome labels"
            else "the tables judge by them too (no ground truth in real history)."
        )
        + " Selection bias: review outcomes exist only for what the old policy held; what it paid "
        "at once is labelled legitimate unless a chargeback or an abuse finding came (model/README.md, "
        "Labels from outcomes)."
    )


def write_report(ev: Evaluation, out: Path, *, version: str, card: dict[str, Any]) -> Path:
    """Write ``out/report.md`` and its plots; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    _plot_curves(ev, out)
    _plot_scores(ev, out)
    _plot_scenarios(ev, out)
    _plot_importance(ev, out)
    m, t = ev.metrics, ev.test
    data = card["data"]
    base = m["baseline"]
    at_k = base["test_at_k"]
    test = m["test"]
    at_target = m["test_at_target"]
    caught = at_target["abuse_held_or_rejected"] >= 0.9
    doubled = bool(at_k) and at_k["ratio"] >= 2
    lines = [
        f"# Refund-abuse model {version}: evaluation report",
        "",
        plain_summary(m, ev.thresholds.hold, ev.thresholds.reject),
        "",
        "Written by `make train` (`model/evaluate.py`); read `model/README.md` § *Reading the "
        "report* first. Every number is the gate's own decision path — `Model.score`, then "
        "`gate.policy.decide` with the guard rules, reasons from the path attribution — on "
        "simulated traffic replayed through the gate (point-in-time features).",
        "",
        _data_line(data),
        _labels_line(data),
        f"- **Split by whole weeks**: {card['split']['train']['weeks']} train, "
        f"{card['split']['valid']['weeks']} validation (early stopping, thresholds, the "
        f"baseline's k), {card['split']['test']['weeks']} test (only measured, never tuned on).",
        f"- **Thresholds** (chosen on the validation week and, when present, a shifted calibration "
        f"world): hold ≥ {ev.thresholds.hold:.4f} for at most "
        f"{_pct(ev.targets.legit_held)} of legitimate refunds held or rejected, reject ≥ "
        f"{ev.thresholds.reject:.4f} for at most {_pct(ev.targets.legit_rejected, 2)} rejected.",
        "",
        "## Headline",
        "",
        f"- Goal *≥ 90 % of abusive refunds held or rejected at ≤ {_pct(ev.targets.legit_held)} "
        f"of legitimate ones held*: **{'met' if caught else 'not met'}** on the test week: "
        f"{_pct(at_target['abuse_held_or_rejected'])} with the hold line at "
        f"{_pct(at_target['legit_held_or_rejected'], 2)} of its legitimate refunds. The shipped "
        f"lines, set on the validation week, hold {_pct(test['legit_held_or_rejected'], 2)} of "
        f"the test week's legitimate refunds and {_pct(test['abuse_held_or_rejected'])} of its "
        "abusive ones.",
        "- Goal *at least twice the rules baseline's recall at the same false-positive rate*: "
        + (
            f"**{'met' if doubled else 'not met'}** at the baseline's operating point chosen on "
            f"validation, {at_k['ratio']:.2f}x ({_pct(at_k['model_recall'])} against "
            f"{_pct(at_k['baseline_recall'])} at {_pct(at_k['legit_held'], 2)} legitimate held); "
            f"the other way round, the baseline lets {_pct(1 - at_k['baseline_recall'])} of abuse "
            f"through, the model {_pct(1 - at_k['model_recall'])}."
            if at_k
            else "no baseline operating point meets the target."
        ),
        "",
        _table(
            [
                "rows",
                "refunds (abusive)",
                "ROC AUC",
                "avg precision",
                "abuse held/rejected",
                "abuse rejected",
                "legit held/rejected",
                "legit rejected",
            ],
            _headline_rows(m),
        ),
        "",
        "*Held/rejected* = HOLD_FOR_REVIEW or REJECT. *Velocity missing*: every account, device, "
        "IP and merchant feature NaN (Redis down). *Model alone* judges the score against the same "
        "thresholds; *gate* adds the degraded policy, which holds every refund from "
        f"{card['degraded_approve_below_minor'] / 100:.2f} up (see docs/ARCHITECTURE.md §6).",
        "",
        "![precision-recall and ROC](curves.png)",
        "",
        "![score distributions](scores.png)",
        "",
        "## Abuse scenarios: recall at the shipped thresholds (test weeks)",
        "",
        _table(
            [
                "scenario",
                "refunds",
                "held or rejected [95 % CI]",
                "rejected",
                "velocity missing (model)",
                f"rules baseline (≥ {ev.baseline_k})",
                "top reason code",
                "names its signal",
            ],
            [
                [
                    s,
                    f"{v['rows']:,}",
                    f"{_pct(v['held_or_rejected'])} [{_pct(v['ci95'][0])}, {_pct(v['ci95'][1])}]",
                    _pct(v["rejected"]),
                    _pct(m["test_degraded_model"]["by_scenario"][s]["held_or_rejected"]),
                    _pct(baseline_flags(t, ev.baseline_k)[t.scenario == s].mean()),
                    m["top_reason_test"].get(s) or "-",
                    "yes" if m["top_reason_test"].get(s) in SCENARIO_SIGNALS[s] else "**no**",
                ]
                for s, v in m["test"]["by_scenario"].items()
                if s in ABUSE_SCENARIOS
            ],
            align="lrrrrrll",
        ),
        "",
        *_shifted_section(ev),
        "## Legitimate refunds: which honest customers do we hold? (test weeks)",
        "",
        _table(
            [
                "scenario",
                "refunds",
                "held or rejected",
                "rejected",
                "velocity missing (model)",
                "velocity missing (gate)",
                "rules baseline",
            ],
            [
                [
                    s,
                    f"{v['rows']:,}",
                    _pct(v["held_or_rejected"], 2),
                    _pct(v["rejected"], 2),
                    _pct(m["test_degraded_model"]["by_scenario"][s]["held_or_rejected"], 2),
                    _pct(m["test_degraded_gate"]["by_scenario"][s]["held_or_rejected"], 1),
                    _pct(baseline_flags(t, ev.baseline_k)[t.scenario == s].mean(), 2),
                ]
                for s, v in m["test"]["by_scenario"].items()
                if s in LEGIT_SCENARIOS
            ],
        ),
        "",
        "![recall and legitimate holds per scenario](scenarios.png)",
        "",
        "## Rules-only baseline at the same false-positive rate",
        "",
        "The rules of `model/baseline.py`, over the same feature rows. Baseline gate: hold when at "
        "least *k* rules fire. Both sides keep the gate's guard rule (a refund past the order "
        "amount is rejected). *Model at the same FPR*: the model's hold line moved so that it holds "
        "the same share of legitimate test refunds as the baseline — a comparison point only, "
        f"never shipped. **k = {ev.baseline_k}** is the operating point chosen on the validation "
        f"weeks for the same target as the model (≤ {_pct(ev.targets.legit_held)} legit held).",
        "",
        _table(
            ["k", "legit held", "baseline recall", "model recall, same FPR", "ratio"],
            [
                [
                    ("**" + str(r["k"]) + "**") if r["chosen"] else r["k"],
                    _pct(r["legit_held"], 2),
                    _pct(r["baseline_recall"]),
                    _pct(r["model_recall"]),
                    f"{r['ratio']:.2f}x",
                ]
                for r in ev.details["baseline_by_k"]
            ],
        ),
        "",
        (
            f"At the chosen point the baseline holds {_pct(at_k['legit_held'], 2)} of legitimate "
            f"refunds and catches {_pct(at_k['baseline_recall'])} of abuse; the model at the same "
            f"rate catches {_pct(at_k['model_recall'])} (**{at_k['ratio']:.2f}x**). With velocity "
            f"missing the baseline holds {_pct(base['test_degraded_at_k']['legit_held'], 2)} and "
            f"catches {_pct(base['test_degraded_at_k']['recall'])}."
            if at_k
            else "No k keeps the baseline within the target on the validation weeks."
        ),
        "",
        _table(
            ["rule", "what it says", "legit refunds hit", "abusive refunds hit"],
            [
                [name, r["text"], _pct(r["legit_hit"], 2), _pct(r["abuse_hit"])]
                for name, r in ev.details["rules"].items()
            ],
            align="llrr",
        ),
        "",
        "## Reason codes on held or rejected refunds (test weeks)",
        "",
        "Computed as the gate does: guard-rule codes first, then up to three model codes from the "
        "features that pushed the score up most (one per code). *First* is what a reviewer reads "
        "first; *anywhere* counts every code of the answer.",
        "",
        _table(
            ["scenario", "held or rejected", "first reason (share)", "anywhere (share)"],
            [
                [
                    s,
                    r["flagged"],
                    ", ".join(f"{c} {_pct(x, 0)}" for c, x in r["first"]),
                    ", ".join(f"{c} {_pct(x, 0)}" for c, x in r["anywhere"]),
                ]
                for s, r in m["reasons_test"].items()
            ],
            align="lrll",
        ),
        "",
        "Where each model code came from: the feature that put it in the answer, its median value "
        "on those refunds and over all legitimate test refunds. A code is only as true as this "
        "difference (e.g. HIGH_REFUND_RATE cited at a median refund rate well above the "
        "legitimate one).",
        "",
        _table(
            ["code", "from feature", "cited on", "median when cited", "median, legitimate"],
            [
                [r["code"], r["feature"], r["cited"], f"{r['median_cited']:.4g}", f"{r['median_legit']:.4g}"]
                for r in ev.details["reason_sources"]
            ],
            align="llrrr",
        ),
        "",
        "## Feature importance",
        "",
        "Total split gain per feature (reason code in brackets). The supporting features "
        f"({', '.join(card['training']['supporting_features'])}) train with their split gain "
        f"scaled by {card['training']['supporting_gain']}, so behaviour leads the trees, and "
        "names the reason, when it separates about as well (model/README.md § *Supporting "
        "features*); their bars show the gain unscaled.",
        "",
        "![feature importance](importance.png)",
        "",
        "## Known blind spots",
        "",
        *[f"- {s}" for s in card["known_blind_spots"]],
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
