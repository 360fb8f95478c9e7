"""Admission control: refuse new calls at once while this process holds a standing backlog.

Why the handlers cannot simply count their own calls: a worker runs one Python event loop, and
the grpc.aio server takes calls out of gRPC core one at a time, once per trip round that loop.
When the loop is CPU-saturated, calls pile up *inside gRPC core*, before any Python sees them: at
2x the max load the handlers held fewer than 10 Checks while hundreds more waited in core, each
until its deadline. Event-loop lag (node's toobusy) hardly sees this either: a busy loop is late
by about one trip round it, ~1 ms, whether 10 or 1,000 calls wait (measured: timer lag p50 went
from ~0.5 ms at half load to ~1.2 ms at 2x, while the wait in core grew to seconds).

What does see the backlog is gRPC core's own per-server call counters (channelz): calls started
minus calls finished is the number of calls held by this process, wherever they wait, counted
from the moment their headers arrive. :class:`Admission` reads that count now and then: a read
renders channelz JSON under the GIL, 0.1-1 ms (more on a busy server), so reads are rationed:
only while calls arrive, every ``sample_s`` while the last read was between ``shed_start`` and
``max_concurrency`` (where the decision is made), 5x less often below (~2 % of a worker at its
max throughput) and 2x less often above. It keeps the fewest calls held over the last
``window_s``: the backlog that has *stood* that long (CoDel's idea). A burst that drains within
the window is served whole; once a read shows the backlog gone, refusals stop. Then:

* standing backlog up to ``shed_start`` calls: admit;
* from ``shed_start`` to ``max_concurrency``: refuse with a probability rising linearly from 0
  to 1 (a ramp, not a cliff, so the admitted share settles instead of flapping between all and
  none, and the backlog settles inside the ramp: its width bounds the queueing);
* and always refuse while ``max_concurrency`` admitted calls are still running in the handlers
  (the bound the gate always had; exact, so the first calls of a burst are the ones served).

A client that keeps at most ``shed_start`` calls in flight per process is never refused by the
backlog rule. One that keeps more gets refusals, and if it resends at once instead of backing
off it keeps the backlog standing and gains nothing: its refusals only cost CPU (measured: 64
callers resending at once against one worker, goodput fell from ~1,000 to ~200 Checks/s).

Refusing is cheap for the gate (no validation, hashing or Redis) but not free: gRPC's Python
layer spends about what an echo call costs (0.4-0.5 ms of the worker), so beyond ~2,000 calls/s
per worker with a CPU to itself (~1,000/s on the benchmark's shared 2 CPUs) even refusing
everything cannot keep up, the backlog stands past ``max_concurrency`` and refusals wait in it
too, and past 1,000 pending calls gRPC core's own limit cancels calls (the caller sees
CANCELLED). More workers (or instances) are the answer there.

Long-lived streams (``grpc.health.v1.Health/Watch``) hold a call for as long as the watcher
stays; the server registers them with :meth:`Admission.stream` so they are not taken for load.
The counters are read with ``grpc._cython.cygrpc.channelz_get_server``, the function the
grpcio-channelz package is built on: not a public API. Without it (another gRPC build, or a read
that fails) only the running calls are counted, which is what the gate did before, and a warning
is logged once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator

from gate.settings import Settings

log = logging.getLogger(__name__)

CallCounter = Callable[[], int]
"""Returns the calls currently held by one gRPC server (started, not yet finished)."""

CALM_READS_EVERY = 5
"""While the last read showed no more than ``shed_start`` calls held, read 5x less often."""
DEEP_READS_EVERY = 2
"""While it showed more than ``max_concurrency`` (every new call is refused anyway), 2x less
often: in deep overload the worker needs its CPU for refusing."""

_COUNTERS = [
    re.compile(rb'"%s":"(\d+)"' % name.encode()) for name in ("callsStarted", "callsSucceeded", "callsFailed")
]


class Admission:
    """Decides whether a new call may start; one per server (per worker process).

    ``admit()`` is asked once at the top of a handler; when it says True the handler must call
    ``release()`` when it ends. ``counter`` reads the calls held from gRPC core (see
    :func:`find_new_server`); without it only the running calls count. ``clock`` and ``rand``
    are injectable for tests.
    """

    def __init__(
        self,
        *,
        shed_start: int,
        max_concurrency: int,
        sample_s: float,
        window_s: float,
        counter: CallCounter | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 1 <= shed_start <= max_concurrency:
            raise ValueError("need 1 <= shed_start <= max_concurrency")
        if sample_s <= 0 or window_s <= 0:
            raise ValueError("sample_s and window_s must be > 0")
        self.shed_start = shed_start
        self.max_concurrency = max_concurrency
        self.sample_s = sample_s
        self.window_s = window_s
        self.counter = counter
        self.clock = clock
        self.rand = rand
        self.active = 0
        """Calls admitted and not yet released (running in the handlers)."""
        self.streams = 0
        """Long-lived streams open (health watchers): held by core, but no load."""
        self.held = 0.0
        """Calls the process has held throughout the last ``window_s`` (the fewest read)."""
        self.last_read = 0
        """Calls held at the last read of ``counter`` (streams excluded)."""
        self._read_at = -math.inf
        self._reads: collections.deque[list[float]] = collections.deque()
        """[calls held, when the next read replaced it] of the reads that stood in the window
        and can still be its fewest: a sliding minimum, values increasing front to back."""
        self._next_read_s = sample_s  # time to the next read: sample_s, or 2x or 5x that

    @classmethod
    def from_settings(cls, settings: Settings, counter: CallCounter | None = None) -> Admission:
        """The controller the settings describe (``shed_start`` capped at the maximum)."""
        return cls(
            shed_start=min(settings.shed_start, settings.max_concurrency),
            max_concurrency=settings.max_concurrency,
            sample_s=settings.admission_sample_ms / 1000.0,
            window_s=settings.admission_window_ms / 1000.0,
            counter=counter,
        )

    def admit(self) -> bool:
        """True to serve a new call (it is counted until ``release()``), False to refuse it with
        RESOURCE_EXHAUSTED now: ``shed()`` then ``enter()``."""
        if self.shed():
            return False
        return self.enter()

    def shed(self) -> bool:
        """True to refuse a new call now. Asked as soon as the call reaches Python, before its
        request is read or parsed (gate/server.py), so a refusal costs gRPC's minimum."""
        if self.active >= self.max_concurrency:
            return True
        if self.counter is not None:
            now = self.clock()
            since = now - self._read_at
            if since > max(2 * self._next_read_s, self.window_s):
                self._restart(now)
            elif since >= self._next_read_s:
                self._read(now)
        excess = self.held - self.shed_start
        return excess > 0 and self.rand() * (self.max_concurrency - self.shed_start) < excess

    def enter(self) -> bool:
        """Count a call ``shed()`` let through, unless ``max_concurrency`` calls are running
        already (calls admitted together can pass ``shed()`` before any of them entered)."""
        if self.active >= self.max_concurrency:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        """An admitted call ended."""
        self.active -= 1

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Mark a long-lived stream (e.g. a health Watch) for as long as it stays open."""
        self.streams += 1
        try:
            yield
        finally:
            self.streams -= 1

    def _restart(self, now: float) -> None:
        """No call reached a handler for a whole window (not merely a read interval: a process
        the kernel did not run for a few ms, under overload, has not gone idle), so nothing stood
        in front of them: the window restarts from an empty process. No read is needed for that
        (nor paid for by the first call after a pause): a backlog must now stand a whole window
        after the next read."""
        self._reads.clear()
        self._reads.append([0, math.inf])
        self.held = 0.0
        self.last_read = 0
        self._read_at = now
        self._next_read_s = self.sample_s

    def _read(self, now: float) -> None:
        assert self.counter is not None
        try:
            count = self.counter()
        except Exception as exc:  # a gRPC build without channelz, or a format change
            log.warning(
                "calls held cannot be read from gRPC core; admission counts only the running calls",
                extra={"error": repr(exc)},
            )
            self.counter = None
            self.held = 0.0
            return
        reads = self._reads
        if reads:
            reads[-1][1] = now  # the previous read stood until now
        self.last_read = max(count - self.streams, 0)
        self._read_at = now
        while reads and reads[-1][0] >= self.last_read:
            reads.pop()  # cannot be the fewest while this newer, smaller read stands
        reads.append([self.last_read, math.inf])
        while reads[0][1] <= now - self.window_s:
            reads.popleft()  # stood only before the window
        self.held = reads[0][0]
        if self.last_read <= self.shed_start:
            self._next_read_s = self.sample_s * CALM_READS_EVERY
        elif self.last_read > self.max_concurrency:
            self._next_read_s = self.sample_s * DEEP_READS_EVERY
        else:
            self._next_read_s = self.sample_s


def channelz_server_ids() -> list[int]:
    """Ids of the gRPC servers of this process in gRPC core's channelz registry (sorted)."""
    from grpc._cython import cygrpc  # the functions grpcio-channelz is built on

    ids: list[int] = []
    start = 0
    while True:
        page = cygrpc.channelz_get_servers(start)
        found = [int(i) for i in re.findall(rb'"serverId":"(\d+)"', page)]
        ids.extend(found)
        if not found or b'"end":true' in page:
            return sorted(set(ids))
        start = max(found) + 1


def channelz_counter(server_id: int) -> CallCounter:
    """Reads calls started minus calls finished of one server from gRPC core's channelz.

    Core counts a call as started when its headers arrive, before it waits to be taken by
    Python, so the difference includes the backlog the event loop has not reached yet.
    """
    from grpc._cython import cygrpc

    def held() -> int:
        data = cygrpc.channelz_get_server(server_id)
        started, succeeded, failed = (
            int(m.group(1)) if (m := pattern.search(data)) else 0 for pattern in _COUNTERS
        )
        return started - succeeded - failed

    held()  # fail here, at start-up, rather than on the first call
    return held


def server_ids_or_none() -> list[int] | None:
    """``channelz_server_ids()``, or None when channelz cannot be read."""
    try:
        return channelz_server_ids()
    except Exception:
        return None


def find_new_server(before: list[int] | None) -> CallCounter | None:
    """The counter of the one server created since ``before = server_ids_or_none()``; None
    (with a warning) when it cannot be told apart or channelz is not available."""
    try:
        if before is None:
            raise RuntimeError("channelz was not readable before the server was made")
        new = sorted(set(channelz_server_ids()) - set(before))
        if len(new) == 1:
            return channelz_counter(new[0])
        reason = f"{len(new)} new servers in channelz"
    except Exception as exc:
        reason = repr(exc)
    log.warning(
        "gRPC core's call counters are not readable; admission counts only the running calls",
        extra={"reason": reason},
    )
    return None
