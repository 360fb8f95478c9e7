"""Redis failing for real: health that says so, the same answer on every retry, the outage
journal, and no raw identifier at rest."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gate.bundle import Bundle
from gate.devredis import RedisProcess, free_port, start_redis
from gate.settings import DEV_ID_KEY, Settings
from gate.velocity import ACCOUNT_RECORD, REFUND, IdHasher, Keys
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc
from tests.conftest import NOW, RunningGate, make_request, start_gate, stop_gate
from tests.faultproxy import FaultProxy
from tests.gateproc import start_gate_process

VELOCITY = "refundgate.v1.RefundGate/velocity"


async def velocity_status(running: RunningGate) -> int:
    stub = health_pb2_grpc.HealthStub(running.channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=VELOCITY))).status


async def test_failing_scripts_turn_velocity_not_serving_and_the_log_says_why(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle: Bundle, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_env(
        {},
        listen="127.0.0.1:0",
        redis_url=redis_proc.url,
        allow_client_time=True,
        budget_ms=250.0,
        velocity_health_interval_s=0.2,
        breaker_failures=1000,  # the breaker alone would not open: the share of degraded must tell
    )
    running = await start_gate(settings, bundle)
    try:
        rdb.config_set("maxmemory-policy", "noeviction")
        rdb.config_set("maxmemory", "1")  # every write fails with OOM; PING still answers
        with caplog.at_level(logging.WARNING, logger="gate.redishealth"):
            for i in range(20):
                resp = await running.stub.Check(make_request(refund_id=f"rf:oom{i}", order_id=f"o:oom{i}"))
                assert resp.degraded
            watch = health_pb2_grpc.HealthStub(running.channel).Watch(
                health_pb2.HealthCheckRequest(service=VELOCITY), timeout=10
            )
            async for update in watch:
                if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
            watch.cancel()
        lines = [r.getMessage() for r in caplog.records if "velocity not serving" in r.getMessage()]
        assert lines and "Checks degraded by Redis" in lines[0] and "OOM" in lines[0]
    finally:
        rdb.config_set("maxmemory", "0")
        await stop_gate(running)


async def test_no_raw_identifier_is_at_rest(gate: RunningGate, rdb: redis.Redis) -> None:
    ids = ["rf:RAW-1", "acct:RAW-2", "ord:RAW-3", "m:RAW-4", "dev:RAW-5", "ev:RAW-6"]
    req = make_request(
        refund_id=ids[0],
        account_id=ids[1],
        order_id=ids[2],
        merchant_id=ids[3],
        device_id=ids[4],
        ip="192.0.2.77",
    )
    first = await gate.stub.Check(req)
    again = await gate.stub.Check(req)
    assert again.refund_id == ids[0] and again.decision_id == first.decision_id  # filled from the request
    ev = pb.Event(
        event_id=ids[5],
        type=pb.EVENT_TYPE_ORDER_PLACED,
        account_id=ids[1],
        merchant_id=ids[3],
        order_id=ids[2],
        amount_minor=100,
        currency="EUR",
        item_category=pb.ITEM_CATEGORY_PHYSICAL,
        payment_method=pb.PAYMENT_METHOD_CARD,
        device_id=ids[4],
        ip="192.0.2.77",
    )
    ev.occurred_at.FromSeconds(int(NOW))
    await gate.stub.RecordEvents(pb.RecordEventsRequest(events=[ev]))
    assert gate.gate.decision_log is not None
    await gate.gate.decision_log.flush()
    await gate.gate.redis.call([("PING",)], 2.0)  # the stored answer went before this
    rdb.config_set("rdbcompression", "no")  # DUMP must not hide a raw id by compressing it
    keys = rdb.keys("*")
    assert any(k.startswith(b"rg:{r:") for k in keys) and b"rg:decisions" in keys
    dump = b"".join(k + (rdb.dump(k) or b"") for k in keys)  # type: ignore[operator]
    for raw in [*ids, "192.0.2.77"]:
        assert raw.encode() not in dump, raw


def scrape_journal(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^refundgate_outage_journal_total\{[^}]*event="(\w+)"[^}]*\} (\S+)$', text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def logged_refunds(client: redis.Redis, account: str) -> list[int]:
    keys = Keys("rg")
    h = IdHasher(DEV_ID_KEY)("a", account)
    raw = [client.get(k) for k in client.keys(keys.log("a", h, "*"))]
    return [r[1] for v in raw if v for r in ACCOUNT_RECORD.iter_unpack(v) if r[0] == REFUND]


async def test_an_outage_is_counted_once_later_and_retries_get_the_first_answer(bundle_dir: Path) -> None:
    server = start_redis()
    proxy = FaultProxy(server.port).start()
    admin = free_port()
    gate = start_gate_process(
        f"redis://127.0.0.1:{proxy.port}/0",
        bundle_dir,
        "--workers",
        "2",
        "--metrics-listen",
        f"127.0.0.1:{admin}",
        "--breaker-failures",
        "2",
    )
    workers = [f"127.0.0.1:{admin}", f"127.0.0.1:{admin + 1}"]
    n = 24
    requests = [
        make_request(
            refund_id=f"rf:out{i}",
            order_id=f"o:out{i}",
            account_id="acct:outage",
            amount_minor=1000 + i * 400,
        )
        for i in range(n)
    ]
    # Own connections (no shared subchannel), so the kernel spreads them over both workers.
    channels = [
        grpc.aio.insecure_channel(gate.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(12)
    ]
    try:
        stubs = [pb_grpc.RefundGateStub(c) for c in channels]
        proxy.set_mode("reset")
        first = [await stubs[i % 12].Check(r, timeout=5) for i, r in enumerate(requests)]
        assert all(r.degraded for r in first)
        proxy.set_mode("pass")
        deadline = time.monotonic() + 20
        while True:  # both workers' journals replayed what they journaled
            stats = [scrape_journal(w) for w in workers]
            if sum(s.get("replayed", 0) for s in stats) == n and all(s.get("journaled", 0) for s in stats):
                break
            assert time.monotonic() < deadline, f"journals never replayed: {stats}"
            await asyncio.sleep(0.1)
        retries = [await stubs[(i + 5) % 12].Check(r, timeout=5) for i, r in enumerate(requests)]
    finally:
        for c in channels:
            await c.close()
        gate.stop()
        proxy.stop()
    try:
        for original, retry in zip(first, retries, strict=True):
            assert retry.replayed and (retry.decision, retry.decision_id) == (
                original.decision,
                original.decision_id,
            )
        assert sum(s.get("dropped", 0) for s in stats) == 0
        counted = logged_refunds(server.client(), "acct:outage")
        assert len(counted) == len(set(counted)) == n  # each refund of the outage, exactly once
    finally:
        server.stop()
