"""``make bench``: Check beside a bare echo server, same run, same machine, same load.

    python -m bench.run --out bench-results/bench.json [--workers 2] [--duration 5]

One run starts a throw-away redis-server, the gate (``refund-gate serve``, ``--workers`` processes
sharing the port) and the echo baseline (``bench.echo``: the same grpc.aio stack and service
definition doing no work, same worker count), each in its own process; waits until every worker
answers SERVING on the gRPC health service; then drives each server from a separate load
generator process (``bench.loadgen``): closed loop at several concurrencies for the maximum
throughput, then open loop at half of it for latency percentiles. It records server CPU per call
(``/proc``), Redis command time per Check (``INFO commandstats``), errors by status code, runs
``bench.scoring`` on the served model when that module exists, prints a table and writes every
figure to ``--out`` (JSON). It exits non-zero if any call failed.

Why ratios: these are small shared VMs (waking an idle vCPU costs ~35-45 us, neighbours come and
go), so absolute req/s move from run to run; Check against an echo server measured minutes apart
on the same machine, and CPU us per call, move much less. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import MAX_OUTSTANDING, children, machine_cpu_s, wait_ready
from gate.settings import EVENT_LOOPS, Settings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = ROOT / "model" / "bundles" / "current"
PYTHON = sys.executable
PROMISE_SLACK_MS = 5.0
"""Overload promise (issue 14): at 2x the max rate, p99 of OK answers <= the gate's budget + this,
p99 of RESOURCE_EXHAUSTED answers <= this, from the scheduled send time; and no refusal from
RECOVERY_AFTER_S after the burst ends. ``make bench`` fails when one is broken."""
RECOVERY_AFTER_S = 1
GOALS = {
    "throughput_ratio_min": 0.70,
    "check_p99_half_load_ms_max": 3.0,
    "redis_us_per_check_target": 60.0,
    "redis_us_per_check_goal": 40.0,
}


def log(text: str) -> None:
    """Progress on stderr."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Model bundle
# ---------------------------------------------------------------------------------------------


def build_throwaway_bundle(out: Path) -> Path:
    """A small real bundle (40 trees x 15 leaves, compiled too), the same as the tests' one."""
    from model.synthetic import build_synthetic_bundle

    return build_synthetic_bundle(out, version="bench-throwaway-1")


def model_info(path: Path) -> dict[str, Any]:
    """Version, engine and size of the bundle the gate will serve."""
    from gate.bundle import load_bundle

    bundle = load_bundle(path)
    return {
        "path": str(path),
        "version": bundle.version,
        "engine": bundle.model.engine,
        "num_trees": bundle.manifest.get("num_trees"),
    }


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server child process and the worker processes it forked."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workers: list[int]
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        """Every process whose CPU counts: the parent and its workers."""
        return sorted({self.proc.pid, *self.workers})

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (the parent forwards it to its workers), then SIGKILL whatever is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)


def start_server(name: str, argv: list[str], port: int, workers: int, log_path: Path) -> Server:
    """Start a server process (stdout/stderr to ``log_path``) and find its forked workers."""
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(name, proc, port, [proc.pid], log_path)
    if workers > 1:
        deadline = time.monotonic() + 60
        while len(found := children(proc.pid)) < workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"{name} did not fork {workers} workers; see {log_path}")
            time.sleep(0.02)
        server.workers = found
    return server


async def exited(servers: Sequence[Server]) -> None:
    """Raise as soon as one of ``servers`` exits (with the tail of its log); never returns."""
    while True:
        for server in servers:
            if server.proc.poll() is not None:
                tail = server.log_path.read_text(errors="replace")[-1500:]
                raise RuntimeError(
                    f"{server.name} exited with status {server.proc.returncode} "
                    f"before it was ready; {server.log_path} ends with:\n{tail}"
                )
        await asyncio.sleep(0.1)


def gate_command() -> list[str]:
    """How to run ``refund-gate``: the console script beside this Python, else via -c."""
    script = Path(PYTHON).parent / "refund-gate"
    if script.exists():
        return [str(script)]
    return [PYTHON, "-c", "import sys; from gate.cli import main; sys.argv[0] = 'refund-gate'; main()"]


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.15) -> float:
    """Wait (at most ``max_wait_s``) until the machine's CPU use over 2 s is below
    ``threshold_cores``; return the last reading. Nothing of ours is busy when this runs."""
    deadline = time.monotonic() + max_wait_s
    while True:
        a = machine_cpu_s()[0]
        time.sleep(2.0)
        busy = (machine_cpu_s()[0] - a) / 2.0
        if busy < threshold_cores or time.monotonic() > deadline:
            return busy
        log(f"machine busy ({busy:.2f} cores used by other processes); waiting")


def reload_model_dir(bundle: Path, out: Path) -> dict[str, Any]:
    """A model directory for the reload step: ``a`` (a copy of ``bundle``), ``b`` (another copy
    whose manifest names version "<version>-b"; the manifest itself is not checksummed) and
    ``current -> a``. The gate serves ``current`` and polls it; loadgen flips it."""
    shutil.copytree(bundle.resolve(), out / "a")
    shutil.copytree(bundle.resolve(), out / "b")
    manifest_path = out / "b" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    version = str(manifest["version"])
    manifest["version"] = f"{version}-b"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "current").symlink_to("a")
    return {"dir": str(out), "a": version, "b": f"{version}-b"}


def gate_has(setting: str) -> bool:
    """Whether this gate version has a setting (so a flag of it can be passed)."""
    from gate.settings import settings_fields

    return setting in {f.name for f in settings_fields()}


def gate_extra_flags() -> list[str]:
    """Flags of newer gate versions, if this gate has them: metrics and admin endpoints on free
    ports (port 0: each worker picks one), so they never collide with another gate's."""
    from gate.settings import settings_fields

    names = {f.name for f in settings_fields()}
    flags = ["--admin-listen", "127.0.0.1:0"] if "admin_listen" in names else []
    return flags + (["--metrics-listen", "127.0.0.1:0"] if "metrics_listen" in names else [])


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    from gate.devredis import free_port as _free_port

    return _free_port()


def run_loadgen(
    label: str,
    server: Server,
    args: argparse.Namespace,
    out_json: Path,
    extra: Sequence[str] = (),
    profile_pid: int | None = None,
    profile_out: Path | None = None,
    extra_s: float = 0.0,
) -> dict[str, Any]:
    """Run bench.loadgen against ``server`` in its own process and return its result; flags in
    ``extra`` come last, so they override the ones taken from ``args``."""
    argv = [
        PYTHON,
        "-m",
        "bench.loadgen",
        "--target",
        server.target,
        "--label",
        label,
        "--pids",
        ",".join(map(str, server.pids)),
        "--workers-pids",
        ",".join(map(str, server.workers)),
        "--concurrencies",
        ",".join(map(str, args.concurrencies)),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--open-duration",
        str(args.open_duration),
        "--open-fraction",
        str(args.open_fraction),
        "--channels",
        str(args.channels),
        "--accounts",
        str(args.accounts),
        "--zipf",
        str(args.zipf),
        "--out",
        str(out_json),
        *extra,
    ]
    budget = (
        len(args.concurrencies) * (args.warmup + args.duration + 2)
        + args.warmup
        + args.open_duration
        + extra_s
        + 120
    )
    spy: subprocess.Popen[bytes] | None = None
    if profile_pid is not None and profile_out is not None:
        spy = start_profiler(profile_pid, profile_out)
    try:
        subprocess.run(argv, cwd=ROOT, check=True, timeout=budget, stdin=subprocess.DEVNULL)
    finally:
        if spy is not None:
            stop_profiler(spy)
    return dict(json.loads(out_json.read_text()))


# ---------------------------------------------------------------------------------------------
# Optional profile of the gate with py-spy
# ---------------------------------------------------------------------------------------------


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy record (collapsed stacks) of ``pid`` and its subprocesses, if py-spy exists."""
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(spy).exists():
        log("--profile: py-spy not found (.venv/bin/pip install py-spy); no profile")
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    """Stop py-spy with SIGINT so it writes its output."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def summarize_profile(path: Path, top: int = 40) -> dict[str, Any]:
    """Inclusive and self shares of functions in py-spy's collapsed stacks."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
    if not total:
        return {"samples": 0}

    def ranked(table: dict[str, int]) -> list[list[Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [[name, round(100.0 * n / total, 1)] for name, n in rows]

    return {"samples": total, "inclusive_pct": ranked(inclusive), "self_pct": ranked(own)}


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py)'; drops process/thread pseudo-frames."""
    frame = frame.strip()
    if frame.startswith(("process ", "thread ")):
        return ""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    else:
        file = file.replace(str(ROOT) + "/", "")
    return f"{name} ({file})" if file else name


# ---------------------------------------------------------------------------------------------
# One configuration: N workers for both servers
# ---------------------------------------------------------------------------------------------


async def ready(servers: Sequence[Server], timeout_s: float) -> list[float]:
    """Wait until every worker of every server answers SERVING; seconds each took. Raises as
    soon as one of them exits."""
    every = asyncio.gather(*(wait_ready(s.target, s.workers, timeout_s) for s in servers))
    watch = asyncio.ensure_future(exited(servers))
    futures: list[asyncio.Future[Any]] = [every, watch]
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        if watch.done():
            watch.result()  # raises: a server died while we waited for it
        return list(await every)
    finally:
        for future in futures:
            future.cancel()
        await asyncio.gather(*futures, return_exceptions=True)


def bench_config(
    workers: int, args: argparse.Namespace, redis: Any, model_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Echo then Check at ``workers`` processes each; returns both loadgen results."""
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    client = redis.client()
    client.flushall()
    client.config_resetstat()
    client.close()
    tag = f"w{workers}"
    gate_port, echo_port = free_port(), free_port()
    # The gate serves the bundle through a model directory of two copies (a, b) whose
    # 'current' link the reload step flips; polled every 0.1 s (a stat of a few files).
    reloads = None
    served = model_dir
    poll: list[str] = []
    if args.reload_flips > 0:
        reload_dir = Path(tempfile.mkdtemp(prefix=f"bench-reload-{tag}-"))
        reloads = reload_model_dir(model_dir, reload_dir)
        served, poll = reload_dir, ["--model-poll-s", "0.1"]

    def gate_argv(port: int, *more: str) -> list[str]:
        return [
            *gate_command(),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--redis-url",
            redis.url,
            "--model-dir",
            str(served),
            *poll,
            "--allow-client-time",
            "--grace-s",
            "1",
            "--event-loop",
            args.event_loop,
            *gate_extra_flags(),
            *args.gate_args.split(),
            *more,
        ]

    echo_argv = [
        PYTHON,
        "-m",
        "bench.echo",
        "--listen",
        f"127.0.0.1:{echo_port}",
        "--workers",
        str(workers),
        "--event-loop",
        args.event_loop,
    ]
    servers: list[Server] = []
    try:
        gate = start_server("gate", gate_argv(gate_port), gate_port, workers, out_dir / f"gate-{tag}.log")
        servers.append(gate)
        echo = start_server("echo", echo_argv, echo_port, workers, out_dir / f"echo-{tag}.log")
        servers.append(echo)

        took = asyncio.run(ready([gate, echo], args.ready_timeout))
        log(f"{workers} worker(s): gate SERVING after {took[0]:.1f} s, echo after {took[1]:.1f} s")
        echo_result = run_loadgen("echo", echo, args, out_dir / f"loadgen-echo-{tag}.json")
        echo.stop()
        peers = bench_peers(workers, args, redis, model_dir, servers, out_dir)
        seed = None
        if args.seed_orders:  # history first, outside every measurement (and the profile)
            seed = run_loadgen(
                "seed", gate, args, out_dir / f"loadgen-seed-{tag}.json", extra=["--seed-only"]
            ).get("seed")
        profile = out_dir / f"check-profile-{tag}.txt" if args.profile else None
        steps = ["--overload-factor", str(args.overload_factor)]
        steps += ["--overload-duration", str(min(args.open_duration, 10.0))]
        if reloads is not None:
            steps += ["--reload-dir", reloads["dir"], "--reload-flips", str(args.reload_flips)]
            steps += ["--reload-interval", str(args.reload_interval)]
        check_result = run_loadgen(
            "check",
            gate,
            args,
            out_dir / f"loadgen-check-{tag}.json",
            extra=[
                "--redis-url",
                redis.url,
                "--redis-pid",
                str(redis.proc.pid),
                "--script-breakdown",
                *steps,
            ],
            profile_pid=gate.proc.pid if profile else None,
            profile_out=profile,
            extra_s=2 * (args.warmup + args.open_duration) + args.reload_flips * args.reload_interval,
        )
        check_result["seed"] = seed
        if reloads is not None and "reload" in check_result:
            check_result["reload"]["versions_named"] = reloads
        result: dict[str, Any] = {"workers": workers, "echo": echo_result, "check": check_result, **peers}
        if profile is not None and profile.exists():
            result["check_profile"] = summarize_profile(profile)
        gate.stop()
        if args.telemetry_cost and gate_has("telemetry"):
            result["check_no_telemetry"] = bench_no_telemetry(
                workers, args, redis, check_result, gate_argv, servers, out_dir
            )
        return result
    finally:
        for server in servers:
            server.stop()
        if reloads is not None:
            shutil.rmtree(reloads["dir"], ignore_errors=True)


def bench_peers(
    workers: int, args: argparse.Namespace, redis: Any, model_dir: Path, servers: list[Server], out_dir: Path
) -> dict[str, Any]:
    """The peers, one after the other, same procedure and load as echo and the gate: the naive
    stack (``bench.naive``, always) and, with ``--peers mlserver``, MLServer's LightGBM runtime
    (``bench.mlserver_peer``, in its own virtualenv). Each is stopped before the next starts."""
    tag = f"w{workers}"
    out: dict[str, Any] = {}
    port = free_port()
    argv = [PYTHON, "-m", "bench.naive", "--listen", f"127.0.0.1:{port}", "--workers", str(workers)]
    argv += ["--redis-url", redis.url, "--model-dir", str(model_dir), "--event-loop", args.event_loop]
    naive = start_server("naive", argv, port, workers, out_dir / f"naive-{tag}.log")
    servers.append(naive)
    took = asyncio.run(ready([naive], args.ready_timeout))
    log(f"{workers} worker(s): naive SERVING after {took[0]:.1f} s")
    out["naive"] = run_loadgen("naive", naive, args, out_dir / f"loadgen-naive-{tag}.json")
    naive.stop()
    if "mlserver" in args.peers:
        from bench import mlserver_peer

        try:
            ml = mlserver_peer.start(args.mlserver_venv, model_dir, workers, out_dir / f"mlserver-{tag}")
        except mlserver_peer.Unavailable as exc:
            log(f"MLServer peer not measured: {exc}")
            out["mlserver"] = {"status": f"not measured: {exc}"}
            return out
        server = Server("mlserver", ml.proc, ml.port, ml.workers, ml.log_path)
        servers.append(server)
        try:
            mlserver_peer.wait_ready(ml, args.ready_timeout)
            out["mlserver"] = run_loadgen(
                "mlserver",
                server,
                args,
                out_dir / f"loadgen-mlserver-{tag}.json",
                extra=["--protocol", "v2", "--v2-model", mlserver_peer.MODEL_NAME],
            )
        finally:
            server.stop()
    return out


def bench_no_telemetry(
    workers: int,
    args: argparse.Namespace,
    redis: Any,
    check_result: dict[str, Any],
    gate_argv: Any,
    servers: list[Server],
    out_dir: Path,
) -> dict[str, Any]:
    """The gate again with ``--no-telemetry``, shorter procedure: closed loop at the concurrency
    of the telemetry-on max, open loop at the same rate as the telemetry-on half-load step.
    Fresh refund/order ids (a new run tag) against the same Redis, so nothing is replayed."""
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    tag = f"w{workers}"
    port = free_port()
    log_path = out_dir / f"gate-notel-{tag}.log"
    gate = start_server("gate-no-telemetry", gate_argv(port, "--no-telemetry"), port, workers, log_path)
    servers.append(gate)
    took = asyncio.run(ready([gate], args.ready_timeout))
    log(f"{workers} worker(s): gate --no-telemetry SERVING after {took[0]:.1f} s")
    best = check_result["max"]
    rate = check_result.get("open", {}).get("target_rps") or best["throughput_rps"] * args.open_fraction
    result = run_loadgen(
        "check-no-telemetry",
        gate,
        args,
        out_dir / f"loadgen-check-notel-{tag}.json",
        extra=[
            "--redis-url",
            redis.url,
            "--redis-pid",
            str(redis.proc.pid),
            "--concurrencies",
            str(best["concurrency"]),
            "--open-rate",
            str(rate),
            "--open-duration",
            str(args.duration),
            "--run-tag",
            f"notel{os.getpid():x}{int(time.time()):x}",
        ],
    )
    gate.stop()
    return result


def summarize(config: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one configuration, and the goals."""
    out: dict[str, Any] = {"workers": config["workers"]}
    for kind in ("echo", "check", "naive", "mlserver"):
        r = config.get(kind)
        if not r or "closed" not in r:
            if r:
                out[kind] = {"status": r.get("status")}
            continue
        best = max(r["closed"], key=lambda s: s["throughput_rps"])
        half = r.get("open", {})
        out[kind] = {
            "max_throughput_rps": best["throughput_rps"],
            "max_at_concurrency": best["concurrency"],
            "server_cpu_us_per_call_at_max": best["cost"].get("server_cpu_us_per_call"),
            "client_cpu_us_per_call_at_max": best["cost"].get("client_cpu_us_per_call"),
            "half_load_rps": half.get("target_rps"),
            "half_load_latency_ms": {k: half.get("latency_ms", {}).get(k) for k in ("p50", "p99", "p99.9")},
            "server_cpu_us_per_call_half_load": half.get("cost", {}).get("server_cpu_us_per_call"),
            "other_processes_cpu_cores": r["phase"]["cost"].get("other_processes_cpu_cores"),
            "errors": r["phase"]["errors"],
            "dropped_open_loop": half.get("dropped", 0),
        }
    light = min(config["check"]["closed"], key=lambda s: s["concurrency"])
    out["check"]["redis_us_per_check_lightest_step"] = {
        "concurrency": light["concurrency"],
        "us_per_check": light["cost"].get("redis", {}).get("us_per_call"),
        "evalsha_us": light["cost"].get("redis", {}).get("evalsha_us_per_command"),
    }
    check_phase = config["check"]["phase"]
    redis = check_phase["cost"].get("redis", {})
    out["check"]["redis_us_per_check"] = redis.get("us_per_call")
    out["check"]["redis_us_per_check_with_decision_log"] = redis.get("us_per_call_with_decision_log")
    out["check"]["redis_evalsha_us_per_call"] = redis.get("evalsha_us_per_command")
    out["check"]["redis_commands_per_check"] = redis.get("commands_per_call")
    out["check"]["redis_evalsha_per_check"] = redis.get("evalsha_per_call")
    out["check"]["redis_process_cpu_us_per_check"] = check_phase["cost"].get("redis_process_cpu_us_per_call")
    out["check"]["decisions"] = check_phase["decisions"]
    pop = config["check"].get("population") or {}
    if pop.get("sent"):
        out["population"] = {**pop, "retry_share_sent": round(pop.get("retries", 0) / pop["sent"], 4)}
    out["check"]["degraded"] = check_phase["degraded"]
    out["check"]["replayed"] = check_phase["replayed"]
    e, c = out["echo"], out["check"]
    ratio = c["max_throughput_rps"] / e["max_throughput_rps"] if e["max_throughput_rps"] else None
    out["throughput_ratio_check_to_echo"] = round(ratio, 3) if ratio is not None else None
    if e["server_cpu_us_per_call_at_max"] and c["server_cpu_us_per_call_at_max"]:
        out["cpu_ratio_check_to_echo"] = round(
            c["server_cpu_us_per_call_at_max"] / e["server_cpu_us_per_call_at_max"], 2
        )
    for peer in ("naive", "mlserver"):
        n = out.get(peer, {})
        if n.get("max_throughput_rps"):
            ratio_tp = c["max_throughput_rps"] / n["max_throughput_rps"]
            out[f"throughput_ratio_check_to_{peer}"] = round(ratio_tp, 3)
            if n["server_cpu_us_per_call_at_max"] and c["server_cpu_us_per_call_at_max"]:
                out[f"cpu_ratio_check_to_{peer}"] = round(
                    c["server_cpu_us_per_call_at_max"] / n["server_cpu_us_per_call_at_max"], 2
                )
            if n["half_load_latency_ms"]["p99"] and c["half_load_latency_ms"]["p99"]:
                out[f"p99_half_load_ratio_check_to_{peer}"] = round(
                    c["half_load_latency_ms"]["p99"] / n["half_load_latency_ms"]["p99"], 2
                )
    if e["half_load_latency_ms"]["p99"] and c["half_load_latency_ms"]["p99"]:
        out["p99_half_load_ratio_check_to_echo"] = round(
            c["half_load_latency_ms"]["p99"] / e["half_load_latency_ms"]["p99"], 2
        )
    out["overload"] = summarize_overload(config["check"])
    out["reload"] = summarize_reload(config["check"], c)
    out["telemetry_cost"] = summarize_telemetry(config, c)
    p99 = c["half_load_latency_ms"]["p99"]
    rus = c["redis_us_per_check"]
    out["goals"] = {
        "throughput_ratio>=0.70": ratio is not None and ratio >= GOALS["throughput_ratio_min"],
        "check_p99_half_load<=3ms": p99 is not None and p99 <= GOALS["check_p99_half_load_ms_max"],
        "redis_us_per_check<=60_target": rus is not None and rus <= GOALS["redis_us_per_check_target"],
        "redis_us_per_check<=40_goal": rus is not None and rus <= GOALS["redis_us_per_check_goal"],
    }
    # Issue 14's targets, all same-run ratios.
    tel = out["telemetry_cost"] or {}
    cpu_echo = out.get("cpu_ratio_check_to_echo")
    tp_naive = out.get("throughput_ratio_check_to_naive")
    p99_echo = out.get("p99_half_load_ratio_check_to_echo")
    tel_tp, tel_p99 = tel.get("throughput_cost_pct"), tel.get("p99_cost_pct")
    out["targets"] = {
        "server_cpu_per_check<=2x_echo": cpu_echo is not None and cpu_echo <= 2.0,
        "max_throughput>=1.5x_naive": tp_naive is not None and tp_naive >= 1.5,
        "half_load_p99<=1.5x_echo": p99_echo is not None and p99_echo <= 1.5,
        "telemetry_cost<=5%_throughput": tel_tp is not None and tel_tp <= 5.0,
        "telemetry_cost<=5%_p99": tel_p99 is not None and tel_p99 <= 5.0,
    }
    total = sum(out["check"]["decisions"].values()) or 1
    out["check"]["mix"] = {k: round(v / total, 3) for k, v in sorted(out["check"]["decisions"].items())}
    return out


def summarize_overload(check: dict[str, Any]) -> dict[str, Any] | None:
    """The 2x-max open-loop step: offered vs answered, shed share, latency of each kind."""
    step = check.get("overload")
    if not step:
        return None
    errors = dict(step["errors"])
    shed = errors.pop("RESOURCE_EXHAUSTED", 0)
    answered = step["ok"] + shed + sum(errors.values())
    lat = step.get("failed_latency_ms", {}).get("RESOURCE_EXHAUSTED", {})
    budget_ms = Settings().budget_ms
    recovery = step.get("recovery", {})
    late = {
        sec: codes
        for sec, codes in recovery.get("by_second_after_burst", {}).items()
        if int(sec) >= RECOVERY_AFTER_S
    }
    shed_late = sum(codes.get("RESOURCE_EXHAUSTED", 0) for codes in late.values())
    ok_p99, re_p99 = step["latency_ms"].get("p99"), lat.get("p99")
    promise = {
        f"ok_p99<=budget+{PROMISE_SLACK_MS:g}ms": ok_p99 is not None
        and ok_p99 <= budget_ms + PROMISE_SLACK_MS,
        f"resource_exhausted_p99<={PROMISE_SLACK_MS:g}ms": re_p99 is None or re_p99 <= PROMISE_SLACK_MS,
        f"no_refusal_{RECOVERY_AFTER_S}s_after_burst": bool(recovery) and shed_late == 0,
    }
    return {
        "budget_ms": budget_ms,
        "recovery": recovery,
        "refused_after_burst": shed_late,
        "promise": promise,
        "promise_kept": all(promise.values()),
        "factor": step.get("factor"),
        "target_rps": step["target_rps"],
        "offered_rps": step.get("offered_rps"),
        "ok_rps": step["achieved_rps"],
        "resource_exhausted": shed,
        "resource_exhausted_share": round(shed / answered, 3) if answered else None,
        "ok_latency_ms": {k: step["latency_ms"].get(k) for k in ("p50", "p99", "p99.9")},
        "resource_exhausted_latency_ms": {k: lat.get(k) for k in ("p50", "p99", "p99.9")},
        "other_errors": errors,
        "dropped_open_loop": step.get("dropped", 0),
        "degraded": step.get("degraded", 0),
        "send_lag_ms": step.get("send_lag_ms"),
        "other_processes_cpu_cores": step["cost"].get("other_processes_cpu_cores"),
    }


def summarize_reload(check: dict[str, Any], c: dict[str, Any]) -> dict[str, Any] | None:
    """The open-loop step during model flips, beside the steady half-load step."""
    step = check.get("reload")
    if not step:
        return None
    lat = {k: step["latency_ms"].get(k) for k in ("p50", "p99", "p99.9")}
    steady = c["half_load_latency_ms"]
    ratio = {k: round(lat[k] / steady[k], 2) if lat[k] is not None and steady.get(k) else None for k in lat}
    return {
        "rate_rps": step["target_rps"],
        "flips": step.get("flips"),
        "flip_interval_s": step.get("flip_interval_s"),
        "flip_errors": step.get("flip_errors", []),
        "failed_calls": sum(step["errors"].values()) + step.get("dropped", 0),
        "errors": step["errors"],
        "responses_by_version": step.get("model_versions", {}),
        "latency_ms": lat,
        "steady_latency_ms": steady,
        "ratio_to_steady": ratio,
        "p99_within_2x": ratio["p99"] is not None and ratio["p99"] <= 2.0,
        "other_processes_cpu_cores": step["cost"].get("other_processes_cpu_cores"),
    }


def summarize_telemetry(config: dict[str, Any], c: dict[str, Any]) -> dict[str, Any] | None:
    """Telemetry on (the main Check phase) vs off (the --no-telemetry gate, same run)."""
    off = config.get("check_no_telemetry")
    if not off or not off.get("closed"):
        return None
    off_closed = off["closed"][0]
    off_open = off.get("open", {})
    on_tp, off_tp = c["max_throughput_rps"], off_closed["throughput_rps"]
    on_cpu = c["server_cpu_us_per_call_at_max"]
    off_cpu = off_closed["cost"].get("server_cpu_us_per_call")
    return {
        "concurrency": off_closed["concurrency"],
        "on_throughput_rps": on_tp,
        "off_throughput_rps": off_tp,
        "throughput_cost_pct": round(100.0 * (off_tp - on_tp) / off_tp, 1) if off_tp else None,
        "on_server_cpu_us_per_call": on_cpu,
        "off_server_cpu_us_per_call": off_cpu,
        "server_cpu_cost_pct": round(100.0 * (on_cpu - off_cpu) / on_cpu, 1) if on_cpu and off_cpu else None,
        "p99_cost_pct": (
            round(100.0 * (on_p99 - off_p99) / off_p99, 1)
            if (on_p99 := c["half_load_latency_ms"].get("p99"))
            and (off_p99 := off_open.get("latency_ms", {}).get("p99"))
            else None
        ),
        "half_load_rps": off_open.get("target_rps"),
        "on_half_load_latency_ms": c["half_load_latency_ms"],
        "off_half_load_latency_ms": {
            k: off_open.get("latency_ms", {}).get(k) for k in ("p50", "p99", "p99.9")
        },
        "errors": off["phase"]["errors"],
        "degraded": off["phase"]["degraded"],
        "other_processes_cpu_cores": off["phase"]["cost"].get("other_processes_cpu_cores"),
    }


# ---------------------------------------------------------------------------------------------
# Scoring micro-benchmark (bench/scoring.py, written separately)
# ---------------------------------------------------------------------------------------------


def run_scoring(model_dir: Path, out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``python -m bench.scoring`` on the served model if the module exists."""
    if not (ROOT / "bench" / "scoring.py").exists():
        log("bench/scoring.py is missing: no scoring figures")
        return {"status": "missing: bench/scoring.py does not exist"}
    out = out_dir / "scoring.json"
    errors: list[str] = []
    for model in (model_dir / "model.txt", model_dir):
        argv = [PYTHON, "-m", "bench.scoring", "--model", str(model), "--out", str(out)]
        try:
            done = subprocess.run(
                argv, cwd=ROOT, timeout=timeout_s, capture_output=True, text=True, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            errors.append(f"--model {model}: timed out after {timeout_s} s")
            continue
        if done.returncode == 0 and out.exists():
            return {"status": "ok", "model": str(model), "result": json.loads(out.read_text())}
        errors.append(f"--model {model}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    log("bench.scoring failed: " + " | ".join(errors))
    return {"status": "failed", "errors": errors}


# ---------------------------------------------------------------------------------------------
# Redis cost of the velocity round trip alone (bench/redis_cost.py)
# ---------------------------------------------------------------------------------------------


def run_redis_cost(out_dir: Path, checks: int, timeout_s: float) -> dict[str, Any]:
    """Run ``python -m bench.redis_cost`` once the servers are stopped.

    In the Check phase redis-server shares the 2 CPUs with the gate's workers and the load
    generator: commandstats time is wall time, so every preemption and every cache the others
    evict lands in it. Driving the same round trips from one process, with nothing else
    running, gives the cost a Redis of its own would see; both figures are reported.
    """
    out = out_dir / "redis-cost.json"
    argv = [
        PYTHON,
        "-m",
        "bench.redis_cost",
        "--checks",
        str(checks),
        "--warmup",
        str(max(checks // 2, 1)),
        "--out",
        str(out),
    ]
    try:
        done = subprocess.run(
            argv, cwd=ROOT, timeout=timeout_s, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        log(f"bench.redis_cost timed out after {timeout_s} s")
        return {"status": f"timed out after {timeout_s} s"}
    if done.returncode == 0 and out.exists():
        return {"status": "ok", "result": json.loads(out.read_text())}
    log(f"bench.redis_cost failed: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    return {"status": "failed", "error": done.stderr.strip()[-400:]}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _lat(d: dict[str, Any]) -> str:
    return " / ".join(_fmt(d.get(k), ".2f") for k in ("p50", "p99", "p99.9"))


def render_peers(s: dict[str, Any]) -> list[str]:
    """Every server of the run side by side, Check's ratios to each, the targets, the mix."""
    lines = [
        "",
        f"peers, same run ({s['workers']} worker(s) each)      max req/s @c   server CPU us/call   "
        "half-load p50 / p99 ms    Check ratio: req/s, CPU, p99",
    ]
    for kind in ("echo", "naive", "mlserver", "check"):
        r = s.get(kind)
        if r is None:
            continue
        if "max_throughput_rps" not in r:
            lines.append(f"  {kind:34}{r.get('status')}")
            continue
        lat = r["half_load_latency_ms"]
        ratios = ""
        if kind != "check":
            tp = s.get(f"throughput_ratio_check_to_{kind}")
            cpu = s.get(f"cpu_ratio_check_to_{kind}")
            p99 = s.get(f"p99_half_load_ratio_check_to_{kind}")
            ratios = f"{_fmt(tp, '.2f')}, {_fmt(cpu, '.2f')}, {_fmt(p99, '.2f')}"
        lines.append(
            f"  {kind:34}{_fmt(r['max_throughput_rps']) + ' @' + str(r['max_at_concurrency']):>14}"
            f"{_fmt(r['server_cpu_us_per_call_at_max']):>21}"
            f"{_fmt(lat['p50'], '.2f') + ' / ' + _fmt(lat['p99'], '.2f'):>26}    {ratios}"
        )
    lines.append(
        "  targets: " + ", ".join(f"{name} {'ok' if met else 'MISSED'}" for name, met in s["targets"].items())
    )
    mix = s["check"]["mix"]
    pop = s.get("population") or {}
    lines.append(
        "  traffic mix (Check answers): "
        + ", ".join(f"{k} {v:.1%}" for k, v in mix.items())
        + (f"; retries {pop.get('retry_share_sent', 0):.1%} of requests" if pop else "")
    )
    return lines


def render_extra_steps(s: dict[str, Any]) -> list[str]:
    """Overload, telemetry cost and model reloads of one configuration."""
    lines: list[str] = []
    over, tel, rel = s.get("overload"), s.get("telemetry_cost"), s.get("reload")
    if over:
        lines += [
            "",
            f"overload, open loop at {_fmt(over['factor'], 'g')}x max ({_fmt(over['target_rps'])} req/s "
            f"target, {_fmt(over['offered_rps'])} req/s actually offered by the client)",
            f"{'  OK rate (req/s)':34}{_fmt(over['ok_rps']):>23}",
            f"{'  RESOURCE_EXHAUSTED (count, share)':34}"
            f"{str(over['resource_exhausted']) + ', ' + _fmt(over['resource_exhausted_share'], '.1%'):>23}",
            f"{'  OK p50/p99/p99.9 (ms)':34}{_lat(over['ok_latency_ms']):>23}",
            f"{'  RESOURCE_EXHAUSTED p50/p99/p99.9':34}{_lat(over['resource_exhausted_latency_ms']):>23}",
            f"{'  after the burst (s: statuses)':34}"
            + ", ".join(
                f"{sec}: {json.dumps(codes)}"
                for sec, codes in over["recovery"].get("by_second_after_burst", {}).items()
            ),
            "  promise: "
            + ", ".join(f"{name} {'ok' if kept else 'BROKEN'}" for name, kept in over["promise"].items()),
            f"{'  other statuses / dropped':34}{json.dumps(over['other_errors']):>23}"
            f"   {over['dropped_open_loop']} dropped, {over['degraded']} degraded, "
            f"other processes {_fmt(over['other_processes_cpu_cores'], '.2f')} cores",
        ]
    if tel:
        lines += [
            "",
            f"telemetry cost (second gate run with --no-telemetry){'':6}{'on':>10}{'off':>23}   cost",
            f"{'  closed loop @' + str(tel['concurrency']) + ' (req/s)':34}"
            f"{_fmt(tel['on_throughput_rps']):>23}{_fmt(tel['off_throughput_rps']):>23}"
            f"   {_fmt(tel['throughput_cost_pct'], '.1f')} %  (goal <= 10 %)",
            f"{'  server CPU us/call':34}{_fmt(tel['on_server_cpu_us_per_call']):>23}"
            f"{_fmt(tel['off_server_cpu_us_per_call']):>23}   {_fmt(tel['server_cpu_cost_pct'], '.1f')} %",
            f"{'  half load ' + _fmt(tel['half_load_rps']) + '/s p50/p99/p99.9':34}"
            f"{_lat(tel['on_half_load_latency_ms']):>23}{_lat(tel['off_half_load_latency_ms']):>23}",
            f"{'  off run: errors, other processes':34}{json.dumps(tel['errors']):>23}"
            f"{_fmt(tel['other_processes_cpu_cores'], '.2f') + ' cores':>23}",
        ]
    if rel:
        ratio = rel["ratio_to_steady"]
        lines += [
            "",
            f"model reloads under load: {rel['flips']} flips every {rel['flip_interval_s']} s, open loop "
            f"{_fmt(rel['rate_rps'])} req/s{'':3}{'steady':>10}{'reloading':>23}   ratio",
            f"{'  p50/p99/p99.9 (ms)':34}{_lat(rel['steady_latency_ms']):>23}{_lat(rel['latency_ms']):>23}"
            f"   {' / '.join(_fmt(ratio[k], '.2f') for k in ('p50', 'p99', 'p99.9'))}"
            f"  p99 <= 2x {'ok' if rel['p99_within_2x'] else 'MISSED'}",
            f"{'  failed calls / responses by version':34}{rel['failed_calls']:>23}"
            f"   {json.dumps(rel['responses_by_version'])}",
        ]
    return lines


def render(report: dict[str, Any]) -> str:
    """The human-readable table."""
    meta = report["meta"]
    lines = [
        f"refund-gate bench  {meta['date']}  {meta['cpus']} CPUs  {meta['machine']}",
        f"model {meta['model'].get('version')} ({meta['model'].get('engine')}, "
        f"{meta['model'].get('num_trees')} trees){'  THROW-AWAY' if meta['model_throwaway'] else ''}"
        f"; {meta['settings']['duration']} s per closed-loop step, open loop "
        f"{meta['settings']['open_duration']} s",
    ]
    for s in report["summaries"]:
        e, c = s["echo"], s["check"]
        g = s["goals"]
        ratio = s["throughput_ratio_check_to_echo"]
        light = c["redis_us_per_check_lightest_step"]
        cmds = f"{_fmt(c['redis_commands_per_check'], '.2f')} / {_fmt(c['redis_evalsha_per_check'], '.2f')}"
        lines += [
            "",
            f"== {s['workers']} worker process(es) per server ==",
            f"{'':34}{'echo':>23}{'Check':>23}   {'Check/echo':>11}  goal",
            f"{'max throughput (req/s) @conc':34}"
            f"{_fmt(e['max_throughput_rps']) + ' @' + str(e['max_at_concurrency']):>23}"
            f"{_fmt(c['max_throughput_rps']) + ' @' + str(c['max_at_concurrency']):>23}"
            f"   {_fmt(ratio, '.2f'):>11}  >= 0.70 {'ok' if g['throughput_ratio>=0.70'] else 'MISSED'}",
            f"{'half-load rate (req/s)':34}{_fmt(e['half_load_rps']):>23}{_fmt(c['half_load_rps']):>23}",
            f"{'half load p50/p99/p99.9 (ms)':34}{_lat(e['half_load_latency_ms']):>23}"
            f"{_lat(c['half_load_latency_ms']):>23}   {'':>11}  p99 <= 3 ms "
            f"{'ok' if g['check_p99_half_load<=3ms'] else 'MISSED'}",
            f"{'server CPU us/call at max':34}{_fmt(e['server_cpu_us_per_call_at_max']):>23}"
            f"{_fmt(c['server_cpu_us_per_call_at_max']):>23}"
            f"   {_fmt(s.get('cpu_ratio_check_to_echo'), '.2f'):>11}",
            f"{'server CPU us/call at half load':34}"
            f"{_fmt(e['server_cpu_us_per_call_half_load']):>23}"
            f"{_fmt(c['server_cpu_us_per_call_half_load']):>23}",
            f"{'client CPU us/call at max':34}{_fmt(e['client_cpu_us_per_call_at_max']):>23}"
            f"{_fmt(c['client_cpu_us_per_call_at_max']):>23}",
            f"{'Redis us/Check EVALSHA+MGET+GET+SET':34}{'':>23}"
            f"{_fmt(c['redis_us_per_check'], '.1f'):>23}   {'':>11}  <= 60 target "
            f"{'ok' if g['redis_us_per_check<=60_target'] else 'MISSED'}, <= 40 goal "
            f"{'ok' if g['redis_us_per_check<=40_goal'] else 'MISSED'}",
            f"{'  + decision log XADD':34}{'':>23}"
            f"{_fmt(c['redis_us_per_check_with_decision_log'], '.1f'):>23}",
            f"{'  at c=' + str(light['concurrency']) + ' only (lightest step)':34}{'':>23}"
            f"{_fmt(light['us_per_check'], '.1f'):>23}",
            f"{'  commands / EVALSHA per Check':34}{'':>23}{cmds:>23}",
            f"{'  us per EVALSHA':34}{'':>23}{_fmt(c['redis_evalsha_us_per_call'], '.1f'):>23}",
            f"{'  redis-server CPU us per Check':34}{'':>23}{_fmt(c['redis_process_cpu_us_per_check']):>23}",
            f"{'other processes CPU (cores)':34}{_fmt(e['other_processes_cpu_cores'], '.2f'):>23}"
            f"{_fmt(c['other_processes_cpu_cores'], '.2f'):>23}   (machine noise; ~0 is clean)",
            f"{'errors (by status)':34}echo {json.dumps(e['errors'])}, Check {json.dumps(c['errors'])}",
            f"{'Check decisions':34}{json.dumps(c['decisions'])}  degraded "
            f"{c['degraded']}, replayed {c['replayed']}",
        ]
        lines += render_peers(s)
        lines += render_extra_steps(s)
    for cfg in report["configs"]:
        scripts = cfg["check"].get("redis_scripts", {}).get("scripts", {})
        if scripts:
            lines += [
                "",
                f"Redis time by command ({cfg['workers']} worker(s); extra step at c="
                f"{cfg['check']['redis_scripts']['concurrency']} with SLOWLOG on): "
                "us per Check, mean / p99 us per call",
            ]
            lines += [
                f"  {name:>14}  {v['us_per_check']:6.1f}  {v['mean_us']:6.1f} / {v['p99_us']}"
                for name, v in scripts.items()
            ]
        lines += [
            "",
            f"steps ({cfg['workers']} worker(s)): req/s, p50/p99 ms, server CPU us/call"
            ", Redis us/Check, degraded answers",
        ]
        for kind in ("echo", "check"):
            for step in [*cfg[kind]["closed"], cfg[kind].get("open")]:
                if not step:
                    continue
                k = step["cost"]
                where = (
                    f"c={step['concurrency']}"
                    if step["mode"] == "closed"
                    else f"open {step['target_rps']:.0f}/s"
                )
                rate = step.get("throughput_rps", step.get("achieved_rps"))
                lat = step["latency_ms"]
                lines.append(
                    f"  {kind:>5} {where:>14}  {_fmt(rate):>6} req/s  {_fmt(lat['p50'], '.2f'):>6}"
                    f" / {_fmt(lat['p99'], '.2f'):>6} ms  {_fmt(k.get('server_cpu_us_per_call')):>5}"
                    f" us  {_fmt(k.get('redis', {}).get('us_per_call'), '.0f'):>4} us"
                    f"  {step.get('degraded', 0)}"
                )
    if len(report["summaries"]) > 1:
        best = max(report["summaries"], key=lambda s: s["throughput_ratio_check_to_echo"] or 0)
        lines += [
            "",
            f"highest Check/echo throughput ratio: {best['workers']} worker(s) "
            f"({best['throughput_ratio_check_to_echo']})",
        ]
    alone = report.get("redis_alone", {})
    lines += ["", f"Redis, velocity round trips alone (bench.redis_cost): {alone.get('status')}"]
    if alone.get("status") == "ok":
        res = alone["result"]
        us = res.get("redis_us_per_check")
        target, goal = GOALS["redis_us_per_check_target"], GOALS["redis_us_per_check_goal"]
        lines += [
            f"  {res.get('checks')} Checks from one process, 32 in flight, nothing else running",
            f"  us/Check EVALSHA+MGET+GET+SET {_fmt(us, '.1f'):>8}   <= {target:.0f} target "
            f"{'ok' if us is not None and us <= target else 'MISSED'}, <= {goal:.0f} goal "
            f"{'ok' if us is not None and us <= goal else 'MISSED'}",
            f"  redis-server CPU us per Check  {_fmt(res.get('redis_process_cpu_us_per_check'), '.1f'):>8}",
            f"  us per EVALSHA                 {_fmt(res.get('us_per_evalsha'), '.2f'):>8}",
        ]
    scoring = report.get("scoring", {})
    lines += ["", f"scoring micro-benchmark: {scoring.get('status')}"]
    if scoring.get("status") == "ok":
        res = scoring["result"]
        lines.append(
            f"  {res.get('num_trees')} trees x {res.get('max_leaves')} leaves, us per row (p50 / p99 / mean):"
        )
        for engine, r in (res.get("results_us") or {}).items():
            lines.append(
                f"  {engine:>18}  {_fmt(r.get('p50'), '.2f')} / "
                f"{_fmt(r.get('p99'), '.2f')} / {_fmt(r.get('mean'), '.2f')}"
            )
    for cfg in report["configs"]:
        prof = cfg.get("check_profile")
        if prof and prof.get("samples"):
            lines += [
                "",
                f"py-spy profile of the gate ({cfg['workers']} worker(s)), "
                f"{prof['samples']} samples (Python frames; C and Cython time shows as "
                "the self time of the calling frame). Self %:",
            ]
            lines += [f"  {pct:5.1f}  {name}" for name, pct in prof["self_pct"][:15]]
            lines.append("  inclusive % of the gate's own functions:")
            lines += [f"  {pct:5.1f}  {name}" for name, pct in prof["inclusive_pct"] if "(gate/" in name][:12]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-results/bench.json"))
    p.add_argument(
        "--workers", default="2", help="worker processes per server; a list (e.g. 1,2) runs each in turn"
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per closed-loop step")
    p.add_argument(
        "--open-duration",
        type=float,
        default=None,
        help="seconds of the open-loop step (default: 2 x --duration)",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before a step")
    # Closed loops stop at 32 calls in flight: one worker's --shed-start. Past it (64 over two
    # workers is 32 each, at the line) the gate rightly sheds whatever imbalance the SO_REUSEPORT
    # split leaves, and a closed loop then measures shedding, which the overload step covers.
    p.add_argument("--concurrencies", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--open-fraction", type=float, default=0.5)
    p.add_argument("--channels", type=int, default=4, help="client connections")
    p.add_argument("--accounts", type=int, default=20_000)
    p.add_argument("--zipf", type=float, default=0.7, help="account activity skew exponent")
    p.add_argument(
        "--no-seed-orders",
        dest="seed_orders",
        action="store_false",
        help="skip recording one ORDER_PLACED per account before the Check phase",
    )
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("--scoring-timeout", type=float, default=180.0)
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each configuration, wait up to this long for other processes "
        "to leave the CPUs idle (shared VMs)",
    )
    p.add_argument(
        "--overload-factor",
        type=float,
        default=2.0,
        help="last Check step: open loop at this multiple of the max throughput "
        "(RESOURCE_EXHAUSTED expected there); 0 skips it",
    )
    p.add_argument(
        "--reload-flips",
        type=int,
        default=20,
        help="model reloads under load: flips of the served model dir's 'current' link "
        "during an extra half-load open loop; 0 skips the step (and serves --model-dir directly)",
    )
    p.add_argument("--reload-interval", type=float, default=0.4, help="seconds between model flips")
    p.add_argument(
        "--gate-args",
        default="",
        help="more flags for the gate's serve command, e.g. '--shed-start 8' (one string)",
    )
    p.add_argument(
        "--peers",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help="more peers beside echo and the naive stack: 'mlserver' (MLServer's LightGBM runtime "
        "on the same model.txt, from --mlserver-venv)",
    )
    p.add_argument(
        "--mlserver-venv",
        type=Path,
        default=ROOT / ".venv-mlserver",
        help="virtualenv with mlserver and mlserver-lightgbm (bench/mlserver_peer.py says how to make it)",
    )
    p.add_argument(
        "--no-telemetry-cost",
        dest="telemetry_cost",
        action="store_false",
        help="skip the second gate run with --no-telemetry",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample the gate with py-spy during the Check phase (costs some CPU)",
    )
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=Settings().event_loop,
        help="event loop of the gate's and the echo server's workers (both the same)",
    )
    p.add_argument(
        "--redis-cost-checks",
        type=int,
        default=20_000,
        help="Checks of the velocity round trip alone (bench.redis_cost) once the servers are "
        "stopped; 0 skips it",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every call succeeded, 1 otherwise."""
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every child process is stopped by the finally blocks.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    args.open_duration = args.open_duration or 2 * args.duration
    workers_list = [int(w) for w in str(args.workers).split(",") if w]
    out: Path = args.out
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    from gate.devredis import start_redis

    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        with contextlib.ExitStack() as stack:
            model_dir: Path = args.model_dir
            throwaway = not model_dir.exists()
            if throwaway:
                tmp = Path(tempfile.mkdtemp(prefix="bench-bundle-"))
                stack.callback(shutil.rmtree, tmp, True)
                log(
                    f"{model_dir} does not exist: building a THROW-AWAY bundle (synthetic data, "
                    "as the tests' bundle_dir fixture); its figures are not the real model's"
                )
                model_dir = build_throwaway_bundle(tmp / "bundle")
            model = model_info(model_dir)
            redis = start_redis()
            stack.callback(shutil.rmtree, redis.workdir, True)
            stack.callback(redis.kill)
            stack.callback(redis.stop)
            configs = []
            for workers in workers_list:
                configs.append(bench_config(workers, args, redis, model_dir, out_dir))
            scoring = run_scoring(model_dir, out_dir, args.scoring_timeout)
            redis_alone = (
                run_redis_cost(out_dir, args.redis_cost_checks, args.scoring_timeout)
                if args.redis_cost_checks > 0
                else {"status": "skipped"}
            )
            redis_version = redis.client().info("server").get("redis_version")
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"\nFAILED: the benchmark could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    summaries = [summarize(c) for c in configs]
    report: dict[str, Any] = {
        "meta": {
            "date": started_at,
            "machine": f"{platform.system()} {platform.machine()} {platform.node()}",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpc": _version("grpcio"),
            "protobuf": _version("protobuf"),
            "redis": redis_version,
            "model": model,
            "model_throwaway": throwaway,
            "seconds": round(time.monotonic() - started, 1),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        },
        "summaries": summaries,
        "configs": configs,
        "scoring": scoring,
        "redis_alone": redis_alone,
        "goals": GOALS,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"\nwritten: {out} ({report['meta']['seconds']} s)")
    for s in summaries:
        if s["check"]["degraded"]:
            print(
                f"\nWARNING ({s['workers']} worker(s)): {s['check']['degraded']} Check answers "
                "were degraded (Redis timed out or failed): the figures are not clean",
                file=sys.stderr,
            )
        for kind in ("echo", "check", "naive"):
            if kind in s and s[kind].get("dropped_open_loop"):
                print(
                    f"\nWARNING ({s['workers']} worker(s)): {kind} open loop dropped "
                    f"{s[kind]['dropped_open_loop']} arrivals (over {MAX_OUTSTANDING} in "
                    "flight): the server could not keep up with half load",
                    file=sys.stderr,
                )
    busy = [
        f"{s['workers']}w/{kind} {s[kind]['other_processes_cpu_cores']}"
        for s in summaries
        for kind in ("echo", "check", "naive")
        if kind in s and (s[kind].get("other_processes_cpu_cores") or 0) > 0.2
    ]
    if busy:
        print(
            "\nWARNING: other processes used CPU during the run (cores: "
            + ", ".join(busy)
            + "): on 2 CPUs that distorts every figure; rerun on a quiet machine",
            file=sys.stderr,
        )
    failures = {
        f"{s['workers']}w/{kind}": s[kind]["errors"]
        for s in summaries
        for kind in ("echo", "check", "naive", "mlserver")
        if kind in s and s[kind].get("errors")
    }
    for s in summaries:
        over, rel, tel = s.get("overload"), s.get("reload"), s.get("telemetry_cost")
        if over and over["other_errors"]:  # RESOURCE_EXHAUSTED is expected there, nothing else
            failures[f"{s['workers']}w/overload"] = over["other_errors"]
        if rel and rel["failed_calls"]:
            failures[f"{s['workers']}w/reload"] = {"failed_calls": rel["failed_calls"], **rel["errors"]}
        if rel and (len(rel["responses_by_version"]) < 2 or rel["flip_errors"]):
            print(
                f"\nWARNING ({s['workers']} worker(s)): the reload step did not see both model "
                f"versions ({rel['responses_by_version']}; flip errors {rel['flip_errors']})",
                file=sys.stderr,
            )
        if tel and tel["errors"]:
            failures[f"{s['workers']}w/no-telemetry"] = tel["errors"]
    broken = {
        f"{s['workers']}w": [name for name, kept in s["overload"]["promise"].items() if not kept]
        for s in summaries
        if s.get("overload") and not s["overload"]["promise_kept"]
    }
    if failures:
        print(f"\nFAILED: calls ended with non-OK status: {json.dumps(failures)}", file=sys.stderr)
    if broken:
        print(f"\nFAILED: overload promise broken: {json.dumps(broken)}", file=sys.stderr)
    return 1 if failures or broken else 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
