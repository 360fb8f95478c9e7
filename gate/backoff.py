"""The one retry/backoff policy: capped exponential delays with full jitter.

Every background loop that waits for Redis (reconnecting, the breaker's probe, waiting to become
ready, refreshing a cluster's slot map, replaying the outage journal) takes its delays from a
``Backoff``. Jitter matters: without it every worker of every gate that lost the same Redis
retries at the same instants, and a Redis that just came back takes the whole herd at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Delays start at ``initial_s`` and double up to ``max_s``; each is drawn uniformly from
    [``(1 - jitter)`` x delay, delay] ("full jitter" at ``jitter=1``)."""

    initial_s: float = 0.02
    max_s: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs multiplier >= 1 and 0 <= jitter <= 1")

    def start(self) -> Backoff:
        """A fresh sequence of delays, for one retry loop."""
        return Backoff(self)


@dataclass(slots=True)
class Backoff:
    """One retry loop's position in its policy; ``reset`` after a success."""

    policy: BackoffPolicy
    _delay: float = field(init=False)
    _rng: random.Random = field(init=False, default_factory=random.Random)

    def __post_init__(self) -> None:
        self._delay = self.policy.initial_s

    def next(self) -> float:
        """The next delay (seconds), jittered; the un-jittered delay grows for the one after."""
        p = self.policy
        base = self._delay
        self._delay = min(base * p.multiplier, p.max_s)
        return base * (1.0 - p.jitter * self._rng.random())

    def reset(self) -> None:
        """Back to the first delay."""
        self._delay = self.policy.initial_s


REDIS_BACKOFF = BackoffPolicy(initial_s=0.02, max_s=1.0)
"""Reconnects, probes and readiness checks of Redis: 20 ms doubling to 1 s, half jittered."""
