"""Redis time per Check of the velocity layout, without gRPC: a quick loop for script work.

Drives ``VelocityStore.record_and_read`` directly with the load generator's population (seeded
order history, Zipf-skewed accounts, retries) against a throw-away redis-server, and reads
``INFO commandstats`` and SLOWLOG (0 µs threshold, every command) to split the time by script.
The full benchmark (``make bench``) measures the same thing through the gate; this one runs in
seconds, so a layout change can be measured before it is benchmarked end to end.

Time on a shared 2-core VM is noisy. ``--callgrind`` runs redis-server under valgrind's callgrind
and reports the instructions Redis executed per Check in the measured phase: the same figure
for the same layout and workload whatever else the machine is doing, so two layouts can be
compared exactly (slow: use a few thousand Checks).

    python -m bench.redis_cost --checks 60000 --concurrency 32
    python -m bench.redis_cost --checks 3000 --warmup 3000 --callgrind
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.loadgen import Population, proc_cpu_s
from gate import pipeline
from gate.devredis import RedisProcess, free_port, start_redis
from gate.redisclient import RedisAddress, RedisConnection
from gate.velocity import LOAD_SCRIPTS, SCRIPTS, IdHasher, VelocityStore
from refundgate.v1 import refund_gate_pb2 as pb


async def _drive(store: VelocityStore, population: Population, checks: int, concurrency: int) -> float:
    """Send ``checks`` Checks' velocity round trips, ``concurrency`` at a time; wall seconds."""
    queue = collections.deque(pb.CheckRequest.FromString(population.check()) for _ in range(checks))

    async def worker() -> None:
        while queue:
            req = queue.popleft()
            _, facts = pipeline.prepare(store, req, time.time())
            await store.record_and_read(facts, 60.0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def _seed(store: VelocityStore, population: Population) -> None:
    for raw in population.order_events(200):
        events = list(pb.RecordEventsRequest.FromString(raw).events)
        times = [ev.occurred_at.seconds + ev.occurred_at.nanos / 1e9 for ev in events]
        await store.record_events(events, times, 60.0)


def _breakdown(entries: list[dict[str, Any]], checks: int) -> dict[str, float]:
    names = {s.sha: s.name for s in SCRIPTS}
    total: dict[str, int] = collections.defaultdict(int)
    for entry in entries:
        cmd = entry["command"].split()
        if cmd and cmd[0].upper() == b"EVALSHA":
            nkeys = int(cmd[2])
            op = cmd[3 + nkeys].decode() if len(cmd) > 3 + nkeys else "?"
            total[f"{names.get(cmd[1].decode(), '?')}:{op}"] += entry["duration"]
        elif cmd:
            total[cmd[0].decode().upper()] += entry["duration"]
    return {name: round(us / checks, 1) for name, us in sorted(total.items())}


def _start_callgrind(workdir: Path) -> RedisProcess:
    port = free_port()
    out = workdir / "callgrind.out"
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=workdir,
    )
    client = redis.Redis(port=port, socket_timeout=60)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.1)
    return RedisProcess(port, proc, workdir)


def _callgrind(pid: int, action: str) -> None:
    subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True)


def _instructions(workdir: Path) -> int:
    """Instructions (Ir) of dump part 2: the measured phase."""
    for line in (workdir / "callgrind.out.2").read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError("no totals in the callgrind dump")


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Seed, warm up, then measure ``args.checks`` Checks; returns the figures."""
    workdir = Path(tempfile.mkdtemp(prefix="rg-redis-cost-"))
    server = _start_callgrind(workdir) if args.callgrind else start_redis()
    try:
        client = server.client()
        conn = RedisConnection(
            RedisAddress.from_url(server.url), connect_timeout_s=30.0, stall_s=60.0, on_connect=LOAD_SCRIPTS
        )
        await conn.connect()
        store = VelocityStore(conn, prefix="rg", hasher=IdHasher("bench"), replay_ttl_s=86400)
        population = Population(accounts=args.accounts, zipf=args.zipf, seed=args.seed, run_tag="rc")
        await _seed(store, population)
        await _drive(store, population, args.warmup, args.concurrency)
        client.config_resetstat()
        if args.callgrind:
            _callgrind(server.proc.pid, "--dump")  # part 1: start-up, seeding, warm-up
            await _drive(store, population, args.checks, args.concurrency)
            _callgrind(server.proc.pid, "--dump")  # part 2: the measured Checks
            await conn.close()
            return {
                "checks": args.checks,
                "redis_instructions_per_check": round(_instructions(workdir) / args.checks),
            }
        cpu = proc_cpu_s(server.proc.pid)
        wall = await _drive(store, population, args.checks, args.concurrency)
        cpu = proc_cpu_s(server.proc.pid) - cpu
        stats = client.info("commandstats")
        # A second, shorter pass with every command in the slow log, to split the time by script
        # (the slow log costs Redis time itself, so it is kept out of the figures above).
        client.config_set("slowlog-max-len", 1_000_000)
        client.config_set("slowlog-log-slower-than", 0)
        client.slowlog_reset()
        split_checks = max(1, args.checks // 4)
        await _drive(store, population, split_checks, args.concurrency)
        entries = client.slowlog_get(1_000_000)
        evalsha = stats.get("cmdstat_evalsha", {})
        # The refund key's SET, the MGETs and the ring's GET are plain commands; GET and SET also
        # run inside the scripts, where EVALSHA's time already holds them: counting all of them
        # overstates the cost by a few µs, never understates it (the slow log split is exact).
        plain = sum(stats.get(f"cmdstat_{c}", {}).get("usec", 0) for c in ("mget", "get", "set"))
        await conn.close()
        return {
            "checks": args.checks,
            "checks_per_s": round(args.checks / wall),
            "redis_us_per_check": round((evalsha.get("usec", 0) + plain) / args.checks, 1),
            "redis_process_cpu_us_per_check": round(cpu * 1e6 / args.checks, 1),
            "us_per_evalsha": evalsha.get("usec_per_call"),
            "evalsha_per_check": round(evalsha.get("calls", 0) / args.checks, 2),
            "by_script_us_per_check": _breakdown(entries, split_checks),
            "used_memory_mb": round(client.info("memory")["used_memory"] / 2**20, 1),
            "keys": client.dbsize(),
        }
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    """Print the figures as JSON (and write them to --out when given)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checks", type=int, default=60_000)
    p.add_argument("--warmup", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--accounts", type=int, default=20_000)
    p.add_argument("--zipf", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="count Redis instructions per Check under valgrind instead of time",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (callgrind dumps)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = asyncio.run(measure(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
