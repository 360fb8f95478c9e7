"""The feature vector: one ordered spec, used by serving, training and the model manifest.

``FEATURES`` is the single source of truth. Training builds its rows with ``assemble`` (through
the same velocity code, replayed against Redis), the bundle's manifest records ``FEATURE_NAMES``,
and the gate refuses a model whose feature list differs. Unknown values are NaN, never 0: a
missing device is not a device with zero accounts, and LightGBM routes NaN on its own branch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from refundgate.v1 import refund_gate_pb2 as pb

NAN = math.nan
Source = Literal["request", "account", "device", "ip", "merchant"]

# Flag bits of one refund, stored in its log record (gate/velocity.py reads them back).
F_INR = 1  # "item not received" claim
F_INR_DELIVERED = 2  # ... on an order logistics shows as delivered
F_DIGITAL_QUICK = 4  # digital goods refund asked within an hour of the order
F_CM_UNRETURNED = 8  # "changed my mind" with the item not returned
F_BNPL = 16  # paid with buy-now-pay-later

QUICK_REFUND_MINUTES = 60.0


@dataclass(frozen=True, slots=True)
class Feature:
    """One model input: its name, where it comes from, the reason code it supports, and why."""

    name: str
    source: Source
    reason: str
    doc: str


def _f(name: str, source: Source, reason: str, doc: str) -> Feature:
    return Feature(name, source, reason, doc)


FEATURES: tuple[Feature, ...] = (
    # From the request alone: always known.
    _f("minutes_order_to_request", "request", "REFUND_TIMING", "Minutes from order to refund request."),
    _f("refund_order_ratio", "request", "REFUND_SHARE_OF_ORDER", "Refund amount / order amount."),
    _f("log10_amount", "request", "HIGH_REFUND_AMOUNT", "log10 of the refund amount (minor units)."),
    _f("account_age_days", "request", "NEW_ACCOUNT", "Days since the account was created; NaN if unknown."),
    _f("reason_code", "request", "REFUND_REASON", "RefundReason enum number."),
    _f("item_category", "request", "ITEM_CATEGORY", "ItemCategory enum number."),
    _f("delivery_status", "request", "DELIVERY_STATUS", "DeliveryStatus enum number; NaN if UNSPECIFIED."),
    _f("payment_method", "request", "PAYMENT_METHOD", "PaymentMethod enum number; NaN if UNSPECIFIED."),
    _f("item_returned", "request", "ITEM_NOT_RETURNED", "1 if the item came back to the merchant."),
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
    _f("acct_refunds_1h", "account", "HIGH_REFUND_VELOCITY", "Refund requests by the account, 1 h."),
    _f("acct_refunds_24h", "account", "HIGH_REFUND_VELOCITY", "... 24 h."),
    _f("acct_refunds_7d", "account", "HIGH_REFUND_VELOCITY", "... 7 d."),
    _f("acct_refunds_30d", "account", "HIGH_REFUND_VELOCITY", "... 30 d."),
    _f(
        "acct_refund_amount_30d",
        "account",
        "HIGH_REFUND_VELOCITY",
        "Sum of refund amounts asked by the account, 30 d (minor units).",
    ),
    _f("acct_inr_30d", "account", "SERIAL_NOT_RECEIVED", "'Not received' claims by the account, 30 d."),
    _f(
        "acct_inr_delivered_30d",
        "account",
        "NOT_RECEIVED_BUT_DELIVERED",
        "'Not received' claims on delivered orders, 30 d.",
    ),
    _f(
        "acct_digital_quick_7d",
        "account",
        "DIGITAL_GOODS_QUICK_REFUND",
        "Digital goods refunds within an hour of the order, 7 d.",
    ),
    _f(
        "acct_changed_mind_unreturned_30d",
        "account",
        "ITEM_NOT_RETURNED",
        "'Changed my mind' refunds without return, 30 d.",
    ),
    _f("acct_orders_30d", "account", "HIGH_REFUND_RATE", "Orders placed by the account, 30 d."),
    _f("acct_refund_rate_30d", "account", "HIGH_REFUND_RATE", "Refund requests / max(orders, 1), 30 d."),
    _f("acct_ips_24h", "account", "IP_CITY_HOPPING", "Distinct IPs of the account, 24 h."),
    _f("acct_cities_24h", "account", "IP_CITY_HOPPING", "Distinct cities of the account, 24 h."),
    _f("acct_devices_30d", "account", "DEVICE_HISTORY", "Distinct devices of the account, 30 d."),
    _f(
        "acct_abuse_outcomes_90d",
        "account",
        "PRIOR_CONFIRMED_ABUSE",
        "Confirmed abuse, chargeback or rejected-on-review outcomes, 90 d.",
    ),
    _f(
        "pair_refunds_30d",
        "account",
        "MERCHANT_COLLUSION",
        "Refund requests by this account at this merchant, 30 d.",
    ),
    _f("pair_orders_30d", "account", "MERCHANT_COLLUSION", "Orders by this account at this merchant, 30 d."),
    _f(
        "order_refund_requests",
        "account",
        "SPLIT_REFUNDS",
        "Refund requests against this order, this one included.",
    ),
    _f(
        "order_refunded_ratio",
        "account",
        "REFUND_SHARE_OF_ORDER",
        "Amount asked against this order so far, this request included / order amount.",
    ),
    _f(
        "order_delivered_event",
        "account",
        "DELIVERY_STATUS",
        "1 if an ORDER_DELIVERED event was recorded for this order.",
    ),
    # Device (exact, from its log; NaN when the request has no device).
    _f("dev_accounts_24h", "device", "MANY_ACCOUNTS_ON_DEVICE", "Distinct accounts on the device, 24 h."),
    _f("dev_accounts_7d", "device", "MANY_ACCOUNTS_ON_DEVICE", "... 7 d."),
    _f("dev_refunds_1h", "device", "HIGH_REFUND_VELOCITY", "Refund requests from the device, 1 h."),
    _f("dev_refunds_24h", "device", "HIGH_REFUND_VELOCITY", "... 24 h."),
    # IP (exact, from its log; NaN when the request has no IP).
    _f("ip_accounts_24h", "ip", "MANY_ACCOUNTS_ON_IP", "Distinct accounts on the IP, 24 h."),
    _f("ip_accounts_7d", "ip", "MANY_ACCOUNTS_ON_IP", "... 7 d."),
    _f("ip_refunds_1h", "ip", "HIGH_REFUND_VELOCITY", "Refund requests from the IP, 1 h."),
    _f("ip_refunds_24h", "ip", "HIGH_REFUND_VELOCITY", "... 24 h."),
    # Merchant (sliding-window estimates from hour and day counters).
    _f("m_refunds_1h", "merchant", "MERCHANT_REFUND_SPIKE", "Refund requests at the merchant, 1 h."),
    _f("m_refunds_24h", "merchant", "MERCHANT_REFUND_SPIKE", "... 24 h."),
    _f("m_refunds_7d", "merchant", "MERCHANT_REFUND_SPIKE", "... 7 d."),
    _f("m_orders_7d", "merchant", "MERCHANT_REFUND_SPIKE", "Orders at the merchant, last 7 days."),
    _f("m_refund_rate_7d", "merchant", "MERCHANT_REFUND_SPIKE", "Refunds / max(orders, 1), 7 d."),
    _f(
        "m_refund_spike",
        "merchant",
        "MERCHANT_REFUND_SPIKE",
        "Refunds in 24 h / max(daily mean over 7 d, 1).",
    ),
    _f(
        "m_digital_quick_24h",
        "merchant",
        "DIGITAL_GOODS_QUICK_REFUND",
        "Digital goods quick refunds at the merchant, 24 h.",
    ),
    _f(
        "m_bnpl_refund_rate_7d",
        "merchant",
        "BNPL_CASHOUT",
        "BNPL refunds / max(BNPL orders, 1) at the merchant, 7 d.",
    ),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}
REQUEST_FEATURES = tuple(f.name for f in FEATURES if f.source == "request")
VELOCITY_SOURCES: tuple[Source, ...] = ("account", "device", "ip", "merchant")
_BY_SOURCE: dict[str, tuple[int, ...]] = {
    s: tuple(i for i, f in enumerate(FEATURES) if f.source == s) for s in VELOCITY_SOURCES
}
assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES), "feature names must be unique"


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """What the request alone says: the request part of the vector plus the refund's flag bits."""

    values: tuple[float, ...]
    flags: int
    order_amount_minor: int


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
    )
    values = (
        minutes,
        req.amount_minor / req.order_amount_minor,
        math.log10(req.amount_minor),
        age_days,
        float(req.reason),
        float(req.item_category),
        float(req.delivery_status) if req.delivery_status else NAN,
        float(req.payment_method) if req.payment_method else NAN,
        1.0 if req.item_returned else 0.0,
        1.0 if inr and delivered else 0.0,
        1.0 if digital_quick else 0.0,
        1.0 if cm_unreturned else 0.0,
    )
    return RequestFeatures(values, flags, req.order_amount_minor)


def _ratio(num: float, den: float) -> float:
    return num / (den if den > 1 else 1.0)


def velocity_values(source: Source, raw: Mapping[str, float], order_amount_minor: int) -> tuple[float, ...]:
    """Turn one velocity script's counters (named as in gate/velocity.py) into features."""
    if source == "account":
        return (
            raw["refunds_1h"],
            raw["refunds_24h"],
            raw["refunds_7d"],
            raw["refunds_30d"],
            raw["amount_30d"],
            raw["inr_30d"],
            raw["inr_delivered_30d"],
            raw["digital_quick_7d"],
            raw["cm_unreturned_30d"],
            raw["orders_30d"],
            _ratio(raw["refunds_30d"], raw["orders_30d"]),
            raw["ips_24h"],
            raw["cities_24h"],
            raw["devices_30d"],
            raw["abuse_90d"],
            raw["pair_refunds_30d"],
            raw["pair_orders_30d"],
            raw["order_refunds"],
            raw["order_amount"] / order_amount_minor,
            raw["order_delivered"],
        )
    if source in ("device", "ip"):
        return (raw["accounts_24h"], raw["accounts_7d"], raw["refunds_1h"], raw["refunds_24h"])
    return (
        raw["refunds_1h"],
        raw["refunds_24h"],
        raw["refunds_7d"],
        raw["orders_7d"],
        _ratio(raw["refunds_7d"], raw["orders_7d"]),
        _ratio(raw["refunds_24h"], raw["refunds_7d"] / 7.0),
        raw["digital_quick_24h"],
        _ratio(raw["bnpl_refunds_7d"], raw["bnpl_orders_7d"]),
    )


def assemble(request: RequestFeatures, velocity: Mapping[Source, Mapping[str, float] | None]) -> list[float]:
    """The full vector in FEATURE_NAMES order; a source that is absent or failed stays NaN."""
    row = [NAN] * len(FEATURE_NAMES)
    row[: len(request.values)] = request.values
    for source in VELOCITY_SOURCES:
        raw = velocity.get(source)
        if raw is None:
            continue
        for i, value in zip(
            _BY_SOURCE[source], velocity_values(source, raw, request.order_amount_minor), strict=True
        ):
            row[i] = float(value)
    return row
