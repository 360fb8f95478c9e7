"""The one owner of Redis health: the per-node circuit breakers and the velocity health verdict.

Two signals, one verdict:
- each Redis node has a breaker (gate/breaker.py), fed by the driver with exactly one outcome per
  call to that node: a failure when the call failed or any reply in it was an error (a script
  failing on every Check opens it, though the connection is fine);
- every Check reports once whether it was decided degraded because of Redis. When at least
  ``degraded_share`` of the Checks of the last ``interval_s`` were, velocity is unhealthy even
  with every breaker closed (a breaker closes on a PING that a broken script does not fail).

The velocity health entry is SERVING when no breaker is open and the last interval was not
mostly degraded; while it is not, the gate logs why, once per interval.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

from gate.backoff import REDIS_BACKOFF, BackoffPolicy
from gate.breaker import CircuitBreaker, State

log = logging.getLogger(__name__)
REDIS_PROBLEMS = frozenset({"timeout", "unavailable", "error", "script"})
"""Check problems that are Redis's fault ("no_time", a caller deadline too short, is not)."""


class RedisHealth:
    """Breakers by node, the degraded share of recent Checks, and the verdict from both."""

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        probe_backoff: BackoffPolicy = REDIS_BACKOFF,
        interval_s: float = 1.0,
        degraded_share: float = 0.5,
        min_checks: int = 5,
        on_change: Callable[[bool], None] | None = None,
        on_open: Callable[[str], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.probe_backoff = probe_backoff
        self.interval_s = interval_s
        self.degraded_share = degraded_share
        self.min_checks = min_checks
        self.on_change = on_change
        self.on_open = on_open
        self.breakers: dict[str, CircuitBreaker] = {}
        self.serving = True
        self._checks = 0
        self._problems: collections.Counter[str] = collections.Counter()
        self._mostly_degraded = False
        self._last_window = ""
        self._last_error: tuple[str, str] | None = None
        self._task: asyncio.Task[None] | None = None

    def breaker(self, node: str, probe: Callable[[], Awaitable[object]]) -> CircuitBreaker:
        """The breaker of ``node``, made on first use."""
        breaker = self.breakers.get(node)
        if breaker is None:
            breaker = CircuitBreaker(
                probe,
                failure_threshold=self.failure_threshold,
                backoff=self.probe_backoff,
                on_change=lambda state: self._breaker_changed(node, state),
                name=node,
            )
            self.breakers[node] = breaker
        return breaker

    async def forget(self, node: str) -> None:
        """A node left the topology (a cluster's failed master): its breaker no longer counts."""
        breaker = self.breakers.pop(node, None)
        if breaker is not None:
            await breaker.close()
            self._evaluate()

    def record_check(self, problem: str | None) -> None:
        """One Check's outcome: None when velocity was complete, else its problem label."""
        self._checks += 1
        if problem in REDIS_PROBLEMS:
            self._problems[problem] += 1

    def note_error(self, node: str, error: str) -> None:
        """The latest error reply of a node, for the log line saying why velocity is unhealthy."""
        self._last_error = (node, error[:200])

    @property
    def open_nodes(self) -> list[str]:
        """Nodes whose breaker is open."""
        return [name for name, b in self.breakers.items() if b.state is State.OPEN]

    @property
    def state(self) -> str:
        """'open' while any breaker is open, else 'closed' (span attribute, metric)."""
        return State.OPEN.value if self.open_nodes else State.CLOSED.value

    def start(self) -> None:
        """Judge the Checks of every interval, on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.tick()

    def tick(self) -> None:
        """Close the current interval: judge its Checks, update the verdict, log why if bad."""
        degraded = sum(self._problems.values())
        self._mostly_degraded = (
            self._checks >= self.min_checks and degraded >= self.degraded_share * self._checks
        )
        self._last_window = (
            f"{degraded} of {self._checks} Checks degraded by Redis in the last {self.interval_s:g} s"
            + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self._problems.items()))})" if degraded else "")
        )
        self._checks = 0
        self._problems.clear()
        self._evaluate()
        if not self.serving:
            log.warning("velocity not serving: %s", self.why())

    def why(self) -> str:
        """One line: what makes velocity unhealthy now."""
        parts = []
        if self.open_nodes:
            parts.append("circuit breaker open for " + ", ".join(self.open_nodes))
        if self._mostly_degraded:
            parts.append(self._last_window)
        if self._last_error is not None:
            node, error = self._last_error
            hint = " (a cluster node: use redis+cluster://)" if error.startswith(("MOVED", "ASK")) else ""
            parts.append(f"last error from {node}: {error}{hint}")
        return "; ".join(parts) or "healthy"

    def _breaker_changed(self, node: str, state: State) -> None:
        if state is State.OPEN:
            if self.on_open is not None:
                self.on_open(node)
            self._evaluate()  # unhealthy at once; healthy again only when an interval says so

    def _evaluate(self) -> None:
        serving = not self.open_nodes and not self._mostly_degraded
        if serving != self.serving:
            self.serving = serving
            if serving:
                self._last_error = None
                log.info("velocity serving again")
            if self.on_change is not None:
                self.on_change(serving)

    async def close(self) -> None:
        """Stop judging and probing (shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for breaker in list(self.breakers.values()):
            await breaker.close()
