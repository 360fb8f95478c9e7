"""The velocity store against a real redis-server: windows, dedup, TTLs, trimming, hashing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis

from gate.devredis import RedisProcess
from gate.features import F_DIGITAL_QUICK, F_INR, F_RETURNED
from gate.redisclient import RedisAddress
from gate.redisdriver import SingleNodeDriver
from gate.velocity import (
    ACCOUNT_BUCKET_MS,
    ACCOUNT_BUCKETS,
    ACCOUNT_CAP,
    ACCOUNT_RECORD,
    ENTITY_BUCKET_MS,
    ENTITY_BUCKETS,
    ENTITY_CAP,
    ENTITY_RECORD,
    LOAD_SCRIPTS,
    IdHasher,
    RefundFacts,
    Status,
    VelocityStore,
)
from refundgate.v1 import refund_gate_pb2 as pb
from tests.conftest import NOW, make_request

HOUR = 3600.0
DAY = 86400.0


@pytest_asyncio.fixture
async def store(redis_proc: RedisProcess, rdb: redis.Redis) -> AsyncIterator[VelocityStore]:
    conn = SingleNodeDriver(
        RedisAddress.from_url(redis_proc.url), scripts=LOAD_SCRIPTS, connect_timeout_s=5.0
    )  # a loaded CI box may be slow to connect
    await conn.connect()
    yield VelocityStore(conn, prefix="rg", hasher=IdHasher("k" * 20), replay_ttl_s=3600)
    await conn.close()


def facts(store: VelocityStore, at: float = NOW, flags: int = 0, **kw: Any) -> RefundFacts:
    return store.refund_facts(make_request(**kw), at, flags)


async def read(store: VelocityStore, f: RefundFacts) -> dict[str, dict[str, int]]:
    result = await store.record_and_read(f, 2.0)
    assert result.complete
    return {k: v for k, v in result.counters.items() if v is not None}


async def test_one_round_trip_per_check(store: VelocityStore, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    real_call = store.driver.call

    async def counting_call(commands: Any, timeout_s: float) -> list[Any]:
        batches.append(len(commands))
        return await real_call(commands, timeout_s)

    monkeypatch.setattr(store.driver, "call", counting_call)
    await store.record_and_read(facts(store), 2.0)
    # the refund key; an MGET and a script each for the account, device and IP; the merchant's
    # script and ring
    assert batches == [9]


async def test_windows_slide_with_request_time(store: VelocityStore) -> None:
    for i, age in enumerate((40 * DAY, 8 * DAY, 2 * DAY, 3 * HOUR, 30 * 60)):
        await read(store, facts(store, at=NOW - age, refund_id=f"rf:{i}", order_id=f"o:{i}"))
    c = await read(store, facts(store, refund_id="rf:now", order_id="o:now"))
    assert [c["account"][k] for k in ("refunds_1h", "refunds_24h", "refunds_7d", "refunds_30d")] == [
        2,
        3,
        4,
        5,
    ]
    # merchant windows are estimates from hour and day buckets: see the test below
    assert [c["device"][k] for k in ("refunds_1h", "refunds_24h")] == [2, 3]


async def test_flags_amounts_pair_and_order(store: VelocityStore) -> None:
    await read(store, facts(store, flags=F_INR, refund_id="rf:1", amount_minor=1000))
    await read(
        store, facts(store, flags=F_DIGITAL_QUICK, refund_id="rf:2", amount_minor=700, merchant_id="m:other")
    )
    c = await read(store, facts(store, flags=F_INR, refund_id="rf:3", amount_minor=300))
    acct = c["account"]
    # Behaviour counts are of the refunds before this one (rf:1's claim, rf:2's quick refund).
    assert (acct["inr_30d"], acct["digital_quick_7d"], acct["amount_30d"]) == (1, 1, 2000)
    assert acct["pair_refunds_30d"] == 2  # rf:2 was at another merchant
    assert (acct["order_refunds"], acct["order_amount"]) == (3, 2000)


async def test_returned_unreturned_and_tenure_counts(store: VelocityStore) -> None:
    await read(store, facts(store, flags=F_RETURNED, refund_id="rf:1"))
    await read(store, facts(store, flags=F_INR, refund_id="rf:2"))
    first = await store.record_and_read(facts(store, flags=F_INR, refund_id="rf:3"), 2.0)
    retry = await store.record_and_read(facts(store, flags=F_INR, refund_id="rf:3"), 2.0)
    acct = first.counters["account"]
    assert acct is not None and retry.counters["account"] == acct  # a retry sees the same
    assert (acct["returned_30d"], acct["unreturned_30d"], acct["pair_unreturned_30d"]) == (1, 1, 1)
    assert (acct["prior_refunds"], acct["prior_returned"], acct["prior_inr"]) == (2, 1, 1)


async def test_distinct_ips_cities_devices_and_accounts(store: VelocityStore) -> None:
    for i, (ip, city) in enumerate(
        (("198.51.100.1", "BER"), ("198.51.100.2", "PAR"), ("198.51.100.1", "BER"))
    ):
        await read(store, facts(store, refund_id=f"rf:{i}", ip=ip, geo_city=city, account_id="acct:hop"))
    for i in range(3):
        await read(store, facts(store, refund_id=f"rf:d{i}", account_id=f"acct:{i}", device_id="dev:shared"))
    c = await read(
        store,
        facts(
            store,
            refund_id="rf:last",
            account_id="acct:hop",
            ip="2001:db8::1",
            geo_city="ROM",
            device_id="dev:shared",
        ),
    )
    assert (c["account"]["ips_24h"], c["account"]["cities_24h"]) == (3, 3)
    assert c["account"]["devices_30d"] == 2  # dev:1 and dev:shared
    assert c["device"]["accounts_24h"] == 4  # acct:0..2 and acct:hop


async def test_retry_counts_once_and_returns_the_same_windows(store: VelocityStore) -> None:
    f = facts(store)
    first = await store.record_and_read(f, 2.0)
    again = await store.record_and_read(f, 2.0)
    assert first.status == Status.COUNTED and again.status == Status.DUPLICATE
    assert first.counted == ["account", "device", "ip", "merchant"] and again.counted == []
    assert again.counters == first.counters


async def test_racing_duplicates_on_many_connections_count_once(
    store: VelocityStore, redis_proc: RedisProcess
) -> None:
    stores = []
    for _ in range(5):
        conn = SingleNodeDriver(
            RedisAddress.from_url(redis_proc.url), scripts=LOAD_SCRIPTS, connect_timeout_s=5.0
        )  # a loaded CI box may be slow to connect
        await conn.connect()
        stores.append(VelocityStore(conn, prefix="rg", hasher=IdHasher("k" * 20), replay_ttl_s=3600))
    try:
        f = facts(store)
        results = await asyncio.gather(*(stores[i % 5].record_and_read(f, 2.0) for i in range(50)))
    finally:
        for s in stores:
            await s.driver.close()
    assert sum(r.status == Status.COUNTED for r in results) == 1
    c = await read(store, facts(store, refund_id="rf:probe", order_id="o:p"))
    assert all(c[s]["refunds_24h"] == 2 for s in ("account", "device", "ip", "merchant"))


async def test_reused_refund_id_with_other_content_conflicts_and_writes_nothing(
    store: VelocityStore, rdb: redis.Redis
) -> None:
    await store.record_and_read(facts(store), 2.0)
    f = facts(store)
    log = store.keys.log("a", f.account, f.at_ms // ACCOUNT_BUCKET_MS)
    before = rdb.get(log)
    result = await store.record_and_read(facts(store, amount_minor=1), 2.0)
    assert result.status == Status.CONFLICT and result.counters["account"] is None
    assert rdb.get(log) == before


async def test_a_reused_id_names_only_the_entities_it_wrote_to(store: VelocityStore) -> None:
    await read(store, facts(store))
    result = await store.record_and_read(facts(store, device_id="dev:other", amount_minor=1), 2.0)
    assert result.status == Status.CONFLICT
    # the account, IP and merchant already held this refund id; the other device did not
    assert result.counted == ["device"]


async def test_every_key_expires_and_ids_are_hashed(store: VelocityStore, rdb: redis.Redis) -> None:
    f = facts(
        store, account_id="acct:SECRET", device_id="dev:SECRET", merchant_id="m:SECRET", order_id="ord:SECRET"
    )
    await read(store, f)
    ev = pb.Event(
        event_id="ev:SECRET",
        type=pb.EVENT_TYPE_ORDER_PLACED,
        account_id="acct:SECRET",
        merchant_id="m:SECRET",
        order_id="ord:SECRET",
        amount_minor=100,
        currency="EUR",
        item_category=pb.ITEM_CATEGORY_PHYSICAL,
        payment_method=pb.PAYMENT_METHOD_CARD,
        device_id="dev:SECRET",
        ip="192.0.2.9",
    )
    await store.record_events([ev], [NOW], 2.0)
    store.store_reply(f, b"payload")
    await store.driver.call([("PING",)], 2.0)
    keys = rdb.keys("*")
    assert len(keys) >= 9
    for key in keys:
        assert rdb.pttl(key) > 0, key
        assert b"SECRET" not in key and b"192.0.2.9" not in key
        assert b"SECRET" not in rdb.dump(key)  # type: ignore[operator]
    assert rdb.get(store.keys.refund(f.refund)) == f.marker + b"payload"


async def test_old_buckets_are_not_read_and_expire(store: VelocityStore, rdb: redis.Redis) -> None:
    old = facts(store, at=NOW - 100 * DAY, refund_id="rf:old", order_id="o:old")
    await read(store, old)
    c = await read(store, facts(store, refund_id="rf:new", order_id="o:2"))
    assert c["account"]["refunds_30d"] == 1 and c["device"]["refunds_24h"] == 1
    account_log = store.keys.log("a", old.account, old.at_ms // ACCOUNT_BUCKET_MS)
    device_log = store.keys.log("d", old.device, old.at_ms // ENTITY_BUCKET_MS)
    # a bucket lives only until the last Check that can read it, measured from its own time
    assert 0 < rdb.pttl(account_log) <= (ACCOUNT_BUCKETS + 1) * ACCOUNT_BUCKET_MS
    assert 0 < rdb.pttl(device_log) <= (ENTITY_BUCKETS + 1) * ENTITY_BUCKET_MS


async def test_a_full_log_bucket_keeps_its_newest_half(store: VelocityStore, rdb: redis.Redis) -> None:
    span = ACCOUNT_BUCKET_MS / 1000
    base = NOW // span * span + DAY  # well inside one bucket
    for i in range(200):
        await read(
            store,
            facts(
                store, at=base + i, refund_id=f"rf:{i}", order_id=f"o:{i}", device_id="", ip="", geo_city=""
            ),
        )
    f = facts(store, at=base + 200, refund_id="rf:last", order_id="o:last", device_id="", ip="", geo_city="")
    c = await read(store, f)
    log = rdb.get(store.keys.log("a", f.account, f.at_ms // ACCOUNT_BUCKET_MS))
    assert log is not None and len(log) <= ACCOUNT_CAP
    times = [r[3] for r in ACCOUNT_RECORD.iter_unpack(log)]
    newest = int((base + 200) * 1000)
    # what is kept is the newest run of records, down to the last one appended
    assert times == [newest - 1000 * i for i in range(len(times) - 1, -1, -1)]
    assert len(times) > ACCOUNT_CAP // ACCOUNT_RECORD.size // 2
    # every refund of the last 40 seconds is still counted
    assert c["account"]["refunds_1h"] >= 45


async def test_a_full_bucket_written_by_events_keeps_its_newest_half(
    store: VelocityStore, rdb: redis.Redis
) -> None:
    span = ENTITY_BUCKET_MS / 1000
    base = NOW // span * span + HOUR  # well inside one bucket
    events = [
        pb.Event(
            event_id=f"e{i}",
            type=pb.EVENT_TYPE_ORDER_PLACED,
            account_id=f"acct:{i}",
            merchant_id="m:1",
            order_id=f"o:{i}",
            amount_minor=100,
            currency="EUR",
            device_id="dev:busy",
        )
        for i in range(300)
    ]
    await store.record_events(events, [base + i for i in range(300)], 5.0)
    device = store.hash("d", "dev:busy")
    log = rdb.get(store.keys.log("d", device, int(base * 1000) // ENTITY_BUCKET_MS))
    assert log is not None and len(log) <= ENTITY_CAP
    times = [r[3] for r in ENTITY_RECORD.iter_unpack(log)]
    newest = int((base + 299) * 1000)
    assert times == [newest - 1000 * i for i in range(len(times) - 1, -1, -1)]
    assert len(times) > ENTITY_CAP // ENTITY_RECORD.size // 2


async def test_merchant_windows_are_sliding_estimates_from_day_buckets(
    store: VelocityStore,
) -> None:
    midnight = NOW // DAY * DAY
    for i, at in enumerate(
        (midnight - DAY + 6 * HOUR, midnight - 2 * HOUR, midnight + 5 * HOUR + 1, midnight + 5 * HOUR + 2)
    ):
        await read(store, facts(store, at=at, refund_id=f"rf:{i}", order_id=f"o:{i}"))
    c = await read(store, facts(store, at=midnight + 6 * HOUR, refund_id="rf:now", order_id="o:now"))
    m = c["merchant"]
    assert m["refunds_1h"] == 3  # this hour: 1; the last hour (5-6 h): 2, all of it left
    # today 3, yesterday 2 with three quarters of its day still inside the 24 h window
    assert m["refunds_24h"] == 3 + 2 * 0.75
    assert m["refunds_7d"] == 5


async def test_events_feed_orders_deliveries_and_outcomes(store: VelocityStore) -> None:
    def ev(**kw: Any) -> pb.Event:
        return pb.Event(account_id="acct:1", merchant_id="m:1", order_id="ord:1", **kw)

    events = [
        ev(
            event_id="e1",
            type=pb.EVENT_TYPE_ORDER_PLACED,
            amount_minor=5000,
            currency="EUR",
            payment_method=pb.PAYMENT_METHOD_BNPL,
        ),
        ev(event_id="e2", type=pb.EVENT_TYPE_ORDER_DELIVERED),
        ev(
            event_id="e3",
            type=pb.EVENT_TYPE_REFUND_OUTCOME,
            refund_id="rf:0",
            outcome=pb.REFUND_OUTCOME_CONFIRMED_ABUSE,
        ),
        ev(
            event_id="e4", type=pb.EVENT_TYPE_REFUND_OUTCOME, refund_id="rf:0", outcome=pb.REFUND_OUTCOME_PAID
        ),
    ]
    assert await store.record_events(events, [NOW - 60] * 4, 2.0) == [Status.COUNTED] * 4
    assert await store.record_events(events, [NOW - 60] * 4, 2.0) == [Status.DUPLICATE] * 4
    c = await read(store, facts(store))
    assert (c["account"]["orders_30d"], c["account"]["pair_orders_30d"]) == (1, 1)
    assert (c["account"]["order_delivered"], c["account"]["abuse_90d"]) == (1, 1)
    assert (c["merchant"]["orders_7d"], c["merchant"]["bnpl_orders_7d"]) == (1, 1)


async def test_scripts_are_reloaded_after_script_flush(store: VelocityStore, rdb: redis.Redis) -> None:
    rdb.script_flush()
    result = await store.record_and_read(facts(store), 2.0)
    assert result.complete and result.status == Status.COUNTED
    # the merchant's ring was read again after its resent script: this refund is in it
    assert result.counters["merchant"] is not None
    assert result.counters["merchant"]["refunds_24h"] == 1
    assert result.counted == ["account", "device", "ip", "merchant"]


async def test_a_merchant_event_older_than_the_ring_leaves_recent_days_alone(
    store: VelocityStore,
) -> None:
    await read(store, facts(store, refund_id="rf:today", order_id="o:1"))
    await read(store, facts(store, at=NOW - 18 * DAY, refund_id="rf:late", order_id="o:2"))
    c = await read(store, facts(store, refund_id="rf:probe", order_id="o:3"))
    assert c["merchant"]["refunds_24h"] == 2  # rf:today and the probe, not wiped by rf:late
