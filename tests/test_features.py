"""The feature spec: one ordered list; unknown values are NaN, never 0."""

from __future__ import annotations

import math

from gate import features
from gate.features import FEATURE_INDEX, FEATURE_NAMES, FEATURES
from gate.velocity import ACCOUNT_FIELDS, ENTITY_FIELDS, MERCHANT_FIELDS
from refundgate.v1 import refund_gate_pb2 as pb
from tests.conftest import NOW, make_request


def test_names_are_unique_and_request_features_come_first() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    sources = [f.source for f in FEATURES]
    assert sources == sorted(sources, key=lambda s: s != "request")


def test_request_features() -> None:
    req = make_request(
        reason=pb.REFUND_REASON_ITEM_NOT_RECEIVED,
        item_category=pb.ITEM_CATEGORY_DIGITAL_GOODS,
        order_created_at=NOW - 1800,
        amount_minor=1000,
        order_amount_minor=4000,
        payment_method=pb.PAYMENT_METHOD_BNPL,
    )
    rf = features.from_request(req, NOW)
    row = features.assemble(rf, {})
    assert math.isclose(row[FEATURE_INDEX["minutes_order_to_request"]], 30.0)
    assert row[FEATURE_INDEX["refund_order_ratio"]] == 0.25
    assert row[FEATURE_INDEX["not_received_but_delivered"]] == 1.0
    assert row[FEATURE_INDEX["digital_quick_refund"]] == 1.0
    assert rf.flags == (
        features.F_INR
        | features.F_INR_DELIVERED
        | features.F_DIGITAL_QUICK
        | features.F_BNPL
        | (features.F_RETURNED if req.item_returned else 0)
    )


def test_unknown_values_are_nan() -> None:
    req = make_request()
    req.ClearField("account_created_at")
    row = features.assemble(features.from_request(req, NOW), {"account": None})
    assert math.isnan(row[FEATURE_INDEX["account_age_days"]])
    velocity = [i for i, f in enumerate(FEATURES) if f.source != "request"]
    assert all(math.isnan(row[i]) for i in velocity)


def test_each_velocity_source_fills_exactly_its_features() -> None:
    rf = features.from_request(make_request(), NOW)
    raw = {
        "account": dict.fromkeys(ACCOUNT_FIELDS, 1),
        "device": dict.fromkeys(ENTITY_FIELDS, 2),
        "merchant": dict.fromkeys(MERCHANT_FIELDS, 3),
    }
    row = features.assemble(rf, raw)  # type: ignore[arg-type]
    for i, f in enumerate(FEATURES):
        assert math.isnan(row[i]) == (f.source == "ip"), f.name


FIELDS = {
    "account": ACCOUNT_FIELDS,
    "device": ENTITY_FIELDS,
    "ip": ENTITY_FIELDS,
    "merchant": MERCHANT_FIELDS,
}


def test_every_velocity_field_lands_in_its_own_feature() -> None:
    """Each counter gets a distinct value; a feature reading it by name shows exactly that value,
    and every counter the store returns is read by some feature."""
    rf = features.from_request(make_request(), NOW)
    raw: dict[str, dict[str, float]] = {}
    value = 101.0
    for source, names in FIELDS.items():
        raw[source] = {}
        for name in names:
            raw[source][name] = value
            value += 1.0
    row = features.assemble(rf, raw)  # type: ignore[arg-type]
    read: dict[str, set[str]] = {s: set() for s in FIELDS}
    for i, f in enumerate(FEATURES):
        if f.field is not None:
            assert row[i] == raw[f.source][f.field], f.name
            read[f.source].add(f.field)
    seen_values = [row[i] for i, f in enumerate(FEATURES) if f.field is not None]
    assert len(seen_values) == len(set(seen_values)), "two features read the same counter"
    for source, names in FIELDS.items():
        derived_inputs = {"returned_30d", "refunds_30d", "orders_30d", "prior_returned", "order_amount"}
        derived_inputs |= {"bnpl_refunds_7d", "bnpl_orders_7d", "returned_7d", "refunds_7d"}
        unread = set(names) - read[source] - derived_inputs
        assert not unread, f"{source} counters read by no feature: {unread}"


def test_derived_features_compute_from_named_counters() -> None:
    rf = features.from_request(make_request(reason=pb.REFUND_REASON_ITEM_NOT_RECEIVED), NOW)
    account = dict.fromkeys(ACCOUNT_FIELDS, 0.0)
    account.update(refunds_30d=4, returned_30d=3, orders_30d=8, prior_refunds=5, prior_returned=2)
    row = features.assemble(rf, {"account": account})
    assert row[FEATURE_INDEX["acct_returned_share_30d"]] == 0.75
    assert row[FEATURE_INDEX["acct_refund_rate_30d"]] == 0.5
    assert row[FEATURE_INDEX["acct_prior_unreturned"]] == 3
    assert row[FEATURE_INDEX["first_inr_claim"]] == 1.0
    account["prior_inr"] = 1
    assert features.assemble(rf, {"account": account})[FEATURE_INDEX["first_inr_claim"]] == 0.0


def test_monotone_features_say_why() -> None:
    assert features.MONOTONE["item_returned"] == -1
    assert features.MONOTONE["account_age_days"] == -1
    assert all(FEATURES[FEATURE_INDEX[n]].why for n in features.MONOTONE)
