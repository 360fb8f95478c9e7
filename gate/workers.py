"""Worker processes: fork them, restart one that dies, stop them all on SIGTERM/SIGINT.

A worker that exits with ``FATAL_EXIT`` has said (one line on stderr) that it can never start,
e.g. its port is taken: the supervisor stops the others and the gate exits with that code. Any
other death (a crash, a signal such as the OOM killer's SIGKILL) while the gate is not stopping
is logged and the worker is restarted after a backoff that doubles per quick death up to
``max_backoff_s``, so a gate never runs silently on part of its capacity. ``restarts(i)`` is how
often slot ``i`` was restarted; a worker reads it (inherited at fork) to export it as a metric.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

FATAL_EXIT = 2
"""Exit code of a worker that cannot start (bad address, port taken): restarting cannot help."""

_restarts: dict[int, int] = {}


def restarts(slot: int) -> int:
    """How often worker ``slot`` was restarted before the current process of that slot began."""
    return _restarts.get(slot, 0)


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a worker: ``first_s`` doubled per death that came within
    ``stable_s`` of its start, at most ``max_s``; a worker that lived ``stable_s`` resets it."""

    first_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0

    def delay(self, quick_deaths: int) -> float:
        """Seconds to wait after ``quick_deaths`` deaths in a row (>= 1)."""
        return min(self.max_s, self.first_s * 2 ** (quick_deaths - 1))


@dataclass
class _Slot:
    pid: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None


def describe_exit(status: int) -> str:
    """``exit code N`` or ``killed by SIGNAME`` for a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def fork_workers(count: int, run: Callable[[int], None], backoff: Backoff | None = None) -> int:
    """Fork ``count`` processes running ``run(i)`` and supervise them until they have all exited.

    SIGTERM/SIGINT are forwarded to every worker and end supervision. Returns 0 after a clean
    stop, ``FATAL_EXIT`` when a worker could not start, else the first non-zero exit code.
    Call it before any gRPC object exists in this process.
    """
    backoff = backoff or Backoff()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    slots = [_Slot() for _ in range(count)]
    stopping: list[int] = []  # the signal that stops the gate, once one came
    status = 0

    def spawn(i: int) -> None:
        pid = os.fork()
        if pid == 0:
            _child(run, i, (wake_r, wake_w))
        slots[i].pid, slots[i].started, slots[i].restart_at = pid, time.monotonic(), None

    def stop_all(signum: int) -> None:
        if not stopping:
            stopping.append(signum)
        for slot in slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    def on_signal(signum: int, _frame: Any) -> None:
        stop_all(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    try:
        for i in range(count):
            spawn(i)
        while any(slot.pid for slot in slots) or (not stopping and any(s.restart_at for s in slots)):
            due = [s.restart_at for s in slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due and not stopping else None
            select.select([wake_r], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            for i, slot in enumerate(slots):
                if not slot.pid:
                    continue
                pid, code = os.waitpid(slot.pid, os.WNOHANG)
                if pid == 0:
                    continue
                slot.pid = 0
                exit_code = os.waitstatus_to_exitcode(code)
                if stopping:
                    status = status or (exit_code if exit_code > 0 else 0)
                    continue
                if exit_code == FATAL_EXIT:
                    status = FATAL_EXIT
                    stop_all(signal.SIGINT)  # no drain: the gate never served as configured
                    continue
                lived = time.monotonic() - slot.started
                slot.quick_deaths = slot.quick_deaths + 1 if lived < backoff.stable_s else 1
                delay = backoff.delay(slot.quick_deaths)
                slot.restart_at = time.monotonic() + delay
                log.error(
                    "worker died; restarting it",
                    extra={
                        "worker": i,
                        "pid": pid,
                        "exit": describe_exit(code),
                        "lived_s": round(lived, 3),
                        "restart_in_s": delay,
                        "restarts": _restarts.get(i, 0) + 1,
                    },
                )
            now = time.monotonic()
            for i, slot in enumerate(slots):
                if not stopping and slot.restart_at is not None and slot.restart_at <= now:
                    _restarts[i] = _restarts.get(i, 0) + 1
                    spawn(i)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)
    return status


def _child(run: Callable[[int], None], i: int, fds: tuple[int, int]) -> None:
    """The forked worker: its own signal handling, ``run(i)``, then ``os._exit`` with its code."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for fd in fds:
        os.close(fd)
    code = 0
    try:
        run(i)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("worker crashed", extra={"worker": i})
        code = 1
    finally:
        from gate.logs import flush_logs

        flush_logs()
        sys.stderr.flush()
        os._exit(code)
