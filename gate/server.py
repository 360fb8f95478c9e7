"""Wiring: build the gRPC server (service, health, reflection v1 and v1alpha) and run it until SIGTERM.

``create_gate`` is separate from ``serve`` so tests bind port 0 and get the real server.
Health is NOT_SERVING until a model is loaded and Redis has answered once, SERVING after that
(a Redis outage later degrades decisions but does not take the sidecar out of rotation).

Shutdown: on SIGTERM health turns NOT_SERVING at once and the gate keeps answering for
``GATE_DRAIN_S``, so load balancers and endpoints move away first; then the listener closes and
in-flight calls get ``GATE_GRACE_S`` to finish. SIGINT (or a second signal) skips the drain.
GateAdmin has a listener of its own (gate/admin.py); health stays on the main port for probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gate.admin import create_admin_server
from gate.admission import Admission, find_new_server, server_ids_or_none
from gate.backoff import REDIS_BACKOFF
from gate.bundle import Bundle
from gate.decisionlog import DecisionLog, OutcomeLog, outcomes_key
from gate.journal import OutageJournal
from gate.logs import setup_logging
from gate.redisclient import RedisAddress, RedisError
from gate.redisdriver import ClusterDriver, SingleNodeDriver, make_driver
from gate.redishealth import RedisHealth
from gate.reflection import enable_reflection
from gate.reloader import ModelHolder, ModelWatcher
from gate.service import OVERLOADED, RefundGateService, bad_request_status
from gate.settings import Settings
from gate.telemetry import (
    Telemetry,
    announce_model,
    announce_shadow,
    observe_breaker,
    start_prometheus_server,
)
from gate.validation import ValidationError, Violation
from gate.velocity import LOAD_SCRIPTS, IdHasher, VelocityStore
from gate.workers import FATAL_EXIT, fork_workers, restarts
from refundgate.v1 import refund_gate_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RefundGate"].full_name
VELOCITY_HEALTH = "refundgate.v1.RefundGate/velocity"
"""Health entry of the velocity store: NOT_SERVING while a node's circuit breaker is open or most
Checks are degraded by Redis (gate/redishealth.py). The service itself stays SERVING then: it
answers, degraded, within its budget."""


def _unary(
    method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]],
    request_type: type[Message],
    telemetry: Telemetry,
) -> grpc.RpcMethodHandler:
    """A unary handler that parses the request itself and maps every failure deliberately.

    gRPC's own deserializer would answer INTERNAL to bytes that are not a valid message; the
    caller sent bad input, so it gets INVALID_ARGUMENT naming the request. Any unexpected
    exception becomes INTERNAL with a generic message and is logged: never a traceback.
    """
    name = method.__name__
    full_method = f"/{SERVICE_NAME}/{name}"

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        with telemetry.server_span(full_method, context):
            try:
                request = request_type.FromString(raw)
            except (DecodeError, ValueError):
                telemetry.m.invalid.add(1, {"method": name})
                await context.abort_with_status(
                    bad_request_status(
                        ValidationError(
                            [Violation("request", f"is not a valid {request_type.DESCRIPTOR.name}")]
                        )
                    )
                )
                raise AssertionError("unreachable: abort raises") from None
            try:
                return await method(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:
                if context.done():  # the call ended under us (peer gone, server closing): no answer
                    log.debug("%s ended before its answer", name, exc_info=True)
                    raise asyncio.CancelledError from None
                log.exception("unexpected error in %s", name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                raise AssertionError("unreachable: abort raises") from None

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=None, response_serializer=lambda m: m.SerializeToString()
    )


class _AdmittingHandler(grpc.GenericRpcHandler):
    """RefundGate's methods behind admission control, decided when a call reaches Python.

    grpc.aio asks ``service()`` for each call's handler before it reads the request, so an
    overloaded process answers RESOURCE_EXHAUSTED without reading, parsing, tracing or queueing
    the request: a handler that takes the request as a stream (never read) and aborts at once.
    That keeps the refusal to gRPC's own minimum per call, which is what bounds how late the
    refusals of an overloaded process are (gate/admission.py)."""

    def __init__(
        self,
        handlers: dict[str, grpc.RpcMethodHandler],
        admission: Admission,
        telemetry: Telemetry,
        durations: dict[str, Any],
    ) -> None:
        self._handlers = {f"/{SERVICE_NAME}/{name}": h for name, h in handlers.items()}
        self._admission = admission
        self._refuse = {f"/{SERVICE_NAME}/{name}": _refusal(telemetry, durations[name]) for name in handlers}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is not None and self._admission.shed():
            return self._refuse[method]
        return handler


def _refusal(telemetry: Telemetry, duration: Any) -> grpc.RpcMethodHandler:
    """A handler answering RESOURCE_EXHAUSTED without reading the request (counted as shed)."""
    shed, outcome = telemetry.m.shed, {"outcome": "RESOURCE_EXHAUSTED"}

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        shed.add(1)
        duration.record(0.0, outcome)
        # The status without abort(): no exception unwinding through grpc.aio's handler.
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details(OVERLOADED)

    return grpc.stream_unary_rpc_method_handler(refuse)


class _HealthServicer(health.aio.HealthServicer):
    """The standard health servicer; its Watch streams are told to admission control, which
    would otherwise count each open watcher as a call held (health is never shed), and they end
    (after NOT_SERVING) when the server stops, so that they do not hold the grace period."""

    def __init__(self, admission: Admission) -> None:
        super().__init__()
        self.admission = admission
        self._closing = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        with self.admission.stream():
            watch = asyncio.ensure_future(super().Watch(request, context))
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait((watch, closing), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (watch, closing):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    def end_watches(self) -> None:
        """Let every Watch stream finish with OK; statuses stay where they are."""
        self._closing.set()


class StartupError(Exception):
    """An expected reason not to start (a taken port, a bad address): the message is the one line
    the operator sees, naming the address and the setting."""


def bind_error(setting: str, address: str, worker: int = 0, problem: str | None = None) -> StartupError:
    """A StartupError for ``address`` (of ``setting``) that cannot be bound, saying why."""
    where = f"GATE_{setting.upper()}, --{setting.replace('_', '-')}"
    if worker:
        where += f"; worker {worker} listens on its port + {worker}"
    return StartupError(f"cannot bind {address} ({where}): {problem or bind_problem(address) or 'refused'}")


def bind_problem(address: str) -> str | None:
    """Why ``host:port`` cannot be bound (e.g. 'address already in use'), found by trying as gRPC
    does (SO_REUSEADDR: a port whose old connections linger is free); None when it can be.
    Asked before gRPC binds, so that its own error log never precedes the one line."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


def redis_problem(exc: RedisError, timeout_ms: float) -> str:
    """A short reason why Redis did not answer: 'connection refused', 'no answer within 200 ms'."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, TimeoutError):
        return f"no answer within {timeout_ms:g} ms"
    if isinstance(cause, OSError) and cause.errno and cause.errno > 0:
        return os.strerror(cause.errno).lower()
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(cause or exc)


def redis_location(address: RedisAddress) -> str:
    """HOST:PORT (or unix:PATH) of a Redis address, without credentials."""
    return f"unix:{address.unix_path}" if address.unix_path else f"{address.host}:{address.port}"


MIN_REDIS = (7, 0)  # SET NX GET, PEXPIRE GT (gate/lua/*.lua)


def redis_version(info: bytes) -> tuple[int, ...]:
    """The server version in an ``INFO server`` reply, e.g. (7, 0, 15); (0,) if absent."""
    for line in info.decode(errors="replace").splitlines():
        if line.startswith("redis_version:"):
            return tuple(int(p) for p in line.split(":", 1)[1].split(".") if p.isdigit())
    return (0,)


@dataclass
class Gate:
    """A built, not yet started gate: the server and the parts tests may want to reach."""

    server: grpc.aio.Server
    port: int
    service: RefundGateService
    health: _HealthServicer
    redis: SingleNodeDriver | ClusterDriver
    redis_health: RedisHealth
    journal: OutageJournal
    models: ModelHolder
    telemetry: Telemetry
    decision_log: DecisionLog | None
    log_redis: SingleNodeDriver | ClusterDriver | None  # the decision log's own connection(s)
    watcher: ModelWatcher | None
    _tasks: list[asyncio.Task[None]]
    admin_server: grpc.aio.Server | None = None
    admin_port: int = 0
    """GateAdmin's own listener (None when admin_listen is empty) and its bound port."""
    redis_wait_log_s: float = 5.0
    """While Redis has not answered yet: how often 'waiting for Redis' is logged."""
    redis_where: str = ""
    """HOST:PORT of the Redis node(s), for that log line."""
    redis_timeout_ms: float = 0.0

    async def start(self) -> None:
        """Start serving and watch Redis until it answers once, then report SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(VELOCITY_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.decision_log is not None:
            self.decision_log.start()
        if self.watcher is not None:
            self.watcher.start()
        self.redis_health.start()
        self.journal.start()
        await self.server.start()
        if self.admin_server is not None:
            await self.admin_server.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._become_ready()))

    async def _become_ready(self) -> None:
        backoff = REDIS_BACKOFF.start()
        warned = False
        next_wait_log = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self.redis.connected:
                    await self.redis.connect()
                if self.log_redis is not None and not self.log_redis.connected:
                    await self.log_redis.connect()
                (info,) = await self.redis.call([("INFO", "server")], timeout_s=1.0)
                version = redis_version(info)
                if version >= MIN_REDIS:
                    break
                if not warned:  # the scripts would fail on every Check: refuse to serve
                    log.error(
                        "Redis %s is too old: refund-gate needs %s or later; staying NOT_SERVING",
                        ".".join(map(str, version)),
                        ".".join(map(str, MIN_REDIS)),
                    )
                    warned = True
                await asyncio.sleep(5.0)
            except RedisError as exc:
                if loop.time() >= next_wait_log:
                    next_wait_log = loop.time() + self.redis_wait_log_s
                    reason = redis_problem(exc, self.redis_timeout_ms)
                    log.warning(f"waiting for Redis at {self.redis_where} ({reason})")
                await asyncio.sleep(backoff.next())
        await self.health.set(VELOCITY_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        if self.models.bundle is not None:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("serving", extra={"port": self.port, "model_version": self.models.bundle.version})

    def on_velocity_health(self, serving: bool) -> None:
        """Mirror the Redis health verdict in the velocity health entry."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        task = asyncio.get_running_loop().create_task(self.health.set(VELOCITY_HEALTH, status))
        self._tasks.append(task)
        self._tasks = [t for t in self._tasks if not t.done()]

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def drain(self, drain_s: float, interrupt: asyncio.Event | None = None) -> None:
        """Report NOT_SERVING for good, then keep answering for ``drain_s`` (less if ``interrupt``
        is set meanwhile), so that callers and endpoints move away before the listener closes."""
        await self.health.enter_graceful_shutdown()
        if drain_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_s):
                await (interrupt or asyncio.Event()).wait()

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, stop accepting calls, let in-flight ones finish within ``grace_s``,
        then close."""
        await self.health.enter_graceful_shutdown()
        self.health.end_watches()
        if self.watcher is not None:
            await self.watcher.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        servers = [self.server] + ([self.admin_server] if self.admin_server is not None else [])
        await asyncio.gather(*(server.stop(grace_s) for server in servers))
        await self.journal.close()
        if self.decision_log is not None:
            await self.decision_log.close()
        await self.redis_health.close()
        await self.redis.close()
        if self.log_redis is not None:
            await self.log_redis.close()


def create_gate(
    settings: Settings,
    models: Bundle | ModelWatcher | None,
    *,
    reuse_port: bool = False,
    telemetry: Telemetry | None = None,
    worker: int = 0,
) -> Gate:
    """Build the server on ``settings.listen`` (port 0 picks a free one).

    ``models`` is a watcher (hot reload of the model directory), a fixed bundle, or None (the
    gate then answers UNAVAILABLE). Without ``telemetry`` a private one is made with no
    Prometheus reader (tests build many gates in one process; that registry is process-wide).
    GateAdmin gets its own server on ``settings.admin_listen`` unless that is empty. Raises
    StartupError when an address cannot be bound (``worker`` only words its message).
    """
    telemetry = telemetry or Telemetry(prometheus=False)
    watcher = models if isinstance(models, ModelWatcher) else None
    holder = (
        watcher.holder if watcher is not None else ModelHolder(models if isinstance(models, Bundle) else None)
    )

    def announce_models() -> None:  # a new model's series exist at 0 before its first decision
        if holder.bundle is not None:
            announce_model(telemetry.m, holder.bundle.version)
        if holder.shadow is not None:
            announce_shadow(telemetry.m, holder.shadow.version)

    def on_load(result: str) -> None:
        announce_models()
        telemetry.m.model_loads.add(1, {"result": result})

    announce_models()
    if watcher is not None:
        watcher.on_result = on_load
        if holder.refusals:  # refused before telemetry existed (e.g. a bad shadow at start-up)
            telemetry.m.model_loads.add(holder.refusals, {"result": "refused"})
    target = settings.redis_target()
    connect_timeout_s = settings.redis_connect_timeout_ms / 1000.0
    redis_health = RedisHealth(
        failure_threshold=settings.breaker_failures,
        interval_s=settings.velocity_health_interval_s,
        degraded_share=settings.velocity_health_degraded_share,
        on_open=lambda _node: telemetry.m.breaker_opens.add(1),
    )
    redis = make_driver(
        target,
        scripts=LOAD_SCRIPTS,
        health=redis_health,
        connect_timeout_s=connect_timeout_s,
        probe_timeout_s=(settings.budget_ms - settings.score_reserve_ms) / 1000.0,
        refresh_s=settings.redis_cluster_refresh_s,
    )
    store = VelocityStore(
        redis,
        prefix=settings.key_prefix,
        hasher=IdHasher(settings.id_hash_key),
        replay_ttl_s=settings.replay_ttl_s,
        outcomes=(
            OutcomeLog(outcomes_key(settings.key_prefix), maxlen=settings.decision_log_maxlen)
            if settings.decision_log
            else None
        ),
    )
    journal = OutageJournal(
        store,
        capacity=settings.outage_journal_max,
        on_event=lambda event, n: telemetry.m.outage_journal.add(n, {"event": event}),
    )
    decision_log = log_redis = None
    if settings.decision_log:
        # Its own connection(s): an audit burst never queues ahead of a Check's pipeline.
        log_redis = make_driver(
            target, connect_timeout_s=connect_timeout_s, refresh_s=settings.redis_cluster_refresh_s
        )
        decision_log = DecisionLog(
            log_redis,
            f"{settings.key_prefix}:decisions",
            maxlen=settings.decision_log_maxlen,
            queue_size=settings.decision_log_queue,
            on_drop=lambda n: telemetry.m.decision_log_dropped.add(n),
        )
    observe_breaker(telemetry.meter, lambda: bool(redis_health.open_nodes))
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.enable_channelz", 1),  # its per-server call counters drive admission
    ]
    # Overload: Check and RecordEvents ask the admission controller first, which counts every
    # call the process holds, including those gRPC core has queued before the event loop takes
    # them (gate/admission.py). No maximum_concurrent_rpcs: grpc.aio applies it to the RPCs its
    # Python side has taken, which stay few while the backlog grows in core, and when it does
    # fire (a stalled loop) it refuses any method, health checks included, uncounted.
    before = server_ids_or_none()
    server = grpc.aio.server(options=options)
    admission = Admission.from_settings(settings, find_new_server(before))
    service = RefundGateService(
        settings,
        store,
        holder,
        telemetry,
        decision_log,
        admission=admission,
        redis_health=redis_health,
        journal=journal,
    )
    server.add_generic_rpc_handlers(
        (
            _AdmittingHandler(
                {
                    "Check": _unary(service.Check, pb.CheckRequest, telemetry),
                    "RecordEvents": _unary(service.RecordEvents, pb.RecordEventsRequest, telemetry),
                },
                admission,
                telemetry,
                {"Check": telemetry.m.check_duration, "RecordEvents": telemetry.m.events_duration},
            ),
        )
    )
    health_servicer = _HealthServicer(admission)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    problem = None if reuse_port else bind_problem(settings.listen)  # workers: checked by serve()
    if problem:
        raise bind_error("listen", settings.listen, problem=problem)
    try:
        port = server.add_insecure_port(settings.listen)
    except RuntimeError:  # grpcio raises where older versions returned 0
        port = 0
    if port == 0:
        raise bind_error("listen", settings.listen)
    admin_server, admin_port = None, 0
    if settings.admin_listen:
        problem = bind_problem(settings.admin_listen)
        if problem:
            raise bind_error("admin_listen", settings.admin_listen, worker, problem)
        try:
            admin_server, admin_port = create_admin_server(
                settings.admin_listen, settings.admin_token, holder
            )
        except OSError:
            raise bind_error("admin_listen", settings.admin_listen, worker) from None
    gate = Gate(
        server=server,
        port=port,
        service=service,
        health=health_servicer,
        redis=redis,
        redis_health=redis_health,
        journal=journal,
        models=holder,
        telemetry=telemetry,
        decision_log=decision_log,
        log_redis=log_redis,
        watcher=watcher,
        _tasks=[],
        admin_server=admin_server,
        admin_port=admin_port,
        redis_where=", ".join(redis_location(a) for a in target.seeds),
        redis_timeout_ms=settings.redis_connect_timeout_ms,
    )
    redis_health.on_change = gate.on_velocity_health
    return gate


def worker_address(address: str, worker: int) -> str:
    """``host:port + worker`` (each worker's own metrics and admin port); port 0 stays 0."""
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + worker if int(port) else 0}"


def observe_worker_restarts(telemetry: Telemetry, count: int) -> None:
    """Export how often this worker's slot was restarted (0 from start-up on)."""
    from opentelemetry.metrics import CallbackOptions, Observation

    def read(_: CallbackOptions) -> list[Observation]:
        return [Observation(count)]

    telemetry.meter.create_observable_counter(
        "refundgate.worker.restarts",
        callbacks=[read],
        description="Times this worker process was restarted after it died (GATE_WORKERS > 1)",
    )


async def _run(settings: Settings, watcher: ModelWatcher, reuse_port: bool, worker: int = 0) -> None:
    settings = settings.replace(
        metrics_listen=settings.metrics_listen and worker_address(settings.metrics_listen, worker),
        admin_listen=settings.admin_listen and worker_address(settings.admin_listen, worker),
    )
    telemetry = Telemetry(
        prometheus=bool(settings.metrics_listen) and settings.telemetry, enabled=settings.telemetry
    )
    if settings.metrics_listen and settings.telemetry:
        try:
            start_prometheus_server(settings.metrics_listen)
        except OSError:
            raise bind_error("metrics_listen", settings.metrics_listen, worker) from None
        log.info("metrics endpoint", extra={"address": settings.metrics_listen})
    gate = create_gate(settings, watcher, reuse_port=reuse_port, telemetry=telemetry, worker=worker)
    if gate.admin_server is not None:
        log.info("admin endpoint", extra={"address": settings.admin_listen, "port": gate.admin_port})
    observe_worker_restarts(telemetry, restarts(worker))
    telemetry.m.model_loads.add(1, {"result": "loaded"})
    gc.collect()
    gc.freeze()  # start-up objects (model, tables, modules) leave the collector's scans for good
    await gate.start()
    signals: list[int] = []
    signalled = asyncio.Event()

    def on_signal(signum: int) -> None:
        signals.append(signum)
        signalled.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await signalled.wait()
    signalled.clear()
    # SIGTERM is an orchestrator's: drain. SIGINT is a person's (Ctrl-C): stop at once.
    drain_s = settings.drain_s if signals[0] == signal.SIGTERM else 0.0
    log.info("draining", extra={"drain_s": drain_s, "health": "NOT_SERVING"})
    await gate.drain(drain_s, interrupt=signalled)
    log.info("shutting down", extra={"grace_s": settings.grace_s, "listener": "closing"})
    await gate.stop(settings.grace_s)
    telemetry.shutdown()


def serve(settings: Settings, watcher: ModelWatcher) -> None:
    """Run until SIGTERM/SIGINT; with workers > 1, fork that many processes sharing the port
    and supervise them (gate/workers.py).

    The watcher has loaded the models already; each worker then watches the directory itself.
    An expected start-up failure (StartupError) prints one line on stderr and exits with
    ``FATAL_EXIT``, from this process or, through the supervisor, from any worker.
    """
    try:
        if settings.workers == 1:
            run_loop(settings.event_loop, _run(settings, watcher, reuse_port=False))
            return
        check_port_free(settings.listen)
    except StartupError as exc:
        _exit_with(exc)

    def worker(i: int) -> None:
        setup_logging(settings.log_level)  # the parent's log writer thread did not fork
        try:
            run_loop(settings.event_loop, _run(settings, watcher, reuse_port=True, worker=i))
        except StartupError as exc:
            _exit_with(exc)

    code = fork_workers(settings.workers, worker)
    if code:
        log.error("gate stopped", extra={"exit_code": code})
        raise SystemExit(code)


def _exit_with(exc: StartupError) -> None:
    print(f"refund-gate: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(FATAL_EXIT)


def run_loop(kind: str, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on a new event loop of ``kind`` ('uvloop' or 'asyncio').

    Every worker serves on one loop in one thread: a loop whose machinery runs in C (uvloop,
    libuv) spends less of the worker's CPU between the gate's own steps than asyncio's, which is
    Python: every Check waits on Redis once, so it pays for several loop iterations.
    """
    if kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


def check_port_free(listen: str) -> None:
    """With SO_REUSEPORT a second gate would silently share a busy port; refuse instead."""
    problem = bind_problem(listen)
    if problem:
        raise bind_error("listen", listen, problem=problem)
