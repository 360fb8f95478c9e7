"""GateAdmin on a listener of its own: never on the refund-facing port, a bearer token when set
(required off loopback), answers without filesystem paths; health stays on the main port."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gate.admin import BearerToken, without_paths
from gate.devredis import RedisProcess, free_port
from gate.reloader import ModelHolder, ModelWatcher
from gate.settings import Settings, SettingsError
from refundgate.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import RunningGate, start_gate, stop_gate
from tests.gateproc import CLI

TOKEN = "admin-token-for-tests-0123456789"


async def model_status(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> object:
    return await admin_pb2_grpc.GateAdminStub(channel).GetModelStatus(
        admin_pb2.GetModelStatusRequest(), metadata=metadata, timeout=5
    )


@pytest_asyncio.fixture
async def with_token(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle: object
) -> AsyncIterator[RunningGate]:
    """A gate whose admin listener is off loopback (all addresses), so it needs the token."""
    settings = Settings.from_env(
        {}, listen="127.0.0.1:0", redis_url=redis_proc.url, admin_listen="0.0.0.0:0", admin_token=TOKEN
    )
    running = await start_gate(settings, bundle)  # type: ignore[arg-type]
    yield running
    await stop_gate(running)


async def test_gate_admin_is_not_served_on_the_refund_port(gate: RunningGate) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await model_status(gate.channel)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_gate_admin_answers_on_its_own_listener_with_the_version(gate: RunningGate) -> None:
    assert gate.admin_channel is not None and gate.gate.admin_port != gate.gate.port
    status = await model_status(gate.admin_channel)
    assert status.live.version == "test-model-1"  # type: ignore[attr-defined]


async def test_health_stays_on_the_main_port_and_not_on_the_admin_one(gate: RunningGate) -> None:
    main = await health_pb2_grpc.HealthStub(gate.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert main.status == health_pb2.HealthCheckResponse.SERVING
    assert gate.admin_channel is not None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health_pb2_grpc.HealthStub(gate.admin_channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_model_status_names_no_filesystem_path(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "current").symlink_to(bundle_dir)
    (models / "half-copied").mkdir()
    (models / "shadow").symlink_to(models / "half-copied")  # no manifest: refused, path in the reason
    watcher = ModelWatcher(models, ModelHolder(), poll_s=3600)
    watcher.load_initial()
    assert watcher.holder.last_refusal is not None and str(tmp_path) in watcher.holder.last_refusal.reason
    settings = Settings.from_env({}, listen="127.0.0.1:0", redis_url=redis_proc.url)
    running = await start_gate(settings, watcher)
    try:
        assert running.admin_channel is not None
        status = await model_status(running.admin_channel)
    finally:
        await stop_gate(running)
    text = text_format.MessageToString(status)  # type: ignore[arg-type]
    assert str(tmp_path) not in text and "/" not in text, text
    assert status.last_refusal.slot == "shadow"  # type: ignore[attr-defined]
    assert status.last_refusal.reason == "half-copied: no manifest.json"  # type: ignore[attr-defined]


def test_paths_in_a_reason_become_their_last_component() -> None:
    assert without_paths("/srv/models/rg-1: golden vectors differ (/srv/x/model.so: bad)") == (
        "rg-1: golden vectors differ (model.so: bad)"
    )


async def test_admin_call_without_the_token_is_unauthenticated(with_token: RunningGate) -> None:
    assert with_token.admin_channel is not None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await model_status(with_token.admin_channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_call_with_a_wrong_token_is_unauthenticated(with_token: RunningGate) -> None:
    assert with_token.admin_channel is not None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await model_status(with_token.admin_channel, (("authorization", f"Bearer {TOKEN[:-1]}x"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_call_with_the_token_is_answered_off_loopback(with_token: RunningGate) -> None:
    assert with_token.admin_channel is not None
    status = await model_status(with_token.admin_channel, (("authorization", f"Bearer {TOKEN}"),))
    assert status.live.version == "test-model-1"  # type: ignore[attr-defined]


def test_token_check_reads_only_the_authorization_header() -> None:
    check = BearerToken(TOKEN)
    assert not check.admits((("x-token", f"Bearer {TOKEN}"),))
    assert not check.admits(None)
    assert check.admits((("user-agent", "grpc"), ("authorization", f"Bearer {TOKEN}")))


def test_settings_refuse_an_admin_listener_off_loopback_without_a_token() -> None:
    with pytest.raises(SettingsError, match="admin_listen 0.0.0.0:50052 is off loopback: set admin_token"):
        Settings.from_env({"GATE_ADMIN_LISTEN": "0.0.0.0:50052"})


def test_a_gate_with_an_open_admin_listener_and_no_token_does_not_start(bundle_dir: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [*CLI, "serve", "--model-dir", str(bundle_dir), "--admin-listen", f"0.0.0.0:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GATE_ADMIN_TOKEN" in lines[0], proc.stderr
