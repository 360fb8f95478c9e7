"""Backtest a candidate model bundle on logged decisions: how would its decisions differ?

Each logged decision (one `DecisionRecord` JSON, from the decision log stream or a JSONL export)
is replayed through the candidate: its logged feature row is scored (null meaning NaN), and
`gate.policy.decide` runs with the candidate's thresholds on `Facts` rebuilt from the record:

* ``amount_minor`` = round(10 ** log10_amount); ``order_amount_minor`` = amount / refund_order_ratio;
* ``order_amount_asked`` = order_refunded_ratio * order amount, when that feature is known;
* ``blocked`` from the logged reasons BLOCKLISTED_ACCOUNT / _DEVICE / _IP; ``degraded`` as logged.

A record that cannot be replayed (unreadable, a feature row of another length, no amounts) is
skipped and counted by reason, never fatal. The result is a 3x3 transition matrix, logged
decision → candidate decision, with the rates derived from it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, cast

import redis

from gate.bundle import Bundle
from gate.features import FEATURE_INDEX, FEATURE_NAMES
from gate.policy import APPROVE, HOLD, REJECT, DegradedPolicy, Facts, Verdict, decide

DECISIONS = (APPROVE, HOLD, REJECT)
BLOCK_REASONS = {"BLOCKLISTED_ACCOUNT": "account", "BLOCKLISTED_DEVICE": "device", "BLOCKLISTED_IP": "ip"}
STREAM_CHUNK = 1000
_Entries = list[tuple[bytes, dict[bytes, bytes]]]  # XRANGE of a client without decode_responses

_AMOUNT = FEATURE_INDEX["log10_amount"]
_REFUND_RATIO = FEATURE_INDEX["refund_order_ratio"]
_ORDER_RATIO = FEATURE_INDEX["order_refunded_ratio"]
_RETURNED = FEATURE_INDEX["item_returned"]


class SkippedRecord(ValueError):
    """A logged decision that cannot be replayed; the message (without row specifics) says why."""


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """What a backtest needs of one decision-log record."""

    features: list[float]
    decision: str
    reasons: tuple[str, ...]
    degraded: bool
    model_version: str


@dataclass(slots=True)
class BacktestReport:
    """Counts of logged → candidate decisions, and the records that could not be replayed."""

    candidate: str
    hold: float
    reject: float
    degraded_approve_below_minor: int
    matrix: dict[str, dict[str, int]] = field(
        default_factory=lambda: {a: dict.fromkeys(DECISIONS, 0) for a in DECISIONS}
    )
    skipped: Counter[str] = field(default_factory=Counter)
    logged_versions: Counter[str] = field(default_factory=Counter)

    @property
    def replayed(self) -> int:
        """Records replayed through the candidate."""
        return sum(sum(row.values()) for row in self.matrix.values())

    @property
    def read(self) -> int:
        """Records read: replayed plus skipped."""
        return self.replayed + sum(self.skipped.values())

    @property
    def changed(self) -> int:
        """Replayed records whose candidate decision differs from the logged one."""
        return self.replayed - sum(self.matrix[d][d] for d in DECISIONS)

    def transitions(self) -> list[tuple[str, str, int]]:
        """Every change that happened, as (logged, candidate, count), most frequent first."""
        out = [(a, b, n) for a, row in self.matrix.items() for b, n in row.items() if a != b and n]
        return sorted(out, key=lambda t: -t[2])

    def rates(self) -> dict[str, dict[str, float]]:
        """Share of each decision among replayed records: logged and candidate."""
        total = self.replayed or 1
        logged = {d: sum(self.matrix[d].values()) / total for d in DECISIONS}
        candidate = {d: sum(row[d] for row in self.matrix.values()) / total for d in DECISIONS}
        return {"logged": logged, "candidate": candidate}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the matrix, transitions, rates and skip reasons)."""
        replayed = self.replayed
        return {
            "candidate": {
                "version": self.candidate,
                "thresholds": {"hold": self.hold, "reject": self.reject},
            },
            "degraded_approve_below_minor": self.degraded_approve_below_minor,
            "read": self.read,
            "replayed": replayed,
            "skipped": sum(self.skipped.values()),
            "skip_reasons": dict(self.skipped),
            "logged_versions": dict(self.logged_versions),
            "matrix": self.matrix,
            "changed": self.changed,
            "changed_share": self.changed / replayed if replayed else None,
            "transitions": [{"from": a, "to": b, "count": n} for a, b, n in self.transitions()],
            "rates": self.rates() if replayed else None,
        }


def parse_record(raw: str | bytes) -> LoggedDecision:
    """Read one decision-log record (`DecisionRecord.to_json()`); SkippedRecord if unusable."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise SkippedRecord("not valid JSON") from None
    if not isinstance(body, dict):
        raise SkippedRecord("not a JSON object")
    missing = [k for k in ("features", "decision", "reasons", "degraded") if k not in body]
    if missing:
        raise SkippedRecord(f"lacks {', '.join(missing)}")
    if body["decision"] not in DECISIONS:
        raise SkippedRecord(
            f"logged decision {str(body['decision'])[:40]!r} is not one of {'/'.join(DECISIONS)}"
        )
    return LoggedDecision(
        features=_decode_features(body["features"]),
        decision=body["decision"],
        reasons=tuple(str(r) for r in body["reasons"]),
        degraded=bool(body["degraded"]),
        model_version=str(body.get("model_version") or "unknown"),
    )


def _decode_features(values: Any) -> list[float]:
    if isinstance(values, dict):  # by name, as export-decisions writes them
        missing = [n for n in FEATURE_NAMES if n not in values]
        if missing:
            raise SkippedRecord(f"features lack {missing[0]} (and {len(missing) - 1} more)")
        values = [values[n] for n in FEATURE_NAMES]
    if not isinstance(values, list):
        raise SkippedRecord("features are not a list")
    try:
        return [math.nan if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        raise SkippedRecord("features are not all numbers or null") from None


def amounts_from_row(row: Sequence[float]) -> tuple[int, int, int | None]:
    """The guard rules' amounts, rebuilt from a feature row: the refund (``log10_amount``), the
    order (``refund_order_ratio``) and all asked against the order (``order_refunded_ratio``;
    None when unknown, as when the decision was degraded)."""
    try:
        amount = round(10.0 ** row[_AMOUNT])
        order_amount = round(amount / row[_REFUND_RATIO])
    except (OverflowError, ValueError, ZeroDivisionError):
        raise SkippedRecord("log10_amount or refund_order_ratio unknown or out of range") from None
    if amount < 1 or order_amount < 1:
        raise SkippedRecord("log10_amount or refund_order_ratio unknown or out of range")
    asked_ratio = row[_ORDER_RATIO]
    return amount, order_amount, None if math.isnan(asked_ratio) else round(asked_ratio * order_amount)


def facts_from_record(record: LoggedDecision) -> Facts:
    """The policy's Facts of a logged decision, rebuilt from its features and reasons."""
    row = record.features
    amount, order_amount, asked = amounts_from_row(row)
    return Facts(
        amount_minor=amount,
        order_amount_minor=order_amount,
        order_amount_asked=asked,
        blocked=[BLOCK_REASONS[r] for r in record.reasons if r in BLOCK_REASONS],
        degraded=record.degraded,
        item_returned=row[_RETURNED] == 1.0,
    )


def replay(record: LoggedDecision, bundle: Bundle, degraded: DegradedPolicy) -> str:
    """The decision the candidate ``bundle`` would have made for a logged decision."""
    takes = bundle.model.num_features
    if len(record.features) != takes:
        raise SkippedRecord(f"{len(record.features)} features, the candidate takes {takes}")
    facts = facts_from_record(record)
    return decide_row(bundle, record.features, facts, degraded).decision


def decide_row(bundle: Bundle, row: list[float], facts: Facts, degraded: DegradedPolicy) -> Verdict:
    """What ``bundle`` decides for ``row`` as the gate does: its score, then the policy with the
    attribution of the leaves just scored (the reasons, which a REJECT needs) and the default
    reject limits (gate/policy.py)."""
    model = bundle.model
    score = model.score(row)
    return decide(
        score,
        bundle.thresholds,
        facts,
        degraded,
        explain=lambda: bundle.explain(model.last_leaves()).tolist(),
    )


def backtest(
    raw_records: Iterable[str | bytes], bundle: Bundle, degraded: DegradedPolicy, *, limit: int | None = None
) -> BacktestReport:
    """Replay up to ``limit`` raw records through ``bundle`` and count the transitions."""
    report = BacktestReport(
        bundle.version, bundle.thresholds.hold, bundle.thresholds.reject, degraded.approve_below_minor
    )
    for raw in islice(raw_records, limit):
        try:
            record = parse_record(raw)
            candidate = replay(record, bundle, degraded)
        except SkippedRecord as exc:
            report.skipped[str(exc)] += 1
            continue
        report.matrix[record.decision][candidate] += 1
        report.logged_versions[record.model_version] += 1
    return report


def read_jsonl(path: Path) -> Iterator[str]:
    """The non-blank lines of a JSONL export, one record each."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                yield line


def read_stream(
    client: redis.Redis, key: str, *, chunk: int = STREAM_CHUNK, field: bytes = b"d"
) -> Iterator[bytes]:
    """Every record of the stream ``key`` (the decision log's by default), oldest first, read by
    XRANGE in chunks.

    An entry without the ``field`` yields b"" (and is then skipped as unreadable).
    """
    start = "-"
    while True:
        entries = cast(_Entries, client.xrange(key, min=start, max="+", count=chunk))
        for _, fields in entries:
            yield fields.get(field, b"")
        if len(entries) < chunk:
            return
        start = "(" + entries[-1][0].decode()


def format_report(report: BacktestReport) -> str:
    """The report as text: matrix, changes, rates and skipped records."""
    lines = [
        f"backtest of {report.candidate} (hold >= {report.hold:.6g}, reject >= "
        f"{report.reject:.6g}; degraded approve below {report.degraded_approve_below_minor} "
        f"minor units)",
        f"read {report.read:,} logged decisions: {report.replayed:,} replayed, "
        f"{sum(report.skipped.values()):,} skipped",
    ]
    lines += [f"  skipped {n:,}: {reason}" for reason, n in report.skipped.most_common()]
    if report.logged_versions:
        lines.append(
            "logged by " + ", ".join(f"{v} ({n:,})" for v, n in report.logged_versions.most_common())
        )
    if not report.replayed:
        lines.append("nothing to compare: no record could be replayed")
        return "\n".join(lines)
    sections = (_matrix_lines(report), _change_lines(report), _rate_lines(report))
    return "\n".join([*lines, *(line for section in sections for line in ["", *section])])


def _matrix_lines(report: BacktestReport) -> list[str]:
    width = 20
    head = "logged \\ candidate".ljust(width) + "".join(d.rjust(width) for d in DECISIONS)
    lines = [head + "total".rjust(10)]
    for logged in DECISIONS:
        row = report.matrix[logged]
        total = sum(row.values())
        cells = "".join(f"{row[c]:,} ({_pct(row[c], total)})".rjust(width) for c in DECISIONS)
        lines.append(logged.ljust(width) + cells + f"{total:,}".rjust(10))
    lines.append("(rates are shares of the logged decision's row)")
    return lines


def _change_lines(report: BacktestReport) -> list[str]:
    lines = [f"changed: {report.changed:,} of {report.replayed:,} ({_pct(report.changed, report.replayed)})"]
    lines += [f"  {a} -> {b}: {n:,}" for a, b, n in report.transitions()]
    return lines


def _rate_lines(report: BacktestReport) -> list[str]:
    rates = report.rates()
    lines = ["rate".ljust(20) + "logged".rjust(10) + "candidate".rjust(12)]
    for d in DECISIONS:
        lines.append(
            d.ljust(20) + f"{rates['logged'][d]:.2%}".rjust(10) + f"{rates['candidate'][d]:.2%}".rjust(12)
        )
    return lines


def _pct(n: int, total: int) -> str:
    return f"{n / total:.1%}" if total else "-"
