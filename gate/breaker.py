"""A small asyncio circuit breaker for the velocity store.

Why our own: the maintained breakers (pybreaker, aiobreaker, purgatory) either block, assume
threads, or probe with live traffic (half-open), which would spend real refunds' budgets on a
Redis that is known to be failing. Here live traffic never probes:

    CLOSED ──(failure_threshold consecutive failures)──▶ OPEN ──(background probe succeeds)──▶ CLOSED

While OPEN, ``allow()`` is False: Checks skip Redis and decide degraded at once instead of each
waiting out its timeout. A background task probes (e.g. PING with the Redis share of the budget
as timeout), with the jittered delays of gate/backoff.py, until Redis answers in time. One breaker
guards one Redis node; gate/redishealth.py owns them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable

from gate.backoff import REDIS_BACKOFF, BackoffPolicy

log = logging.getLogger(__name__)


class State(enum.Enum):
    """Breaker states; the value is the metric/health label."""

    CLOSED = "closed"
    OPEN = "open"


class CircuitBreaker:
    """Opens after consecutive failures; closes when a background probe succeeds."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[object]],
        *,
        failure_threshold: int = 5,
        backoff: BackoffPolicy = REDIS_BACKOFF,
        on_change: Callable[[State], None] | None = None,
        name: str = "redis",
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self._probe = probe
        self.failure_threshold = failure_threshold
        self.backoff = backoff
        self.on_change = on_change
        self.name = name
        self.state = State.CLOSED
        self.opened_at: float | None = None
        self.failures = 0
        self.opens = 0
        self._prober: asyncio.Task[None] | None = None

    def allow(self) -> bool:
        """True when calls may go to the dependency."""
        return self.state is State.CLOSED

    def record_success(self) -> None:
        """A call succeeded: the failure streak ends."""
        self.failures = 0

    def record_failure(self) -> None:
        """A call failed; the threshold-th failure in a row opens the breaker."""
        self.failures += 1
        if self.state is State.CLOSED and self.failures >= self.failure_threshold:
            self._open()

    def trip(self) -> None:
        """Open at once (e.g. the connection is known to be down)."""
        if self.state is State.CLOSED:
            self._open()

    def _open(self) -> None:
        self.state = State.OPEN
        self.opened_at = time.monotonic()
        self.opens += 1
        log.warning("circuit breaker opened", extra={"failures": self.failures, "node": self.name})
        self._notify()
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_until_healthy())

    async def _probe_until_healthy(self) -> None:
        backoff = self.backoff.start()
        while self.state is State.OPEN:
            await asyncio.sleep(backoff.next())
            try:
                await self._probe()
            except Exception as exc:  # every failure just means "not yet"
                log.debug("probe failed: %s", type(exc).__name__)
                continue
            self.state = State.CLOSED
            self.failures = 0
            log.info(
                "circuit breaker closed",
                extra={"open_s": round(time.monotonic() - (self.opened_at or 0), 3), "node": self.name},
            )
            self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change(self.state)

    async def close(self) -> None:
        """Stop probing (shutdown)."""
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
