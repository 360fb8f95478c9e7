"""Point-in-time training set: history records (model/records.py: a model owner's own export, or
the simulator's) replayed, in time order, through the gate's own validation, RecordEvents and
Check feature path against a real Redis, then labelled from the outcomes (model/labels.py).

No feature is computed here: every row is what ``gate.pipeline.observe`` returned at that moment,
exactly as a live Check would have seen it. Requests go out on one pipelined connection in time
order, and Redis runs them in that order, so many can be in flight without breaking causality.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gate.pipeline import observe, prepare
from gate.redisclient import RedisAddress
from gate.redisdriver import SingleNodeDriver
from gate.validation import validate_check, validate_events
from gate.velocity import LOAD_SCRIPTS, IdHasher, VelocityStore
from model.labels import DEFAULT_MATURITY_DAYS, LabelSet, label_refunds
from model.progress import Progress
from model.records import Record
from model.simulate import ABUSE_SCENARIOS, LEGIT_SCENARIOS
from refundgate.v1 import refund_gate_pb2 as pb

IN_FLIGHT = 512
TIMEOUT_S = 30.0


_TRUTH = {**dict.fromkeys(LEGIT_SCENARIOS, 0), **dict.fromkeys(ABUSE_SCENARIOS, 1)}


@dataclass(frozen=True)
class Dataset:
    """Feature rows of every refund request, with labels, segments and times.

    ``label`` is the training label from outcomes (1 abusive, 0 legitimate, -1 left out:
    ``labels`` says why). ``y`` is what evaluation judges by: the ground truth where the segment
    names a simulator scenario (the simulator knows it), else the outcome label.
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
    label: np.ndarray
    labels: LabelSet
    first_at: float
    last_at: float

    def __len__(self) -> int:
        return len(self.y)

    @property
    def simulated(self) -> bool:
        """True when every refund's segment is a simulator scenario (ground truth known)."""
        return bool(len(self.scenario)) and all(s in _TRUTH for s in np.unique(self.scenario))


async def build_dataset(
    records: Iterable[Record],
    redis_url: str,
    *,
    id_hash_key: str = "training-key-0123456789",
    maturity_days: float = DEFAULT_MATURITY_DAYS,
    as_of: float | None = None,
    total: int | None = None,
) -> Dataset:
    """Replay ``records`` (time-ordered) through the gate against the Redis at ``redis_url``,
    then label each refund from the outcomes the records hold up to ``as_of`` (the end of the
    export; default: its last record) with ``maturity_days`` (model/labels.py)."""
    conn = SingleNodeDriver(
        RedisAddress.from_url(redis_url), scripts=LOAD_SCRIPTS, connect_timeout_s=5.0, probe_timeout_s=5.0
    )
    await conn.connect()
    store = VelocityStore(conn, prefix="train", hasher=IdHasher(id_hash_key), replay_ttl_s=86400)
    rows: list[list[float]] = []
    amounts: list[int] = []
    order_amounts: list[int] = []
    asked: list[int] = []
    truth: list[int] = []
    scenarios: list[str] = []
    times: list[float] = []
    refund_ids: list[str] = []
    outcomes: dict[str, list[tuple[float, int]]] = {}
    first_at = last_at = 0.0
    tasks: list[asyncio.Future[object]] = []
    events: list[pb.Event] = []

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
        asked[slot] = int(account["order_amount"])

    n = 0
    bar = Progress("replaying records through the gate", total, unit="records")
    for n, rec in enumerate(records, 1):
        if n == 1:
            first_at = rec.at
        last_at = rec.at
        if rec.event is not None:
            if rec.event.type == pb.EVENT_TYPE_REFUND_OUTCOME:
                outcomes.setdefault(rec.event.refund_id, []).append((rec.at, rec.event.outcome))
            events.append(rec.event)
            if len(events) >= 200:
                flush_events()
            if n & 0xFFF == 0:
                bar.update(0x1000, note=f"{len(rows):,} refunds")
            continue
        assert rec.check is not None
        flush_events()
        rows.append([])
        amounts.append(rec.check.amount_minor)
        order_amounts.append(rec.check.order_amount_minor)
        asked.append(0)
        truth.append(_TRUTH.get(rec.segment, -1))
        scenarios.append(rec.segment)
        times.append(rec.at)
        refund_ids.append(rec.check.refund_id)
        tasks.append(asyncio.ensure_future(check(rec.check, len(rows) - 1)))
        if len(tasks) >= IN_FLIGHT:
            await asyncio.gather(*tasks)
            tasks.clear()
        if n & 0xFFF == 0:
            bar.update(0x1000, note=f"{len(rows):,} refunds")
    flush_events()
    await asyncio.gather(*tasks)
    await conn.close()
    bar.done = n
    bar.close()
    end = last_at if as_of is None else as_of
    labels = label_refunds(refund_ids, times, outcomes, as_of=end, maturity_days=maturity_days)
    y = np.asarray(truth, dtype=np.int8)
    if not (y >= 0).all():  # no ground truth for some: judge every row by its outcome label
        y = labels.y.copy()
    return Dataset(
        np.asarray(rows, dtype=np.float64).reshape(len(rows), -1),
        y,
        np.asarray(scenarios),
        np.asarray(times),
        amount=np.asarray(amounts, dtype=np.int64),
        order_amount=np.asarray(order_amounts, dtype=np.int64),
        order_asked=np.asarray(asked, dtype=np.int64),
        records=n,
        label=labels.y,
        labels=labels,
        first_at=first_at,
        last_at=last_at,
    )
