"""The request pipeline of a Check, knowing no gRPC and no OpenTelemetry.

    validate → prepare → observe (one Redis round trip) → score → decide → decision record

The servicer (gate/service.py) keeps what belongs to the call: admission, single flight of
identical concurrent calls, the stored answer of a retry, and the mapping of what comes out of
here to protobuf and a gRPC status. Training (model/dataset.py) builds its rows with the same
``prepare`` and ``observe``, so the model learns exactly what the gate will see.

What the pipeline counts it reports to a :class:`Observer` (plain method calls; the servicer's
one records OpenTelemetry metrics), and how long each stage took comes back in the
:class:`Verdict`, so spans are made by the caller, after the fact, only when a call is sampled.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gate import features, policy
from gate.bundle import Bundle
from gate.decisionlog import DecisionLog, DecisionRecord
from gate.redisclient import RedisError, RedisTimeout, RedisUnavailable
from gate.velocity import CheckVelocity, RefundFacts, Status, VelocityStore
from refundgate.v1 import refund_gate_pb2 as pb

SHADOW_MIN_S = 0.001  # budget that must be left to score the shadow model; otherwise skip it


class Observer(Protocol):
    """What the pipeline counts, as it happens."""

    def stage(self, name: str, seconds: float) -> None:
        """One stage ("velocity", "score", "policy") took ``seconds``."""

    def redis_problem(self, kind: str) -> None:
        """The velocity round trip failed or was skipped (see :func:`observe`)."""

    def decided(self, decision: str, model_version: str, degraded: bool) -> None:
        """A decision was made (not a replay)."""

    def shadow(self, version: str, agree: bool) -> None:
        """The shadow model would have decided the same (``agree``) or not."""


def prepare(
    store: VelocityStore, request: pb.CheckRequest, at_s: float
) -> tuple[features.RequestFeatures, RefundFacts]:
    """Request features and hashed facts of a validated request (no I/O)."""
    rf = features.from_request(request, at_s)
    return rf, store.refund_facts(request, at_s, rf.flags)


async def observe(
    store: VelocityStore, rf: features.RequestFeatures, facts: RefundFacts, timeout_s: float
) -> tuple[CheckVelocity | None, list[float], str | None]:
    """Record the refund, read its windows (one round trip) and assemble the feature row.

    This is the only way a feature row is made: Check serves with it and the training set is
    built with it, so the model learns exactly what the gate will see. Velocity is None (and its
    features NaN) when Redis failed or there was no time left for it; the third value then says
    why: "no_time", "timeout", "unavailable" (down or breaker open) or "error"; "script" when
    only some entities failed.
    """
    velocity: CheckVelocity | None = None
    problem: str | None = "no_time"
    if timeout_s > 0:
        try:
            velocity = await store.record_and_read(facts, timeout_s)
            problem = None if velocity.complete else "script"
        except RedisError as exc:
            problem = redis_problem(exc)
    row = features.assemble(rf, velocity.counters if velocity is not None else {})
    return velocity, row, problem


def redis_problem(exc: RedisError) -> str:
    """Metric label of a velocity store failure."""
    if isinstance(exc, RedisTimeout):
        return "timeout"
    if isinstance(exc, RedisUnavailable):
        return "unavailable"
    return "error"


def decision_id(refund_hash: str, status: Status | None) -> str:
    """Derived from the refund when its count is known (so racing copies agree), else random."""
    if status is None:
        return "d-" + os.urandom(12).hex()
    return "d-" + hashlib.blake2b(refund_hash.encode(), digest_size=12).hexdigest()


@dataclass(slots=True)
class Verdict:
    """What the live model and the policy decided for one Check, and how long each step took
    (monotonic seconds: ``observed`` after the round trip, ``scored``, ``decided``)."""

    decision: str
    score: float
    reasons: list[str]
    model_version: str
    degraded: bool
    decision_id: str
    rules: policy.Facts
    observed: float
    scored: float
    decided: float


class Decider:
    """Score → decide → shadow → decision record, for a row already observed."""

    def __init__(
        self,
        degraded_policy: policy.DegradedPolicy,
        reject_limits: policy.RejectLimits,
        decision_log: DecisionLog | None,
        observer: Observer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.degraded_policy = degraded_policy
        self.reject_limits = reject_limits
        self.decision_log = decision_log
        self.observer = observer
        self.clock = clock

    def decide(
        self,
        bundle: Bundle,
        request: pb.CheckRequest,
        velocity: CheckVelocity | None,
        row: list[float],
        facts: RefundFacts,
        observed: float,
    ) -> Verdict:
        """The live model's score and the policy's decision on it (pure: no I/O)."""
        counters = velocity.counters if velocity is not None else {}
        degraded = velocity is None or not velocity.complete
        model = bundle.model
        score = model.score(row)
        scored = self.clock()
        self.observer.stage("score", scored - observed)
        account = counters.get("account")
        rules = policy.Facts(
            amount_minor=request.amount_minor,
            order_amount_minor=request.order_amount_minor,
            order_amount_asked=int(account["order_amount"]) if account else None,
            blocked=velocity.blocked if velocity is not None else (),
            degraded=degraded,
            item_returned=request.item_returned,
        )
        verdict = policy.decide(
            score,
            bundle.thresholds,
            rules,
            self.degraded_policy,
            explain=lambda: bundle.explain(model.last_leaves()).tolist(),
            limits=self.reject_limits,
        )
        decided = self.clock()
        self.observer.stage("policy", decided - scored)
        self.observer.decided(verdict.decision, bundle.version, degraded)
        status = velocity.status if velocity is not None else None
        return Verdict(
            decision=verdict.decision,
            score=score,
            reasons=list(verdict.reasons),
            model_version=bundle.version,
            degraded=degraded,
            decision_id=decision_id(facts.refund, status),
            rules=rules,
            observed=observed,
            scored=scored,
            decided=decided,
        )

    def shadow(self, shadow: Bundle, row: list[float], verdict: Verdict) -> tuple[str, float, str]:
        """What the shadow model would have decided on the same row: (version, score, decision)."""
        shadow_score = shadow.model.score(row)
        shadow_model = shadow.model
        would = policy.decide(
            shadow_score,
            shadow.thresholds,
            verdict.rules,
            self.degraded_policy,
            explain=lambda: shadow.explain(shadow_model.last_leaves()).tolist(),
            limits=self.reject_limits,
        ).decision
        self.observer.shadow(shadow.version, would == verdict.decision)
        return shadow.version, shadow_score, would

    def record(
        self,
        verdict: Verdict,
        facts: RefundFacts,
        row: list[float],
        started: float,
        shadow: tuple[str, float, str] | None,
    ) -> None:
        """Hand the decision to the decision log (off the hot path), if there is one."""
        if self.decision_log is None:
            return
        self.decision_log.submit(
            DecisionRecord(
                decision_id=verdict.decision_id,
                at=facts.at_ms / 1000.0,
                refund=facts.refund,
                account=facts.account,
                merchant=facts.merchant,
                order=facts.order,
                device=facts.device,
                ip=facts.ip,
                features=row,
                score=verdict.score,
                model_version=verdict.model_version,
                decision=verdict.decision,
                reasons=verdict.reasons,
                degraded=verdict.degraded,
                latency_ms=(self.clock() - started) * 1000.0,
                shadow=shadow,
            )
        )
