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
        features.F_INR | features.F_INR_DELIVERED | features.F_DIGITAL_QUICK | features.F_BNPL
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
