"""Fixtures that start real parts: a redis-server per session, a model bundle, a gRPC gate."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gate.bundle import Bundle, load_bundle
from gate.devredis import RedisProcess, start_redis
from gate.reloader import ModelWatcher
from gate.server import Gate, create_gate
from gate.settings import Settings
from model.synthetic import build_synthetic_bundle
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    """One redis-server for the session, on a free port, stopped at the end."""
    proc = start_redis()
    yield proc
    proc.stop()


@pytest.fixture
def rdb(redis_proc: RedisProcess) -> Iterator[redis.Redis]:
    """A redis-py client on an empty database."""
    client = redis_proc.client()
    client.flushall()
    client.config_resetstat()
    yield client
    client.close()


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small but real bundle (compiled too) built by the model owners' packaging code."""
    return build_synthetic_bundle(tmp_path_factory.mktemp("bundles") / "test-model", version="test-model-1")


@pytest.fixture(scope="session")
def bundle(bundle_dir: Path) -> Bundle:
    """The test bundle, loaded and verified."""
    return load_bundle(bundle_dir)


@dataclass
class RunningGate:
    """A started gate with a channel and stub to call it over a real socket."""

    gate: Gate
    channel: grpc.aio.Channel
    stub: pb_grpc.RefundGateStub
    settings: Settings
    admin_channel: grpc.aio.Channel | None = None
    """To the gate's GateAdmin listener (None when admin_listen is empty)."""


async def start_gate(
    settings: Settings, bundle: Bundle | ModelWatcher | None, *, ready: bool = True
) -> RunningGate:
    """Start a gate on a free port (its admin listener too); with ``ready``, return once its
    health says SERVING (model loaded, Redis answered), so a first Check is never degraded."""
    if settings.admin_listen:
        settings = settings.replace(admin_listen=settings.admin_listen.rpartition(":")[0] + ":0")
    gate = create_gate(settings, bundle)
    await gate.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gate.port}")
    admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{gate.admin_port}") if gate.admin_port else None
    if ready:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=20
        )
        async for update in watch:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                break
        watch.cancel()
    return RunningGate(gate, channel, pb_grpc.RefundGateStub(channel), settings, admin_channel)


async def stop_gate(running: RunningGate) -> None:
    """Close the channels and stop the gate."""
    await running.channel.close()
    if running.admin_channel is not None:
        await running.admin_channel.close()
    await running.gate.stop(0.5)


@pytest_asyncio.fixture
async def gate(redis_proc: RedisProcess, rdb: redis.Redis, bundle: Bundle) -> AsyncIterator[RunningGate]:
    """A gate on an empty Redis, serving the test bundle, trusting client time. Its budget is
    generous: these tests are about behaviour, and a busy CI machine must not make them degrade
    (tests/test_faults.py holds the gate to the real budget)."""
    settings = Settings.from_env(
        {}, listen="127.0.0.1:0", redis_url=redis_proc.url, allow_client_time=True, budget_ms=250.0
    )
    running = await start_gate(settings, bundle)
    yield running
    await stop_gate(running)


NOW = time.time()


def make_request(**overrides: object) -> pb.CheckRequest:
    """A valid CheckRequest (the same one on every call); keyword arguments replace fields."""
    now = NOW
    req = pb.CheckRequest(
        refund_id="rf:1",
        account_id="acct:1",
        order_id="ord:1",
        merchant_id="m:1",
        amount_minor=2500,
        order_amount_minor=5000,
        currency="EUR",
        reason=pb.REFUND_REASON_DAMAGED,
        item_category=pb.ITEM_CATEGORY_PHYSICAL,
        delivery_status=pb.DELIVERY_STATUS_DELIVERED,
        item_returned=True,
        payment_method=pb.PAYMENT_METHOD_CARD,
        device_id="dev:1",
        ip="203.0.113.7",
        geo_city="BER",
    )
    req.order_created_at.FromNanoseconds(int((now - 3 * 86400) * 1e9))
    req.account_created_at.FromNanoseconds(int((now - 400 * 86400) * 1e9))
    for key, value in overrides.items():
        if key in ("order_created_at", "account_created_at", "requested_at"):
            getattr(req, key).FromNanoseconds(int(float(value) * 1e9))  # type: ignore[arg-type]
        else:
            setattr(req, key, value)
    return req
