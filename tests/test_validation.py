"""Every contract rule, checked before any I/O; violations name fields, never values."""

from __future__ import annotations

import pytest

from gate.validation import ValidationError, validate_check, validate_events
from refundgate.v1 import refund_gate_pb2 as pb
from tests.conftest import NOW, make_request


def violations(req: pb.CheckRequest, *, allow_client_time: bool = False) -> dict[str, str]:
    try:
        validate_check(req, now_s=NOW, allow_client_time=allow_client_time, skew_s=300)
    except ValidationError as err:
        return {v.field: v.description for v in err.violations}
    return {}


def test_a_valid_request_passes_and_defaults_to_the_server_clock() -> None:
    assert validate_check(make_request(), now_s=NOW, allow_client_time=False, skew_s=300) == NOW


@pytest.mark.parametrize("refund_id", ["", "a b", "x" * 129, "é", "a/b"])
def test_refund_id_charset_and_length(refund_id: str) -> None:
    assert "refund_id" in violations(make_request(refund_id=refund_id))


@pytest.mark.parametrize("field", ["account_id", "order_id", "merchant_id"])
def test_required_ids(field: str) -> None:
    assert violations(make_request(**{field: ""})) == {field: "is required"}
    assert field in violations(make_request(**{field: "x" * 129}))


@pytest.mark.parametrize("field", ["amount_minor", "order_amount_minor"])
@pytest.mark.parametrize("value", [0, -1, -(2**63)])
def test_amounts_must_be_positive(field: str, value: int) -> None:
    assert field in violations(make_request(**{field: value}))


@pytest.mark.parametrize("currency", ["", "eur", "EURO", "E1R"])
def test_currency_is_iso_4217_shaped(currency: str) -> None:
    assert "currency" in violations(make_request(currency=currency))


def test_unspecified_and_unknown_enums_are_refused() -> None:
    req = make_request(reason=pb.REFUND_REASON_UNSPECIFIED, item_category=pb.ITEM_CATEGORY_UNSPECIFIED)
    req.payment_method = 99  # an enum number the contract does not know
    assert set(violations(req)) == {"reason", "item_category", "payment_method"}


def test_order_created_at_required_and_not_after_request() -> None:
    req = make_request()
    req.ClearField("order_created_at")
    assert violations(req) == {"order_created_at": "is required"}
    assert "order_created_at" in violations(make_request(order_created_at=NOW + 10))


def test_requested_at_far_from_the_server_clock() -> None:
    req = make_request(requested_at=NOW - 3600)
    assert "requested_at" in violations(req)
    assert violations(req, allow_client_time=True) == {}


def test_timestamps_at_the_edges_are_refused() -> None:
    req = make_request()
    req.requested_at.seconds = 2**40
    assert "requested_at" in violations(req, allow_client_time=True)
    req = make_request()
    req.account_created_at.nanos = -1
    assert "account_created_at" in violations(req)


@pytest.mark.parametrize("ip", ["1.2.3", "::g", "1.2.3.4 ", "x" * 60])
def test_ip_must_parse(ip: str) -> None:
    assert "ip" in violations(make_request(ip=ip))


@pytest.mark.parametrize("ip", ["", "10.0.0.1", "2001:db8::1", "::ffff:192.0.2.1"])
def test_valid_or_absent_ip(ip: str) -> None:
    assert violations(make_request(ip=ip)) == {}


def test_control_characters_and_long_optional_fields() -> None:
    assert set(violations(make_request(device_id="a\x00b", geo_city="c" * 65))) == {"device_id", "geo_city"}


def test_every_violation_is_reported_without_values() -> None:
    req = make_request(refund_id="secret value!", account_id="", amount_minor=-5, currency="x")
    with pytest.raises(ValidationError) as info:
        validate_check(req, now_s=NOW, allow_client_time=False, skew_s=300)
    err = info.value
    assert {v.field for v in err.violations} == {"refund_id", "account_id", "amount_minor", "currency"}
    assert "secret" not in str(err) and "-5" not in str(err)


def _event(**kw: object) -> pb.Event:
    ev = pb.Event(
        event_id="ev:1",
        type=pb.EVENT_TYPE_ORDER_PLACED,
        account_id="a",
        merchant_id="m",
        order_id="o",
        amount_minor=100,
        currency="EUR",
        item_category=pb.ITEM_CATEGORY_PHYSICAL,
        payment_method=pb.PAYMENT_METHOD_CARD,
    )
    ev.occurred_at.FromSeconds(int(NOW))
    for k, v in kw.items():
        setattr(ev, k, v)
    return ev


def test_event_batches_are_checked_per_event() -> None:
    req = pb.RecordEventsRequest(
        events=[_event(), _event(type=pb.EVENT_TYPE_UNSPECIFIED), _event(amount_minor=0)]
    )
    with pytest.raises(ValidationError) as info:
        validate_events(req, now_s=NOW, allow_client_time=False, skew_s=300, max_events=10)
    err = info.value
    assert {v.field for v in err.violations} == {"events[1].type", "events[2].amount_minor"}


def test_empty_and_oversized_event_batches() -> None:
    for events, max_events in (([], 10), ([_event()] * 3, 2)):
        with pytest.raises(ValidationError, match="events"):
            validate_events(
                pb.RecordEventsRequest(events=events),
                now_s=NOW,
                allow_client_time=False,
                skew_s=300,
                max_events=max_events,
            )
