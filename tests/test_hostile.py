"""Hostile input against a real gate process: property-based requests and raw-bytes fuzz.

Whatever arrives: no crash, never INTERNAL or UNKNOWN, bad input is INVALID_ARGUMENT, and an
invalid request creates no Redis key.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gate.devredis import RedisProcess, start_redis
from gate.settings import DEV_ID_KEY
from gate.velocity import MARKER_LEN, IdHasher, Keys
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc
from tests.conftest import make_request
from tests.gateproc import GateProcess, start_gate_process

OK_OR_INVALID = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=100, max_size=3000),
    st.sampled_from(
        [
            "",
            " ",
            "rf:1",
            "x" * 128,
            "x" * 129,
            "\x00",
            "e\u0301" * 50,
            "🙂" * 64,
            "1.2.3.4",
            "::1",
            "EUR",
            "eur",
            "‮RLO",
            "%s%n",
            "' OR 1=1 --",
        ]
    ),
)
FIELDS = {
    "refund_id": TEXT,
    "account_id": TEXT,
    "order_id": TEXT,
    "merchant_id": TEXT,
    "currency": TEXT,
    "device_id": TEXT,
    "ip": TEXT,
    "geo_city": TEXT,
    "amount_minor": INT64,
    "order_amount_minor": INT64,
    "reason": INT32,
    "item_category": INT32,
    "delivery_status": INT32,
    "payment_method": INT32,
    "item_returned": st.booleans(),
}
TIMESTAMPS = ("order_created_at", "account_created_at", "requested_at")
_unique = itertools.count()
_keys = Keys("rg")
_hash = IdHasher(DEV_ID_KEY)


@dataclass
class Target:
    redis: RedisProcess
    gate: GateProcess
    channel: grpc.Channel
    stub: pb_grpc.RefundGateStub
    client: redis.Redis

    def keys(self) -> int:
        return int(self.client.dbsize())

    def settled(self, refund_id: str, resp: pb.CheckResponse) -> None:
        """A counted answer is stored just after it is sent; wait (bounded) until it is, so
        the next example's key count starts from a still state."""
        if resp.degraded or resp.replayed:
            return
        deadline = time.monotonic() + 2
        key = _keys.refund(_hash("r", refund_id))
        while len(self.client.get(key) or b"") <= MARKER_LEN:
            assert time.monotonic() < deadline, "stored answer never appeared"


@pytest.fixture(scope="module")
def target(bundle_dir: Path) -> Iterator[Target]:
    server = start_redis()
    gate = start_gate_process(server.url, bundle_dir)
    channel = grpc.insecure_channel(gate.target)
    try:
        yield Target(server, gate, channel, pb_grpc.RefundGateStub(channel), server.client())
    finally:
        channel.close()
        gate.stop()
        server.stop()


@st.composite
def requests(draw: st.DrawFn) -> pb.CheckRequest:
    """A valid request with some fields replaced by hostile values, or cleared."""
    req = make_request(refund_id=f"rf:h{next(_unique):09d}", requested_at=time.time())
    for name in draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=5)):
        setattr(req, name, draw(FIELDS[name]))
    for name in draw(st.sets(st.sampled_from(TIMESTAMPS), max_size=2)):
        ts = getattr(req, name)
        if draw(st.booleans()):
            req.ClearField(name)  # type: ignore[arg-type]
        else:
            ts.seconds = draw(st.one_of(INT64, st.sampled_from([0, -62135596800, 253402300799])))
            ts.nanos = draw(st.one_of(INT32, st.just(0)))
    return req


def status_of(call: object) -> tuple[grpc.StatusCode, object]:
    try:
        return grpc.StatusCode.OK, call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code(), None  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests())
def test_any_check_request_is_answered_or_refused_precisely(target: Target, req: pb.CheckRequest) -> None:
    before = target.keys()
    code, resp = status_of(lambda: target.stub.Check(req, timeout=5))
    assert code in OK_OR_INVALID
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert target.keys() == before
    else:
        target.settled(req.refund_id, resp)  # type: ignore[arg-type]


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid request's bytes truncated, bit-flipped or spliced."""
    # A random id: a flipped bit in a counter-made id can turn it into an earlier example's id,
    # and the gate then rightly answers ALREADY_EXISTS (same refund id, different request).
    valid = make_request(
        refund_id=f"rf:r{uuid.uuid4().hex}", requested_at=float(int(time.time()))
    ).SerializeToString()
    kind = draw(st.sampled_from(["random", "truncate", "flip", "splice"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(valid) - 1))
        return valid[:i] + bytes([valid[i] ^ (1 << draw(st.integers(0, 7)))]) + valid[i + 1 :]
    return valid + draw(st.binary(min_size=1, max_size=64))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=raw_bodies(), method=st.sampled_from(["Check", "RecordEvents"]))
def test_raw_bytes_never_crash_or_leak_internal(target: Target, body: bytes, method: str) -> None:
    call = target.channel.unary_unary(
        f"/refundgate.v1.RefundGate/{method}", request_serializer=None, response_deserializer=None
    )
    before = target.keys()
    code, raw = status_of(lambda: call(body, timeout=5))
    assert code in OK_OR_INVALID
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert target.keys() == before
    elif method == "Check":
        resp = pb.CheckResponse.FromString(raw)  # type: ignore[arg-type]
        target.settled(resp.refund_id, resp)


def test_undecodable_bytes_name_the_request(target: Target) -> None:
    call = target.channel.unary_unary(
        "/refundgate.v1.RefundGate/Check", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as info:
        call(b"\xff\xff\xff\xff", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "request" in info.value.details()  # type: ignore[attr-defined]


def test_oversized_messages_are_refused_by_the_size_limit(target: Target) -> None:
    before = target.keys()
    req = make_request(geo_city="x" * 100_000)
    with pytest.raises(grpc.RpcError) as info:
        target.stub.Check(req, timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert target.keys() == before


def test_the_gate_still_serves_after_the_fuzz(target: Target) -> None:
    resp = target.stub.Check(make_request(refund_id="rf:after-fuzz", requested_at=time.time()))
    assert resp.decision != pb.DECISION_UNSPECIFIED and not resp.degraded
