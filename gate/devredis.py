"""A throw-away redis-server for tests, training and benchmarks: free port, no persistence.

Not used by the service itself, which connects to the Redis its settings name.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisProcess:
    """A redis-server child process on 127.0.0.1:port."""

    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _die_with_parent() -> None:
    """Linux: SIGTERM the child when the process that started it dies, even if killed, so an
    interrupted test run leaves no redis-server behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_redis(port: int | None = None, timeout_s: float = 10.0) -> RedisProcess:
    """Start redis-server and return once it answers PING (or raise with its log).

    A given port is retried until the timeout: right after a Redis on it was killed, a client
    still connecting to it can hold the port for a moment (a TCP self-connect), and the new
    server then fails to bind.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install redis-server")
    fixed_port = port is not None
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="rg-redis-"))
    log_path = workdir / "redis.log"
    deadline = time.monotonic() + timeout_s
    while True:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--protected-mode",
                "no",
                "--logfile",
                str(log_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        if _wait_ready(proc, port, deadline):
            return RedisProcess(port, proc, workdir)
        proc.kill()
        proc.wait(timeout=10)
        if not fixed_port or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(f"redis-server did not start on port {port}:\n{tail}")
        time.sleep(0.1)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    """True once this process answers on port (not another Redis holding the port); False if
    it exited or the deadline passed."""
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        while proc.poll() is None and time.monotonic() <= deadline:
            with contextlib.suppress(redis.ConnectionError):
                if client.info("server")["process_id"] == proc.pid:
                    return True
            time.sleep(0.02)
        return False
    finally:
        client.close()
