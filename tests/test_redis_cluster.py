"""The velocity store on a real local Redis Cluster (3 masters, 3 replicas): routing, redirects,
counts exactly as on one node, and a master's failover under load."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis

from gate.devredis import RedisCluster, RedisProcess, start_cluster
from gate.redisclient import RedisAddress, RedisTarget
from gate.redisdriver import ClusterDriver, SingleNodeDriver, key_slot
from gate.velocity import LOAD_SCRIPTS, IdHasher, VelocityStore
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc
from tests.conftest import NOW, make_request
from tests.gateproc import start_gate_process


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    c = start_cluster()
    yield c
    c.stop()


@pytest_asyncio.fixture
async def cluster_store(cluster: RedisCluster) -> AsyncIterator[VelocityStore]:
    cluster.client().flushall()
    driver = ClusterDriver(RedisTarget.from_url(cluster.url), scripts=LOAD_SCRIPTS, connect_timeout_s=5.0)
    await driver.connect()
    yield VelocityStore(driver, prefix="rg", hasher=IdHasher("k" * 20), replay_ttl_s=3600)
    await driver.close()


@pytest_asyncio.fixture
async def node_store(redis_proc: RedisProcess, rdb: redis.Redis) -> AsyncIterator[VelocityStore]:
    driver = SingleNodeDriver(
        RedisAddress.from_url(redis_proc.url), scripts=LOAD_SCRIPTS, connect_timeout_s=5.0
    )
    await driver.connect()
    yield VelocityStore(driver, prefix="rg", hasher=IdHasher("k" * 20), replay_ttl_s=3600)
    await driver.close()


def test_key_slots_are_the_cluster_s(cluster: RedisCluster) -> None:
    client = cluster.nodes[0].client()
    for key in ("rg:{a:abc}:L1", "plain", "{}:empty-tag", "a{b}c{d}", "rg:decisions"):
        assert key_slot(key) == client.cluster("keyslot", key), key


def _traffic() -> list[pb.CheckRequest]:
    """Refunds over shared accounts, devices, IPs and merchants, with retries."""
    out = []
    for i in range(40):
        out.append(
            make_request(
                refund_id=f"rf:{i}",
                order_id=f"o:{i % 7}",
                account_id=f"acct:{i % 5}",
                device_id=f"dev:{i % 3}",
                ip=f"198.51.100.{i % 4}",
                merchant_id=f"m:{i % 2}",
                amount_minor=100 + i,
            )
        )
        if i % 6 == 0:
            out.append(out[-1])  # a retry
    return out


async def test_counts_are_exactly_those_of_one_node(
    cluster_store: VelocityStore, node_store: VelocityStore
) -> None:
    for i, req in enumerate(_traffic()):
        at = NOW - 3600 + i
        on_cluster = await cluster_store.record_and_read(cluster_store.refund_facts(req, at, 0), 5.0)
        on_node = await node_store.record_and_read(node_store.refund_facts(req, at, 0), 5.0)
        assert on_cluster.complete and on_node.complete
        assert (on_cluster.status, on_cluster.counted, on_cluster.counters) == (
            on_node.status,
            on_node.counted,
            on_node.counters,
        )


async def test_a_check_sends_each_master_one_batch_at_once(
    cluster_store: VelocityStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = cluster_store.driver
    assert isinstance(driver, ClusterDriver)
    in_flight = 0
    most = 0
    batches: list[int] = []
    for node in driver.nodes.values():
        real = node.conn.call

        async def call(commands: Any, timeout_s: float, urgent: bool = True, real: Any = real) -> list[Any]:
            nonlocal in_flight, most
            if commands[0][0] == "CLUSTER":  # the driver's own slot map refresh
                return await real(commands, timeout_s, urgent=urgent)
            batches.append(len(commands))
            in_flight += 1
            most = max(most, in_flight)
            try:
                return await real(commands, timeout_s, urgent=urgent)
            finally:
                in_flight -= 1

        monkeypatch.setattr(node.conn, "call", call)
    f = cluster_store.refund_facts(make_request(), NOW, 0)
    assert (await cluster_store.record_and_read(f, 5.0)).complete
    assert sum(batches) == 9 and len(batches) == len(
        {driver.slots[key_slot(k)] for k in _keys(cluster_store, f)}
    )
    assert most == len(batches)  # every group was in flight together: one round trip


def _keys(store: VelocityStore, f: Any) -> list[str]:
    k = store.keys
    return [
        k.refund(f.refund),
        k.log("a", f.account, 0),
        k.log("d", f.device, 0),
        k.log("i", f.ip, 0),
        k.ring(f.merchant),
    ]


async def test_moved_is_followed_and_fixes_the_map(cluster_store: VelocityStore) -> None:
    driver = cluster_store.driver
    assert isinstance(driver, ClusterDriver)
    f = cluster_store.refund_facts(make_request(), NOW, 0)
    right = {key_slot(k): driver.slots[key_slot(k)] for k in _keys(cluster_store, f)}
    wrong = next(iter(driver.nodes.values()))
    driver.slots = [wrong] * len(driver.slots)  # a stale map: everything on one master
    result = await cluster_store.record_and_read(f, 5.0)
    assert result.complete and result.counted == ["account", "device", "ip", "merchant"]
    assert all(driver.slots[slot] is node for slot, node in right.items())


async def test_ask_is_followed_during_a_slot_migration(
    cluster: RedisCluster, cluster_store: VelocityStore
) -> None:
    driver = cluster_store.driver
    assert isinstance(driver, ClusterDriver)
    key = "rg:{ask-test}:k"
    slot = key_slot(key)
    source = driver.slots[slot]
    assert source is not None
    target = next(n for n in driver.nodes.values() if n is not source)
    src = redis.Redis(port=source.address.port, socket_timeout=5)
    dst = redis.Redis(port=target.address.port, socket_timeout=5)
    src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    try:
        # The key is not on the source, which answers ASK: the driver asks the target.
        assert await driver.call([("SET", key, "v"), ("GET", key)], 5.0) == [b"OK", b"v"]
        on_target = dst.pipeline(transaction=False)
        on_target.execute_command("ASKING")
        on_target.get(key)
        assert on_target.execute()[1] == b"v"  # written on the importing node
        assert driver.slots[slot] is source  # ASK is for one command, not a map change
    finally:
        on_target = dst.pipeline(transaction=False)
        on_target.execute_command("ASKING")
        on_target.delete(key)
        on_target.execute()
        for client in (src, dst):
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", src_id)
            client.close()


BUDGET_MS = 60.0
HOST_STALL_S = 0.060  # see tests/test_faults.py: these shared VMs lose the CPU now and then
_ids = itertools.count()


def _replica_of(cluster: RedisCluster, master: RedisProcess) -> RedisProcess:
    master_id = master.client().execute_command("CLUSTER", "MYID").decode()
    for line in master.client().execute_command("CLUSTER", "NODES").decode().splitlines():
        _id, address, flags, parent, *_ = line.split()
        if "slave" in flags and parent == master_id:
            port = int(address.split("@")[0].rpartition(":")[2])
            return next(n for n in cluster.nodes if n.port == port)
    raise LookupError("the master has no replica")


def _promoted(cluster: RedisCluster, replica: RedisProcess) -> bool:
    """True once the replica has become a master and every surviving node serves again
    (``cluster_state:ok``): the failover is over, as far as Redis is concerned."""
    for node in cluster.nodes:
        if node in cluster.dead:
            continue
        client = node.client()
        try:
            if node is replica and client.info("replication")["role"] != "master":
                return False
            if client.cluster("info").get("cluster_state") != "ok":
                return False
        finally:
            client.close()
    return True


async def test_failover_under_load_answers_in_budget_and_recovers(bundle_dir: Path) -> None:
    cluster = start_cluster(node_timeout_ms=1000)
    gate = start_gate_process(
        cluster.url, bundle_dir, "--budget-ms", str(BUDGET_MS), "--breaker-failures", "3"
    )
    try:
        async with grpc.aio.insecure_channel(gate.target) as channel:
            stub = pb_grpc.RefundGateStub(channel)
            answers: list[tuple[float, float, bool]] = []  # (sent at, latency, degraded)

            async def caller(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    n = next(_ids)
                    req = make_request(
                        refund_id=f"rf:fo{n}", order_id=f"o:fo{n}", account_id=f"acct:{n % 50}"
                    )
                    sent = time.monotonic()
                    resp = await stub.Check(req, timeout=5)
                    answers.append((sent, time.monotonic() - sent, resp.degraded))
                    if len(answers) >= 50:
                        warmed.set()

            stop, warmed = asyncio.Event(), asyncio.Event()
            callers = [asyncio.create_task(caller(stop)) for _ in range(4)]
            await asyncio.wait_for(warmed.wait(), 30)
            # Blocking calls run in a thread: the callers' loop must measure the gate, not them.
            victim = await asyncio.to_thread(cluster.master_of, "rg:{a:whatever}")
            replica = await asyncio.to_thread(_replica_of, cluster, victim)
            killed = time.monotonic()
            await asyncio.to_thread(victim.kill)
            cluster.dead.append(victim)
            while not await asyncio.to_thread(_promoted, cluster, replica):
                assert time.monotonic() - killed < 20, "the replica was never promoted"
                await asyncio.sleep(0.05)
            promoted = time.monotonic()
            await asyncio.sleep(6.0)  # load goes on: recovery must come within 5 s of this
            stop.set()
            await asyncio.gather(*callers)
    finally:
        gate.stop()
        cluster.stop()
    assert any(d for sent, _, d in answers if sent >= killed), "the kill must have been felt"
    # Within budget: this 2-core VM is shared, and its stalls (hundreds of ms under load, before
    # the kill as much as after it) hit any process; so no call may wait anywhere near a hang,
    # and all but the stalled few must meet the budget.
    latencies = sorted(lat for _, lat, _ in answers)
    assert latencies[-1] < 1.0, f"an answer took {latencies[-1] * 1000:.0f} ms"
    late = [lat for lat in latencies if lat > BUDGET_MS / 1000 + HOST_STALL_S]
    assert len(late) <= 0.02 * len(latencies), f"{len(late)} of {len(latencies)} answers over budget"
    # Non-degraded again within 5 s of the promotion: from then on, degraded answers are only
    # the stragglers a host stall pushes past the Redis share of the budget (as in test_faults).
    tail = [d for sent, _, d in answers if sent > promoted + 5.0]
    assert len(tail) >= 20 and sum(tail) <= 0.1 * len(tail), f"{sum(tail)} of {len(tail)} still degraded"
