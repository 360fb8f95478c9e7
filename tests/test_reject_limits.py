"""The costliest error, through Check: the model alone never REJECTs on request context alone,
and a refund whose item came back is at most held unless a guard rule fires; both settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from gate.bundle import Bundle, load_bundle
from gate.devredis import RedisProcess
from gate.features import BEHAVIOUR_CODES
from gate.settings import Settings
from model.synthetic import build_synthetic_bundle
from refundgate.v1 import refund_gate_pb2 as pb
from tests.conftest import RunningGate, make_request, start_gate, stop_gate

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def strict_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A bundle whose lines make the model REJECT every refund it scores."""
    out: Path = tmp_path_factory.mktemp("strict") / "strict-model"
    return load_bundle(
        build_synthetic_bundle(out, version="strict-1", thresholds={"hold": 1e-9, "reject": 1e-9})
    )


async def _gate(redis_url: str, bundle: Bundle, **settings: object) -> RunningGate:
    return await start_gate(
        Settings.from_env(
            {},
            listen="127.0.0.1:0",
            redis_url=redis_url,
            allow_client_time=True,
            budget_ms=250.0,
            **settings,  # type: ignore[arg-type]
        ),
        bundle,
    )


@pytest.fixture(scope="module")
def context_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The same, trained on the request's context alone: no reason it gives is behaviour."""
    out: Path = tmp_path_factory.mktemp("context") / "context-model"
    return load_bundle(
        build_synthetic_bundle(
            out, version="context-1", thresholds={"hold": 1e-9, "reject": 1e-9}, velocity=False
        )
    )


@pytest_asyncio.fixture
async def strict_gate(
    redis_proc: RedisProcess, rdb: redis.Redis, strict_bundle: Bundle
) -> AsyncIterator[RunningGate]:
    running = await _gate(redis_proc.url, strict_bundle)
    yield running
    await stop_gate(running)


def _unreturned(i: int) -> pb.CheckRequest:
    return make_request(
        refund_id=f"rf:{i}", order_id=f"ord:{i}", account_id=f"acct:{i % 3}", item_returned=False
    )


async def test_a_model_reject_comes_with_a_behavioural_reason(strict_gate: RunningGate) -> None:
    responses = [await strict_gate.stub.Check(_unreturned(i)) for i in range(12)]
    for resp in responses:
        codes = {r.code for r in resp.reasons}
        assert resp.decision in (pb.DECISION_HOLD_FOR_REVIEW, pb.DECISION_REJECT)
        assert (resp.decision == pb.DECISION_REJECT) == bool(codes & BEHAVIOUR_CODES), codes


async def test_request_context_alone_never_rejects(
    redis_proc: RedisProcess, rdb: redis.Redis, context_bundle: Bundle
) -> None:
    running = await _gate(redis_proc.url, context_bundle)
    try:
        responses = [await running.stub.Check(_unreturned(i)) for i in range(6)]
    finally:
        await stop_gate(running)
    assert all(r.decision == pb.DECISION_HOLD_FOR_REVIEW for r in responses), responses
    assert all(r.reasons and not {c.code for c in r.reasons} & BEHAVIOUR_CODES for r in responses)


async def test_without_the_limit_the_model_rejects_on_its_score(
    redis_proc: RedisProcess, rdb: redis.Redis, context_bundle: Bundle
) -> None:
    running = await _gate(redis_proc.url, context_bundle, reject_needs_behaviour=False)
    try:
        responses = [await running.stub.Check(_unreturned(i)) for i in range(6)]
    finally:
        await stop_gate(running)
    assert all(r.decision == pb.DECISION_REJECT for r in responses)


async def test_a_returned_item_is_at_most_held(strict_gate: RunningGate) -> None:
    for i in range(6):
        resp = await strict_gate.stub.Check(
            make_request(refund_id=f"rf:r{i}", order_id=f"ord:r{i}", item_returned=True)
        )
        assert resp.decision == pb.DECISION_HOLD_FOR_REVIEW, resp


async def test_a_returned_item_above_the_order_is_still_rejected(strict_gate: RunningGate) -> None:
    resp = await strict_gate.stub.Check(
        make_request(refund_id="rf:x", order_id="ord:x", item_returned=True, amount_minor=9000)
    )
    assert resp.decision == pb.DECISION_REJECT
    assert resp.reasons[0].code == "REFUND_EXCEEDS_ORDER"


async def test_without_the_limit_a_returned_item_may_be_rejected(
    redis_proc: RedisProcess, rdb: redis.Redis, strict_bundle: Bundle
) -> None:
    running = await _gate(
        redis_proc.url, strict_bundle, returned_at_most_hold=False, reject_needs_behaviour=False
    )
    try:
        resp = await running.stub.Check(make_request(refund_id="rf:y", order_id="ord:y", item_returned=True))
    finally:
        await stop_gate(running)
    assert resp.decision == pb.DECISION_REJECT
