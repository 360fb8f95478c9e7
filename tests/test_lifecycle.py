"""The gate's life as a process: drain on SIGTERM under load, one line for a start-up failure,
supervised workers, and 'waiting for Redis' while Redis does not answer."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gate.bundle import Bundle
from gate.devredis import RedisProcess, free_port
from gate.server import create_gate
from gate.settings import Settings
from gate.workers import Backoff
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc
from tests.conftest import make_request
from tests.faultproxy import FaultProxy
from tests.gateproc import CLI, GateProcess, start_gate_process

DRAIN_S = 3.0
TRANSIT_S = 0.1
"""Time allowed for a call to travel from the test's client to the gate on a busy machine."""


@dataclass
class Traffic:
    """Checks sent back to back from several threads until stopped: (start, end, code) each."""

    target: str
    calls: list[tuple[float, float, grpc.StatusCode]] = field(default_factory=list)
    statuses: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    sigterm: float = 0.0
    answered: threading.Condition = field(default_factory=threading.Condition)

    def relative(self, calls: list[tuple[float, float, grpc.StatusCode]]) -> list[object]:
        """Calls with times in seconds after SIGTERM, for failure messages."""
        return [(round(a - self.sigterm, 3), round(b - self.sigterm, 3), c.name) for a, b, c in calls]

    def first_status_after_sigterm(self, status: int) -> float | None:
        return next((t for t, s in self.statuses if t >= self.sigterm and s == status), None)

    def send(self, worker: int) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.RefundGateStub(channel)
            n = 0
            while not self.stop.is_set():
                n += 1
                request = make_request(refund_id=f"rf:{worker}:{n}", account_id=f"acct:{worker}:{n}")
                start = time.time()
                try:
                    stub.Check(request, timeout=5)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()  # type: ignore[attr-defined]
                with self.answered:
                    self.calls.append((start, time.time(), code))
                    self.answered.notify_all()

    def watch(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            try:
                for update in stream:
                    self.statuses.append((time.time(), update.status))
            except grpc.RpcError:
                pass  # the stream ends when the server stops


def through_sigterm(
    gate: GateProcess, senders: int, at_sigterm: Callable[[], object] = lambda: None
) -> Traffic:
    """Steady Checks from ``senders`` threads and a health watcher; SIGTERM once 50 Checks were
    answered (``at_sigterm`` runs then); wait for a clean exit; return what the callers saw."""
    traffic = Traffic(gate.target)
    threads = [threading.Thread(target=traffic.send, args=(i,)) for i in range(senders)]
    threads.append(threading.Thread(target=traffic.watch))
    for t in threads:
        t.start()
    with traffic.answered:
        steady = traffic.answered.wait_for(
            lambda: sum(code == grpc.StatusCode.OK for *_, code in traffic.calls) >= 50, timeout=30
        )
    assert steady, "no steady load"
    at_sigterm()
    traffic.sigterm = time.time()
    gate.proc.send_signal(signal.SIGTERM)
    code = gate.proc.wait(timeout=30)
    traffic.stop.set()
    for t in threads:
        t.join(timeout=30)
    logs = gate.log_path.read_text()
    assert code == 0 and "Traceback" not in logs, logs[-3000:]
    return traffic


def test_sigterm_drains_under_load_with_no_failed_call(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path
) -> None:
    gate = start_gate_process(
        redis_proc.url, bundle_dir, "--allow-client-time", "--drain-s", str(DRAIN_S), "--grace-s", "2"
    )
    traffic = through_sigterm(gate, senders=4)
    # The drain's timer starts once the gate has the signal, so its listener closes no sooner than
    # this; a call sent within TRANSIT_S of that may reach the gate after it closed.
    closed = traffic.sigterm + DRAIN_S
    during_drain = [c for c in traffic.calls if traffic.sigterm <= c[0] < closed - TRANSIT_S]
    assert len(during_drain) >= 50, "load did not go on through the drain"
    assert all(c[2] == grpc.StatusCode.OK for c in during_drain), traffic.relative(
        [c for c in during_drain if c[2] != grpc.StatusCode.OK]
    )
    failed = [c for c in traffic.calls if c[2] != grpc.StatusCode.OK]
    assert all(c[0] >= closed - TRANSIT_S for c in failed), traffic.relative(failed)  # once it closed
    # Calls that reach the gate as its listener closes are refused, never half-served.
    assert {c[2] for c in failed} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    not_serving = traffic.first_status_after_sigterm(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert not_serving is not None and not_serving < traffic.sigterm + 1.0  # at once
    assert not failed or not_serving < min(c[0] for c in failed)


def test_calls_in_flight_when_the_listener_closes_are_finished(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path
) -> None:
    # Redis 150 ms away each way: every Check is in the gate's hands for 300 ms or more, so
    # several are in flight when the listener closes.
    proxy = FaultProxy(redis_proc.port).start()
    proxy.set_mode("latency", 0.15)
    try:
        gate = start_gate_process(
            f"redis://127.0.0.1:{proxy.port}/0",
            bundle_dir,
            *("--allow-client-time", "--drain-s", str(DRAIN_S), "--grace-s", "3", "--budget-ms", "2000"),
            *("--redis-connect-timeout-ms", "2000"),
        )
        traffic = through_sigterm(gate, senders=8)
    finally:
        proxy.stop()
    closed = traffic.sigterm + DRAIN_S
    in_flight = [c for c in traffic.calls if c[0] < closed - TRANSIT_S and c[1] > closed]
    assert len(in_flight) >= 1, "no call was in flight at the close"
    assert all(c[2] == grpc.StatusCode.OK for c in in_flight), traffic.relative(in_flight)
    assert all(c[2] == grpc.StatusCode.OK for c in traffic.calls if c[0] < closed - TRANSIT_S)


def test_sigint_stops_without_waiting_for_the_drain(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path
) -> None:
    gate = start_gate_process(redis_proc.url, bundle_dir, "--drain-s", "120")
    start = time.monotonic()
    gate.proc.send_signal(signal.SIGINT)
    assert gate.proc.wait(timeout=60) == 0
    assert time.monotonic() - start < 60


def serve_and_fail(bundle_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`refund-gate serve` expected to refuse to start; its exit code and output."""
    return subprocess.run(
        [*CLI, "serve", "--model-dir", str(bundle_dir), "--redis-url", "redis://127.0.0.1:1/0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def plain_lines(stderr: str) -> list[str]:
    """Lines of stderr that are not JSON log records: what an operator reads as the error."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


@contextmanager
def taken_port() -> Iterator[int]:
    """A port some other process holds (listening), the port below it free."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        while not _free(holder.getsockname()[1] - 1):
            holder.close()
            holder = socket.socket()
            holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("flag", "setting"),
    [
        ("--listen", "GATE_LISTEN"),
        ("--admin-listen", "GATE_ADMIN_LISTEN"),
        ("--metrics-listen", "GATE_METRICS_LISTEN"),
    ],
)
def test_a_taken_port_is_one_line_naming_address_and_setting(
    bundle_dir: Path, flag: str, setting: str
) -> None:
    others = ["--listen", f"127.0.0.1:{free_port()}", "--admin-listen", "", "--metrics-listen", ""]
    with taken_port() as port:
        proc = serve_and_fail(bundle_dir, *others, flag, f"127.0.0.1:{port}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = plain_lines(proc.stderr)
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and setting in lines[0], proc.stderr
    assert "address already in use" in lines[0]


def test_a_worker_that_cannot_bind_its_admin_port_exits_the_gate(bundle_dir: Path, tmp_path: Path) -> None:
    with taken_port() as port:
        base = port - 1  # worker 0 gets `port - 1`, worker 1 the taken one
        proc = serve_and_fail(
            bundle_dir,
            "--workers",
            "2",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--metrics-listen",
            "",
            "--admin-listen",
            f"127.0.0.1:{base}",
            "--drain-s",
            "0",
        )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = plain_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "GATE_ADMIN_LISTEN" in lines[0] and "worker 1" in lines[0]


def scrape_restarts(address: str) -> float | None:
    """refundgate_worker_restarts_total of one worker's metrics endpoint; None while it is down."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("refundgate_worker_restarts_total"):
            return float(line.rsplit(" ", 1)[1])
    return None


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_killed_worker_is_restarted_logged_and_counted(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path
) -> None:
    metrics = free_port()
    while not _free(metrics + 1):
        metrics = free_port()
    gate = start_gate_process(
        redis_proc.url, bundle_dir, "--workers", "2", "--metrics-listen", f"127.0.0.1:{metrics}"
    )
    try:
        addresses = [f"127.0.0.1:{metrics + i}" for i in range(2)]
        deadline = time.monotonic() + 30
        while [scrape_restarts(a) for a in addresses] != [0.0, 0.0]:  # both up, exported at 0
            assert time.monotonic() < deadline, "workers never exported the restart counter"
            time.sleep(0.05)
        victim = children(gate.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while sorted(scrape_restarts(a) or 0.0 for a in addresses) != [0.0, 1.0]:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.05)
        assert victim not in children(gate.proc.pid) and len(children(gate.proc.pid)) == 2
    finally:
        records = gate.stop()
    died = [r for r in records if r["message"] == "worker died; restarting it"]
    assert len(died) == 1 and died[0]["pid"] == victim and died[0]["exit"] == "killed by SIGKILL"


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_waiting_for_redis_is_logged_every_few_seconds(
    bundle: Bundle, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = Settings.from_env(
        {}, listen="127.0.0.1:0", admin_listen="", redis_url=f"redis://127.0.0.1:{port}/0"
    )
    gate = create_gate(settings, bundle)
    gate.redis_wait_log_s = 0.3  # five seconds in production
    caplog.set_level(logging.WARNING, logger="gate.server")
    await gate.start()
    try:
        deadline = time.monotonic() + 20
        while len(waits := [r for r in caplog.records if r.getMessage().startswith("waiting for")]) < 3:
            assert time.monotonic() < deadline, "no 'waiting for Redis' lines"
            await asyncio.sleep(0.05)
    finally:
        await gate.stop(0.5)
    assert waits[0].getMessage() == f"waiting for Redis at 127.0.0.1:{port} (connection refused)"
    gaps = [b.created - a.created for a, b in itertools.pairwise(waits)]
    assert all(gap >= 0.25 for gap in gaps), gaps  # every interval, not at every retry


def test_a_gate_without_redis_says_so_at_start_up(bundle_dir: Path) -> None:
    port = free_port()
    gate = start_gate_process(f"redis://127.0.0.1:{port}/0", bundle_dir, wait=False)
    try:
        deadline = time.monotonic() + 20
        while f"waiting for Redis at 127.0.0.1:{port} (connection refused)" not in gate.log_path.read_text():
            assert time.monotonic() < deadline, gate.log_path.read_text()[-2000:]
            time.sleep(0.05)
    finally:
        records = gate.stop()
    waits = [r for r in records if r["message"].startswith("waiting for Redis")]
    assert waits and waits[0]["level"] == "WARNING"
    assert json.dumps(records).count("Traceback") == 0


def test_the_restart_backoff_doubles_per_quick_death_and_is_bounded() -> None:
    backoff = Backoff(first_s=0.5, max_s=30.0)
    assert [backoff.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff.delay(50) == 30.0
