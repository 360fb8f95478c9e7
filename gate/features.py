"""The feature vector: one ordered spec, used by serving, training and the model manifest.

``FEATURES`` is the single source of truth. Training builds its rows with ``assemble`` (through
the same velocity code, replayed against Redis), the bundle's manifest records ``FEATURE_NAMES``,
and the gate refuses a model whose feature list differs. Unknown values are NaN, never 0: a
missing device is not a device with zero accounts, and LightGBM routes NaN on its own branch.

The account's behaviour counts of flagged refunds ("not received" claims, quick digital refunds,
refunds without a return) count the refunds *before* this one: the request's own flags are
request features, so a reason code backed by these counters is evidence of what the account did
before, never of this request alone (gate/policy.py rejects only on such evidence).

Each velocity feature names the counter it reads (``field``, one of the names in
gate/velocity.py's ``*_FIELDS``) or derives its value from named counters (``derive``): nothing
maps by position. Each feature also says what kind of evidence it is (``kind``): *behaviour*
(what the account, device, IP or merchant did: the counters and the refund's own flags) or
*context* (who, what, when, how much, how paid, how deep the history; it qualifies behaviour and
is never enough to reject on, gate/policy.py). ``monotone`` is the direction the score must move
with the feature, all else equal, where domain knowledge makes it certain (``why`` says why);
training passes it to LightGBM as ``monotone_constraints`` so the model cannot unlearn it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from refundgate.v1 import refund_gate_pb2 as pb

NAN = math.nan
Source = Literal["request", "account", "device", "ip", "merchant"]
Kind = Literal["behaviour", "context"]

# Flag bits of one refund, stored in its log record (gate/velocity.py reads them back).
F_INR = 1  # "item not received" claim
F_INR_DELIVERED = 2  # ... on an order logistics shows as delivered
F_DIGITAL_QUICK = 4  # digital goods refund asked within an hour of the order
F_CM_UNRETURNED = 8  # "changed my mind" with the item not returned
F_BNPL = 16  # paid with buy-now-pay-later
F_RETURNED = 32  # the item came back to the merchant

QUICK_REFUND_MINUTES = 60.0


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """What the request alone says: the request part of the vector plus the refund's flag bits."""

    values: tuple[float, ...]
    flags: int
    order_amount_minor: int


Derive = Callable[[Mapping[str, float], RequestFeatures], float]


@dataclass(frozen=True, slots=True)
class Feature:
    """One model input: its name, where it comes from, the reason code it supports, and why.

    A velocity feature reads the counter ``field`` of its source as it is, or computes its value
    with ``derive`` from the source's named counters (and the request's flags).
    """

    name: str
    source: Source
    reason: str
    doc: str
    kind: Kind = "behaviour"
    monotone: Literal[-1, 0, 1] = 0
    why: str = ""
    field: str | None = None
    derive: Derive | None = None


def _ratio(num: float, den: float) -> float:
    return num / (den if den > 1 else 1.0)


def _f(
    name: str,
    source: Source,
    reason: str,
    doc: str,
    *,
    kind: Kind = "behaviour",
    monotone: Literal[-1, 0, 1] = 0,
    why: str = "",
    field: str | None = None,
    derive: Derive | None = None,
) -> Feature:
    if source != "request" and (field is None) == (derive is None):
        raise ValueError(f"velocity feature {name} needs exactly one of field and derive")
    if monotone and not why:
        raise ValueError(f"monotone feature {name} needs its reason")
    return Feature(name, source, reason, doc, kind, monotone, why, field, derive)


_UP_ABUSE = "more of it is more of the abusive behaviour itself, all else equal"

FEATURES: tuple[Feature, ...] = (
    # From the request alone: always known.
    _f(
        "minutes_order_to_request",
        "request",
        "REFUND_TIMING",
        "Minutes from order to refund request.",
        kind="context",
    ),
    _f(
        "refund_order_ratio",
        "request",
        "REFUND_SHARE_OF_ORDER",
        "Refund amount / order amount.",
        monotone=1,
        why="asking back more of the same order is never less suspicious",
    ),
    _f(
        "log10_amount",
        "request",
        "HIGH_REFUND_AMOUNT",
        "log10 of the refund amount (minor units).",
        kind="context",
    ),
    _f(
        "account_age_days",
        "request",
        "NEW_ACCOUNT",
        "Days since the account was created; NaN if unknown.",
        kind="context",
        monotone=-1,
        why="an older account is never more likely a throw-away one",
    ),
    _f("reason_code", "request", "REFUND_REASON", "RefundReason enum number.", kind="context"),
    _f("item_category", "request", "ITEM_CATEGORY", "ItemCategory enum number.", kind="context"),
    _f(
        "delivery_status",
        "request",
        "DELIVERY_STATUS",
        "DeliveryStatus enum number; NaN if UNSPECIFIED.",
        kind="context",
    ),
    _f(
        "payment_method",
        "request",
        "PAYMENT_METHOD",
        "PaymentMethod enum number; NaN if UNSPECIFIED.",
        kind="context",
    ),
    _f(
        "item_returned",
        "request",
        "ITEM_NOT_RETURNED",
        "1 if the item came back to the merchant.",
        monotone=-1,
        why="an item back with the merchant leaves nothing to gain but the refund of what was returned",
    ),
    _f(
        "not_received_but_delivered",
        "request",
        "NOT_RECEIVED_BUT_DELIVERED",
        "1 for an 'item not received' claim on an order the caller says was delivered.",
    ),
    _f(
        "digital_quick_refund",
        "request",
        "DIGITAL_GOODS_QUICK_REFUND",
        "1 for digital goods refunded within an hour of the order.",
    ),
    _f(
        "changed_mind_not_returned",
        "request",
        "ITEM_NOT_RETURNED",
        "1 for 'changed my mind' with the item not returned.",
    ),
    # Account (exact, from the account's log; pair and order are filters of it).
    _f(
        "acct_refunds_1h",
        "account",
        "HIGH_REFUND_VELOCITY",
        "Refund requests by the account, 1 h.",
        field="refunds_1h",
    ),
    _f("acct_refunds_24h", "account", "HIGH_REFUND_VELOCITY", "... 24 h.", field="refunds_24h"),
    _f("acct_refunds_7d", "account", "HIGH_REFUND_VELOCITY", "... 7 d.", field="refunds_7d"),
    _f("acct_refunds_30d", "account", "HIGH_REFUND_VELOCITY", "... 30 d.", field="refunds_30d"),
    _f(
        "acct_refund_amount_30d",
        "account",
        "HIGH_REFUND_VELOCITY",
        "Sum of refund amounts asked by the account, 30 d (minor units).",
        field="amount_30d",
    ),
    _f(
        "acct_inr_30d",
        "account",
        "SERIAL_NOT_RECEIVED",
        "'Not received' claims by the account, 30 d, before this one.",
        field="inr_30d",
    ),
    _f(
        "acct_inr_delivered_30d",
        "account",
        "SERIAL_NOT_RECEIVED",
        "'Not received' claims on delivered orders, 30 d, before this one.",
        monotone=1,
        why=_UP_ABUSE,
        field="inr_delivered_30d",
    ),
    _f(
        "acct_digital_quick_7d",
        "account",
        "REPEATED_QUICK_DIGITAL_REFUNDS",
        "Digital goods refunds within an hour of the order, 7 d, before this one.",
        field="digital_quick_7d",
    ),
    _f(
        "acct_changed_mind_unreturned_30d",
        "account",
        "REPEATED_UNRETURNED",
        "'Changed my mind' refunds without return, 30 d, before this one.",
        field="cm_unreturned_30d",
    ),
    _f(
        "acct_returned_30d",
        "account",
        "FEW_RETURNS",
        "Refunds of the account, 30 d, whose item came back.",
        monotone=-1,
        why="with the other counts fixed, more refunds that came back means fewer that did not",
        field="returned_30d",
    ),
    _f(
        "acct_returned_share_30d",
        "account",
        "FEW_RETURNS",
        "Share of the account's refunds, 30 d, whose item came back.",
        monotone=-1,
        why="a bulk returner sends the items back; an abuser keeps them",
        derive=lambda raw, _: _ratio(raw["returned_30d"], raw["refunds_30d"]),
    ),
    _f(
        "acct_unreturned_30d",
        "account",
        "REPEATED_UNRETURNED",
        "Refunds of the account, 30 d, before this one, whose item did not come back.",
        monotone=1,
        why=_UP_ABUSE,
        field="unreturned_30d",
    ),
    _f(
        "acct_orders_30d",
        "account",
        "THIN_HISTORY",
        "Orders placed by the account, 30 d.",
        monotone=-1,
        why="with the refunds fixed, more orders is a lower refund rate",
        field="orders_30d",
    ),
    _f(
        "acct_refund_rate_30d",
        "account",
        "HIGH_REFUND_RATE",
        "Refund requests / max(orders, 1), 30 d.",
        derive=lambda raw, _: _ratio(raw["refunds_30d"], raw["orders_30d"]),
    ),
    _f(
        "acct_delivered_30d",
        "account",
        "THIN_HISTORY",
        "Deliveries of the account's orders recorded, 30 d.",
        kind="context",
        field="delivered_30d",
    ),
    _f("acct_ips_24h", "account", "IP_CITY_HOPPING", "Distinct IPs of the account, 24 h.", field="ips_24h"),
    _f(
        "acct_cities_24h",
        "account",
        "IP_CITY_HOPPING",
        "Distinct cities of the account, 24 h.",
        field="cities_24h",
    ),
    _f(
        "acct_devices_30d",
        "account",
        "DEVICE_HISTORY",
        "Distinct devices of the account, 30 d.",
        field="devices_30d",
    ),
    _f(
        "acct_abuse_outcomes_90d",
        "account",
        "PRIOR_CONFIRMED_ABUSE",
        "Confirmed abuse, chargeback or rejected-on-review outcomes, 90 d.",
        kind="context",
        monotone=1,
        why="an account already found abusing is never less suspicious for it",
        field="abuse_90d",
    ),
    # Account history beyond the log's window (tenure counters, about 13 months), before this
    # refund: how deep an account's ordinary history is tells a first claim from a habit.
    _f(
        "acct_orders_total",
        "account",
        "THIN_HISTORY",
        "Orders of the account recorded over its tenure (about 13 months).",
        kind="context",
        monotone=-1,
        why="with the refunds fixed, a longer history of orders is a lower refund rate",
        field="orders_total",
    ),
    _f(
        "acct_delivered_total",
        "account",
        "THIN_HISTORY",
        "Deliveries of the account's orders recorded over its tenure.",
        kind="context",
        monotone=-1,
        why="parcels that reached the buyer without a claim are ordinary history",
        field="delivered_total",
    ),
    _f(
        "acct_prior_refunds",
        "account",
        "HIGH_REFUND_RATE",
        "Refund requests of the account over its tenure, before this one.",
        field="prior_refunds",
    ),
    _f(
        "acct_prior_unreturned",
        "account",
        "REPEATED_UNRETURNED",
        "Refunds over the tenure, before this one, whose item did not come back.",
        monotone=1,
        why=_UP_ABUSE,
        derive=lambda raw, _: raw["prior_refunds"] - raw["prior_returned"],
    ),
    _f(
        "acct_prior_inr",
        "account",
        "SERIAL_NOT_RECEIVED",
        "'Not received' claims of the account over its tenure, before this one.",
        monotone=1,
        why=_UP_ABUSE,
        field="prior_inr",
    ),
    _f(
        "first_inr_claim",
        "account",
        "CLAIM_HISTORY",
        "1 for an account's first 'not received' claim over its tenure.",
        monotone=-1,
        why="a first claim is what a lost or stolen parcel looks like; a habit is not",
        derive=lambda raw, rf: 1.0 if rf.flags & F_INR and raw["prior_inr"] == 0 else 0.0,
    ),
    _f(
        "pair_refunds_30d",
        "account",
        "MERCHANT_COLLUSION",
        "Refund requests by this account at this merchant, 30 d.",
        field="pair_refunds_30d",
    ),
    _f(
        "pair_unreturned_30d",
        "account",
        "MERCHANT_COLLUSION",
        "Refunds by this account at this merchant, 30 d, before this one, not sent back.",
        monotone=1,
        why=_UP_ABUSE,
        field="pair_unreturned_30d",
    ),
    _f(
        "pair_orders_30d",
        "account",
        "MERCHANT_COLLUSION",
        "Orders by this account at this merchant, 30 d.",
        field="pair_orders_30d",
    ),
    _f(
        "order_refund_requests",
        "account",
        "SPLIT_REFUNDS",
        "Refund requests against this order, this one included.",
        field="order_refunds",
    ),
    _f(
        "order_refunded_ratio",
        "account",
        "SPLIT_REFUNDS",
        "Amount asked against this order so far, this request included / order amount.",
        monotone=1,
        why="asking back more of the same order is never less suspicious",
        derive=lambda raw, rf: raw["order_amount"] / rf.order_amount_minor,
    ),
    _f(
        "order_delivered_event",
        "account",
        "DELIVERY_STATUS",
        "1 if an ORDER_DELIVERED event was recorded for this order.",
        kind="context",
        field="order_delivered",
    ),
    # Device (exact, from its log; NaN when the request has no device).
    _f(
        "dev_accounts_24h",
        "device",
        "MANY_ACCOUNTS_ON_DEVICE",
        "Distinct accounts on the device, 24 h.",
        field="accounts_24h",
    ),
    _f("dev_accounts_7d", "device", "MANY_ACCOUNTS_ON_DEVICE", "... 7 d.", field="accounts_7d"),
    _f(
        "dev_refunds_1h",
        "device",
        "HIGH_REFUND_VELOCITY",
        "Refund requests from the device, 1 h.",
        field="refunds_1h",
    ),
    _f("dev_refunds_24h", "device", "HIGH_REFUND_VELOCITY", "... 24 h.", field="refunds_24h"),
    # IP (exact, from its log; NaN when the request has no IP).
    _f(
        "ip_accounts_24h",
        "ip",
        "MANY_ACCOUNTS_ON_IP",
        "Distinct accounts on the IP, 24 h.",
        field="accounts_24h",
    ),
    _f("ip_accounts_7d", "ip", "MANY_ACCOUNTS_ON_IP", "... 7 d.", field="accounts_7d"),
    _f(
        "ip_refunds_1h", "ip", "HIGH_REFUND_VELOCITY", "Refund requests from the IP, 1 h.", field="refunds_1h"
    ),
    _f("ip_refunds_24h", "ip", "HIGH_REFUND_VELOCITY", "... 24 h.", field="refunds_24h"),
    # Merchant (sliding-window estimates from hour and day counters).
    _f(
        "m_refunds_1h",
        "merchant",
        "MERCHANT_REFUND_SPIKE",
        "Refund requests at the merchant, 1 h.",
        field="refunds_1h",
    ),
    _f("m_refunds_24h", "merchant", "MERCHANT_REFUND_SPIKE", "... 24 h.", field="refunds_24h"),
    _f("m_refunds_7d", "merchant", "MERCHANT_REFUND_SPIKE", "... 7 d.", field="refunds_7d"),
    _f(
        "m_orders_7d",
        "merchant",
        "MERCHANT_REFUND_SPIKE",
        "Orders at the merchant, last 7 days.",
        field="orders_7d",
    ),
    _f(
        "m_refund_rate_7d",
        "merchant",
        "MERCHANT_REFUND_SPIKE",
        "Refunds / max(orders, 1), 7 d.",
        derive=lambda raw, _: _ratio(raw["refunds_7d"], raw["orders_7d"]),
    ),
    _f(
        "m_refund_spike",
        "merchant",
        "MERCHANT_REFUND_SPIKE",
        "Refunds in 24 h / max(daily mean over 7 d, 1).",
        derive=lambda raw, _: _ratio(raw["refunds_24h"], raw["refunds_7d"] / 7.0),
    ),
    _f(
        "m_returned_share_7d",
        "merchant",
        "MERCHANT_FEW_RETURNS",
        "Share of the merchant's refunds, 7 d, whose item came back.",
        monotone=-1,
        why="a shop whose refunds come back as goods is taking returns, not paying out cash",
        derive=lambda raw, _: _ratio(raw["returned_7d"], raw["refunds_7d"]),
    ),
    _f(
        "m_digital_quick_24h",
        "merchant",
        "REPEATED_QUICK_DIGITAL_REFUNDS",
        "Digital goods quick refunds at the merchant, 24 h.",
        field="digital_quick_24h",
    ),
    _f(
        "m_bnpl_refund_rate_7d",
        "merchant",
        "BNPL_CASHOUT",
        "BNPL refunds / max(BNPL orders, 1) at the merchant, 7 d.",
        derive=lambda raw, _: _ratio(raw["bnpl_refunds_7d"], raw["bnpl_orders_7d"]),
    ),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}
REQUEST_FEATURES = tuple(f.name for f in FEATURES if f.source == "request")
VELOCITY_SOURCES: tuple[Source, ...] = ("account", "device", "ip", "merchant")
MONOTONE: dict[str, int] = {f.name: f.monotone for f in FEATURES if f.monotone}
"""Feature name -> +1 (the score never falls as it grows) or -1 (never rises), all else equal."""
CONTEXT_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.kind == "context")
BEHAVIOUR_CODES: frozenset[str] = frozenset(
    f.reason for f in FEATURES if f.source != "request" and f.kind == "behaviour" and f.monotone >= 0
)
"""Reason codes backed by velocity counters of behaviour: the evidence a model REJECT needs. A
feature whose score falls as it grows (monotone -1: returns, history) credits its code when its
value is low, i.e. for the absence of something, so its codes are never behaviour evidence."""
assert not BEHAVIOUR_CODES & {f.reason for f in FEATURES if f.source == "request" or f.monotone < 0}, (
    "a behaviour code must not also be given for the request alone, or for an absence"
)
_BY_SOURCE: dict[str, tuple[tuple[int, Feature], ...]] = {
    s: tuple((i, f) for i, f in enumerate(FEATURES) if f.source == s) for s in VELOCITY_SOURCES
}
assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES), "feature names must be unique"
assert FEATURE_NAMES[: len(REQUEST_FEATURES)] == REQUEST_FEATURES, "request features come first"


def from_request(req: pb.CheckRequest, requested_at_s: float) -> RequestFeatures:
    """Derive the request features of a validated CheckRequest at its effective time."""
    order_at = req.order_created_at.seconds + req.order_created_at.nanos / 1e9
    minutes = (requested_at_s - order_at) / 60.0
    if req.HasField("account_created_at"):
        created = req.account_created_at.seconds + req.account_created_at.nanos / 1e9
        age_days = (requested_at_s - created) / 86400.0
    else:
        age_days = NAN
    inr = req.reason == pb.REFUND_REASON_ITEM_NOT_RECEIVED
    delivered = req.delivery_status == pb.DELIVERY_STATUS_DELIVERED
    digital_quick = req.item_category == pb.ITEM_CATEGORY_DIGITAL_GOODS and minutes <= QUICK_REFUND_MINUTES
    cm_unreturned = req.reason == pb.REFUND_REASON_CHANGED_MIND and not req.item_returned
    flags = (
        (F_INR if inr else 0)
        | (F_INR_DELIVERED if inr and delivered else 0)
        | (F_DIGITAL_QUICK if digital_quick else 0)
        | (F_CM_UNRETURNED if cm_unreturned else 0)
        | (F_BNPL if req.payment_method == pb.PAYMENT_METHOD_BNPL else 0)
        | (F_RETURNED if req.item_returned else 0)
    )
    named = {
        "minutes_order_to_request": minutes,
        "refund_order_ratio": req.amount_minor / req.order_amount_minor,
        "log10_amount": math.log10(req.amount_minor),
        "account_age_days": age_days,
        "reason_code": float(req.reason),
        "item_category": float(req.item_category),
        "delivery_status": float(req.delivery_status) if req.delivery_status else NAN,
        "payment_method": float(req.payment_method) if req.payment_method else NAN,
        "item_returned": 1.0 if req.item_returned else 0.0,
        "not_received_but_delivered": 1.0 if inr and delivered else 0.0,
        "digital_quick_refund": 1.0 if digital_quick else 0.0,
        "changed_mind_not_returned": 1.0 if cm_unreturned else 0.0,
    }
    return RequestFeatures(tuple(named[n] for n in REQUEST_FEATURES), flags, req.order_amount_minor)


def assemble(request: RequestFeatures, velocity: Mapping[Source, Mapping[str, float] | None]) -> list[float]:
    """The full vector in FEATURE_NAMES order; a source that is absent or failed stays NaN."""
    row = [NAN] * len(FEATURE_NAMES)
    row[: len(request.values)] = request.values
    for source in VELOCITY_SOURCES:
        raw = velocity.get(source)
        if raw is None:
            continue
        for i, f in _BY_SOURCE[source]:
            derive = f.derive
            row[i] = float(raw[f.field]) if derive is None else float(derive(raw, request))  # type: ignore[index]
    return row
