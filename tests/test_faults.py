"""Faults for real: the gate process talks to redis-server through a fault proxy.

For every fault: each call is answered within budget + 2 ms, marked degraded when features were
missing, never UNKNOWN or INTERNAL, and the gate recovers by itself once Redis is back.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gate.devredis import RedisProcess, start_redis
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc
from tests.conftest import make_request
from tests.faultproxy import FaultProxy
from tests.gateproc import GateProcess, start_gate_process

BUDGET_MS = 20.0
SLACK_S = 0.002
# These VMs lose the CPU to their host now and then (measured on an idle box: 17 % steal, a 1 ms
# sleep overshooting by 12 ms at p99 and 38 ms at worst), which no process can absorb. So the
# typical call must meet budget + 2 ms, and every call must come back within budget + this: far
# below the 5 s client timeout a hang would run into, and below the 60 ms Redis latency tested.
HOST_STALL_S = 0.040
_ids = itertools.count()


@dataclass
class Rig:
    redis: RedisProcess
    proxy: FaultProxy
    gate: GateProcess
    stub: pb_grpc.RefundGateStub


@pytest.fixture(scope="module")
def rig(bundle_dir: Path) -> Iterator[Rig]:
    redis = start_redis()
    proxy = FaultProxy(redis.port).start()
    gate = start_gate_process(
        f"redis://127.0.0.1:{proxy.port}/0",
        bundle_dir,
        "--budget-ms",
        str(BUDGET_MS),
        "--breaker-failures",
        "3",
    )
    channel = grpc.insecure_channel(gate.target)
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = pb_grpc.RefundGateStub(channel)
    stub.Check(make_request(refund_id="warm-up"))  # first call pays for lazy imports
    rig = Rig(redis, proxy, gate, stub)
    try:
        yield rig
    finally:
        channel.close()
        gate.stop()
        proxy.stop()
        rig.redis.stop()  # the test that restarts Redis replaces rig.redis


@pytest.fixture(autouse=True)
def healthy_after(rig: Rig) -> Iterator[None]:
    yield
    rig.proxy.set_mode("pass")
    assert_recovers(rig)


def call(rig: Rig) -> tuple[pb.CheckResponse, float]:
    """One Check with a fresh refund id; returns the response and its latency (s)."""
    n = next(_ids)
    req = make_request(refund_id=f"rf:f{n}", order_id=f"ord:f{n}")
    started = time.perf_counter()
    try:
        resp = rig.stub.Check(req, timeout=5)
    except grpc.RpcError as err:
        raise AssertionError(f"call failed with {err.code()}: {err.details()}") from None
    return resp, time.perf_counter() - started


def assert_in_budget(rig: Rig, n: int, *, degraded: bool | None) -> list[pb.CheckResponse]:
    responses = []
    latencies = []
    for _ in range(n):
        resp, latency = call(rig)
        latencies.append(latency)
        assert latency <= BUDGET_MS / 1000 + HOST_STALL_S, f"answered in {latency * 1000:.1f} ms"
        if degraded is not None:
            assert resp.degraded == degraded
        if resp.degraded:
            assert "FEATURES_UNAVAILABLE" in {r.code for r in resp.reasons}
        responses.append(resp)
    median = statistics.median(latencies)
    assert median <= BUDGET_MS / 1000 + SLACK_S, f"median answer in {median * 1000:.1f} ms"
    return responses


def assert_recovers(rig: Rig, timeout_s: float = 10.0) -> None:
    """Calls until one is not degraded; the gate must get there on its own."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp, _ = call(rig)
        if not resp.degraded:
            return
    raise AssertionError("gate did not recover")


def test_small_latency_is_absorbed(rig: Rig) -> None:
    rig.proxy.set_mode("latency", latency_s=0.004)
    responses = assert_in_budget(rig, 20, degraded=None)
    # A host stall (see HOST_STALL_S) may push a call past the Redis budget; most must not.
    assert sum(not r.degraded for r in responses) >= 16


def test_latency_beyond_the_budget_degrades_within_budget(rig: Rig) -> None:
    rig.proxy.set_mode("latency", latency_s=0.060)
    assert_in_budget(rig, 30, degraded=True)


def test_blackhole_degrades_within_budget(rig: Rig) -> None:
    rig.proxy.set_mode("blackhole")
    assert_in_budget(rig, 30, degraded=True)


def test_connection_resets_degrade_within_budget(rig: Rig) -> None:
    rig.proxy.set_mode("reset")
    assert_in_budget(rig, 30, degraded=True)


def test_flapping_resets_never_fail_a_call(rig: Rig) -> None:
    for i in range(10):
        rig.proxy.set_mode("reset" if i % 2 else "pass")
        assert_in_budget(rig, 5, degraded=None)


def test_redis_killed_and_restarted_empty(rig: Rig) -> None:
    rig.redis.kill()
    assert_in_budget(rig, 20, degraded=True)
    rig.redis = start_redis(port=rig.redis.port)  # same port, empty data, no scripts loaded
    assert_recovers(rig)
    assert_in_budget(rig, 10, degraded=False)


def test_overload_is_shed_at_once_with_resource_exhausted(rig: Rig, bundle_dir: Path) -> None:
    small = start_gate_process(
        f"redis://127.0.0.1:{rig.proxy.port}/0",
        bundle_dir,
        "--budget-ms",
        str(BUDGET_MS),
        "--max-concurrency",
        "4",
    )
    rig.proxy.set_mode("latency", latency_s=0.010)  # each admitted call holds its slot ~10 ms
    try:
        with grpc.insecure_channel(small.target) as channel:
            stub = pb_grpc.RefundGateStub(channel)
            futures = [
                stub.Check.future(make_request(refund_id=f"rf:o{i}", order_id=f"o:{i}"), timeout=5)
                for i in range(40)
            ]
            codes = []
            for f in futures:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())  # type: ignore[attr-defined]
    finally:
        small.stop()
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) >= 4


def test_a_deadline_too_short_for_redis_gets_an_immediate_degraded_decision(
    rig: Rig, bundle_dir: Path
) -> None:
    # A deadline of a few ms would race the client's own expiry on a stalling host, so this gate
    # keeps 800 ms of its 1 s budget back for scoring: a 300 ms deadline then leaves Redis
    # nothing, and the client still has ample time to see the gate's answer.
    gate = start_gate_process(
        f"redis://127.0.0.1:{rig.proxy.port}/0",
        bundle_dir,
        "--budget-ms",
        "1000",
        "--score-reserve-ms",
        "800",
        "--deadline-margin-ms",
        "2",
    )
    try:
        with grpc.insecure_channel(gate.target) as channel:
            stub = pb_grpc.RefundGateStub(channel)
            stub.Check(make_request(refund_id="rf:warm", order_id="o:warm"), timeout=5)
            resp = stub.Check(make_request(refund_id="rf:short", order_id="o:short"), timeout=0.300)
    finally:
        gate.stop()
    # Redis is healthy here: degraded means the Check did not wait for it (the outage journal
    # counts the refund afterwards, off the hot path).
    assert resp.degraded
    assert "FEATURES_UNAVAILABLE" in {r.code for r in resp.reasons}
