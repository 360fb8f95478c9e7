"""Training labels from outcomes (REFUND_OUTCOME events), not from anyone's ground truth.

A refund is **abusive** (1) once any outcome says so: CONFIRMED_ABUSE, CHARGEBACK or
REVIEW_REJECTED, whenever it arrived. It is **legitimate** (0) when an outcome says it was paid
or approved on review (PAID, REVIEW_APPROVED), no bad outcome came, and the refund is older than
the **maturity window** at the end of the data: only then has a chargeback or a confirmed-abuse
finding had time to arrive. Every other refund is left out of training and counted: no outcome
at all, or only a good one that is not mature yet.

Why 60 days by default: card chargebacks are what arrives last. Card networks give issuers up to
120 days to dispute, but most disputes are raised within the first weeks, and a refund whose
good outcome has stood for two months has seen the large majority of the chargebacks it will
ever get; review outcomes come within days, confirmed-abuse findings within about a month (the
simulator draws chargebacks 15-50 days and confirmed abuse 4-25 days after the refund, so at
60 days every label it will ever have has arrived). A shorter window labels more recent refunds
legitimate that will still turn out abusive (label noise towards "legit"); a longer one leaves
the most recent, most relevant weeks out. ``--maturity-days`` changes it.

Selection bias: REVIEW_* labels exist only for refunds the old policy held for review, and
CONFIRMED_ABUSE mostly for what a person looked at; what the old policy paid at once is
labelled only by the absence of a chargeback (PAID), so abuse that was never reviewed and never
charged back is labelled legitimate. ``LabelSet.sources`` counts the labels by the outcome that
decided them; model/README.md ("Labels from outcomes") says what the pipeline does about it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from refundgate.v1 import refund_gate_pb2 as pb

DAY_S = 86_400
DEFAULT_MATURITY_DAYS = 60.0
ABUSIVE = frozenset(
    {pb.REFUND_OUTCOME_CONFIRMED_ABUSE, pb.REFUND_OUTCOME_CHARGEBACK, pb.REFUND_OUTCOME_REVIEW_REJECTED}
)
LEGITIMATE = frozenset({pb.REFUND_OUTCOME_PAID, pb.REFUND_OUTCOME_REVIEW_APPROVED})
NO_OUTCOME, NOT_MATURE = "no_outcome", "not_mature"


def outcome_name(outcome: int) -> str:
    """``CHARGEBACK`` for REFUND_OUTCOME_CHARGEBACK."""
    return pb.RefundOutcome.Name(outcome).removeprefix("REFUND_OUTCOME_")  # type: ignore[arg-type]


@dataclass(frozen=True)
class LabelSet:
    """Per refund: ``y`` 1 abusive, 0 legitimate, -1 left out; ``source`` the outcome that
    decided it (e.g. ``CHARGEBACK``) or why it was left out (``no_outcome``, ``not_mature``)."""

    y: np.ndarray
    source: np.ndarray
    as_of: float
    maturity_s: float

    def summary(self) -> dict[str, Any]:
        """Counts by label and by source, JSON-ready (for the report and the model card)."""
        names, counts = np.unique(self.source, return_counts=True)
        by_source = {str(n): int(c) for n, c in zip(names, counts, strict=True)}
        return {
            "abusive": int((self.y == 1).sum()),
            "legitimate": int((self.y == 0).sum()),
            "left_out": int((self.y < 0).sum()),
            "by_source": by_source,
            "maturity_days": self.maturity_s / DAY_S,
            "as_of": self.as_of,
        }


def label_refunds(
    refund_ids: Sequence[str],
    requested_at: Sequence[float],
    outcomes: Mapping[str, Sequence[tuple[float, int]]],
    *,
    as_of: float,
    maturity_days: float = DEFAULT_MATURITY_DAYS,
) -> LabelSet:
    """Label each refund from the outcomes recorded for its refund id up to ``as_of``."""
    if maturity_days < 0:
        raise ValueError("maturity_days must be >= 0")
    maturity_s = maturity_days * DAY_S
    y = np.full(len(refund_ids), -1, dtype=np.int8)
    source = np.empty(len(refund_ids), dtype=object)
    for i, (rid, at) in enumerate(zip(refund_ids, requested_at, strict=True)):
        seen = [(t, o) for t, o in outcomes.get(rid, ()) if t <= as_of]
        bad = [o for _, o in sorted(seen) if o in ABUSIVE]
        if bad:
            y[i], source[i] = 1, outcome_name(bad[0])
            continue
        good = [o for _, o in sorted(seen) if o in LEGITIMATE]
        if not good:
            source[i] = NO_OUTCOME
        elif as_of - at < maturity_s:
            source[i] = NOT_MATURE
        else:
            y[i], source[i] = 0, outcome_name(good[-1])
    return LabelSet(y, source.astype(str), as_of, maturity_s)
