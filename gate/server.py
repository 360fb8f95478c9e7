"""Wiring: build the gRPC server (service, health, reflection v1 and v1alpha) and run it until SIGTERM.

``create_server`` is separate from ``serve`` so tests bind port 0 and get the real server.
Health is NOT_SERVING until a model is loaded and Redis has answered once, SERVING after that
(a Redis outage later degrades decisions but does not take the sidecar out of rotation), and
NOT_SERVING again as soon as shutdown starts, so load balancers drain before the port closes.
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

from gate.admission import Admission, find_new_server, server_ids_or_none
from gate.backoff import REDIS_BACKOFF
from gate.bundle import Bundle
from gate.decisionlog import DecisionLog, OutcomeLog, outcomes_key
from gate.journal import OutageJournal
from gate.logs import setup_logging
from gate.redisclient import RedisError
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
from refundgate.v1 import admin_pb2, admin_pb2_grpc
from refundgate.v1 import refund_gate_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RefundGate"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["GateAdmin"].full_name
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


class GateAdminService(admin_pb2_grpc.GateAdminServicer):
    """Operators' view of the gate's models."""

    def __init__(self, holder: ModelHolder) -> None:
        self.holder = holder

    async def GetModelStatus(
        self, request: admin_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModelStatus:
        """Live, shadow and previous bundles and the last refusal."""
        h = self.holder
        status = admin_pb2.ModelStatus(refusals=h.refusals, reloads=h.reloads)
        for field, bundle in (("live", h.bundle), ("shadow", h.shadow), ("previous", h.previous)):
            if bundle is not None:
                info = getattr(status, field)
                info.version, info.path = bundle.version, str(bundle.path)
                info.engine, info.num_trees = bundle.model.engine, bundle.model.num_trees
                info.hold_threshold = bundle.thresholds.hold
                info.reject_threshold = bundle.thresholds.reject
                info.loaded_at.FromNanoseconds(int(bundle.loaded_at * 1e9))
        if h.last_refusal is not None:
            r = h.last_refusal
            status.last_refusal.path, status.last_refusal.reason = r.path, r.reason
            status.last_refusal.at.FromNanoseconds(int(r.at * 1e9))
        return status


class _HealthServicer(health.aio.HealthServicer):
    """The standard health servicer; its Watch streams are told to admission control, which
    would otherwise count each open watcher as a call held (health is never shed)."""

    def __init__(self, admission: Admission) -> None:
        super().__init__()
        self.admission = admission

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        with self.admission.stream():
            await super().Watch(request, context)


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
    health: health.aio.HealthServicer
    redis: SingleNodeDriver | ClusterDriver
    redis_health: RedisHealth
    journal: OutageJournal
    models: ModelHolder
    telemetry: Telemetry
    decision_log: DecisionLog | None
    log_redis: SingleNodeDriver | ClusterDriver | None  # the decision log's own connection(s)
    watcher: ModelWatcher | None
    _tasks: list[asyncio.Task[None]]

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
        self._tasks.append(asyncio.get_running_loop().create_task(self._become_ready()))

    async def _become_ready(self) -> None:
        backoff = REDIS_BACKOFF.start()
        warned = False
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
                if not warned:
                    log.warning("waiting for redis: %s", exc)
                    warned = True
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

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, let in-flight calls finish within ``grace_s``, then close."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.watcher is not None:
            await self.watcher.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(grace_s)
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
) -> Gate:
    """Build the server on ``settings.listen`` (port 0 picks a free one).

    ``models`` is a watcher (hot reload of the model directory), a fixed bundle, or None (the
    gate then answers UNAVAILABLE). Without ``telemetry`` a private one is made with no
    Prometheus reader (tests build many gates in one process; that registry is process-wide).
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
    admin_pb2_grpc.add_GateAdminServicer_to_server(GateAdminService(holder), server)
    health_servicer = _HealthServicer(admission)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server
    )
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"cannot bind {settings.listen}")
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
    )
    redis_health.on_change = gate.on_velocity_health
    return gate


async def _run(settings: Settings, watcher: ModelWatcher, reuse_port: bool, worker: int = 0) -> None:
    telemetry = Telemetry(
        prometheus=bool(settings.admin_listen) and settings.telemetry, enabled=settings.telemetry
    )
    if settings.admin_listen and settings.telemetry:
        host, _, port = settings.admin_listen.rpartition(":")
        address = f"{host}:{int(port) + worker if int(port) else 0}"
        start_prometheus_server(address)
        log.info("metrics endpoint", extra={"address": address})
    gate = create_gate(settings, watcher, reuse_port=reuse_port, telemetry=telemetry)
    telemetry.m.model_loads.add(1, {"result": "loaded"})
    gc.collect()
    gc.freeze()  # start-up objects (model, tables, modules) leave the collector's scans for good
    await gate.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_s": settings.grace_s})
    await gate.stop(settings.grace_s)
    telemetry.shutdown()


def serve(settings: Settings, watcher: ModelWatcher) -> None:
    """Run until SIGTERM/SIGINT; with workers > 1, fork that many processes sharing the port.

    The watcher has loaded the models already; each worker then watches the directory itself.
    """
    if settings.workers == 1:
        run_loop(settings.event_loop, _run(settings, watcher, reuse_port=False))
        return
    check_port_free(settings.listen)

    def worker(i: int) -> None:
        setup_logging(settings.log_level)  # the parent's log writer thread did not fork
        run_loop(settings.event_loop, _run(settings, watcher, reuse_port=True, worker=i))

    sys.exit(fork_workers(settings.workers, worker))


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


def fork_workers(count: int, run: Callable[[int], None]) -> int:
    """Fork ``count`` processes running ``run(i)``, forward SIGTERM/SIGINT to them, wait for all;
    return the first non-zero exit code. Call it before any gRPC object exists in this process."""
    children: list[int] = []
    for i in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                run(i)
            finally:
                os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return status


def check_port_free(listen: str) -> None:
    """Refuse a port another process listens on: with SO_REUSEPORT a second gate would silently
    share it, and without, gRPC core would log its own error first. (SO_REUSEADDR, as gRPC sets
    it: connections of a previous run still in TIME_WAIT do not count.)"""
    host, _, port = listen.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), int(port)))
        except OSError:
            raise OSError(f"{listen} is already in use") from None
