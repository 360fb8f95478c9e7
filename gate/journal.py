"""The outage journal: refunds decided while Redis could not count them, counted once it can.

Without it an outage erases exactly the history abusers want erased: every refund asked while
Redis was down would be missing from the windows afterwards. Each refund decided degraded is
journaled here (bounded; one entry per refund id; in the order decided) and a background task
hands the entries to Redis, oldest first, as soon as it answers again: counted at the time they
were decided, and their answers kept for retries (unless Redis holds one already). Counting is
idempotent by refund id (gate/velocity.py), so an entry Redis had partly taken, or one replayed
twice, still counts once.

Limits: the journal lives in the worker's memory; a worker that dies loses it (those refunds stay
uncounted). When full, the oldest entry is dropped (and counted as dropped) for the newest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gate.backoff import REDIS_BACKOFF, BackoffPolicy
from gate.redisclient import RedisError
from gate.velocity import RefundFacts, VelocityStore

log = logging.getLogger(__name__)
BATCH = 16  # entries replayed per round trip
REPLAY_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Entry:
    """One refund decided without Redis: its hashed facts and its serialized answer."""

    facts: RefundFacts
    response: bytes


class OutageJournal:
    """Bounded FIFO of refunds to count late, with the task that counts them."""

    def __init__(
        self,
        store: VelocityStore,
        *,
        capacity: int,
        backoff: BackoffPolicy = REDIS_BACKOFF,
        on_event: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.capacity = capacity
        self.backoff = backoff
        self.on_event = on_event  # ("journaled" | "replayed" | "dropped", n)
        self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, facts: RefundFacts, response: bytes) -> None:
        """Journal a refund (again for the same refund id: nothing new)."""
        if facts.refund in self._entries:
            return
        self._entries[facts.refund] = Entry(facts, response)
        self._event("journaled", 1)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self._event("dropped", 1)
        if self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        """Start replaying on the running loop."""
        if self._task is None:
            self._wake = asyncio.Event()
            if self._entries:
                self._wake.set()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = self.backoff.start()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._entries:
                started = time.monotonic()
                if await self.replay_some():
                    backoff.reset()
                    # Replay at most half the time: Checks keep their budget during a catch-up.
                    await asyncio.sleep(max(time.monotonic() - started, 0.001))
                else:
                    await asyncio.sleep(backoff.next())

    async def replay_some(self) -> bool:
        """Count the oldest entries (one pipelined batch); False if Redis took none of them."""
        batch = list(self._entries.values())[:BATCH]
        results = await asyncio.gather(
            *(self.store.count_late(e.facts, e.response, REPLAY_TIMEOUT_S) for e in batch),
            return_exceptions=True,
        )
        done = 0
        for entry, result in zip(batch, results, strict=True):
            if isinstance(result, RedisError):
                continue  # Redis did not take it (all of it): again later
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            if self._entries.get(entry.facts.refund) is not entry:
                continue
            del self._entries[entry.facts.refund]
            if isinstance(result, Exception):  # a bug: never retry it forever
                log.error("outage journal entry dropped: %s", type(result).__name__)
                self._event("dropped", 1)
            else:
                done += 1
        if done:
            self._event("replayed", done)
            log.info("outage journal replayed", extra={"refunds": done, "left": len(self._entries)})
        return done > 0

    def _event(self, what: str, n: int) -> None:
        if self.on_event is not None:
            self.on_event(what, n)

    async def close(self) -> None:
        """Stop replaying; what is left is lost (and logged)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._entries:
            log.warning("outage journal not replayed at shutdown", extra={"refunds": len(self._entries)})
