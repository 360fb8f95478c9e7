"""Load generator for ``make bench``: grpc.aio client, closed loop then open loop, one target.

Procedure (the same for the echo baseline and for the gate, so their figures compare):

1. open ``--channels`` channels, each its own TCP connection, pinned evenly to the server's
   worker processes (SO_REUSEPORT hashes connections to workers at random; a 3:1 split would
   measure one busy worker, so connections are reopened until the split is even);
2. closed loop at each ``--concurrencies`` value (N coroutines, each sends its next call as soon as
   the previous one returns): throughput and latency, after a warm-up;
3. open loop at ``--open-fraction`` of the best closed-loop throughput: arrivals paced by a timer
   thread (Poisson by default), latency measured from each call's *scheduled* send time, so a
   server (or client) that falls behind shows as queueing instead of silently slowing the
   arrivals (coordinated omission).

Around every measured window it samples: CPU time of the server processes (``/proc/<pid>/stat``,
utime+stime, all threads, forked workers included), of this process and of redis-server, and
Redis ``INFO commandstats``. Requests are real, valid CheckRequests over a population of accounts
(Zipf-skewed), devices, IPs, merchants and orders, with unique refund ids and a small share of
retries (identical bytes, same refund id). The result is one JSON document (``--out``).

    python -m bench.loadgen --target 127.0.0.1:50051 --pids 123,124 --out -
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import gc
import itertools
import json
import math
import os
import random
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from refundgate.v1 import refund_gate_pb2 as pb

CHECK_METHOD = "/refundgate.v1.RefundGate/Check"
EVENTS_METHOD = "/refundgate.v1.RefundGate/RecordEvents"
HEALTH_METHOD = "/grpc.health.v1.Health/Check"
SERVICE_NAME = "refundgate.v1.RefundGate"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_ESTABLISHED, TCP_LISTEN = 0x01, 0x0A
MAX_OUTSTANDING = 4096  # open loop: beyond this many calls in flight, arrivals are dropped

# ---------------------------------------------------------------------------------------------
# /proc helpers (Linux)
# ---------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread, dead threads included) of a live process."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all CPUs (``/proc/stat``)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / CLK_TCK, (f[7] if len(f) > 7 else 0) / CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. the workers a server forked)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
    except FileNotFoundError:  # no such process, or a kernel without CONFIG_PROC_CHILDREN
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{entry}/stat", "rb") as fh:
                        stat = fh.read()
                    if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
                        found.append(int(entry))
    return sorted(set(found))


def _tcp_sockets(port: int) -> list[tuple[int, int]]:
    """(state, inode) of every TCP socket whose local port is ``port``."""
    out: list[tuple[int, int]] = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                lines = fh.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port:
                out.append((int(parts[3], 16), int(parts[9])))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    with contextlib.suppress(FileNotFoundError, PermissionError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


def port_owners(port: int, pids: Iterable[int]) -> tuple[dict[int, int], dict[int, int]]:
    """Which of ``pids`` listens on ``port`` (pid -> listening sockets), and which owns each
    accepted connection (server-side inode -> pid)."""
    sockets = _tcp_sockets(port)
    by_pid = {pid: _socket_inodes(pid) for pid in pids}
    listening: dict[int, int] = collections.Counter()
    accepted: dict[int, int] = {}
    for state, inode in sockets:
        for pid, inodes in by_pid.items():
            if inode in inodes:
                if state == TCP_LISTEN:
                    listening[pid] += 1
                elif state == TCP_ESTABLISHED:
                    accepted[inode] = pid
    return dict(listening), accepted


def _established(port: int) -> set[int]:
    return {inode for state, inode in _tcp_sockets(port) if state == TCP_ESTABLISHED}


# ---------------------------------------------------------------------------------------------
# Channels pinned evenly to worker processes, and readiness
# ---------------------------------------------------------------------------------------------


def new_channel(target: str) -> grpc.aio.Channel:
    """A channel with its own TCP connection (no sharing through the global subchannel pool)."""
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


V2_MODEL: str | None = None
"""Set by ``--protocol v2``: the target speaks the Open Inference Protocol (MLServer) and serves
this model; readiness is its ModelReady and each Check is sent as that model's ModelInfer."""


async def health_status(channel: grpc.aio.Channel, timeout_s: float = 1.0) -> int:
    """The health status of RefundGate through this channel (raises grpc.RpcError)."""
    if V2_MODEL is not None:
        from bench import mlserver_peer

        ready = channel.unary_unary(mlserver_peer.READY_METHOD)
        reply = await ready(mlserver_peer.ready_request(V2_MODEL), timeout=timeout_s)
        return int(health_pb2.HealthCheckResponse.SERVING if reply == b"\x08\x01" else 0)
    call = channel.unary_unary(
        HEALTH_METHOD,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    resp = await call(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
    return int(resp.status)


async def pinned_channels(
    target: str, workers: Sequence[int], n: int, deadline: float
) -> list[tuple[grpc.aio.Channel, int]]:
    """``n`` channels spread evenly over the ``workers`` pids that accepted their connections.

    A worker's share is ``n / len(workers)`` (rounded up); a connection the kernel hands to a
    worker whose share is full is closed and reopened. Raises TimeoutError past ``deadline``
    (``time.monotonic()``).
    """
    port = int(target.rsplit(":", 1)[1])
    quota = math.ceil(n / len(workers))
    kept: list[tuple[grpc.aio.Channel, int]] = []
    count: dict[int, int] = collections.Counter()
    while len(kept) < n:
        if time.monotonic() > deadline:
            for ch, _ in kept:
                await ch.close()
            raise TimeoutError(f"could not spread {n} connections over workers {list(workers)}")
        before = _established(port)
        channel = new_channel(target)
        try:
            await health_status(channel)
        except grpc.RpcError:
            await channel.close()
            await asyncio.sleep(0.05)
            continue
        _, accepted = port_owners(port, workers)
        new = [accepted[i] for i in accepted if i not in before]
        if len(new) == 1 and count[new[0]] < quota:
            count[new[0]] += 1
            kept.append((channel, new[0]))
        else:
            await channel.close()
    return kept


async def wait_ready(target: str, workers: Sequence[int], timeout_s: float) -> float:
    """Wait until every worker listens and answers SERVING for RefundGate; return the seconds
    it took. Polls the health service over connections pinned to each worker (no fixed sleeps)."""
    started = time.monotonic()
    deadline = started + timeout_s
    port = int(target.rsplit(":", 1)[1])
    while set(port_owners(port, workers)[0]) != set(workers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target}: not every worker of {list(workers)} listens")
        await asyncio.sleep(0.02)
    pinned = await pinned_channels(target, workers, len(workers), deadline)
    try:
        for channel, _ in pinned:
            while True:
                try:
                    if await health_status(channel) == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target}: not SERVING within {timeout_s} s")
                await asyncio.sleep(0.02)
    finally:
        for channel, _ in pinned:
            await channel.close()
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# Realistic requests
# ---------------------------------------------------------------------------------------------

_CITIES = (
    "BER",
    "HAM",
    "MUC",
    "CGN",
    "FRA",
    "STR",
    "DUS",
    "LEJ",
    "DRS",
    "NUE",
    "PAR",
    "LYS",
    "MAD",
    "BCN",
    "MIL",
    "ROM",
    "AMS",
    "RTM",
    "VIE",
    "ZRH",
    "WAW",
    "PRG",
    "CPH",
    "STO",
    "OSL",
    "HEL",
    "LIS",
    "DUB",
    "BRU",
    "LON",
)
_CURRENCIES = (("EUR", 0.82), ("USD", 0.08), ("GBP", 0.06), ("SEK", 0.04))
_REASONS = (
    (pb.REFUND_REASON_ITEM_NOT_RECEIVED, 0.22),
    (pb.REFUND_REASON_DAMAGED, 0.18),
    (pb.REFUND_REASON_NOT_AS_DESCRIBED, 0.2),
    (pb.REFUND_REASON_CHANGED_MIND, 0.27),
    (pb.REFUND_REASON_DUPLICATE_CHARGE, 0.05),
    (pb.REFUND_REASON_OTHER, 0.08),
)
_CATEGORIES = (
    (pb.ITEM_CATEGORY_PHYSICAL, 0.8),
    (pb.ITEM_CATEGORY_DIGITAL_GOODS, 0.12),
    (pb.ITEM_CATEGORY_SERVICE, 0.08),
)
_DELIVERY = (
    (pb.DELIVERY_STATUS_DELIVERED, 0.6),
    (pb.DELIVERY_STATUS_IN_TRANSIT, 0.14),
    (pb.DELIVERY_STATUS_NOT_SHIPPED, 0.1),
    (pb.DELIVERY_STATUS_UNKNOWN, 0.16),
)
_PAYMENTS = (
    (pb.PAYMENT_METHOD_CARD, 0.55),
    (pb.PAYMENT_METHOD_WALLET, 0.2),
    (pb.PAYMENT_METHOD_BNPL, 0.1),
    (pb.PAYMENT_METHOD_BANK_TRANSFER, 0.08),
    (pb.PAYMENT_METHOD_STORE_CREDIT, 0.04),
    (pb.PAYMENT_METHOD_OTHER, 0.03),
)
_RETURNABLE = frozenset(
    {pb.REFUND_REASON_DAMAGED, pb.REFUND_REASON_NOT_AS_DESCRIBED, pb.REFUND_REASON_CHANGED_MIND}
)
DAY_S = 86400.0


class _Choice:
    """Weighted choice over a small fixed table, one random number per draw."""

    __slots__ = ("cum", "values")

    def __init__(self, table: Sequence[tuple[Any, float]]) -> None:
        self.values = [v for v, _ in table]
        total = sum(w for _, w in table)
        self.cum = list(itertools.accumulate(w / total for _, w in table))

    def __call__(self, rng: random.Random) -> Any:
        return self.values[min(bisect.bisect(self.cum, rng.random()), len(self.values) - 1)]


@dataclass
class Population:
    """Accounts, devices, IPs, merchants and orders the generated traffic is drawn from.

    Account activity is Zipf-skewed (``zipf`` exponent over ranks, ranks shuffled against ids);
    every account has a creation date, a home city, one or two devices (a few share a device
    with other accounts) and one to three IPs (some behind a shared carrier NAT); each account
    shops mostly at a few favourite merchants, merchants themselves Zipf(1.0)-skewed.
    """

    accounts: int = 20_000
    merchants: int = 500
    zipf: float = 0.7
    retry_share: float = 0.03
    seed: int = 1
    run_tag: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = self.rng = random.Random(self.seed)
        now = time.time()
        self.run_tag = self.run_tag or f"{rng.getrandbits(32):08x}"
        weights = [(k + 1) ** -self.zipf for k in range(self.accounts)]
        self._acct_cum = list(itertools.accumulate(weights))
        ids = list(range(self.accounts))
        rng.shuffle(ids)  # rank k is account ids[k]
        self.acct_id = [f"acct:{i:06d}" for i in ids]
        self.acct_created = [
            now - min(3650.0, rng.lognormvariate(5.5, 1.2)) * DAY_S if rng.random() < 0.92 else None
            for _ in ids
        ]
        self.acct_city = [rng.choice(_CITIES) for _ in ids]
        shared_devices = [f"dev:shared:{i}" for i in range(max(1, self.accounts // 200))]
        nat_ips = [f"100.64.{i // 250}.{i % 250 + 1}" for i in range(max(1, self.accounts // 60))]
        self.acct_devices: list[list[str]] = []
        self.acct_ips: list[list[str]] = []
        for i in ids:
            devs = [f"dev:{i:06d}:{d}" for d in range(1 if rng.random() < 0.7 else 2)]
            if rng.random() < 0.03:
                devs.append(rng.choice(shared_devices))
            self.acct_devices.append(devs)
            ips = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                if rng.random() < 0.12:
                    ips.append(
                        f"2001:db8:{rng.getrandbits(16):x}:{rng.getrandbits(16):x}::{rng.getrandbits(16):x}"
                    )
                else:
                    ips.append(
                        f"{rng.randint(11, 223)}.{rng.randint(0, 255)}."
                        f"{rng.randint(0, 255)}.{rng.randint(1, 254)}"
                    )
            if rng.random() < 0.15:
                ips.append(rng.choice(nat_ips))
            self.acct_ips.append(ips)
        m_weights = [1.0 / (k + 1) for k in range(self.merchants)]
        self._merchant_cum = list(itertools.accumulate(m_weights))
        self.acct_merchants = [[self._merchant() for _ in range(3)] for _ in ids]
        self._currency = _Choice(_CURRENCIES)
        self._reason = _Choice(_REASONS)
        self._category = _Choice(_CATEGORIES)
        self._delivery = _Choice(_DELIVERY)
        self._payment = _Choice(_PAYMENTS)
        self._counter = itertools.count()
        self._last_order: dict[int, tuple[str, int, float, str, Any, Any]] = {}
        self._recent: collections.deque[bytes] = collections.deque(maxlen=512)
        total = self._acct_cum[-1]
        self.stats = {
            "accounts": self.accounts,
            "zipf_exponent": self.zipf,
            "merchants": self.merchants,
            "top_account_share": round(weights[0] / total, 5),
            "top_100_accounts_share": round(self._acct_cum[99] / total, 4) if self.accounts >= 100 else 1.0,
            "devices": len({d for ds in self.acct_devices for d in ds}),
            "ips": len({i for ips in self.acct_ips for i in ips}),
            "retry_share": self.retry_share,
            "sent": 0,
            "retries": 0,
            "second_refunds_on_an_order": 0,
        }

    def _merchant(self) -> str:
        r = self.rng.random() * self._merchant_cum[-1]
        return f"m:{bisect.bisect(self._merchant_cum, r):04d}"

    def _account(self) -> int:
        r = self.rng.random() * self._acct_cum[-1]
        return min(bisect.bisect(self._acct_cum, r), self.accounts - 1)

    def _order_age_s(self, category: int) -> float:
        rng = self.rng
        if category == pb.ITEM_CATEGORY_DIGITAL_GOODS and rng.random() < 0.3:
            return rng.uniform(120.0, 3600.0)
        return min(60 * DAY_S, max(600.0, rng.lognormvariate(12.3, 1.0)))  # median ~2.5 days

    def check(self) -> bytes:
        """The next CheckRequest, serialized: new refund id, or now and then a retry."""
        rng = self.rng
        st = self.stats
        st["sent"] += 1
        if self._recent and rng.random() < self.retry_share:
            st["retries"] += 1
            return self._recent[rng.randrange(len(self._recent))]
        now = time.time()
        a = self._account()
        n = next(self._counter)
        last = self._last_order.get(a)
        if last is not None and rng.random() < 0.05:  # a further partial refund on one order
            st["second_refunds_on_an_order"] += 1
            order_id, order_amount, order_at, merchant, category, payment = last
            amount = max(1, int(order_amount * rng.uniform(0.05, 0.5)))
        else:
            category = self._category(rng)
            payment = self._payment(rng)
            merchant = rng.choice(self.acct_merchants[a]) if rng.random() < 0.7 else self._merchant()
            order_id = f"ord:{self.run_tag}:{n}"
            order_amount = max(100, int(rng.lognormvariate(8.3, 1.0)))  # median ~40.00
            order_at = now - self._order_age_s(category)
            amount = (
                order_amount if rng.random() < 0.65 else max(1, int(order_amount * rng.uniform(0.1, 0.9)))
            )
            self._last_order[a] = (order_id, order_amount, order_at, merchant, category, payment)
        reason = self._reason(rng)
        if category == pb.ITEM_CATEGORY_PHYSICAL:
            delivery = self._delivery(rng)
            returned = reason in _RETURNABLE and rng.random() < 0.5
        else:
            delivery = pb.DELIVERY_STATUS_DELIVERED if rng.random() < 0.7 else pb.DELIVERY_STATUS_UNKNOWN
            returned = False
        req = pb.CheckRequest(
            refund_id=f"rf:{self.run_tag}:{n}",
            account_id=self.acct_id[a],
            order_id=order_id,
            merchant_id=merchant,
            amount_minor=amount,
            order_amount_minor=order_amount,
            currency=self._currency(rng),
            reason=reason,
            item_category=category,
            delivery_status=delivery,
            item_returned=returned,
            payment_method=payment,
        )
        if rng.random() < 0.88:
            req.device_id = rng.choice(self.acct_devices[a])
        if rng.random() < 0.95:
            req.ip = rng.choice(self.acct_ips[a])
        if rng.random() < 0.9:
            req.geo_city = self.acct_city[a] if rng.random() < 0.9 else rng.choice(_CITIES)
        req.order_created_at.FromNanoseconds(int(order_at * 1e9))
        created = self.acct_created[a]
        if created is not None:
            req.account_created_at.FromNanoseconds(int(min(created, order_at) * 1e9))
        req.requested_at.FromNanoseconds(int(now * 1e9))
        data = req.SerializeToString()
        self._recent.append(data)
        return data

    def order_events(self, batch: int) -> list[bytes]:
        """ORDER_PLACED history, one order per account in the last 30 days, as RecordEvents
        requests of ``batch`` events (so refund rates have a denominator)."""
        rng = self.rng
        now = time.time()
        requests: list[bytes] = []
        events: list[pb.Event] = []
        for a in range(self.accounts):
            ev = pb.Event(
                event_id=f"ev:{self.run_tag}:{a}",
                type=pb.EVENT_TYPE_ORDER_PLACED,
                account_id=self.acct_id[a],
                merchant_id=rng.choice(self.acct_merchants[a]),
                order_id=f"ord:{self.run_tag}:seed:{a}",
                amount_minor=max(100, int(rng.lognormvariate(8.3, 1.0))),
                currency="EUR",
                item_category=self._category(rng),
                payment_method=self._payment(rng),
                device_id=self.acct_devices[a][0],
                ip=self.acct_ips[a][0],
                geo_city=self.acct_city[a],
            )
            ev.occurred_at.FromNanoseconds(int((now - rng.uniform(3600.0, 30 * DAY_S)) * 1e9))
            events.append(ev)
            if len(events) == batch:
                requests.append(pb.RecordEventsRequest(events=events).SerializeToString())
                events = []
        if events:
            requests.append(pb.RecordEventsRequest(events=events).SerializeToString())
        return requests


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

# Top-level commands a Check sends: the velocity round trip (the refund key's SET, an MGET and
# an EVALSHA per account, device and IP, the merchant's EVALSHA and GET), SET of the answer for
# retries, and XADD of the decision log. Commands run inside the scripts are counted by Redis
# too, though their time is already inside EVALSHA's: GET and SET run both ways, so the sum
# overstates by a few µs per Check (bench.redis_cost splits them exactly with the slow log).
VELOCITY_COMMANDS = ("evalsha", "mget", "get", "set")
REDIS_COMMANDS = (*VELOCITY_COMMANDS, "xadd")


@dataclass
class Snapshot:
    """Counters at one instant: calls done, CPU seconds per process, Redis command stats."""

    at: float
    completed: int
    server_cpu: dict[int, float]
    client_cpu: float
    redis_cpu: float | None
    cmdstats: dict[str, tuple[int, int]] | None
    machine: tuple[float, float]


class Probe:
    """Takes Snapshots of the servers, this process and Redis."""

    def __init__(self, pids: Sequence[int], redis_url: str | None, redis_pid: int | None) -> None:
        self.pids = list(pids)
        self.redis_pid = redis_pid
        self.redis: Any = None
        if redis_url:
            import redis

            self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)

    def cmdstats(self) -> dict[str, tuple[int, int]] | None:
        """(calls, usec) per command, or None without Redis."""
        if self.redis is None:
            return None
        info = self.redis.info("commandstats")
        return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in info.items()}

    def snapshot(self, completed: int) -> Snapshot:
        """Read every counter now."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu: dict[int, float] = {}
        for pid in self.pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                cpu[pid] = proc_cpu_s(pid)
        redis_cpu = None
        if self.redis_pid:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                redis_cpu = proc_cpu_s(self.redis_pid)
        return Snapshot(
            time.perf_counter(),
            completed,
            cpu,
            ru.ru_utime + ru.ru_stime,
            redis_cpu,
            self.cmdstats(),
            machine_cpu_s(),
        )


def cost(a: Snapshot, b: Snapshot, calls: int | None = None) -> dict[str, Any]:
    """CPU and Redis cost per call between two snapshots (calls = completions in between)."""
    n = calls if calls is not None else b.completed - a.completed
    seconds = b.at - a.at
    out: dict[str, Any] = {"calls": n, "seconds": round(seconds, 3)}
    server = {pid: b.server_cpu[pid] - a.server_cpu.get(pid, 0.0) for pid in b.server_cpu}
    ours = (
        sum(server.values())
        + (b.client_cpu - a.client_cpu)
        + ((b.redis_cpu - a.redis_cpu) if a.redis_cpu is not None and b.redis_cpu is not None else 0)
    )
    if seconds > 0:
        # CPU used by everything else on the machine meanwhile: the noise these figures carry.
        out["other_processes_cpu_cores"] = round(max(0.0, (b.machine[0] - a.machine[0]) - ours) / seconds, 2)
        out["steal_cpu_cores"] = round((b.machine[1] - a.machine[1]) / seconds, 2)
    if n <= 0:
        return out
    out["server_cpu_us_per_call"] = round(sum(server.values()) / n * 1e6, 1)
    out["server_cpu_s_per_pid"] = {str(pid): round(s, 2) for pid, s in server.items()}
    out["client_cpu_us_per_call"] = round((b.client_cpu - a.client_cpu) / n * 1e6, 1)
    if a.redis_cpu is not None and b.redis_cpu is not None:
        out["redis_process_cpu_us_per_call"] = round((b.redis_cpu - a.redis_cpu) / n * 1e6, 1)
    if a.cmdstats is not None and b.cmdstats is not None:
        out["redis"] = redis_cost(a.cmdstats, b.cmdstats, n)
    return out


def redis_cost(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]], n: int) -> dict[str, Any]:
    """Redis command time per call from two INFO commandstats readings."""

    def delta(cmd: str) -> tuple[int, int]:
        calls0, usec0 = a.get(cmd, (0, 0))
        calls1, usec1 = b.get(cmd, (0, 0))
        return calls1 - calls0, usec1 - usec0

    per = {cmd: delta(cmd) for cmd in REDIS_COMMANDS}
    calls = sum(per[cmd][0] for cmd in VELOCITY_COMMANDS)
    usec = sum(per[cmd][1] for cmd in VELOCITY_COMMANDS)
    ev_calls, ev_usec = per["evalsha"]
    return {
        "us_per_call": round(usec / n, 2),
        "us_per_call_with_decision_log": round((usec + per["xadd"][1]) / n, 2),
        "xadd_us_per_call": round(per["xadd"][1] / n, 2),
        "commands_per_call": round(calls / n, 3),
        "evalsha_us_per_command": round(ev_usec / ev_calls, 2) if ev_calls else None,
        "evalsha_per_call": round(ev_calls / n, 3),
        "by_command": {cmd: {"calls": c, "usec": u} for cmd, (c, u) in per.items()},
        # Commands run inside the scripts are counted too (their time is inside EVALSHA's).
        "all_commands": {
            cmd: {"calls": c, "usec": u, "us_per_call": round(u / n, 2)}
            for cmd in sorted(b)
            if (c := b[cmd][0] - a.get(cmd, (0, 0))[0]) > 0 and (u := b[cmd][1] - a.get(cmd, (0, 0))[1]) >= 0
        },
    }


def percentiles(samples_s: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max/mean in milliseconds (nearest rank)."""
    if not samples_s:
        return {"p50": None, "p90": None, "p99": None, "p99.9": None, "max": None, "mean": None}
    xs = sorted(samples_s)
    n = len(xs)

    def q(p: float) -> float:
        return round(xs[max(0, math.ceil(p * n) - 1)] * 1e3, 3)

    return {
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "p99.9": q(0.999),
        "max": round(xs[-1] * 1e3, 3),
        "mean": round(sum(xs) / n * 1e3, 3),
    }


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


class _Pacer(threading.Thread):
    """Wakes at each scheduled time (``time.sleep`` is far finer than asyncio's 1 ms timers) and
    hands the due arrivals to the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, times: list[float], fire: Callable[[list[float]], None]
    ) -> None:
        super().__init__(name="pacer", daemon=True)
        self.loop, self.times, self.fire = loop, times, fire
        self.stop = threading.Event()

    def run(self) -> None:
        times, i, n = self.times, 0, len(self.times)
        while i < n and not self.stop.is_set():
            wait = times[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            now = time.perf_counter()
            j = i + 1
            while j < n and times[j] <= now:
                j += 1
            self.loop.call_soon_threadsafe(self.fire, times[i:j])
            i = j


def _infer_request(check: bytes) -> bytes:
    """The Check's feature row as the gate would make it without velocity (those features
    missing), as one ModelInfer request (``--protocol v2``)."""
    from bench import mlserver_peer
    from gate import features

    req = pb.CheckRequest.FromString(check)
    row = features.assemble(features.from_request(req, req.requested_at.ToNanoseconds() / 1e9), {})
    assert V2_MODEL is not None
    return mlserver_peer.infer_request(V2_MODEL, list(row))


class Load:
    """Sends Check calls over pinned channels and keeps the books."""

    def __init__(
        self, channels: Sequence[grpc.aio.Channel], population: Population, probe: Probe, timeout_s: float
    ) -> None:
        method = CHECK_METHOD
        if V2_MODEL is not None:
            from bench import mlserver_peer

            method = mlserver_peer.INFER_METHOD
        self.calls = [ch.unary_unary(method) for ch in channels]
        self.population = population
        self.probe = probe
        self.timeout_s = timeout_s
        self.completed = 0
        self.sent = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.step_errors: collections.Counter[str] = collections.Counter()
        self.decisions: collections.Counter[str] = collections.Counter()
        self.abandoning = False
        self.degraded = 0
        self.step_degraded = 0
        self.replayed = 0
        # Status codes a step expects (the overload step: RESOURCE_EXHAUSTED): counted in the
        # step's errors, kept out of the phase's (which fail the run).
        self.expected: frozenset[str] = frozenset()
        self.step_versions: collections.Counter[str] = collections.Counter()
        self._rr = itertools.count()

    async def _call(self, call: Any) -> str:
        """One Check; returns "OK" or the status code's name."""
        data = self.population.check()
        if V2_MODEL is not None:
            data = _infer_request(data)
        self.sent += 1
        try:
            reply = await call(data, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            self.completed += 1
            if self.abandoning:  # cancelled by us below (counted as UNFINISHED)
                return "CANCELLED"
            code = err.code().name
            if code not in self.expected:
                self.errors[code] += 1
            self.step_errors[code] += 1
            return code
        self.completed += 1
        if V2_MODEL is not None:
            return "OK"
        resp = pb.CheckResponse.FromString(reply)
        self.decisions[pb.Decision.Name(resp.decision)] += 1
        self.degraded += resp.degraded
        self.step_degraded += resp.degraded
        self.replayed += resp.replayed
        self.step_versions[resp.model_version] += 1
        return "OK"

    async def closed(self, concurrency: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
        """``concurrency`` callers, each calling again as soon as its call returns."""
        latencies: list[float] = []
        window = [math.inf, math.inf]
        stop = False
        self.step_errors = collections.Counter()
        self.step_degraded = 0

        async def caller(call: Any) -> None:
            while not stop:
                t0 = time.perf_counter()
                ok = await self._call(call) == "OK"
                t1 = time.perf_counter()
                if ok and window[0] <= t1 <= window[1]:
                    latencies.append(t1 - t0)

        tasks = [asyncio.create_task(caller(self.calls[i % len(self.calls)])) for i in range(concurrency)]
        await asyncio.sleep(warmup_s)
        a = self.probe.snapshot(self.completed)
        window[0] = a.at
        await asyncio.sleep(duration_s)
        b = self.probe.snapshot(self.completed)
        window[1] = b.at
        stop = True
        await asyncio.gather(*tasks)
        return {
            "mode": "closed",
            "concurrency": concurrency,
            "throughput_rps": round(len(latencies) / (b.at - a.at), 1),
            "ok": len(latencies),
            "errors": dict(self.step_errors),
            "degraded": self.step_degraded,
            "latency_ms": percentiles(latencies),
            "cost": cost(a, b),
        }

    async def open(
        self,
        rate: float,
        warmup_s: float,
        duration_s: float,
        poisson: bool = True,
        during: Flipper | None = None,
        recovery: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        """Arrivals at ``rate``/s regardless of answers; latency from the scheduled send time.

        Failed calls' latencies are kept by status code (the overload step's RESOURCE_EXHAUSTED
        answers should be fast); ``during`` (a thread) starts with the measured window.
        ``recovery`` = (rate, seconds): right after the window, arrivals go on at that rate, and
        their answers are counted by status and by second since the window ended (``recovery``
        in the result: whether the server stops refusing once the burst is over)."""
        loop = asyncio.get_running_loop()
        rng = random.Random(7)
        start = time.perf_counter() + 0.05
        end = start + warmup_s + duration_s
        times: list[float] = []
        t = start
        while t < end:
            times.append(t)
            t += rng.expovariate(rate) if poisson else 1.0 / rate
        after: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        if recovery is not None:
            t, stop_at = end, end + recovery[1]
            while t < stop_at:
                times.append(t)
                t += rng.expovariate(recovery[0]) if poisson else 1.0 / recovery[0]
        window = (start + warmup_s, end)
        latencies: list[float] = []
        send_lag: list[float] = []
        failed: dict[str, list[float]] = collections.defaultdict(list)
        sent_in_window = 0
        tasks: set[asyncio.Task[None]] = set()
        dropped = 0
        self.step_errors = collections.Counter()
        self.step_degraded = 0
        self.step_versions = collections.Counter()

        async def one(scheduled: float) -> None:
            nonlocal sent_in_window
            call = self.calls[next(self._rr) % len(self.calls)]
            sent = time.perf_counter()
            sent_in_window += window[0] <= sent < window[1]
            status = await self._call(call)
            done = time.perf_counter()
            if scheduled >= window[1]:
                after[int(scheduled - window[1])][status] += 1
            elif window[0] <= scheduled:
                send_lag.append(sent - scheduled)
                if status == "OK":
                    latencies.append(done - scheduled)
                elif status != "CANCELLED":
                    failed[status].append(done - scheduled)

        def fire(batch: list[float]) -> None:
            nonlocal dropped
            for scheduled in batch:
                if len(tasks) >= MAX_OUTSTANDING:
                    dropped += 1
                    continue
                task = loop.create_task(one(scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        pacer = _Pacer(loop, times, fire)
        pacer.start()
        try:
            await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
            a = self.probe.snapshot(self.completed)
            if during is not None:
                during.start()
            await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
            b = self.probe.snapshot(self.completed)
            if recovery is not None:  # the pacer goes on firing the recovery arrivals
                await asyncio.sleep(max(0.0, times[-1] - time.perf_counter()))
        finally:
            pacer.stop.set()
            await asyncio.to_thread(pacer.join)
            if during is not None and during.is_alive():
                during.stop.set()
                await asyncio.to_thread(during.join)
        unfinished = 0
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.timeout_s + 1.0)
            # Past its deadline and a second more: the client itself is hopelessly behind.
            unfinished = len(pending)
            self.abandoning = True
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.abandoning = False
            if unfinished:
                self.errors["UNFINISHED"] += unfinished
                self.step_errors["UNFINISHED"] += unfinished
        scheduled_n = sum(1 for x in times if window[0] <= x < window[1])
        extra: dict[str, Any] = {}
        if recovery is not None:
            extra["recovery"] = {
                "rate_rps": round(recovery[0], 1),
                "seconds": recovery[1],
                "by_second_after_burst": {str(k): dict(v) for k, v in sorted(after.items())},
            }
        return {
            **extra,
            "mode": "open",
            "arrivals": "poisson" if poisson else "uniform",
            "target_rps": round(rate, 1),
            "scheduled": scheduled_n,
            "achieved_rps": round(len(latencies) / duration_s, 1),
            # What the client actually sent in the window (it is Python too: at overload it
            # may not manage the target rate).
            "offered_rps": round(sent_in_window / duration_s, 1),
            "ok": len(latencies),
            "dropped": dropped,
            "errors": dict(self.step_errors),
            "degraded": self.step_degraded,
            "model_versions": dict(self.step_versions),
            "latency_ms": percentiles(latencies),
            "failed_latency_ms": {code: percentiles(xs) for code, xs in sorted(failed.items())},
            "send_lag_ms": {k: v for k, v in percentiles(send_lag).items() if k in ("p50", "p99", "max")},
            "cost": cost(a, b),
        }


class Flipper(threading.Thread):
    """Flips the ``current`` symlink of a model directory between ``a`` and ``b``, ``flips``
    times every ``interval_s`` from when it starts, atomically (a new link under a temporary
    name, renamed over ``current``), as an operator's model rollout would."""

    def __init__(self, model_dir: str, flips: int, interval_s: float) -> None:
        super().__init__(name="flipper", daemon=True)
        self.model_dir, self.flips, self.interval_s = model_dir, flips, interval_s
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[str] = []

    def run(self) -> None:
        current = os.path.join(self.model_dir, "current")
        tmp = os.path.join(self.model_dir, f".current.{os.getpid()}.tmp")
        started = time.perf_counter()
        for k in range(self.flips):
            if self.stop.wait(max(0.0, started + k * self.interval_s - time.perf_counter())):
                return
            try:
                target = "a" if os.readlink(current) == "b" else "b"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                os.symlink(target, tmp)
                os.replace(tmp, current)
                self.done += 1
            except OSError as exc:
                self.errors.append(str(exc))


def _script_names() -> dict[str, str]:
    """SHA1 -> script name of the gate's Lua scripts (empty if the gate's layout changed)."""
    try:
        from gate.velocity import SCRIPTS
    except ImportError:
        return {}
    return {s.sha: s.name for s in SCRIPTS}


async def script_breakdown(load: Load, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Redis time per script (and op) from SLOWLOG with a 0 us threshold, in an extra step.

    The slow log records every top-level command with its duration, so EVALSHA calls can be
    told apart by script; it costs Redis a little, so this step is kept out of every other
    figure. The previous slow-log settings are restored afterwards.
    """
    r = load.probe.redis
    if r is None:
        return {}
    saved = r.config_get("slowlog-*")
    names = _script_names()
    try:
        r.config_set("slowlog-max-len", 1_000_000)
        r.config_set("slowlog-log-slower-than", 0)
        r.slowlog_reset()
        sent = load.sent
        await load.closed(concurrency, 0.2, duration_s)
        sent = load.sent - sent  # every Check of the step, warm-up included, as in the log
        entries = r.slowlog_get(1_000_000)
    finally:
        for key, value in saved.items():
            r.config_set(key, value)
        r.slowlog_reset()
    durations: dict[str, list[int]] = collections.defaultdict(list)
    for entry in entries:
        cmd = entry["command"].split()
        if not cmd:
            continue
        verb = cmd[0].decode().upper()
        if verb == "EVALSHA" and len(cmd) > 3:
            nkeys = int(cmd[2])
            op = cmd[3 + nkeys].decode() if len(cmd) > 3 + nkeys else "?"
            durations[f"{names.get(cmd[1].decode(), cmd[1].decode()[:8])}:{op}"].append(entry["duration"])
        elif verb in ("GET", "SET", "XADD"):
            durations[verb].append(entry["duration"])
    checks = max(sent, 1)
    out: dict[str, Any] = {"concurrency": concurrency, "checks": checks, "scripts": {}}
    for name, xs in sorted(durations.items()):
        xs.sort()
        out["scripts"][name] = {
            "calls": len(xs),
            "mean_us": round(sum(xs) / len(xs), 1),
            "p50_us": xs[len(xs) // 2],
            "p99_us": xs[min(len(xs) - 1, int(len(xs) * 0.99))],
            "us_per_check": round(sum(xs) / checks, 1),
        }
    return out


async def seed_orders(
    channels: Sequence[grpc.aio.Channel], population: Population, batch: int, timeout_s: float
) -> dict[str, Any]:
    """Send one ORDER_PLACED per account through RecordEvents (four calls in flight); keep
    ``batch`` well under the gate's 64 KiB message limit (~130 bytes an event)."""
    requests = population.order_events(batch)
    calls = [ch.unary_unary(EVENTS_METHOD) for ch in channels]
    started = time.perf_counter()
    accepted = 0
    queue = collections.deque(requests)

    async def sender(call: Any) -> None:
        nonlocal accepted
        while queue:
            reply = await call(queue.popleft(), timeout=timeout_s)
            accepted += pb.RecordEventsResponse.FromString(reply).accepted

    await asyncio.gather(*(sender(calls[i % len(calls)]) for i in range(4)))
    return {
        "events": population.accounts,
        "accepted": accepted,
        "seconds": round(time.perf_counter() - started, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole procedure for one target; returns the result document."""
    global V2_MODEL
    if args.protocol == "v2":
        V2_MODEL = args.v2_model
    pids = [int(p) for p in args.pids.split(",") if p]
    workers = [int(p) for p in (args.workers_pids or args.pids).split(",") if p]
    population = Population(
        accounts=args.accounts,
        merchants=args.merchants,
        zipf=args.zipf,
        retry_share=args.retry_share,
        seed=args.seed,
        run_tag=args.run_tag,
    )
    probe = Probe(pids, args.redis_url, args.redis_pid)
    gc.collect()
    gc.freeze()  # the population is long-lived: keep full collections from scanning it
    deadline = time.monotonic() + 30.0
    pinned = await pinned_channels(args.target, workers, args.channels, deadline)
    channels = [ch for ch, _ in pinned]
    out: dict[str, Any] = {
        "label": args.label,
        "target": args.target,
        "channels": args.channels,
        "connections_per_worker": dict(collections.Counter(str(pid) for _, pid in pinned)),
        "population": population.stats,
        "timeout_s": args.timeout_s,
    }
    try:
        if args.seed_orders or args.seed_only:
            out["seed"] = await seed_orders(channels, population, 200, 30.0)
            _progress(args.label, f"seeded {out['seed']}")
            if args.seed_only:
                return out
        load = Load(channels, population, probe, args.timeout_s)
        phase_start = probe.snapshot(load.completed)
        steps: list[dict[str, Any]] = []
        for c in args.concurrencies:
            step = await load.closed(c, args.warmup, args.duration)
            steps.append(step)
            _progress(
                args.label,
                f"closed c={c}: {step['throughput_rps']} req/s, "
                f"p50 {step['latency_ms']['p50']} ms, p99 {step['latency_ms']['p99']} ms, "
                f"server CPU {step['cost'].get('server_cpu_us_per_call')} us/call",
            )
        out["closed"] = steps
        rate = args.open_rate or 0.0
        if steps:
            best = max(steps, key=lambda s: s["throughput_rps"])
            out["max"] = {"throughput_rps": best["throughput_rps"], "concurrency": best["concurrency"]}
            rate = rate or best["throughput_rps"] * args.open_fraction
        if rate > 0:
            step = await load.open(rate, args.warmup, args.open_duration, poisson=args.arrivals == "poisson")
            out["open"] = step
            _progress(
                args.label,
                f"open {step['target_rps']}/s: p50 {step['latency_ms']['p50']} "
                f"p99 {step['latency_ms']['p99']} p99.9 {step['latency_ms']['p99.9']} ms",
            )
        if rate > 0 and args.reload_dir and args.reload_flips > 0:
            flipper = Flipper(args.reload_dir, args.reload_flips, args.reload_interval)
            window = args.reload_flips * args.reload_interval
            step = await load.open(rate, args.warmup, window, args.arrivals == "poisson", during=flipper)
            step["flips"] = flipper.done
            step["flip_interval_s"] = args.reload_interval
            step["flip_errors"] = flipper.errors
            out["reload"] = step
            _progress(
                args.label,
                f"open {step['target_rps']}/s with {flipper.done} model flips: p50 "
                f"{step['latency_ms']['p50']} p99 {step['latency_ms']['p99']} p99.9 "
                f"{step['latency_ms']['p99.9']} ms, versions {step['model_versions']}, "
                f"errors {step['errors']}",
            )
        # The phase's cost per call covers the steps where every call is served: in the
        # overload step most calls are refused before any Redis work and would dilute it.
        served_end, served_sent = probe.snapshot(load.completed), load.sent
        if args.overload_factor > 0 and "max" in out:
            load.expected = frozenset({"RESOURCE_EXHAUSTED"})
            try:
                step = await load.open(
                    out["max"]["throughput_rps"] * args.overload_factor,
                    args.warmup,
                    args.overload_duration,
                    poisson=args.arrivals == "poisson",
                    recovery=(rate or out["max"]["throughput_rps"] * args.open_fraction, args.recovery_s),
                )
            finally:
                load.expected = frozenset()
            step["factor"] = args.overload_factor
            out["overload"] = step
            _progress(
                args.label,
                f"overload {step['target_rps']}/s (offered {step['offered_rps']}/s): OK "
                f"{step['achieved_rps']}/s p50 {step['latency_ms']['p50']} p99 "
                f"{step['latency_ms']['p99']} ms, errors {step['errors']}, dropped {step['dropped']}",
            )
        out["phase"] = {
            "sent": load.sent,
            "completed": load.completed,
            "errors": dict(load.errors),
            "decisions": dict(load.decisions),
            "degraded": load.degraded,
            "replayed": load.replayed,
            "cost": cost(phase_start, served_end, served_sent),
        }
        if args.script_breakdown and probe.redis is not None:
            out["redis_scripts"] = await script_breakdown(load, 8, 2.0)
            out["phase"]["errors"] = dict(load.errors)  # every call's status counts
            _progress(
                args.label,
                "Redis us per Check by script: "
                + ", ".join(f"{k} {v['us_per_check']}" for k, v in out["redis_scripts"]["scripts"].items()),
            )
        out["population"] = population.stats
    finally:
        for ch in channels:
            await ch.close()
    return out


def _progress(label: str, text: str) -> None:
    print(f"[{label}] {text}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="bench.loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="host:port of the server")
    p.add_argument("--label", default="check", help="name in progress lines and output")
    p.add_argument(
        "--pids", required=True, help="comma-separated pids of every server process (CPU is summed)"
    )
    p.add_argument("--workers-pids", default="", help="pids that accept connections (default: --pids)")
    p.add_argument("--redis-url", default=None, help="read INFO commandstats around each step")
    p.add_argument("--redis-pid", type=int, default=None, help="redis-server pid, for its CPU")
    p.add_argument(
        "--concurrencies", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 8, 32, 64]
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per closed-loop step")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before a step")
    p.add_argument("--open-duration", type=float, default=10.0)
    p.add_argument(
        "--open-fraction",
        type=float,
        default=0.5,
        help="open-loop rate as a fraction of the best closed-loop throughput",
    )
    p.add_argument(
        "--open-rate", type=float, default=None, help="open-loop rate in calls/s (overrides --open-fraction)"
    )
    p.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--timeout-s", type=float, default=2.0, help="deadline of each call")
    p.add_argument(
        "--seed-orders",
        action="store_true",
        help="first record one ORDER_PLACED per account via RecordEvents",
    )
    p.add_argument(
        "--seed-only",
        action="store_true",
        help="only record the ORDER_PLACED history (same population), no Checks",
    )
    p.add_argument(
        "--script-breakdown",
        action="store_true",
        help="after the phase, an extra step with SLOWLOG on: Redis us per script",
    )
    p.add_argument("--accounts", type=int, default=20_000)
    p.add_argument("--merchants", type=int, default=500)
    p.add_argument("--zipf", type=float, default=0.7, help="account activity skew exponent")
    p.add_argument("--retry-share", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--run-tag",
        default="",
        help="prefix of refund and order ids (default: from --seed); a new tag gives fresh ids "
        "against a Redis that already saw this population",
    )
    p.add_argument(
        "--reload-dir",
        default="",
        help="after the open loop, the same open loop again while the 'current' link of this "
        "model directory flips between its 'a' and 'b' bundles",
    )
    p.add_argument("--reload-flips", type=int, default=20)
    p.add_argument("--reload-interval", type=float, default=0.4, help="seconds between flips")
    p.add_argument(
        "--overload-factor",
        type=float,
        default=0.0,
        help="last, an open loop at this multiple of the best closed-loop throughput "
        "(RESOURCE_EXHAUSTED expected there, not counted as a phase error); 0: none",
    )
    p.add_argument("--overload-duration", type=float, default=10.0)
    p.add_argument(
        "--recovery-s",
        type=float,
        default=3.0,
        help="after the overload burst, arrivals go on at the half-load rate this long (refusals "
        "counted by second since the burst ended)",
    )
    p.add_argument(
        "--protocol",
        choices=("refundgate", "v2"),
        default="refundgate",
        help="v2: the target is an Open Inference Protocol server (MLServer); Checks are sent as "
        "ModelInfer of their feature rows",
    )
    p.add_argument("--v2-model", default="refund-model", help="model name for --protocol v2")
    p.add_argument("--out", default="-", help="JSON result file, - for stdout")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Run the procedure and write the JSON result."""
    args = build_parser().parse_args(argv)
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
