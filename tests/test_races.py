"""Idempotency under races and a flapping Redis: nothing is lost, nothing is counted twice.

10,000 Checks (20 % retries, part of them concurrent with the original) and a stream of
RecordEvents (20 % repeated event ids) go through a real gate process while the fault proxy in
front of Redis resets connections on and off. Callers then retry what came back degraded or
UNAVAILABLE, as a refund service would. Afterwards every counter in Redis equals the number of
distinct refund ids (and event ids) behind it.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from gate.devredis import start_redis
from gate.settings import DEV_ID_KEY
from gate.velocity import (
    ACCOUNT_RECORD,
    DAY_MS,
    ENTITY_RECORD,
    M_ORDERS,
    M_REFUNDS,
    ORDER,
    REFUND,
    IdHasher,
    Keys,
    merchant_days,
)
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc
from tests.conftest import NOW, make_request
from tests.faultproxy import FaultProxy
from tests.gateproc import GateProcess, start_gate_process

CHECKS = 10_000
RETRY_SHARE = 0.2
EVENTS = 2_000
BATCH = 100
_hash = IdHasher(DEV_ID_KEY)
_keys = Keys("rg")


def logged(client: redis.Redis, entity: str, h: str, record: struct.Struct, kind: int) -> int:
    """Records of one kind in every log bucket of an account, device or IP, read raw."""
    raw = [client.get(key) for key in client.keys(_keys.log(entity, h, "*"))]
    return sum(r[0] == kind for value in raw if value for r in record.iter_unpack(value))


def merchant_count(client: redis.Redis, merchant: str, counter: int) -> int:
    """One counter summed over the merchant's days in the ring, read raw."""
    ring = client.get(_keys.ring(_hash("m", merchant)))
    return sum(day[counter] for day in merchant_days(ring, int(NOW * 1000) // DAY_MS))


@pytest.fixture(scope="module")
def rig(bundle_dir: Path) -> Iterator[tuple[GateProcess, FaultProxy, object]]:
    redis = start_redis()
    proxy = FaultProxy(redis.port).start()
    gate = start_gate_process(
        f"redis://127.0.0.1:{proxy.port}/0",
        bundle_dir,
        "--budget-ms",
        "50",
        "--max-concurrency",
        "1000",
        "--shed-start",
        "1000",
    )  # idempotency, not overload, is tested here
    try:
        yield gate, proxy, redis
    finally:
        gate.stop()
        proxy.stop()
        redis.stop()


def refund(i: int) -> pb.CheckRequest:
    rng = random.Random(i)
    return make_request(
        refund_id=f"rf:race{i}",
        order_id=f"ord:race{i}",
        account_id=f"acct:{rng.randrange(400)}",
        device_id=f"dev:{rng.randrange(250)}",
        ip=f"198.51.100.{rng.randrange(200)}",
        merchant_id=f"m:{rng.randrange(40)}",
        amount_minor=100 + rng.randrange(2000),
    )


def traffic() -> list[int]:
    """Refund indexes in arrival order: each distinct refund once, plus 20 % retries, some of
    them right next to their original (so they race it), some later."""
    rng = random.Random(42)
    distinct = int(CHECKS * (1 - RETRY_SHARE))
    order = list(range(distinct))
    for _ in range(CHECKS - distinct):
        i = rng.randrange(distinct)
        at = order.index(i) + rng.choice([0, 1, 2, rng.randrange(1, CHECKS // 2)])
        order.insert(min(at, len(order)), i)
    return order


async def flap(proxy: FaultProxy, stop: asyncio.Event) -> int:
    """Reset Redis connections every 150 ms for 30 ms, until told to stop."""
    flaps = 0
    while not stop.is_set():
        await asyncio.sleep(0.15)
        await asyncio.to_thread(proxy.set_mode, "reset")
        await asyncio.sleep(0.03)
        await asyncio.to_thread(proxy.set_mode, "pass")
        flaps += 1
    return flaps


def counts_match(client: redis.Redis, order: list[int]) -> bool:
    """True when every account, device, IP and merchant holds each of its refunds once."""
    expected: dict[str, Counter[str]] = {k: Counter() for k in ("a", "d", "i", "m")}
    for i in set(order):
        req = refund(i)
        expected["a"][req.account_id] += 1
        expected["d"][req.device_id] += 1
        expected["i"][req.ip] += 1
        expected["m"][req.merchant_id] += 1
    for account, n in expected["a"].items():
        if logged(client, "a", _hash("a", account), ACCOUNT_RECORD, REFUND) != n:
            return False
    for kind in ("d", "i"):
        for entity, n in expected[kind].items():
            if logged(client, kind, _hash(kind, entity), ENTITY_RECORD, REFUND) != n:
                return False
    return all(merchant_count(client, m, M_REFUNDS) == n for m, n in expected["m"].items())


async def test_checks_count_each_refund_once_through_flaps(rig: tuple) -> None:
    gate, proxy, redis = rig
    order = traffic()
    async with grpc.aio.insecure_channel(gate.target) as channel:
        stub = pb_grpc.RefundGateStub(channel)
        stop = asyncio.Event()
        flapper = asyncio.create_task(flap(proxy, stop))
        first_pass: list[pb.CheckResponse] = []
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            first_pass += await asyncio.gather(*(stub.Check(refund(i), timeout=5) for i in batch))
        stop.set()
        flaps = await flapper
        # Every refund retried once Redis is steady: it gets the answer it was first given.
        retries = []
        distinct = sorted(set(order))
        for start in range(0, len(distinct), BATCH):
            batch = distinct[start : start + BATCH]
            retries += await asyncio.gather(*(stub.Check(refund(i), timeout=5) for i in batch))

    assert flaps >= 3, "the storm must actually flap Redis"
    assert any(r.degraded for r in first_pass), "some calls must have met the flaps"
    given: dict[str, set[tuple[int, str]]] = defaultdict(set)  # answers not claimed as replays
    replayed: dict[str, set[tuple[int, str]]] = defaultdict(set)
    for resp in [*first_pass, *retries]:
        (replayed if resp.replayed else given)[resp.refund_id].add((resp.decision, resp.decision_id))
    for refund_id, answers in replayed.items():  # one answer replayed, and one that was given
        assert len(answers) == 1 and answers <= given[refund_id], refund_id
    assert sum(r.replayed for r in retries) >= 0.9 * len(retries)
    # Refunds decided while Redis flapped are counted by the outage journal once it is steady.
    client = redis.client()
    deadline = time.monotonic() + 15
    while not counts_match(client, order):
        assert time.monotonic() < deadline, "counts never settled to each refund once"
        await asyncio.sleep(0.1)


def order_event(i: int) -> pb.Event:
    rng = random.Random(10_000 + i)
    ev = pb.Event(
        event_id=f"ev:race{i}",
        type=pb.EVENT_TYPE_ORDER_PLACED,
        account_id=f"acct:{rng.randrange(300)}",
        merchant_id=f"m:{rng.randrange(30)}",
        order_id=f"ord:ev{i}",
        amount_minor=1000,
        currency="EUR",
        item_category=pb.ITEM_CATEGORY_PHYSICAL,
        payment_method=pb.PAYMENT_METHOD_CARD,
    )
    ev.occurred_at.FromSeconds(int(NOW))
    return ev


async def record_until_accepted(
    stub: pb_grpc.RefundGateStub, events: list[pb.Event]
) -> pb.RecordEventsResponse:
    for _ in range(200):
        try:
            return await stub.RecordEvents(pb.RecordEventsRequest(events=events), timeout=5)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.code()
            await asyncio.sleep(0.01)
    raise AssertionError("events never accepted")


async def test_events_count_each_event_id_once_through_flaps(rig: tuple) -> None:
    gate, proxy, redis = rig
    rng = random.Random(7)
    stream = list(range(EVENTS)) + [rng.randrange(EVENTS) for _ in range(EVENTS // 4)]
    rng.shuffle(stream)
    async with grpc.aio.insecure_channel(gate.target) as channel:
        stub = pb_grpc.RefundGateStub(channel)
        stop = asyncio.Event()
        flapper = asyncio.create_task(flap(proxy, stop))
        started = time.monotonic()
        responses = await asyncio.gather(
            *(
                record_until_accepted(stub, [order_event(i) for i in stream[s : s + 25]])
                for s in range(0, len(stream), 25)
            )
        )
        stop.set()
        await flapper
    assert time.monotonic() - started < 60
    # A call cut off by a reset may have counted its events before failing; its retry then
    # reports them as duplicates. So `accepted` can only fall short, and Redis must be exact.
    assert sum(r.accepted for r in responses) <= EVENTS
    assert sum(r.accepted + r.duplicates for r in responses) == len(stream)

    client = redis.client()
    per_account: Counter[str] = Counter(order_event(i).account_id for i in range(EVENTS))
    for account, n in per_account.items():
        assert logged(client, "a", _hash("a", account), ACCOUNT_RECORD, ORDER) == n, account
    per_merchant: Counter[str] = Counter(order_event(i).merchant_id for i in range(EVENTS))
    for merchant, n in per_merchant.items():
        assert merchant_count(client, merchant, M_ORDERS) == n, merchant
