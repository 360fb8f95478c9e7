"""This process's memory of the answers it gave while Redis could not keep them.

A refund answered degraded (Redis slow, down, or a script failing) has its answer nowhere else
until the outage journal (gate/journal.py) hands it to Redis, so a retry in between would be
decided again, perhaps differently. Here each such answer is kept, bounded (the oldest go first)
and for at most the replay TTL, keyed by the refund's hashed id, with the request's fingerprint
(so a reused refund_id is still told apart) and the serialized answer without raw ids.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Answer:
    """One remembered answer: the request's fingerprint and the serialized CheckResponse."""

    fingerprint: bytes
    response: bytes
    at: float  # monotonic


class DegradedAnswers:
    """Bounded, per-process: refund hash -> the degraded answer this process gave."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._answers: collections.OrderedDict[str, Answer] = collections.OrderedDict()

    def remember(self, refund: str, fingerprint: bytes, response: bytes) -> None:
        """Keep an answer (the first one given stays: a retry never replaces it)."""
        if refund in self._answers:
            return
        self._answers[refund] = Answer(fingerprint, response, time.monotonic())
        if len(self._answers) > self.capacity:
            self._answers.popitem(last=False)

    def recall(self, refund: str) -> Answer | None:
        """The answer given for a refund, unless it is unknown or older than the TTL."""
        answer = self._answers.get(refund)
        if answer is not None and time.monotonic() - answer.at > self.ttl_s:
            del self._answers[refund]
            return None
        return answer

    def __len__(self) -> int:
        return len(self._answers)
