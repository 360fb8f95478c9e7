"""Overload: admission control, first on a fake clock, then against a really saturated gate.

The unit tests drive :class:`gate.admission.Admission` with a fake clock, a fake count of calls
held by gRPC core and a fake random source, so every number they assert is exact. The integration
test floods a real gate process (one worker, default limits and budget) from a real client,
faster than its event loop can serve, and checks what a caller sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gate.admission import (
    CALM_READS_EVERY,
    DEEP_READS_EVERY,
    Admission,
    channelz_server_ids,
    find_new_server,
)
from gate.devredis import RedisProcess, free_port
from gate.settings import Settings, SettingsError
from refundgate.v1 import refund_gate_pb2 as pb
from tests.conftest import RunningGate, make_request
from tests.gateproc import start_gate_process

SAMPLE_S, WINDOW_S = 0.005, 0.050
DEEP_READ_CALLS = round(SAMPLE_S * DEEP_READS_EVERY * 1000) + 1  # at 1,000 calls/s, and one


@dataclass
class Core:
    """Stands in for gRPC core: the calls it holds, and how often it was asked."""

    held: int = 0
    reads: int = 0

    def __call__(self) -> int:
        self.reads += 1
        return self.held


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rand:
    """Uniform draws spread evenly over [0, 1): the share refused is exactly the probability."""

    draws: Iterator[float] = field(
        default_factory=lambda: itertools.cycle([(i + 0.5) / 100 for i in range(100)])
    )

    def __call__(self) -> float:
        return next(self.draws)


def controller(
    core: Core | None, clock: Clock, *, shed_start: int = 32, max_concurrency: int = 64
) -> Admission:
    return Admission(
        shed_start=shed_start,
        max_concurrency=max_concurrency,
        sample_s=SAMPLE_S,
        window_s=WINDOW_S,
        counter=core,
        clock=clock,
        rand=Rand(),
    )


def run(adm: Admission, clock: Clock, seconds: float, calls_per_s: float = 1000.0) -> list[bool]:
    """Calls arriving evenly for ``seconds``, each released at once when admitted."""
    decisions = []
    for _ in range(round(seconds * calls_per_s)):
        clock.now += 1 / calls_per_s
        ok = adm.admit()
        decisions.append(ok)
        if ok:
            adm.release()
    return decisions


def test_a_standing_backlog_is_refused_and_a_calm_one_is_not() -> None:
    core, clock = Core(held=10), Clock()
    adm = controller(core, clock)
    assert all(run(adm, clock, 0.5))
    core.held = 200  # calls pile up in core faster than the loop takes them
    decisions = run(adm, clock, 0.5)
    assert not any(decisions[200:])  # within ~4 windows every new call is refused
    assert all(decisions[:5])  # but not before the backlog has stood a window
    core.held = 5  # drained: refusals stop with the first read that shows it
    assert all(run(adm, clock, 0.5)[DEEP_READ_CALLS:])


def test_the_refused_share_rises_linearly_between_the_limits() -> None:
    """None at shed_start itself: a client keeping that many calls in flight is never refused."""
    core, clock = Core(), Clock()
    adm = controller(core, clock)
    for held, share in ((32, 0.0), (40, 0.25), (48, 0.5), (56, 0.75), (64, 1.0), (90, 1.0)):
        core.held = held
        run(adm, clock, 0.5)  # let the count stand a window
        decisions = run(adm, clock, 0.2)
        assert abs(adm.held - held) < 0.01
        assert decisions.count(False) / len(decisions) == pytest.approx(share, abs=0.02), held


def test_a_burst_that_drains_within_the_window_is_served_whole() -> None:
    core, clock = Core(held=0), Clock()
    adm = controller(core, clock)
    run(adm, clock, 0.2)
    decisions = []
    for left in range(50, 0, -1):  # 50 calls arrive at once and are served one per ms
        core.held = left
        clock.now += 0.001
        decisions.append(adm.admit())
        adm.release()
    assert all(decisions)
    assert adm.held < 32


def test_running_calls_are_capped_exactly_even_without_gRPC_core_counters() -> None:
    clock = Clock()
    adm = controller(None, clock, shed_start=4, max_concurrency=4)
    assert [adm.admit() for _ in range(6)] == [True] * 4 + [False] * 2
    adm.release()
    assert adm.admit() and not adm.admit()


def test_health_watch_streams_are_not_taken_for_load() -> None:
    core, clock = Core(held=100), Clock()
    adm = controller(core, clock)
    with contextlib.ExitStack() as watchers:
        for _ in range(95):
            watchers.enter_context(adm.stream())
        assert all(run(adm, clock, 0.5))
    assert not any(run(adm, clock, 0.5)[250:])


def test_reads_of_core_are_rate_limited_and_rarer_while_calm() -> None:
    core, clock = Core(held=2), Clock()
    adm = controller(core, clock)
    run(adm, clock, 1.0, calls_per_s=5000)
    calm = 1.0 / (SAMPLE_S * CALM_READS_EVERY)
    assert 0.9 * calm <= core.reads <= calm + 1  # calm: at most every 5 x 5 ms, not per call
    core.held, core.reads = 40, 0
    run(adm, clock, 1.0, calls_per_s=5000)
    assert 180 <= core.reads <= 201  # past shed_start: at most every 5 ms


def test_an_idle_gap_does_not_keep_an_old_backlog_alive_and_costs_no_read() -> None:
    core, clock = Core(held=100), Clock()
    adm = controller(core, clock)
    run(adm, clock, 0.5)
    assert adm.held > 90
    core.held, core.reads = 1, 0
    clock.now += 1.0  # a second without calls: nothing stood in front of the handlers
    assert adm.admit() and core.reads == 0  # the first call after the pause pays no read
    adm.release()
    assert all(run(adm, clock, 0.05))


def test_a_failing_read_falls_back_to_counting_running_calls() -> None:
    clock = Clock()

    def broken() -> int:
        raise RuntimeError("no channelz here")

    adm = Admission(
        shed_start=2, max_concurrency=3, sample_s=SAMPLE_S, window_s=WINDOW_S, counter=broken, clock=clock
    )
    decisions = []
    for _ in range(4):
        clock.now += SAMPLE_S  # a read is due at every call
        decisions.append(adm.admit())
    assert decisions == [True, True, True, False]
    assert adm.counter is None


async def test_core_counts_calls_queued_before_python_takes_them() -> None:
    """The premise of the design, on a real grpc.aio server: while its event loop is blocked,
    calls that arrive are already counted by core, and none has reached a handler."""
    before = channelz_server_ids()
    server = grpc.aio.server(options=[("grpc.enable_channelz", 1)])
    counter = find_new_server(before)
    assert counter is not None
    entered = 0

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal entered
        entered += 1
        return request

    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_unary("/t.T/M")
            first = method.future(b"x", timeout=5)
            assert await asyncio.to_thread(first.result) == b"x"
            base = counter()
            futures = [method.future(b"y", timeout=10) for _ in range(20)]  # loop blocked below
            deadline = time.monotonic() + 5
            while counter() < base + 20 and time.monotonic() < deadline:
                pass  # polling core from this thread: the event loop stays blocked meanwhile
            assert (counter() - base, entered) == (20, 1)
            for f in futures:  # the loop runs again: every queued call is served
                assert await asyncio.to_thread(f.result) == b"y"
            assert entered == 21
    finally:
        await server.stop(0)


async def test_the_gate_reads_its_own_servers_counters_and_registers_health_watchers(
    gate: RunningGate,
) -> None:
    admission = gate.gate.service.admission
    assert admission.counter is not None  # create_gate found its server in channelz
    watch = health_pb2_grpc.HealthStub(gate.channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=5
    )
    async for _ in watch:
        break  # the watcher is open on the server
    try:
        assert admission.streams == 1  # discounted from the count (see the unit test above)
        assert admission.counter() >= 1  # core holds the open stream
    finally:
        watch.cancel()


def test_settings_validate_the_admission_limits() -> None:
    s = Settings.from_env({"GATE_SHED_START": "16", "GATE_ADMISSION_WINDOW_MS": "80"})
    adm = Admission.from_settings(s)
    assert (adm.shed_start, adm.max_concurrency, adm.window_s, adm.sample_s) == (16, 64, 0.08, 0.01)
    assert Admission.from_settings(s.replace(max_concurrency=8)).shed_start == 8  # capped
    with pytest.raises(SettingsError, match="shed_start"):
        Settings.from_env({"GATE_SHED_START": "0"})
    with pytest.raises(SettingsError, match="admission_window_ms"):
        Settings.from_env({"GATE_ADMISSION_WINDOW_MS": "1", "GATE_ADMISSION_SAMPLE_MS": "5"})


# ---------------------------------------------------------------------------------------------
# A really saturated gate
# ---------------------------------------------------------------------------------------------

CHECK = "/refundgate.v1.RefundGate/Check"
OVERLOAD = 1.5
"""Offered load over the max measured just before. Not 2x as in the benchmark: a Python client
on the same 2 CPUs as a one-worker gate would offer ~2,000-2,800 calls/s, at which refusing alone
takes the whole worker (see gate/admission.py); 1.5x overloads it just as surely."""


@dataclass
class Answer:
    sent: float
    latency_s: float
    code: str
    degraded: bool = False


async def closed_loop(target: str, callers: int, seconds: float) -> float:
    """Checks/s the gate serves with ``callers`` calls always in flight (its max throughput)."""
    done = 0
    ids = itertools.count()
    async with grpc.aio.insecure_channel(target) as channel:
        check = channel.unary_unary(CHECK)
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                n = next(ids)
                await check(
                    make_request(refund_id=f"rf:m{n}", order_id=f"o:m{n}").SerializeToString(), timeout=5
                )
                done += 1

        await asyncio.gather(*(caller() for _ in range(callers)))
    return done / seconds


async def open_loop(target: str, rate: float, seconds: float) -> tuple[list[Answer], int]:
    """Checks sent at ``rate``/s whatever the answers (as callers arrive in production), and one
    health check halfway through; returns every answer and the health status."""
    answers: list[Answer] = []
    payloads = [
        make_request(refund_id=f"rf:o{i}", order_id=f"o:o{i}").SerializeToString()
        for i in range(int(rate * seconds) + 1)
    ]
    async with (
        grpc.aio.insecure_channel(target) as channel,
        grpc.aio.insecure_channel(target) as health_channel,
    ):
        check = channel.unary_unary(CHECK)

        async def one(payload: bytes) -> None:
            sent = time.perf_counter()
            try:
                reply = pb.CheckResponse.FromString(await check(payload, timeout=5))
                code, degraded = "OK", reply.degraded
            except grpc.aio.AioRpcError as err:
                code, degraded = err.code().name, False
            answers.append(Answer(sent - start, time.perf_counter() - sent, code, degraded))

        health_stub = health_pb2_grpc.HealthStub(health_channel)
        health: asyncio.Future[health_pb2.HealthCheckResponse] | None = None
        calls: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            while len(calls) < min(elapsed * rate, len(payloads)):
                calls.append(asyncio.create_task(one(payloads[len(calls)])))
            if elapsed > seconds / 2 and health is None:
                health = asyncio.ensure_future(
                    health_stub.Check(
                        health_pb2.HealthCheckRequest(service="refundgate.v1.RefundGate"), timeout=5
                    )
                )
            await asyncio.sleep(0.001)  # pacing of the sender, not synchronisation
        await asyncio.gather(*calls)
        assert health is not None
        status = (await health).status
    return answers, status


def shed_total(admin: str) -> float:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("refundgate_shed_total"):
                return float(line.rpartition(" ")[2])
    raise AssertionError("refundgate_shed_total is missing")


def describe(max_rps: float, answers: list[Answer]) -> str:
    """What the caller saw, per status, for assertion messages."""
    parts = [f"max {max_rps:.0f}/s, offered {OVERLOAD * max_rps:.0f}/s, after 0.5 s"]
    for code in sorted({a.code for a in answers}):
        lat = [a.latency_s * 1000 for a in answers if a.code == code]
        parts.append(
            f"{code} {len(lat)} p50 {p(lat, 0.5):.0f} p90 {p(lat, 0.9):.0f} ms "
            f"({sum(a.degraded for a in answers if a.code == code)} degraded)"
        )
    return "; ".join(parts)


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def test_a_saturated_gate_refuses_at_once_and_serves_the_rest(
    redis_proc: RedisProcess, bundle_dir: Path
) -> None:
    """One worker, default limits and budget, offered 1.5x what it serves (its event loop
    saturated, calls queueing in gRPC core): the excess is refused with RESOURCE_EXHAUSTED,
    answers come back in tens of ms instead of queueing for the rest of the run, every refusal
    is counted, and health is answered throughout."""
    admin = f"127.0.0.1:{free_port()}"
    gate = start_gate_process(redis_proc.url, bundle_dir, "--budget-ms", "25", "--metrics-listen", admin)
    try:
        await closed_loop(gate.target, callers=16, seconds=0.2)  # warm-up (lazy imports, caches)
        # Median of three: one step slowed (or flattered) by a neighbour does not set the load.
        max_rps = sorted([await closed_loop(gate.target, callers=16, seconds=0.3) for _ in range(3)])[1]
        answers, health = await open_loop(gate.target, rate=OVERLOAD * max_rps, seconds=2.0)
        shed = shed_total(admin)
    finally:
        gate.stop()
    codes = Counter(a.code for a in answers)
    steady = [a for a in answers if a.sent > 0.5]  # past the onset (the window, the ramp)
    summary = describe(max_rps, steady)
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes  # no DEADLINE_EXCEEDED, CANCELLED
    assert shed == codes["RESOURCE_EXHAUSTED"]  # every refusal is the gate's, and counted
    assert health == health_pb2.HealthCheckResponse.SERVING
    refused = [a.latency_s for a in steady if a.code == "RESOURCE_EXHAUSTED"]
    served = [a.latency_s for a in steady if a.code == "OK"]
    assert len(refused) >= 0.05 * len(steady), summary
    # Still serving, not refusing everything. A refusal costs gRPC's Python layer ~1/3 of a
    # served call's CPU, so the share served is well below 1/1.5 (measured 2-60 %).
    assert len(served) >= 0.01 * len(steady), summary
    # Without admission control the backlog grows by ~max_rps / 2 calls per second of the run,
    # so calls sent after 0.5 s wait 0.25-1 s and more (measured, same procedure: p50 0.25-2.4 s
    # with under 5 % refused, or p50 0.74 s with 11 %). With it they wait behind at most the
    # calls held (32-64): measured p50 25-150 ms, p90 50-350 ms on a quiet machine, p50 up to
    # ~400 ms while the VM's host steals CPU. The bounds leave room for that, not for a queue
    # that grows with the run.
    for latencies in (refused, served):
        assert p(latencies, 0.5) < 0.5 and p(latencies, 0.9) < 1.0, summary
