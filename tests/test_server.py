"""The Check path end to end: real gRPC socket, real redis-server, real model bundle."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from gate.bundle import Bundle
from gate.devredis import RedisProcess, free_port
from gate.server import MIN_REDIS, redis_version
from gate.settings import Settings
from gate.velocity import MARKER_LEN
from refundgate.v1 import refund_gate_pb2 as pb
from tests.conftest import RunningGate, make_request, start_gate, stop_gate


def field_violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    out: dict[str, str] = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        out.update({v.field: v.description for v in bad.field_violations})
    return out


def velocity_keys(rdb: redis.Redis) -> list[bytes]:
    return [k for k in rdb.keys("*") if not k.endswith(b":bl")]


async def test_check_returns_a_decision_from_the_model(gate: RunningGate) -> None:
    resp = await gate.stub.Check(make_request())
    assert resp.refund_id == "rf:1"
    assert resp.decision in (pb.DECISION_APPROVE, pb.DECISION_HOLD_FOR_REVIEW, pb.DECISION_REJECT)
    assert resp.HasField("score") and 0.0 <= resp.score <= 1.0
    assert resp.model_version == "test-model-1"
    assert not resp.degraded and not resp.replayed
    assert resp.decision_id.startswith("d-")


async def test_invalid_request_names_every_bad_field_and_counts_nothing(
    gate: RunningGate, rdb: redis.Redis
) -> None:
    req = make_request(
        refund_id="bad id!",
        amount_minor=0,
        currency="eur",
        reason=pb.REFUND_REASON_UNSPECIFIED,
        ip="999.1.1.1",
    )
    req.ClearField("order_created_at")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gate.stub.Check(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = field_violations(info.value)
    assert set(bad) == {"refund_id", "amount_minor", "currency", "reason", "ip", "order_created_at"}
    assert "999" not in info.value.details() and "bad id" not in str(bad)
    assert rdb.dbsize() == 0


async def test_bad_order_time_is_rejected_before_any_io(gate: RunningGate, rdb: redis.Redis) -> None:
    now = time.time()
    req = make_request(order_created_at=now + 3600, requested_at=now)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gate.stub.Check(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == {"order_created_at": "must not be after requested_at"}
    assert rdb.dbsize() == 0


async def test_retry_returns_the_stored_answer_and_counts_nothing(
    gate: RunningGate, rdb: redis.Redis
) -> None:
    first = await gate.stub.Check(make_request())
    await _until_stored(gate, rdb)
    before = _snapshot(rdb)
    again = await gate.stub.Check(make_request())
    await _until_stored(gate, rdb)
    assert again.replayed and not first.replayed
    assert (again.decision, again.score, again.decision_id) == (
        first.decision,
        first.score,
        first.decision_id,
    )
    assert _snapshot(rdb) == before


async def test_reused_refund_id_with_other_content_is_already_exists(
    gate: RunningGate, rdb: redis.Redis
) -> None:
    await gate.stub.Check(make_request())
    await _until_stored(gate, rdb)
    before = _snapshot(rdb)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gate.stub.Check(make_request(amount_minor=4999))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert _snapshot(rdb) == before


async def test_reused_refund_id_on_another_account_is_taken_back(gate: RunningGate, rdb: redis.Redis) -> None:
    await gate.stub.Check(make_request())
    await _until_stored(gate, rdb)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gate.stub.Check(make_request(account_id="acct:other", device_id="dev:other"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    resp = await gate.stub.Check(
        make_request(refund_id="rf:2", account_id="acct:other", device_id="dev:other", order_id="ord:2")
    )
    assert resp.decision  # the other account's first real refund counts as its first
    store = gate.gate.service.store
    rf_facts = store.refund_facts(
        make_request(refund_id="rf:3", account_id="acct:other", device_id="dev:other", order_id="ord:3"),
        time.time(),
        0,
    )
    velocity = await store.record_and_read(rf_facts, 1.0)
    assert velocity.counters["account"] is not None
    assert velocity.counters["account"]["refunds_24h"] == 2  # rf:2 and rf:3, not the conflict
    assert velocity.counters["device"] is not None
    assert velocity.counters["device"]["refunds_24h"] == 2


async def test_fifty_concurrent_identical_checks_count_once(gate: RunningGate, rdb: redis.Redis) -> None:
    responses = await asyncio.gather(*(gate.stub.Check(make_request()) for _ in range(50)))
    assert len({r.decision_id for r in responses}) == 1
    assert sum(not r.replayed for r in responses) == 1
    store = gate.gate.service.store
    probe = store.refund_facts(make_request(refund_id="rf:probe", order_id="ord:p"), time.time(), 0)
    velocity = await store.record_and_read(probe, 1.0)
    for source in ("account", "device", "ip", "merchant"):
        counters = velocity.counters[source]
        assert counters is not None
        assert counters["refunds_24h"] == 2, source  # the 50 copies once, plus the probe


async def test_split_partial_refunds_past_the_order_amount_are_rejected(gate: RunningGate) -> None:
    first = await gate.stub.Check(make_request(refund_id="rf:a", amount_minor=3000))
    assert "REFUND_EXCEEDS_ORDER" not in {r.code for r in first.reasons}
    second = await gate.stub.Check(make_request(refund_id="rf:b", amount_minor=2500))
    assert second.decision == pb.DECISION_REJECT
    assert "REFUND_EXCEEDS_ORDER" in {r.code for r in second.reasons}


async def test_refund_above_order_amount_is_rejected(gate: RunningGate) -> None:
    resp = await gate.stub.Check(make_request(amount_minor=6000, order_amount_minor=5000))
    assert resp.decision == pb.DECISION_REJECT
    assert resp.reasons[0].code == "REFUND_EXCEEDS_ORDER"


async def test_blocklisted_device_is_rejected(gate: RunningGate, redis_proc: RedisProcess) -> None:
    from gate.blocklist import Blocklist

    Blocklist.from_settings(gate.settings).add("device", "dev:1", note="test")
    resp = await gate.stub.Check(make_request())
    assert resp.decision == pb.DECISION_REJECT
    assert "BLOCKLISTED_DEVICE" in {r.code for r in resp.reasons}


async def test_hold_and_reject_carry_model_reasons(gate: RunningGate) -> None:
    risky = [
        make_request(refund_id=f"rf:{i}", order_id=f"ord:{i}", reason=pb.REFUND_REASON_ITEM_NOT_RECEIVED)
        for i in range(6)
    ]
    responses = [await gate.stub.Check(r) for r in risky]
    flagged = [r for r in responses if r.decision != pb.DECISION_APPROVE]
    assert flagged, "the test model flags repeated 'not received' on delivered orders"
    for resp in flagged:
        codes = [r.code for r in resp.reasons]
        assert codes and len(codes) == len(set(codes))
        assert all(r.detail for r in resp.reasons)
        assert {"NOT_RECEIVED_BUT_DELIVERED", "HIGH_REFUND_VELOCITY"} & set(codes)


async def test_record_events_counts_each_event_id_once(gate: RunningGate) -> None:
    now = time.time()
    ev = pb.Event(
        event_id="ev:1",
        type=pb.EVENT_TYPE_ORDER_PLACED,
        account_id="acct:1",
        merchant_id="m:1",
        order_id="ord:9",
        amount_minor=1000,
        currency="EUR",
        item_category=pb.ITEM_CATEGORY_PHYSICAL,
        payment_method=pb.PAYMENT_METHOD_BNPL,
    )
    ev.occurred_at.FromNanoseconds(int(now * 1e9))
    first = await gate.stub.RecordEvents(pb.RecordEventsRequest(events=[ev]))
    again = await gate.stub.RecordEvents(pb.RecordEventsRequest(events=[ev, ev]))
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (again.accepted, again.duplicates) == (0, 2)
    store = gate.gate.service.store
    velocity = await store.record_and_read(store.refund_facts(make_request(), now, 0), 1.0)
    assert velocity.counters["account"] is not None and velocity.counters["merchant"] is not None
    assert velocity.counters["account"]["orders_30d"] == 1
    assert velocity.counters["merchant"]["orders_7d"] == 1
    assert velocity.counters["merchant"]["bnpl_orders_7d"] == 1


async def test_record_events_rejects_a_bad_batch_whole(gate: RunningGate, rdb: redis.Redis) -> None:
    good = pb.Event(
        event_id="ev:1",
        type=pb.EVENT_TYPE_ORDER_DELIVERED,
        account_id="acct:1",
        merchant_id="m:1",
        order_id="ord:1",
    )
    good.occurred_at.GetCurrentTime()
    bad = pb.Event(event_id="ev:2", type=pb.EVENT_TYPE_REFUND_OUTCOME, account_id="acct:1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gate.stub.RecordEvents(pb.RecordEventsRequest(events=[good, bad]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(info.value)) == {
        "events[1].occurred_at",
        "events[1].refund_id",
        "events[1].outcome",
    }
    assert rdb.dbsize() == 0


async def test_health_is_serving_once_model_and_redis_are_ready(gate: RunningGate) -> None:
    stub = health_pb2_grpc.HealthStub(gate.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="refundgate.v1.RefundGate"), timeout=5)
    seen = []
    async for update in watch:  # NOT_SERVING (maybe) until Redis answered, then SERVING
        seen.append(update.status)
        if update.status == health_pb2.HealthCheckResponse.SERVING:
            break
    watch.cancel()
    assert seen[-1] == health_pb2.HealthCheckResponse.SERVING


async def test_health_is_not_serving_without_redis(bundle: Bundle) -> None:
    settings = Settings.from_env({}, listen="127.0.0.1:0", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    running = await start_gate(settings, bundle, ready=False)
    try:
        stub = health_pb2_grpc.HealthStub(running.channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await stop_gate(running)


async def test_reflection_lists_the_services(gate: RunningGate) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(gate.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    async for resp in call:
        names = {s.name for s in resp.list_services_response.service}
        break
    assert {"refundgate.v1.RefundGate", "grpc.health.v1.Health"} <= names


async def test_redis_down_gives_a_degraded_decision_in_budget(bundle: Bundle) -> None:
    settings = Settings.from_env(
        {},
        listen="127.0.0.1:0",
        degraded_approve_below_minor=1000,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    running = await start_gate(settings, bundle, ready=False)
    try:
        started = time.monotonic()
        small = await running.stub.Check(make_request(amount_minor=100))
        large = await running.stub.Check(make_request(refund_id="rf:2", amount_minor=4000))
        elapsed = time.monotonic() - started
    finally:
        await stop_gate(running)
    assert small.degraded and large.degraded
    assert "FEATURES_UNAVAILABLE" in {r.code for r in small.reasons}
    assert large.decision != pb.DECISION_APPROVE  # above the degraded approve-below amount
    assert elapsed < 2 * settings.budget_ms / 1000 + 0.5


async def test_no_model_is_unavailable(redis_proc: RedisProcess, rdb: redis.Redis) -> None:
    settings = Settings.from_env({}, listen="127.0.0.1:0", redis_url=redis_proc.url)
    running = await start_gate(settings, None, ready=False)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Check(make_request())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_gate(running)
    assert rdb.dbsize() == 0


async def _until_stored(gate: RunningGate, rdb: redis.Redis) -> None:
    """The answer and the decision log entry are written off the hot path on the gate's own
    pipelined connection: once the log queue is flushed, a PING sent after them on that
    connection returns only when Redis has run both."""
    assert gate.gate.decision_log is not None
    await gate.gate.decision_log.flush()
    await gate.gate.redis.call([("PING",)], timeout_s=2)
    stored = [rdb.get(key) or b"" for key in rdb.keys("rg:{r:*")]
    assert any(len(v) > MARKER_LEN for v in stored), "stored answer is missing"


def _snapshot(rdb: redis.Redis) -> dict[bytes, object]:
    out: dict[bytes, object] = {}
    for key in rdb.keys("*"):
        kind = rdb.type(key)
        if kind == b"zset":
            out[key] = rdb.zrange(key, 0, -1, withscores=True)
        elif kind == b"hash":
            out[key] = rdb.hgetall(key)
        elif kind == b"stream":
            out[key] = [fields for _, fields in rdb.xrange(key)]
        else:
            out[key] = rdb.get(key)
    return out


def test_the_redis_version_is_read_from_info_server() -> None:
    info = b"# Server\r\nredis_version:6.2.14\r\nredis_mode:standalone\r\n"
    assert redis_version(info) == (6, 2, 14) and redis_version(info) < MIN_REDIS
    assert redis_version(b"redis_version:7.0.15\r\n") >= MIN_REDIS
    assert redis_version(b"# Server\r\n") == (0,)
