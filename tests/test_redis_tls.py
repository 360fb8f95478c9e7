"""TLS to a real redis-server listening only on --tls-port, with certificates made by the fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from gate.devredis import Certs, RedisProcess, make_certs, start_redis
from gate.redisclient import RedisAddress, RedisConnection, RedisUnavailable, TlsOptions
from gate.settings import Settings, SettingsError
from tests.conftest import RunningGate, make_request, start_gate, stop_gate
from tests.faultproxy import FaultProxy

PASSWORD = "tls-only-s3cret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_redis(certs: Certs) -> Iterator[RedisProcess]:
    proc = start_redis(certs=certs, password=PASSWORD, client_certs="yes")
    yield proc
    proc.stop()


def tls(certs: Certs, **kw: object) -> TlsOptions:
    base: dict[str, object] = {
        "ca_file": str(certs.ca),
        "cert_file": str(certs.client_cert),
        "key_file": str(certs.client_key),
    }
    base.update(kw)
    return TlsOptions(**base)  # type: ignore[arg-type]


async def connect(url: str, options: TlsOptions) -> RedisConnection:
    conn = RedisConnection(RedisAddress.from_url(url, options), connect_timeout_s=5.0)
    await conn.connect()
    return conn


async def test_rediss_speaks_tls_with_a_client_certificate(tls_redis: RedisProcess, certs: Certs) -> None:
    conn = await connect(tls_redis.url, tls(certs))
    try:
        assert await conn.call([("PING",)], 5.0) == [b"PONG"]
    finally:
        await conn.close()


async def test_a_server_signed_by_another_ca_is_refused(
    tls_redis: RedisProcess, tmp_path: Path, certs: Certs
) -> None:
    other = make_certs(tmp_path / "other")
    with pytest.raises(RedisUnavailable, match="TLS certificate not accepted"):
        await connect(tls_redis.url, tls(certs, ca_file=str(other.ca)))


async def test_a_name_the_certificate_lacks_is_refused_unless_server_name_says_it(
    tls_redis: RedisProcess, certs: Certs
) -> None:
    via_wrong_name = tls_redis.url.replace("127.0.0.1", "localhost")  # the cert has localhost...
    with pytest.raises(RedisUnavailable, match="TLS"):
        await connect(via_wrong_name, tls(certs, server_name="db.example"))  # ...not this name
    conn = await connect(tls_redis.url, tls(certs, server_name="redis.test"))
    await conn.close()


async def test_without_a_client_certificate_redis_refuses_us(tls_redis: RedisProcess, certs: Certs) -> None:
    with pytest.raises(RedisUnavailable):
        await connect(tls_redis.url, TlsOptions(ca_file=str(certs.ca)))


@pytest_asyncio.fixture
async def tls_gate(
    tls_redis: RedisProcess, certs: Certs, bundle: object
) -> AsyncIterator[tuple[RunningGate, FaultProxy]]:
    tls_redis.client().flushall()
    proxy = FaultProxy(tls_redis.port).start()  # sees every byte the gate sends
    proxy.record = True
    settings = Settings.from_env(
        {},
        listen="127.0.0.1:0",
        redis_url=f"rediss://:{PASSWORD}@127.0.0.1:{proxy.port}/0",
        redis_tls_ca_file=str(certs.ca),
        redis_tls_cert_file=str(certs.client_cert),
        redis_tls_key_file=str(certs.client_key),
        allow_client_time=True,
        budget_ms=250.0,
    )
    running = await start_gate(settings, bundle)  # type: ignore[arg-type]
    yield running, proxy
    await stop_gate(running)
    proxy.stop()


async def test_the_gate_over_tls_decides_and_sends_no_secret_in_clear(
    tls_gate: tuple[RunningGate, FaultProxy],
) -> None:
    running, proxy = tls_gate
    resp = await running.stub.Check(make_request(refund_id="rf:tls-secret-id"))
    assert not resp.degraded
    sent = bytes(proxy.recorded)
    assert len(sent) > 100
    assert PASSWORD.encode() not in sent and b"rf:tls-secret-id" not in sent and b"EVALSHA" not in sent


def test_a_password_in_plaintext_to_another_host_is_refused_at_start() -> None:
    with pytest.raises(SettingsError, match="plaintext to 10.1.2.3:6379"):
        Settings.from_env({"GATE_REDIS_URL": "redis://:pw@10.1.2.3:6379/0"})
    allowed = Settings.from_env(
        {"GATE_REDIS_URL": "redis://:pw@10.1.2.3:6379/0", "GATE_REDIS_ALLOW_PLAINTEXT_PASSWORD": "true"}
    )
    assert allowed.redis_target().seeds[0].password == "pw"
    Settings.from_env({"GATE_REDIS_URL": "redis://:pw@127.0.0.1:6379/0"})  # loopback: fine


async def test_the_connection_itself_never_sends_such_a_password() -> None:
    conn = RedisConnection(RedisAddress.from_url("redis://:pw@192.0.2.1:6379/0"))
    with pytest.raises(RedisUnavailable, match="plaintext"):
        await conn.connect()
