"""Rules-only baseline: velocity thresholds of the kind a fraud team writes by hand.

The rules read the SAME point-in-time feature rows the model is trained and tested on (columns
by name from ``gate.features``), so the comparison in the evaluation report is between two ways
of using identical information, not between two data pipelines. No feature is computed here.

Every count includes the refund being decided (the gate records it before reading its windows).
A missing value (NaN: no device, Redis down) never fires a rule. The thresholds were written
once, from the scenario descriptions and common fraud-team practice, and never tuned on data.
How the rules become a decision (hold when at least ``k`` fire, ``k`` chosen on the validation
weeks for the same legitimate-hold target as the model) is in `model.evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gate.features import FEATURE_INDEX
from refundgate.v1 import refund_gate_pb2 as pb

Column = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class Rule:
    """One hand-written rule: a name, the sentence an analyst would write, and its test."""

    name: str
    text: str
    fires: Callable[[Column], np.ndarray]


RULES: tuple[Rule, ...] = (
    Rule(
        "refund_velocity", "≥ 3 refund requests by the account in 24 h", lambda c: c("acct_refunds_24h") >= 3
    ),
    Rule(
        "serial_not_received",
        "'not received' on an order shown as delivered, and ≥ 2 such claims by the account in 30 d",
        lambda c: (c("not_received_but_delivered") == 1) & (c("acct_inr_delivered_30d") >= 2),
    ),
    Rule(
        "digital_quick_refund",
        "digital goods refunded within 1 h of the purchase",
        lambda c: c("digital_quick_refund") == 1,
    ),
    Rule("device_accounts", "≥ 4 accounts on the device in 7 d", lambda c: c("dev_accounts_7d") >= 4),
    Rule(
        "merchant_refund_rate",
        "merchant refund rate over 7 d > 30 % (at least 10 refunds)",
        lambda c: (c("m_refund_rate_7d") > 0.3) & (c("m_refunds_7d") >= 10),
    ),
    Rule("city_hopping", "account seen in ≥ 3 cities in 24 h", lambda c: c("acct_cities_24h") >= 3),
    Rule(
        "serial_changed_mind",
        "'changed my mind' without return, and ≥ 3 such refunds by the account in 30 d",
        lambda c: (c("changed_mind_not_returned") == 1) & (c("acct_changed_mind_unreturned_30d") >= 3),
    ),
    Rule(
        "bnpl_cashout",
        "BNPL refund at a merchant refunding > 50 % of its BNPL orders over 7 d",
        lambda c: (c("payment_method") == pb.PAYMENT_METHOD_BNPL) & (c("m_bnpl_refund_rate_7d") > 0.5),
    ),
    Rule(
        "prior_abuse",
        "account with a confirmed abuse, chargeback or rejected refund in 90 d",
        lambda c: c("acct_abuse_outcomes_90d") >= 1,
    ),
)


def rule_hits(X: np.ndarray) -> np.ndarray:
    """Boolean matrix (rows x RULES): which rule fires on which feature row."""

    def column(name: str) -> np.ndarray:
        return X[:, FEATURE_INDEX[name]]

    with np.errstate(invalid="ignore"):  # NaN compares False: a missing value fires nothing
        return np.column_stack([np.asarray(rule.fires(column), dtype=bool) for rule in RULES])


def rules_fired(X: np.ndarray) -> np.ndarray:
    """Number of rules that fire on each row: the baseline's score."""
    return rule_hits(X).sum(axis=1)
