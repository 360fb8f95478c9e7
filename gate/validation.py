"""Request validation: every rule of the contract, checked before any I/O.

A bad request gets INVALID_ARGUMENT with a ``google.rpc.BadRequest`` that names every violated
field. Descriptions state the rule, never the offending value: values may be identifiers or
amounts, which must not travel into logs, spans or error messages.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from refundgate.v1 import refund_gate_pb2 as pb

MAX_ID_LEN = 128
MAX_CITY_LEN = 64
MAX_IP_LEN = 45  # the longest textual IPv6 address (with an embedded IPv4 tail)
# Timestamps are accepted from 2000-01-01 to 2100-01-01: anything outside is a client bug.
MIN_TS_S = 946_684_800
MAX_TS_S = 4_102_444_800

_REFUND_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CURRENCY = re.compile(r"[A-Z]{3}")

_REASONS = frozenset(pb.RefundReason.values()) - {pb.REFUND_REASON_UNSPECIFIED}
_CATEGORIES = frozenset(pb.ItemCategory.values()) - {pb.ITEM_CATEGORY_UNSPECIFIED}
_DELIVERY = frozenset(pb.DeliveryStatus.values())
_PAYMENT = frozenset(pb.PaymentMethod.values())
_EVENT_TYPES = frozenset(pb.EventType.values()) - {pb.EVENT_TYPE_UNSPECIFIED}
_OUTCOMES = frozenset(pb.RefundOutcome.values()) - {pb.REFUND_OUTCOME_UNSPECIFIED}


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule: the field path (as in the request) and the rule, without the value."""

    field: str
    description: str


class ValidationError(ValueError):
    """The request breaks one or more contract rules; carries every violation."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


def _ts_seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


class _Checker:
    __slots__ = ("prefix", "violations")

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.violations: list[Violation] = []

    def bad(self, name: str, description: str) -> None:
        self.violations.append(Violation(self.prefix + name, description))

    def ident(self, name: str, value: str, *, required: bool) -> None:
        if not value:
            if required:
                self.bad(name, "is required")
        elif len(value) > MAX_ID_LEN:
            self.bad(name, f"must be at most {MAX_ID_LEN} characters")
        elif not value.isprintable():
            self.bad(name, "must not contain control or non-printable characters")

    def refund_id(self, name: str, value: str, *, required: bool = True) -> None:
        if not value:
            if required:
                self.bad(name, "is required")
        elif _REFUND_ID.fullmatch(value) is None:
            self.bad(name, "must be 1-128 characters of [A-Za-z0-9._:-]")

    def positive(self, name: str, value: int) -> None:
        if value <= 0:
            self.bad(name, "must be greater than zero")

    def currency(self, name: str, value: str) -> None:
        if _CURRENCY.fullmatch(value) is None:
            self.bad(name, "must be an ISO 4217 code of three upper-case letters")

    def enum(self, name: str, value: int, allowed: frozenset[int], rule: str) -> None:
        if value not in allowed:
            self.bad(name, rule)

    def timestamp(self, name: str, ts: Timestamp) -> bool:
        if not 0 <= ts.nanos <= 999_999_999:
            self.bad(name, "nanos must be within 0..999999999")
            return False
        if not MIN_TS_S <= ts.seconds < MAX_TS_S:
            self.bad(name, "must be between 2000-01-01 and 2100-01-01")
            return False
        return True

    def client_time(
        self,
        name: str,
        msg: pb.CheckRequest | pb.Event,
        now_s: float,
        allow_client_time: bool,
        skew_s: float,
    ) -> float:
        """The effective time of the request: the client's if valid, else the server clock."""
        if not msg.HasField(name):  # type: ignore[arg-type]
            return now_s
        ts: Timestamp = getattr(msg, name)
        if not self.timestamp(name, ts):
            return now_s
        at = _ts_seconds(ts)
        if not allow_client_time and abs(at - now_s) > skew_s:
            self.bad(name, f"must be within {int(skew_s)} seconds of the server clock")
        return at

    def optional_text(self, name: str, value: str, limit: int) -> None:
        if len(value) > limit:
            self.bad(name, f"must be at most {limit} characters")
        elif value and not value.isprintable():
            self.bad(name, "must not contain control or non-printable characters")

    def ip(self, name: str, value: str) -> None:
        if not value:
            return
        if len(value) > MAX_IP_LEN:
            self.bad(name, "must be a valid IPv4 or IPv6 address")
            return
        try:
            ipaddress.ip_address(value)
        except ValueError:
            self.bad(name, "must be a valid IPv4 or IPv6 address")


def validate_check(req: pb.CheckRequest, *, now_s: float, allow_client_time: bool, skew_s: float) -> float:
    """Check a CheckRequest against the contract; return its effective request time (epoch s).

    Raises ValidationError listing every violated field.
    """
    c = _Checker()
    c.refund_id("refund_id", req.refund_id)
    c.ident("account_id", req.account_id, required=True)
    c.ident("order_id", req.order_id, required=True)
    c.ident("merchant_id", req.merchant_id, required=True)
    c.positive("amount_minor", req.amount_minor)
    c.positive("order_amount_minor", req.order_amount_minor)
    c.currency("currency", req.currency)
    c.enum("reason", req.reason, _REASONS, "must be a RefundReason other than UNSPECIFIED")
    c.enum("item_category", req.item_category, _CATEGORIES, "must be an ItemCategory other than UNSPECIFIED")
    c.enum("delivery_status", req.delivery_status, _DELIVERY, "must be a known DeliveryStatus")
    c.enum("payment_method", req.payment_method, _PAYMENT, "must be a known PaymentMethod")
    requested_at = c.client_time("requested_at", req, now_s, allow_client_time, skew_s)
    if not req.HasField("order_created_at"):
        c.bad("order_created_at", "is required")
    elif (
        c.timestamp("order_created_at", req.order_created_at)
        and _ts_seconds(req.order_created_at) > requested_at
    ):
        c.bad("order_created_at", "must not be after requested_at")
    if (
        req.HasField("account_created_at")
        and c.timestamp("account_created_at", req.account_created_at)
        and _ts_seconds(req.account_created_at) > requested_at
    ):
        c.bad("account_created_at", "must not be after requested_at")
    c.ident("device_id", req.device_id, required=False)
    c.ip("ip", req.ip)
    c.optional_text("geo_city", req.geo_city, MAX_CITY_LEN)
    if c.violations:
        raise ValidationError(c.violations)
    return requested_at


def validate_events(
    req: pb.RecordEventsRequest,
    *,
    now_s: float,
    allow_client_time: bool,
    skew_s: float,
    max_events: int,
) -> list[float]:
    """Check every event of a RecordEvents batch; return each event's effective time.

    One bad event rejects the whole batch (nothing is counted), so a caller never has to work out
    which part of a batch landed.
    """
    violations: list[Violation] = []
    if not req.events:
        violations.append(Violation("events", "must contain at least one event"))
    elif len(req.events) > max_events:
        violations.append(Violation("events", f"must contain at most {max_events} events"))
    times: list[float] = []
    for i, ev in enumerate(req.events[:max_events]):
        c = _Checker(f"events[{i}].")
        c.refund_id("event_id", ev.event_id)
        c.enum("type", ev.type, _EVENT_TYPES, "must be an EventType other than UNSPECIFIED")
        if not ev.HasField("occurred_at"):
            c.bad("occurred_at", "is required")
            at = now_s
        else:
            at = c.client_time("occurred_at", ev, now_s, allow_client_time, skew_s)
        times.append(at)
        if ev.type in (pb.EVENT_TYPE_ORDER_PLACED, pb.EVENT_TYPE_ORDER_DELIVERED):
            c.ident("account_id", ev.account_id, required=True)
            c.ident("merchant_id", ev.merchant_id, required=True)
            c.ident("order_id", ev.order_id, required=True)
        if ev.type == pb.EVENT_TYPE_ORDER_PLACED:
            c.positive("amount_minor", ev.amount_minor)
            c.currency("currency", ev.currency)
            c.enum(
                "item_category",
                ev.item_category,
                _CATEGORIES,
                "must be an ItemCategory other than UNSPECIFIED",
            )
            c.enum("payment_method", ev.payment_method, _PAYMENT, "must be a known PaymentMethod")
        elif ev.amount_minor < 0:
            c.bad("amount_minor", "must not be negative")
        if ev.type == pb.EVENT_TYPE_REFUND_OUTCOME:
            c.ident("account_id", ev.account_id, required=True)
            c.refund_id("refund_id", ev.refund_id)
            c.enum("outcome", ev.outcome, _OUTCOMES, "must be a RefundOutcome other than UNSPECIFIED")
        if ev.HasField("account_created_at"):
            c.timestamp("account_created_at", ev.account_created_at)
        c.ident("device_id", ev.device_id, required=False)
        c.ip("ip", ev.ip)
        c.optional_text("geo_city", ev.geo_city, MAX_CITY_LEN)
        violations.extend(c.violations)
    if violations:
        raise ValidationError(violations)
    return times
