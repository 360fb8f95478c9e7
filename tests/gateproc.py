"""Run the gate as a real process (`python -m gate.cli serve`) for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gate.devredis import free_port

CLI = [sys.executable, "-m", "gate.cli"]


@dataclass
class GateProcess:
    """A gate subprocess listening on ``target``; its log goes to a file, never a pipe (a
    full pipe would block the gate's event loop on a log write)."""

    proc: subprocess.Popen[str]
    target: str
    log_path: Path

    def stop(self) -> list[dict[str, object]]:
        """SIGTERM, wait, and return its JSON log lines; fails if the exit was not clean."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=20)
        logs = self.log_path.read_text()
        assert code == 0, logs[-4000:]
        assert "Traceback" not in logs, logs[-4000:]
        return [json.loads(line) for line in logs.splitlines() if line.startswith("{")]


def wait_serving(target: str, service: str = "", timeout_s: float = 20.0) -> None:
    """Block on the health Watch stream until ``service`` is SERVING (bounded by its deadline)."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        stub = health_pb2_grpc.HealthStub(channel)
        for update in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s):
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                return
    raise AssertionError("gate never reported SERVING")


def start_gate_process(
    redis_url: str, bundle_dir: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True
) -> GateProcess:
    """Start `refund-gate serve` on a free port and wait until it is SERVING."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="gate-", suffix=".log")[1])
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                *CLI,
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--model-dir",
                str(bundle_dir),
                "--redis-url",
                redis_url,
                "--grace-s",
                "2",
                "--admin-listen",
                "",
                "--metrics-listen",
                "",
                "--drain-s",
                "0",
                "--budget-ms",
                "250",
                *args,
            ],  # behaviour tests; later args (e.g. a budget) win
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            text=True,
            env={**os.environ, **(env or {})},
        )
    gate = GateProcess(proc, f"127.0.0.1:{port}", log_path)
    if wait:
        try:
            wait_serving(gate.target)
        except BaseException:
            proc.kill()
            raise
    return gate
