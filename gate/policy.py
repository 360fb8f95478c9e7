"""Turn a score, the guard rules and the feature attribution into a decision with reasons.

The model's thresholds come from the bundle's manifest. Guard rules only ever raise severity:
a refund above the order amount (this request, or all requests against the order together) and a
blocklisted account, device or IP are rejected whatever the score. When velocity features were
unavailable the degraded policy applies: approve only small refunds the model is calm about.

Rejecting an honest customer is the costliest error, so the model's REJECT is held back to
HOLD_FOR_REVIEW (a person decides) in two cases, both on by default (`RejectLimits`):
- without behavioural evidence: none of the reasons given is backed by the velocity counters
  of what the account, device, IP or merchant did (`gate.features.BEHAVIOUR_CODES`); the
  request's context alone (a young account, a large amount, a reason) never rejects;
- when the item came back to the merchant (``item_returned``), unless a guard rule fires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gate.features import BEHAVIOUR_CODES, FEATURES

APPROVE, HOLD, REJECT = "APPROVE", "HOLD_FOR_REVIEW", "REJECT"
_RANK = {APPROVE: 0, HOLD: 1, REJECT: 2}
MAX_MODEL_REASONS = 3

REASON_DETAILS: dict[str, str] = {
    "REFUND_EXCEEDS_ORDER": "refunds asked against this order exceed the order amount",
    "BLOCKLISTED_ACCOUNT": "the account is on the blocklist",
    "BLOCKLISTED_DEVICE": "the device is on the blocklist",
    "BLOCKLISTED_IP": "the IP address is on the blocklist",
    "FEATURES_UNAVAILABLE": "velocity counters were unavailable; decided by the degraded policy",
    "QUICK_REFUND_AFTER_ORDER": "the refund was asked unusually soon after the order",
    "HIGH_REFUND_AMOUNT": "the refund amount is unusually high",
    "NEW_ACCOUNT": "the account is new",
    "REFUND_REASON": "the refund reason is often abused in this context",
    "ITEM_CATEGORY": "the item category is often abused in this context",
    "NOT_RECEIVED_BUT_DELIVERED": "'not received' claimed on an order logistics shows as delivered",
    "PAYMENT_METHOD": "the payment method is often abused in this context",
    "DELIVERY_STATUS": "the order's delivery status is often abused in this context",
    "REFUND_TIMING": "the time from order to refund request is unusual for this refund",
    "REFUND_SHARE_OF_ORDER": "the share of the order amount asked back is unusual for this refund",
    "HIGH_REFUND_RATE": "the account asks refunds on an unusually large share of its orders",
    "DEVICE_HISTORY": "the account's devices over the last 30 days are unusual for this refund",
    "ITEM_NOT_RETURNED": "the item was not returned",
    "DIGITAL_GOODS_QUICK_REFUND": "digital goods refunded within an hour of purchase",
    "HIGH_REFUND_VELOCITY": "many refund requests in a short time",
    "SERIAL_NOT_RECEIVED": "repeated 'not received' claims",
    "IP_CITY_HOPPING": "the account changes IPs, cities or devices unusually often",
    "PRIOR_CONFIRMED_ABUSE": "earlier refunds of the account were confirmed abusive",
    "MERCHANT_COLLUSION": "unusual refund pattern between this account and merchant",
    "SPLIT_REFUNDS": "several refunds asked against one order",
    "MANY_ACCOUNTS_ON_DEVICE": "many accounts use this device",
    "MANY_ACCOUNTS_ON_IP": "many accounts use this IP address",
    "MERCHANT_REFUND_SPIKE": "the merchant's refunds spike",
    "BNPL_CASHOUT": "buy-now-pay-later orders at this merchant turn into refunds",
    "THIN_HISTORY": "the account has little order and delivery history",
    "FEW_RETURNS": "few of the account's refunded items came back to the merchant",
    "CLAIM_HISTORY": "the account's 'not received' claims are unusual for this refund",
    "MERCHANT_FEW_RETURNS": "few of the merchant's refunded items come back",
    "REPEATED_UNRETURNED": "the account has had several refunds without sending the item back",
    "REPEATED_QUICK_DIGITAL_REFUNDS": "digital goods refunded within the hour again and again, by the "
    "account or at this merchant",
}
REASON_CODES: tuple[str, ...] = tuple(dict.fromkeys(f.reason for f in FEATURES))
"""The codes the model's features can give: the order of an explanation's weights."""
REASON_GROUPS = np.array([[1.0 if f.reason == code else 0.0 for code in REASON_CODES] for f in FEATURES])
"""(features, codes): the code each feature's attribution counts for."""
assert set(REASON_CODES) <= set(REASON_DETAILS), "every feature reason needs a detail text"


def code_weights(per_feature: Sequence[float]) -> list[float]:
    """Per-feature attribution (FEATURES order) summed per reason code (REASON_CODES order)."""
    weights: list[float] = (np.asarray(per_feature, dtype=np.float64) @ REASON_GROUPS).tolist()
    return weights


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Score thresholds of a model, from its manifest: hold at or above, reject at or above."""

    hold: float
    reject: float

    def __post_init__(self) -> None:
        if not 0.0 < self.hold <= self.reject <= 1.0:
            raise ValueError("thresholds must satisfy 0 < hold <= reject <= 1")


@dataclass(frozen=True, slots=True)
class DegradedPolicy:
    """What to do without velocity features: approve only below this amount and the hold line."""

    approve_below_minor: int


@dataclass(frozen=True, slots=True)
class RejectLimits:
    """When the model's REJECT becomes HOLD_FOR_REVIEW (module docstring): settings
    GATE_REJECT_NEEDS_BEHAVIOUR and GATE_RETURNED_AT_MOST_HOLD."""

    needs_behaviour: bool = True
    returned_at_most_hold: bool = True


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision and its reason codes, most important first."""

    decision: str
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything the rules look at, besides the score."""

    amount_minor: int
    order_amount_minor: int
    order_amount_asked: int | None  # all requests against the order, this one included
    blocked: Sequence[str]  # "account", "device", "ip"
    degraded: bool
    item_returned: bool = False


def model_decision(score: float, t: Thresholds) -> str:
    """The decision the score alone implies."""
    if score >= t.reject:
        return REJECT
    if score >= t.hold:
        return HOLD
    return APPROVE


def decide(
    score: float | None,
    t: Thresholds,
    facts: Facts,
    degraded: DegradedPolicy,
    explain: Callable[[], Sequence[float]] | None = None,
    limits: RejectLimits = RejectLimits(),
) -> Verdict:
    """Combine the model, the guard rules and the degraded policy into one verdict.

    ``explain`` returns how much each reason code's features together pushed the score up
    (REASON_CODES order: ``Bundle.explain`` of the leaves just scored, or `code_weights` of a
    per-feature attribution); it is called only for HOLD and REJECT, the only decisions whose
    reasons anyone reads. ``limits`` says when the model's REJECT is only a HOLD.
    """
    decision = APPROVE if score is None else model_decision(score, t)
    rules: list[str] = []
    asked = max(facts.amount_minor, facts.order_amount_asked or 0)
    if asked > facts.order_amount_minor:
        rules.append("REFUND_EXCEEDS_ORDER")
    rules.extend(f"BLOCKLISTED_{kind.upper()}" for kind in facts.blocked)
    guarded = bool(rules)  # a guard rule fired: REJECT, whatever the model or the limits say
    if facts.degraded:
        calm = score is not None and score < t.hold
        if not (calm and facts.amount_minor < degraded.approve_below_minor):
            decision = _max(decision, HOLD)
    if guarded:
        decision = REJECT
    elif decision == REJECT and limits.returned_at_most_hold and facts.item_returned:
        decision = HOLD
    if facts.degraded:
        rules.append("FEATURES_UNAVAILABLE")
    if decision == APPROVE:
        return Verdict(APPROVE, ("FEATURES_UNAVAILABLE",) if facts.degraded else ())
    weights = explain() if explain is not None else None
    reasons = _model_reasons(weights, rules)
    if (
        decision == REJECT
        and not guarded
        and limits.needs_behaviour
        and not BEHAVIOUR_CODES.intersection(reasons)
    ):
        decision = HOLD
    return Verdict(decision, tuple(rules) + reasons)


def _max(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


def _model_reasons(weights: Sequence[float] | None, already: Sequence[str]) -> tuple[str, ...]:
    """Reason codes whose features together pushed the score up most.

    A code weighs the summed attribution of all its features: the evidence for "quick
    digital-goods refund" is the request's flag plus the account's and the merchant's counts of
    them, so one strong supporting feature (a young account) does not outrank a signal whose
    evidence is spread over several features.
    """
    if weights is None:
        return ()
    ranked = sorted(
        (w, code) for code, w in zip(REASON_CODES, weights, strict=True) if w > 0 and code not in already
    )
    return tuple(code for _, code in reversed(ranked[-MAX_MODEL_REASONS:]))
