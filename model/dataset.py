"""Point-in-time training set: simulated traffic replayed, in time order, through the gate's own
validation, RecordEvents and Check feature path against a real Redis.

No feature is computed here: every row is what ``gate.service.observe`` returned at that moment,
exactly as a live Check would have seen it. Requests go out on one pipelined connection in time
order, and Redis runs them in that order, so many can be in flight without breaking causality.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gate.redisclient import RedisAddress, RedisConnection
from gate.service import observe, prepare
from gate.validation import validate_check, validate_events
from gate.velocity import LOAD_SCRIPTS, IdHasher, VelocityStore
from model.simulate import SimRecord
from refundgate.v1 import refund_gate_pb2 as pb

IN_FLIGHT = 512
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Dataset:
    """Feature rows of every simulated refund request, with labels, scenarios and times.

    ``amount``, ``order_amount`` and ``order_asked`` (all requests against the order so far, this
    one included, as the account script counted them) are what the gate's guard rules look at
    besides the row (``gate.policy.Facts``), so evaluation can decide exactly as the gate does.
    ``records`` counts every replayed record, events included.
    """

    X: np.ndarray
    y: np.ndarray
    scenario: np.ndarray
    at: np.ndarray
    amount: np.ndarray
    order_amount: np.ndarray
    order_asked: np.ndarray
    records: int

    def __len__(self) -> int:
        return len(self.y)


async def build_dataset(
    records: Iterable[SimRecord], redis_url: str, *, id_hash_key: str = "training-key-0123456789"
) -> Dataset:
    """Replay ``records`` (time-ordered) through the gate against the Redis at ``redis_url``."""
    conn = RedisConnection(RedisAddress.from_url(redis_url), connect_timeout_s=5.0, on_connect=LOAD_SCRIPTS)
    await conn.connect()
    store = VelocityStore(conn, prefix="train", hasher=IdHasher(id_hash_key), replay_ttl_s=86400)
    rows: list[list[float]] = []
    amounts: list[int] = []
    order_amounts: list[int] = []
    asked: list[int] = []
    labels: list[int] = []
    scenarios: list[str] = []
    times: list[float] = []
    tasks: list[asyncio.Future[object]] = []
    events: list[pb.Event] = []
    started = time.monotonic()

    def flush_events() -> None:
        if events:
            batch = pb.RecordEventsRequest(events=events)
            at = validate_events(batch, now_s=0.0, allow_client_time=True, skew_s=0.0, max_events=len(events))
            tasks.append(asyncio.ensure_future(store.record_events(batch.events, at, TIMEOUT_S)))
            events.clear()

    async def check(req: pb.CheckRequest, slot: int) -> None:
        at = validate_check(req, now_s=0.0, allow_client_time=True, skew_s=0.0)
        rf, facts = prepare(store, req, at)
        velocity, row, _ = await observe(store, rf, facts, TIMEOUT_S)
        account = velocity.counters.get("account") if velocity is not None else None
        if velocity is None or not velocity.complete or account is None:
            raise RuntimeError("velocity store failed while building the training set")
        rows[slot] = row
        asked[slot] = account["order_amount"]

    n = 0
    for n, rec in enumerate(records, 1):
        if rec.event is not None:
            events.append(rec.event)
            if len(events) >= 200:
                flush_events()
            continue
        assert rec.check is not None
        flush_events()
        rows.append([])
        amounts.append(rec.check.amount_minor)
        order_amounts.append(rec.check.order_amount_minor)
        asked.append(0)
        labels.append(rec.label)
        scenarios.append(rec.scenario)
        times.append(rec.at)
        tasks.append(asyncio.ensure_future(check(rec.check, len(rows) - 1)))
        if len(tasks) >= IN_FLIGHT:
            await asyncio.gather(*tasks)
            tasks.clear()
        if n % 100_000 == 0:
            print(
                f"  replayed {n:,} records ({len(rows):,} refunds) in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
            )
    flush_events()
    await asyncio.gather(*tasks)
    await conn.close()
    print(
        f"  replayed {n:,} records ({len(rows):,} refunds) in {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )
    return Dataset(
        np.asarray(rows, dtype=np.float64),
        np.asarray(labels, dtype=np.int8),
        np.asarray(scenarios),
        np.asarray(times),
        amount=np.asarray(amounts, dtype=np.int64),
        order_amount=np.asarray(order_amounts, dtype=np.int64),
        order_asked=np.asarray(asked, dtype=np.int64),
        records=n,
    )
