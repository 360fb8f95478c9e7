"""The RefundGate servicer: it only orchestrates.

    request → validate → request features → velocity (one round trip) → assemble → score → decide
            → respond; then, off the hot path, store the answer for retries

Retries: the refund key (gate/velocity.py) is the authority on whether a refund_id was already
counted; its stored answer comes back in the same round trip. Concurrent identical calls in one
process share one computation (single flight); across processes the logs' per-refund ids keep
counts exact and the decision id is derived from the refund id, so every copy names the same
decision.

The same answer on every retry, outage or not: an answer given degraded is remembered by this
process (gate/answers.py) and journaled (gate/journal.py), which counts the refund once Redis is
back and, when that is the refund's first count, stores the answer there for every worker. So a
retry gets, in this order: the answer Redis holds (``replayed=true``); else this process's own
degraded answer (``replayed=false``: an earlier call's stored answer may have been lost, so it
is not known to be the first); else a new decision, with ``replayed=false``. A concurrent copy
gets its original's answer, ``replayed=true`` only when that answer is the one on record.
``replayed=true`` only ever carries the answer on record. Stored answers hold
no raw identifier: the refund_id is filled in from the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.metrics import Histogram

from gate import features, policy
from gate.admission import Admission
from gate.answers import DegradedAnswers
from gate.bundle import Bundle
from gate.decisionlog import DecisionLog
from gate.journal import OutageJournal
from gate.pipeline import SHADOW_MIN_S, Decider, observe, prepare, redis_problem
from gate.redisclient import RedisError
from gate.redishealth import RedisHealth
from gate.reloader import ModelHolder
from gate.settings import Settings
from gate.telemetry import Telemetry
from gate.validation import ValidationError, validate_check, validate_events
from gate.velocity import CheckVelocity, RefundFacts, Status, VelocityStore
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_DECISIONS = {
    policy.APPROVE: pb.DECISION_APPROVE,
    policy.HOLD: pb.DECISION_HOLD_FOR_REVIEW,
    policy.REJECT: pb.DECISION_REJECT,
}
_OUTCOMES = {v: k for k, v in _DECISIONS.items()}
EVENTS_TIMEOUT_S = 2.0
OVERLOADED = "gate overloaded, retry later"
REUSED_ID = "refund_id was already used for a different request"
R = TypeVar("R")


@dataclass(slots=True)
class _InFlight:
    fingerprint: bytes
    future: asyncio.Future[pb.CheckResponse]
    on_record: bool = False  # its answer is the refund's answer on record (stored, or replayed)


def bad_request_status(err: ValidationError) -> grpc.Status:
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming every violated field."""
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in err.violations
        ]
    )
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="invalid request: " + ", ".join(sorted({v.field for v in err.violations})),
    )
    status.details.add().Pack(detail)
    return rpc_status.to_status(status)


class Refused(Exception):
    """A deliberate non-OK answer (overloaded, invalid, reused id, no model, Redis down for
    events). Raised inside a counted call and sent by ``RefundGateService._admitted`` once the
    call's duration is recorded under its code, so the metrics never lag the answer."""

    def __init__(self, code: grpc.StatusCode, message: str, status: grpc.Status | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status  # with details (a BadRequest), else code and message alone

    @classmethod
    def bad_request(cls, err: ValidationError) -> Refused:
        """INVALID_ARGUMENT with a google.rpc.BadRequest naming every violated field."""
        status = bad_request_status(err)
        return cls(grpc.StatusCode.INVALID_ARGUMENT, status.details, status)

    async def send(self, context: grpc.aio.ServicerContext) -> NoReturn:
        """Answer the call with this status (``abort`` raises AbortError)."""
        if self.status is not None:
            await context.abort_with_status(self.status)
        await context.abort(self.code, self.message)
        raise AssertionError("unreachable: abort raises")


class MetricsObserver:
    """The pipeline's counts (gate/pipeline.py's Observer) as OpenTelemetry metrics."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.m = telemetry.m

    def stage(self, name: str, seconds: float) -> None:
        """Stage duration histogram."""
        self.m.stage_duration.record(seconds, {"stage": name})

    def redis_problem(self, kind: str) -> None:
        """Velocity store failures by kind."""
        self.m.redis_errors.add(1, {"kind": kind})

    def decided(self, decision: str, model_version: str, degraded: bool) -> None:
        """Decisions by outcome, model version, degraded."""
        self.m.decisions.add(1, {"decision": decision, "model_version": model_version, "degraded": degraded})

    def shadow(self, version: str, agree: bool) -> None:
        """Shadow verdicts by version and agreement."""
        self.m.shadow.add(1, {"shadow_version": version, "agree": agree})


class RefundGateService(pb_grpc.RefundGateServicer):
    """Check and RecordEvents over one velocity store and the live model."""

    def __init__(
        self,
        settings: Settings,
        store: VelocityStore,
        models: ModelHolder,
        telemetry: Telemetry,
        decision_log: DecisionLog | None = None,
        clock: Callable[[], float] = time.time,
        admission: Admission | None = None,
        redis_health: RedisHealth | None = None,
        journal: OutageJournal | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.telemetry = telemetry
        self.metrics = telemetry.m
        self.decision_log = decision_log
        self.clock = clock
        self.admission = admission or Admission.from_settings(settings)
        self.observer = MetricsObserver(telemetry)
        self.decider = Decider(
            policy.DegradedPolicy(settings.degraded_approve_below_minor),
            policy.RejectLimits(
                needs_behaviour=settings.reject_needs_behaviour,
                returned_at_most_hold=settings.returned_at_most_hold,
            ),
            decision_log,
            self.observer,
        )
        self.redis_health = redis_health
        self.journal = journal
        self.answers = DegradedAnswers(settings.degraded_answers_max, settings.replay_ttl_s)
        self._in_flight: dict[str, _InFlight] = {}

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:
        """One refund request, one decision; see the module docstring for the path."""
        return await self._admitted(
            context,
            self.metrics.check_duration,
            lambda started: self._check(request, context, started),
            lambda response: _OUTCOMES[response.decision],
        )

    async def _admitted(
        self,
        context: grpc.aio.ServicerContext,
        duration: Histogram,
        work: Callable[[float], Awaitable[R]],
        outcome_of: Callable[[R], str],
    ) -> R:
        """Run one counted call: count it in admission control (gate/admission.py; the refusals
        of an overloaded process are decided before the request is even read, in gate/server.py,
        and this refuses only past ``max_concurrency`` running), then record its duration by
        outcome, release it, and only then send a refusal the work raised."""
        started = time.monotonic()
        if not self.admission.enter():
            self.metrics.shed.add(1)
            duration.record(time.monotonic() - started, {"outcome": "RESOURCE_EXHAUSTED"})
            await Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED).send(context)
        outcome = "INTERNAL"
        refused: Refused | None = None
        try:
            result = await work(started)
            outcome = outcome_of(result)
            return result
        except Refused as exc:
            refused = exc
            outcome = exc.code.name
        finally:
            self.admission.release()
            duration.record(time.monotonic() - started, {"outcome": outcome})
        await refused.send(context)

    async def _check(
        self, request: pb.CheckRequest, context: grpc.aio.ServicerContext, started: float
    ) -> pb.CheckResponse:
        s = self.settings
        try:
            at_s = validate_check(
                request, now_s=self.clock(), allow_client_time=s.allow_client_time, skew_s=s.clock_skew_s
            )
        except ValidationError as err:
            self.metrics.invalid.add(1, {"method": "Check"})
            raise Refused.bad_request(err) from None
        bundle, shadow = self.models.bundle, self.models.shadow  # read once: one model per call
        if bundle is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "no valid model loaded")

        rf, facts = prepare(self.store, request, at_s)

        waiting = self._in_flight.get(facts.refund)
        if waiting is not None:
            if waiting.fingerprint != facts.fingerprint:
                raise Refused(grpc.StatusCode.ALREADY_EXISTS, REUSED_ID)
            shared = await self._await_shared(waiting, started, context)
            if shared is not None:
                return shared
        mine = _InFlight(facts.fingerprint, asyncio.get_running_loop().create_future())
        self._in_flight[facts.refund] = mine
        try:
            # A copy that gave up waiting for its original is not the original: its answer is
            # never stored as the refund's (the original's is, by it or its journal entry).
            response = await self._decide(
                request, context, bundle, shadow, rf, facts, started, original=waiting is None, flight=mine
            )
            mine.future.set_result(response)
            return response
        except asyncio.CancelledError:
            mine.future.cancel()  # the caller went away; copies waiting on it decide alone
            raise
        except BaseException as exc:
            mine.future.set_exception(exc)
            mine.future.exception()
            raise
        finally:
            if self._in_flight.get(facts.refund) is mine:
                del self._in_flight[facts.refund]

    async def _await_shared(
        self, waiting: _InFlight, started: float, context: grpc.aio.ServicerContext
    ) -> pb.CheckResponse | None:
        future = waiting.future
        try:
            async with asyncio.timeout(self._budget_s(started, context)):
                await asyncio.wait((future,))  # never raises the original's error, never cancels it
        except TimeoutError:
            return None
        if future.cancelled() or future.exception() is not None:
            return None  # the original failed or was abandoned: decide on our own
        response = pb.CheckResponse()
        response.CopyFrom(future.result())
        # The original's answer; a replay only if it is the one on record (a degraded decision
        # Redis never saw may be a second opinion on a refund answered before).
        response.replayed = waiting.on_record
        if waiting.on_record:
            self.metrics.replays.add(1)
        return response

    def _budget_s(self, started: float, context: grpc.aio.ServicerContext) -> float:
        """Time left for this Check: min(budget, caller deadline - margin), from its start."""
        s = self.settings
        left = s.budget_ms / 1000.0 - (time.monotonic() - started)
        remaining = context.time_remaining()
        if remaining is not None:
            left = min(left, remaining - s.deadline_margin_ms / 1000.0)
        return left

    async def _decide(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext,
        bundle: Bundle,
        shadow: Bundle | None,
        rf: features.RequestFeatures,
        facts: RefundFacts,
        started: float,
        original: bool = True,
        flight: _InFlight | None = None,
    ) -> pb.CheckResponse:
        tel = self.telemetry
        span = trace.get_current_span()
        redis_s = self._budget_s(started, context) - self.settings.score_reserve_ms / 1000.0
        t0 = time.monotonic()
        with tel.stage("velocity", span) as stage:
            velocity, row, problem = await observe(self.store, rf, facts, redis_s)
            if stage is not None:
                stage.set_attribute("refundgate.velocity.problem", problem or "none")
        t1 = time.monotonic()
        self.observer.stage("velocity", t1 - t0)
        if problem is not None:
            self.observer.redis_problem(problem)
        if self.redis_health is not None:
            self.redis_health.record_check(problem)
        replay = self._replay(request, velocity, facts)
        if replay is not None:
            if flight is not None:
                flight.on_record = replay.replayed
            return replay
        verdict = self.decider.decide(bundle, request, velocity, row, facts, t1)
        if span.is_recording():
            tel.retro_stage("score", span, t1, verdict.scored)
            tel.retro_stage("policy", span, verdict.scored, verdict.decided)
            health = self.redis_health
            span.set_attributes(
                {
                    "refundgate.decision": verdict.decision,
                    "refundgate.model_version": bundle.version,
                    "refundgate.degraded": verdict.degraded,
                    "refundgate.breaker": health.state if health is not None else "none",
                    "refundgate.velocity_ms": round((t1 - t0) * 1000, 3),
                    "refundgate.score_ms": round((verdict.scored - t1) * 1000, 3),
                }
            )
        status = velocity.status if velocity is not None else None
        degraded = verdict.degraded
        response = pb.CheckResponse(  # no refund_id yet: what is stored holds no raw id
            decision=_DECISIONS[verdict.decision],
            score=verdict.score,
            reasons=[pb.Reason(code=c, detail=policy.REASON_DETAILS[c]) for c in verdict.reasons],
            model_version=bundle.version,
            degraded=degraded,
            decision_id=verdict.decision_id,
        )
        if original and (status == Status.COUNTED or degraded):
            blob = response.SerializeToString()
            if status == Status.COUNTED:
                self.store.store_reply(facts, blob)
            if degraded:
                self.answers.remember(facts.refund, facts.fingerprint, blob)
                if self.journal is not None:
                    self.journal.add(facts, blob)
        response.refund_id = request.refund_id
        if flight is not None:  # the first count's answer is the one kept for retries
            flight.on_record = original and status == Status.COUNTED
        if status == Status.DUPLICATE:
            # Counted before, its answer unknown here (still being decided elsewhere, or given
            # degraded by another worker): decided again, and not claimed to be a replay.
            return response
        shadow_verdict: tuple[str, float, str] | None = None
        if shadow is not None and self._budget_s(started, context) > SHADOW_MIN_S:
            shadow_verdict = self.decider.shadow(shadow, row, verdict)
        self.decider.record(verdict, facts, row, started, shadow_verdict)
        return response

    def _replay(
        self, request: pb.CheckRequest, velocity: CheckVelocity | None, facts: RefundFacts
    ) -> pb.CheckResponse | None:
        """The answer first given to this refund, if known (Redis's, else this process's own
        degraded one), or ALREADY_EXISTS for a reused refund_id; None: decide it now."""
        if velocity is not None and velocity.status == Status.CONFLICT:
            self._undo(facts, velocity.counted)
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, REUSED_ID)
        blob = velocity.stored_reply if velocity is not None else None
        if blob is None:
            mine = self.answers.recall(facts.refund)
            if mine is None:
                return None
            if mine.fingerprint != facts.fingerprint:
                self._undo(facts, velocity.counted if velocity is not None else [])
                raise Refused(grpc.StatusCode.ALREADY_EXISTS, REUSED_ID)
            # Redis holds no answer: it cannot say whether one was given before ours (by another
            # worker, or by a call whose stored answer was lost). The same answer again, not
            # claimed to be a replay; the outage journal puts it on record if its count is the
            # refund's first (VelocityStore.count_late).
            answer = pb.CheckResponse.FromString(mine.response)
            answer.refund_id = request.refund_id
            return answer
        self.metrics.replays.add(1)
        stored = pb.CheckResponse.FromString(blob)
        stored.refund_id = request.refund_id
        stored.replayed = True
        return stored

    def _undo(self, facts: RefundFacts, counted: list[str]) -> None:
        """Take back, off the hot path, what a reused refund_id's request counted."""
        if counted:
            task = asyncio.get_running_loop().create_task(self.store.undo(facts, counted, EVENTS_TIMEOUT_S))
            task.add_done_callback(_log_failure)

    async def RecordEvents(
        self, request: pb.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEventsResponse:
        """Count order and outcome events; all or nothing, a repeated event_id counts once.

        Shed like Check when the process is overloaded: a batch competes for the same event loop
        and Redis, and callers retry it safely (a repeated event_id counts once)."""
        return await self._admitted(
            context,
            self.metrics.events_duration,
            lambda _started: self._record_events(request, context),
            lambda _response: "OK",
        )

    async def _record_events(
        self, request: pb.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEventsResponse:
        s = self.settings
        try:
            times = validate_events(
                request,
                now_s=self.clock(),
                allow_client_time=s.allow_client_time,
                skew_s=s.clock_skew_s,
                max_events=s.max_events_per_call,
            )
        except ValidationError as err:
            self.metrics.invalid.add(1, {"method": "RecordEvents"})
            raise Refused.bad_request(err) from None
        timeout = EVENTS_TIMEOUT_S
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining - s.deadline_margin_ms / 1000.0)
        try:
            statuses = await self.store.record_events(request.events, times, max(timeout, 0.001))
        except RedisError as exc:
            self.metrics.redis_errors.add(1, {"kind": redis_problem(exc)})
            raise Refused(
                grpc.StatusCode.UNAVAILABLE, "velocity store unavailable; retry, events are idempotent"
            ) from None
        accepted = sum(1 for st in statuses if st == Status.COUNTED)
        return pb.RecordEventsResponse(accepted=accepted, duplicates=len(statuses) - accepted)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("undo of a conflicting refund failed: %s", type(task.exception()).__name__)
