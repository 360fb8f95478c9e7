"""The decisions path (model/decisions.py): the same simulated traffic replayed by
model.dataset.build_dataset and sent through a real gate's Check and RecordEvents gives the same
feature rows for the same refunds, by feature name, from the decision log stream and from an
export-decisions file, with the outcomes joined by refund."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
import redis

from gate.bundle import Bundle
from gate.decisionlog import FEATURE_SPEC, decisions_key, specs_key
from gate.decisionread import group_outcomes, named_features
from gate.devredis import RedisProcess
from gate.features import FEATURE_NAMES
from gate.settings import DEV_ID_KEY, Settings
from gate.velocity import IdHasher
from model.dataset import build_dataset
from model.decisions import DecisionRows, load_decisions, rows_from, to_dataset
from model.simulate import SimConfig, SimRecord, simulate
from refundgate.v1 import refund_gate_pb2 as pb
from tests.conftest import RunningGate, start_gate, stop_gate
from tests.test_cli import run_cli

REFUND = IdHasher(DEV_ID_KEY)


@pytest.fixture(scope="module")
def traffic() -> list[SimRecord]:
    """A few thousand simulated records: orders, deliveries, refunds and their outcomes."""
    return list(simulate(SimConfig.scaled(3000, seed=5)))


async def send_through_gate(running: RunningGate, records: Sequence[SimRecord]) -> None:
    """Every record in time order: consecutive events in one RecordEvents, each check alone."""
    events: list[pb.Event] = []
    for rec in [*records, None]:
        if rec is not None and rec.event is not None:
            events.append(rec.event)
            continue
        if events:
            await running.stub.RecordEvents(pb.RecordEventsRequest(events=events))
            events = []
        if rec is not None and rec.check is not None:
            resp = await running.stub.Check(rec.check)
            assert not resp.degraded


async def drain_decision_log(running: RunningGate) -> None:
    """Write what the decision log holds, and wait until Redis has run every write sent before:
    it runs one connection's commands in order, so a PING's reply comes after theirs."""
    assert running.gate.decision_log is not None
    await running.gate.decision_log.flush()
    await running.gate.redis.call([("PING",)], 5.0)


def by_name(values: Sequence[float]) -> dict[str, float | None]:
    return {n: None if math.isnan(v) else float(v) for n, v in zip(FEATURE_NAMES, values, strict=True)}


@pytest_asyncio.fixture(scope="module")
async def served(
    traffic: list[SimRecord],
    redis_proc: RedisProcess,
    bundle: Bundle,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Path]:
    """The traffic sent through a real gate (client time trusted) on an empty Redis; then its
    decision log exported with the CLI. Returns the Redis URL and the export."""
    client = redis_proc.client()
    client.flushall()
    settings = Settings.from_env(
        {"GATE_ALLOW_CLIENT_TIME": "true"}, listen="127.0.0.1:0", redis_url=redis_proc.url, budget_ms=1000.0
    )
    running = await start_gate(settings, bundle)
    try:
        await send_through_gate(running, traffic)
        await drain_decision_log(running)
    finally:
        await stop_gate(running)
    out = tmp_path_factory.mktemp("export") / "decisions.jsonl"
    exported = run_cli("model", "export-decisions", "--redis-url", redis_proc.url, "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    client.close()
    return redis_proc.url, out


@pytest.fixture(scope="module")
def from_stream(served: tuple[str, Path]) -> DecisionRows:
    return load_decisions(served[0])


async def test_the_gates_logged_rows_are_the_training_replays_rows_by_name(
    traffic: list[SimRecord], from_stream: DecisionRows, redis_proc: RedisProcess
) -> None:
    replayed = await build_dataset([rec.record() for rec in traffic], redis_proc.url)
    checks = [rec.check for rec in traffic if rec.check is not None]
    assert len(replayed) == len(checks) == len(from_stream) > 50
    row_of = from_stream.index()
    for check, row in zip(checks, replayed.X, strict=True):
        logged = from_stream.X[row_of[REFUND("r", check.refund_id)]]
        assert by_name(logged) == by_name(row), check.refund_id


def test_every_recorded_outcome_is_joined_to_its_refund(
    traffic: list[SimRecord], from_stream: DecisionRows
) -> None:
    expected: dict[str, list[tuple[float, int]]] = {}
    for rec in traffic:
        if rec.event is not None and rec.event.type == pb.EVENT_TYPE_REFUND_OUTCOME:
            ev = rec.event
            at = ev.occurred_at.seconds + ev.occurred_at.nanos / 1e9
            expected.setdefault(REFUND("r", ev.refund_id), []).append((at, ev.outcome))
    assert expected
    row_of = from_stream.index()
    for refund, outcomes in expected.items():
        assert from_stream.outcomes[row_of[refund]] == sorted(outcomes)
    assert sum(map(len, from_stream.outcomes)) == sum(map(len, expected.values()))


def test_the_export_gives_the_same_rows_as_the_stream(
    served: tuple[str, Path], from_stream: DecisionRows
) -> None:
    from_file = load_decisions(served[1])
    assert list(from_file.refund) == list(from_stream.refund)
    assert [by_name(r) for r in from_file.X] == [by_name(r) for r in from_stream.X]
    assert from_file.outcomes == from_stream.outcomes
    assert list(from_file.decision) == list(from_stream.decision)
    first = orjson.loads(served[1].read_text().splitlines()[0])
    assert isinstance(first["features"], dict) and list(first["features"]) == list(FEATURE_NAMES)


def test_the_decision_log_names_its_features(served: tuple[str, Path], redis_proc: RedisProcess) -> None:
    client = redis_proc.client()
    try:
        specs = client.hgetall(specs_key("rg"))
        _, fields = client.xrange(decisions_key("rg"), count=1)[0]
    finally:
        client.close()
    assert orjson.loads(specs[FEATURE_SPEC.encode()]) == list(FEATURE_NAMES)
    body = orjson.loads(fields[b"d"])
    assert body["feature_spec"] == FEATURE_SPEC and isinstance(body["features"], list)


def test_a_retried_outcome_event_is_joined_once() -> None:
    entry = {"refund": "R", "event": "E", "at": 10.0, "outcome": pb.REFUND_OUTCOME_CHARGEBACK}
    later = {"refund": "R", "event": "F", "at": 5.0, "outcome": pb.REFUND_OUTCOME_PAID}
    grouped = group_outcomes([entry, entry, later])
    assert [o["outcome"] for o in grouped["R"]] == ["REFUND_OUTCOME_PAID", "REFUND_OUTCOME_CHARGEBACK"]


def test_rows_whose_feature_names_are_unknown_are_left_out_and_counted() -> None:
    row = [0.0] * len(FEATURE_NAMES)
    known = {"refund": "A", "at": 1.0, "features": dict(zip(FEATURE_NAMES, row, strict=True))}
    unknown_spec = {"refund": "B", "at": 2.0, "features": row, "feature_spec": "0123456789ab"}
    assert named_features(unknown_spec, {}) is None
    fewer = {"refund": "C", "at": 3.0, "features": dict(zip(FEATURE_NAMES[1:], row, strict=False))}
    rows = rows_from([known, unknown_spec, fewer, {"unreadable": "not valid JSON"}])
    assert list(rows.refund) == ["A"] and rows.read == 4
    assert rows.skipped == {
        "features not by name (no known feature_spec)": 1,
        f"lacks the gate's feature {FEATURE_NAMES[0]}": 1,
        "not valid JSON": 1,
    }


def test_a_refund_decided_twice_keeps_its_complete_decision() -> None:
    features = dict.fromkeys(FEATURE_NAMES, 1.0)
    degraded = {
        "refund": "A",
        "at": 1.0,
        "features": features,
        "degraded": True,
        "decision": "HOLD_FOR_REVIEW",
    }
    complete = {"refund": "A", "at": 2.0, "features": features, "degraded": False, "decision": "APPROVE"}
    rows = rows_from([degraded, complete])
    assert list(rows.decision) == ["APPROVE"] and rows.skipped == {"refund decided again (kept one)": 1}


def test_loading_from_an_unreachable_redis_raises_a_redis_error() -> None:
    from gate.devredis import free_port

    with pytest.raises(redis.RedisError):
        load_decisions(f"redis://127.0.0.1:{free_port()}/0")


async def test_both_paths_give_the_same_training_rows_and_labels(
    traffic: list[SimRecord], from_stream: DecisionRows, redis_proc: RedisProcess
) -> None:
    as_of = max(rec.at for rec in traffic)
    replayed = await build_dataset(  # its own key space: an earlier test replayed the same ids
        [rec.record() for rec in traffic],
        redis_proc.url,
        id_hash_key="second-replay-key-0123456789",
        as_of=as_of,
        maturity_days=1,
    )
    logged = to_dataset(from_stream, as_of=as_of, maturity_days=1)
    checks = [rec.check for rec in traffic if rec.check is not None]
    row_of = from_stream.index()
    assert (replayed.label >= 0).sum() > 20 and (replayed.label == 1).any()
    for i, check in enumerate(checks):
        j = row_of[REFUND("r", check.refund_id)]
        assert by_name(logged.X[j]) == by_name(replayed.X[i]), check.refund_id
        assert logged.label[j] == replayed.label[i], check.refund_id
        assert logged.amount[j] == replayed.amount[i] and logged.order_amount[j] == replayed.order_amount[i]
        assert logged.order_asked[j] == replayed.order_asked[i]
