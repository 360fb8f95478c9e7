"""The decision log: every decision, appended to a capped Redis Stream off the hot path.

A Check hands its decision to a bounded in-process queue (never waits); a background task
writes queued decisions in pipelined XADD batches. When the queue is full or Redis refuses, the
decision is dropped and counted, so the hot path never slows for the audit trail and the loss is
visible. The stream is capped (approximate MAXLEN), and holds only hashed ids.

This is the record that replays, audits, backtests and labels join on (by decision_id).

Feature rows are logged by name: each record carries ``feature_spec``, a short id of the ordered
feature names, and every batch also writes the names under that id to the hash
``<stream>:feature_specs``, so a row stays readable by name after the feature list changes.
Beside it, `OutcomeLog` appends every REFUND_OUTCOME that RecordEvents counts to the stream
``<prefix>:outcomes`` (hashed refund id, time, outcome), in the same pipeline as its counters,
so decisions join their outcomes by the hashed refund id (gate/decisionread.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gate.features import FEATURE_NAMES
from gate.redisclient import RedisError
from gate.redisdriver import RedisDriver

log = logging.getLogger(__name__)
BATCH = 256
WRITE_TIMEOUT_S = 1.0


def feature_spec_id(names: Sequence[str]) -> str:
    """A short id of an ordered list of feature names (the same list, the same id)."""
    return hashlib.blake2b("\n".join(names).encode(), digest_size=6).hexdigest()


FEATURE_SPEC = feature_spec_id(FEATURE_NAMES)
"""The id of this gate's feature names, logged with every decision."""


def decisions_key(prefix: str) -> str:
    """The decision log stream."""
    return f"{prefix}:decisions"


def specs_key(prefix: str) -> str:
    """The hash of feature spec id -> JSON list of names, beside the decision stream."""
    return f"{decisions_key(prefix)}:feature_specs"


def outcomes_key(prefix: str) -> str:
    """The stream of refund outcomes recorded through RecordEvents."""
    return f"{prefix}:outcomes"


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision as logged. Ids are the keyed hashes used in Redis, never raw ids."""

    decision_id: str
    at: float
    refund: str
    account: str
    merchant: str
    order: str
    device: str
    ip: str
    features: Sequence[float]
    score: float | None
    model_version: str
    decision: str
    reasons: Sequence[str]
    degraded: bool
    latency_ms: float
    shadow: tuple[str, float, str] | None = None  # version, score, would-be decision
    feature_spec: str = FEATURE_SPEC  # the names of ``features``, in order: <stream>:feature_specs

    def to_json(self) -> str:
        """Compact JSON; NaN features as null (orjson's own rule for NaN: this runs for every
        decision, and orjson does it ~10x faster than ``json``)."""
        body: dict[str, Any] = {
            "decision_id": self.decision_id,
            "at": self.at,
            "refund": self.refund,
            "account": self.account,
            "merchant": self.merchant,
            "order": self.order,
            "device": self.device or None,
            "ip": self.ip or None,
            "features": list(self.features),
            "feature_spec": self.feature_spec,
            "score": self.score,
            "model_version": self.model_version,
            "decision": self.decision,
            "reasons": list(self.reasons),
            "degraded": self.degraded,
            "latency_ms": round(self.latency_ms, 3),
        }
        if self.shadow is not None:
            body["shadow"] = {
                "model_version": self.shadow[0],
                "score": self.shadow[1],
                "decision": self.shadow[2],
            }
        return orjson.dumps(body).decode()


class OutcomeLog:
    """The outcomes stream: one entry per REFUND_OUTCOME event, written by `VelocityStore`
    in the RecordEvents pipeline. A retried event is appended again; readers keep one entry per
    event (its hashed event id)."""

    def __init__(self, key: str, *, maxlen: int) -> None:
        self.key = key
        self.maxlen = maxlen

    def command(self, refund: str, event: str, at_ms: int, outcome: int) -> tuple[Any, ...]:
        """The XADD of one outcome (hashed refund and event ids, time in ms, RefundOutcome)."""
        body = orjson.dumps({"refund": refund, "event": event, "at": at_ms / 1000.0, "outcome": outcome})
        return ("XADD", self.key, "MAXLEN", "~", self.maxlen, "*", "o", body)


class DecisionLog:
    """Bounded queue + background writer to the stream ``key``."""

    def __init__(
        self,
        conn: RedisDriver,
        key: str,
        *,
        maxlen: int,
        queue_size: int,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.conn = conn
        self.key = key
        self.maxlen = maxlen
        # Rewritten with every batch (one small HSET): it survives a Redis restart or flush.
        self._spec = ("HSET", f"{key}:feature_specs", FEATURE_SPEC, orjson.dumps(list(FEATURE_NAMES)))
        self._queue: asyncio.Queue[DecisionRecord] = asyncio.Queue(maxsize=queue_size)
        self._on_drop = on_drop
        self._task: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None  # the writer's batch in flight

    def submit(self, record: DecisionRecord) -> None:
        """Queue a decision for the log; never blocks, drops (and counts) when full."""
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._drop(1)

    def start(self) -> None:
        """Start the background writer on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = self._take([await self._queue.get()])
            self._writing = asyncio.ensure_future(self._write(batch))
            await self._writing

    def _take(self, batch: list[DecisionRecord]) -> list[DecisionRecord]:
        """Fill ``batch`` with what is queued, up to BATCH records."""
        while len(batch) < BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _write(self, batch: list[DecisionRecord]) -> None:
        commands = [("XADD", self.key, "MAXLEN", "~", self.maxlen, "*", "d", r.to_json()) for r in batch]
        try:
            replies = await self.conn.call([*commands, self._spec], WRITE_TIMEOUT_S, urgent=False)
        except RedisError:
            self._drop(len(batch))
            return
        failed = sum(
            1 for r in replies[: len(commands)] if not isinstance(r, bytes)
        )  # error replies, failed nodes
        if failed:
            self._drop(failed)

    def _drop(self, n: int) -> None:
        if self._on_drop is not None:
            self._on_drop(n)

    async def flush(self, timeout_s: float = 2.0) -> None:
        """Write what is queued now, and wait for the batch the writer has in flight: once it
        returns, every decision submitted before is in Redis or counted as dropped."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            await self._write(self._take([]))
        writing = self._writing
        if writing is not None and not writing.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(writing), max(deadline - time.monotonic(), 0.001))

    async def close(self) -> None:
        """Flush, then stop the writer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
