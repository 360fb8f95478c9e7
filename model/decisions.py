"""A training set from production: the gate's own decision log (features as served), joined
with the outcomes recorded through RecordEvents.

    rows = load_decisions("redis://127.0.0.1:6379/0")      # the live streams (key prefix "rg")
    rows = load_decisions(Path("decisions.jsonl"))         # a `refund-gate model export-decisions`

Features are read by name (gate/decisionread.py) and laid out in the order of
``gate.features.FEATURE_NAMES``; a decision whose names are unknown, or that lacks one of the
gate's features, is left out and counted by reason, as are unreadable lines. A refund decided
more than once (a degraded decision, then a retry that reached Redis) is kept once: its first
complete (not degraded) decision, else its first. Labels are not made here: ``outcomes`` holds
every outcome of each refund with its time, for the labelling step to apply its maturity window.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gate.backtest import amounts_from_row
from gate.features import FEATURE_NAMES
from model.dataset import Dataset
from model.labels import DEFAULT_MATURITY_DAYS, label_refunds
from model.progress import Progress
from refundgate.v1 import refund_gate_pb2 as pb

DEFAULT_KEY_PREFIX = "rg"


@dataclass(frozen=True)
class DecisionRows:
    """One row per refund decided by the gate, in decision time order.

    ``X`` columns are ``feature_names`` (the gate's), NaN where the gate had no value;
    ``outcomes[i]`` lists (at, RefundOutcome value) of row i's refund, oldest first.
    """

    X: np.ndarray
    refund: np.ndarray
    at: np.ndarray
    decision: np.ndarray
    model_version: np.ndarray
    degraded: np.ndarray
    score: np.ndarray
    outcomes: list[list[tuple[float, int]]]
    read: int
    skipped: Counter[str] = field(default_factory=Counter)
    feature_names: tuple[str, ...] = FEATURE_NAMES

    def __len__(self) -> int:
        return len(self.at)

    def index(self) -> dict[str, int]:
        """Row of each hashed refund id."""
        return {str(r): i for i, r in enumerate(self.refund)}


def load_decisions(
    source: str | Path, *, key_prefix: str = DEFAULT_KEY_PREFIX, progress: bool = False
) -> DecisionRows:
    """Decisions with their outcomes from a Redis URL (redis://, rediss://, unix://) or an
    export-decisions JSONL file. Raises FileNotFoundError for a missing file and redis errors
    for an unreachable Redis."""
    text = str(source)
    if isinstance(source, str) and text.split("://", 1)[0] in ("redis", "rediss", "unix"):
        import redis

        from gate.decisionread import joined_records

        client = redis.Redis.from_url(text, socket_timeout=30, socket_connect_timeout=5)
        try:
            return rows_from(joined_records(client, key_prefix), progress=progress)
        finally:
            client.close()
    return rows_from(_read_jsonl(Path(source)), progress=progress)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                body = json.loads(line)
            except ValueError:
                yield {"unreadable": "not valid JSON"}
                continue
            yield body if isinstance(body, dict) else {"unreadable": "not a JSON object"}


def rows_from(records: Iterable[Mapping[str, Any]], *, progress: bool = False) -> DecisionRows:
    """DecisionRows of joined decision records (gate.decisionread's format)."""
    skipped: Counter[str] = Counter()
    kept: dict[str, tuple[list[float], Mapping[str, Any]]] = {}
    read = 0
    with Progress("reading decisions", unit="decisions", enabled=progress) as bar:
        for body in records:
            read += 1
            bar.update()
            try:
                row = _row(body)
            except ValueError as exc:
                skipped[str(exc)] += 1
                continue
            refund = str(body["refund"])
            earlier = kept.get(refund)
            if earlier is not None:
                skipped["refund decided again (kept one)"] += 1
                if not (earlier[1].get("degraded") and not body.get("degraded")):
                    continue
            kept[refund] = (row, body)
    ordered = sorted(kept.items(), key=lambda kv: float(kv[1][1]["at"]))
    n = len(ordered)
    return DecisionRows(
        X=np.asarray([row for _, (row, _) in ordered], dtype=np.float64).reshape(n, len(FEATURE_NAMES)),
        refund=np.asarray([r for r, _ in ordered], dtype=object),
        at=np.asarray([float(b["at"]) for _, (_, b) in ordered], dtype=np.float64),
        decision=np.asarray([str(b.get("decision")) for _, (_, b) in ordered], dtype=object),
        model_version=np.asarray([str(b.get("model_version")) for _, (_, b) in ordered], dtype=object),
        degraded=np.asarray([bool(b.get("degraded")) for _, (_, b) in ordered], dtype=bool),
        score=np.asarray([_number(b.get("score")) for _, (_, b) in ordered], dtype=np.float64),
        outcomes=[_outcomes(b.get("outcomes")) for _, (_, b) in ordered],
        read=read,
        skipped=skipped,
    )


def _row(body: Mapping[str, Any]) -> list[float]:
    if "unreadable" in body:
        raise ValueError(str(body["unreadable"]))
    if "refund" not in body or "at" not in body:
        raise ValueError("lacks refund or at")
    features = body.get("features")
    if not isinstance(features, dict):
        raise ValueError("features not by name (no known feature_spec)")
    missing = [n for n in FEATURE_NAMES if n not in features]
    if missing:
        raise ValueError(f"lacks the gate's feature {missing[0]}")
    try:
        return [_number(features[n]) for n in FEATURE_NAMES]
    except (TypeError, ValueError):
        raise ValueError("features are not all numbers or null") from None


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _outcomes(values: Any) -> list[tuple[float, int]]:
    if not isinstance(values, list):
        return []
    return [(float(o["at"]), pb.RefundOutcome.Value(str(o["outcome"]))) for o in values]


def to_dataset(
    rows: DecisionRows, *, maturity_days: float = DEFAULT_MATURITY_DAYS, as_of: float | None = None
) -> Dataset:
    """The training set of these decisions: features as served, labelled from their outcomes
    like a replay (model/labels.py), judged by those labels (production has no ground truth).

    The guard rules' inputs come back from the features themselves, as the backtest rebuilds
    them (``gate.backtest.amounts_from_row``; no running total when the decision was degraded).
    ``as_of`` defaults to the latest decision or outcome.
    """
    X = rows.X
    latest = max([float(rows.at.max(initial=0.0))] + [t for o in rows.outcomes for t, _ in o])
    end = latest if as_of is None else as_of
    refunds = [str(r) for r in rows.refund]
    outcomes = {refund: list(o) for refund, o in zip(refunds, rows.outcomes, strict=True)}
    labels = label_refunds(refunds, rows.at.tolist(), outcomes, as_of=end, maturity_days=maturity_days)
    amounts = [amounts_from_row(row) for row in X.tolist()]
    return Dataset(
        X,
        labels.y.copy(),
        np.full(len(rows), "", dtype=object).astype(str),
        rows.at.astype(np.float64),
        amount=np.asarray([a for a, _, _ in amounts], dtype=np.int64),
        order_amount=np.asarray([o for _, o, _ in amounts], dtype=np.int64),
        order_asked=np.asarray([k or 0 for _, _, k in amounts], dtype=np.int64),
        records=rows.read,
        label=labels.y,
        labels=labels,
        first_at=float(rows.at.min(initial=0.0)),
        last_at=end,
    )
