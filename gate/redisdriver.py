"""The Redis driver of the hot path: one interface, a single-node and a cluster implementation.

Both speak through the fast pipelined connection of gate/redisclient.py. The interface:

- ``call(commands, timeout_s)``: send a batch, wait for every reply. Replies come back in the
  order of the commands; a command that failed has an exception in its place (a Redis error
  reply, or the RedisError of a node that could not answer), so one failed node hides nothing
  else; when no command got an answer the call raises that RedisError instead.
- ``send(commands, urgent=False)``: the same without waiting (work nobody waits for).
- ``connect()``, ``close()``, ``connected``: the lifecycle.

Both reload the Lua scripts on a node that lost them (restart, failover, SCRIPT FLUSH) and
resend what failed for it, and feed the node's breaker exactly one outcome per call
(gate/redishealth.py owns the breakers).

The cluster driver takes the slot map from CLUSTER SLOTS, groups a batch's commands by node and
sends the groups concurrently (one round trip, not one per node), follows MOVED (and updates its
map) and ASK, and refreshes the map periodically: often while a node is down, so a promoted
replica takes over within about a second of its promotion.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import hiredis

from gate.backoff import REDIS_BACKOFF, BackoffPolicy
from gate.breaker import CircuitBreaker
from gate.redisclient import (
    Command,
    RedisAddress,
    RedisConnection,
    RedisError,
    RedisReplyError,
    RedisTarget,
    RedisUnavailable,
)
from gate.redishealth import RedisHealth

log = logging.getLogger(__name__)
SLOTS = 16384
_READS = frozenset({"GET", "MGET"})
# Where a command's first key is (every key of one command shares a hash tag here).
_KEY_AT = {"GET": 1, "SET": 1, "MGET": 1, "DEL": 1, "XADD": 1, "PTTL": 1, "EVALSHA": 3, "EVAL": 3}


class RedisDriver(Protocol):
    """What the velocity store and the decision log need of Redis (see the module docstring).

    A bare RedisConnection satisfies it too (tools, training), without breakers or reloads."""

    def send(self, commands: Sequence[Command], *, urgent: bool = True) -> asyncio.Future[list[Any]]:
        """Queue a batch without waiting for it."""
        ...

    async def call(self, commands: Sequence[Command], timeout_s: float, *, urgent: bool = True) -> list[Any]:
        """Send a batch and wait at most ``timeout_s`` for its replies."""
        ...


class _Node:
    """One Redis node: its connection and breaker, and how to call it."""

    __slots__ = ("address", "breaker", "conn", "follows_redirects", "health", "scripts")

    def __init__(
        self,
        address: RedisAddress,
        *,
        scripts: Sequence[Command],
        health: RedisHealth | None,
        connect_timeout_s: float,
        probe_timeout_s: float,
        backoff: BackoffPolicy,
        follows_redirects: bool = False,
    ) -> None:
        self.address = address
        self.follows_redirects = follows_redirects  # a cluster's: MOVED and ASK are not errors
        self.scripts = list(scripts)
        self.health = health
        self.conn = RedisConnection(
            address, connect_timeout_s=connect_timeout_s, backoff=backoff, on_connect=scripts
        )
        conn = self.conn
        self.breaker: CircuitBreaker | None = (
            health.breaker(address.name, lambda: conn.call([("PING",)], probe_timeout_s))
            if health is not None
            else None
        )

    async def call(self, commands: Sequence[Command], timeout_s: float, urgent: bool = True) -> list[Any]:
        """Call through the breaker; reload lost scripts; record one outcome."""
        breaker = self.breaker
        if breaker is not None and not breaker.allow():
            raise RedisUnavailable(f"circuit breaker open for {self.address.name}")
        try:
            replies = await self.conn.call(commands, timeout_s, urgent=urgent)
            failed = [r for r in replies if isinstance(r, hiredis.ReplyError)]
            if failed and any(str(r).startswith("NOSCRIPT") for r in failed):
                replies = await self._reload_and_resend(commands, replies, timeout_s)
                failed = [r for r in replies if isinstance(r, hiredis.ReplyError)]
        except RedisError:
            if breaker is not None:
                breaker.record_failure()
            raise
        if breaker is not None:
            errors = [r for r in failed if not _redirect(r)] if self.follows_redirects else failed
            if errors:
                breaker.record_failure()
                if self.health is not None:
                    self.health.note_error(self.address.name, str(errors[0]))
            else:
                breaker.record_success()
        return replies

    async def _reload_and_resend(
        self, commands: Sequence[Command], replies: list[Any], timeout_s: float
    ) -> list[Any]:
        """Load the scripts, then resend the commands that failed for want of them and the
        reads after the first of them (a read after a script must see its write), but no other
        write: a refund key's SET NX must not run twice. Resending a script is safe: each is
        idempotent for the same refund or event."""
        lost = [
            i
            for i, r in enumerate(replies)
            if isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT")
        ]
        lost += [i for i in range(lost[0] + 1, len(commands)) if commands[i][0] in _READS and i not in lost]
        lost.sort()
        again = await self.conn.call([*self.scripts, *(commands[i] for i in lost)], timeout_s)
        for i, reply in zip(lost, again[len(self.scripts) :], strict=True):
            replies[i] = reply
        return replies


def _redirect(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith(("MOVED ", "ASK "))


class SingleNodeDriver:
    """One Redis (or a proxy in front of one): a node, its breaker, nothing to route."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        scripts: Sequence[Command] = (),
        health: RedisHealth | None = None,
        connect_timeout_s: float = 0.2,
        probe_timeout_s: float = 0.02,
        backoff: BackoffPolicy = REDIS_BACKOFF,
    ) -> None:
        self.node = _Node(
            address,
            scripts=scripts,
            health=health,
            connect_timeout_s=connect_timeout_s,
            probe_timeout_s=probe_timeout_s,
            backoff=backoff,
        )
        self.conn = self.node.conn
        self.call = self.node.call  # the hot path: no extra frame

    @property
    def connected(self) -> bool:
        """True while the connection is open."""
        return self.conn.connected

    async def connect(self) -> None:
        """Open the connection (raises RedisUnavailable)."""
        if not self.conn.connected:
            await self.conn.connect()

    def send(self, commands: Sequence[Command], *, urgent: bool = True) -> asyncio.Future[list[Any]]:
        """Queue a batch; raises RedisUnavailable while the connection is down."""
        return self.conn.send(commands, urgent=urgent)

    async def close(self) -> None:
        """Close for good."""
        await self.conn.close()


# --- cluster ----------------------------------------------------------------------------------


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), Redis Cluster's key hash."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


@functools.lru_cache(maxsize=1 << 16)
def key_slot(key: str | bytes) -> int:
    """The cluster slot of a key: of its hash tag ``{...}`` when it has a non-empty one."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % SLOTS


def command_slot(cmd: Command) -> int | None:
    """The slot a command must go to, or None for a command without keys (PING, INFO)."""
    at = _KEY_AT.get(str(cmd[0]).upper())
    if at is None or len(cmd) <= at:
        return None
    if at == 3 and int(cmd[2]) == 0:  # EVALSHA sha 0 ...: no keys
        return None
    key = cmd[at]
    return key_slot(key if isinstance(key, str | bytes) else str(key))


class ClusterDriver:
    """A Redis Cluster's masters, each a node with its own connection and breaker."""

    def __init__(
        self,
        target: RedisTarget,
        *,
        scripts: Sequence[Command] = (),
        health: RedisHealth | None = None,
        connect_timeout_s: float = 0.2,
        probe_timeout_s: float = 0.02,
        backoff: BackoffPolicy = REDIS_BACKOFF,
        refresh_s: float = 10.0,
    ) -> None:
        self.seeds = list(target.seeds)
        self.scripts = list(scripts)
        self.health = health
        self.connect_timeout_s = connect_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.backoff = backoff
        self.refresh_s = refresh_s
        self.nodes: dict[str, _Node] = {}
        self.slots: list[_Node | None] = [None] * SLOTS
        self.known: dict[str, RedisAddress] = {a.name: a for a in self.seeds}  # masters and replicas
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_now: asyncio.Event | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        """True when every slot has a node whose connection is open."""
        return all(node is not None and node.conn.connected for node in self.slots)

    async def connect(self) -> None:
        """Take the slot map and open every master's connection (raises RedisUnavailable)."""
        if self._refresher is None:
            self._refresh_now = asyncio.Event()
            self._refresher = asyncio.get_running_loop().create_task(self._keep_fresh())
        if any(node is None for node in self.slots):
            await self.refresh()
        await asyncio.gather(*(node.conn.ready(self.connect_timeout_s) for node in self.nodes.values()))

    async def refresh(self) -> None:
        """Read CLUSTER SLOTS from the first node that answers; apply it."""
        last: Exception = RedisUnavailable("no cluster node known")
        candidates = [n.address for n in self.nodes.values() if n.conn.connected]
        candidates += [a for name, a in self.known.items() if name not in self.nodes]
        candidates += [n.address for n in self.nodes.values() if not n.conn.connected]
        for address in candidates:
            try:
                reply = await self._ask_slots(address)
            except RedisError as exc:
                last = exc
                continue
            await self._apply(address, reply)
            return
        raise RedisUnavailable(f"cannot read the cluster's slot map: {last}")

    async def _ask_slots(self, address: RedisAddress) -> Any:
        node = self.nodes.get(address.name)
        if node is not None and node.conn.connected:
            (reply,) = await node.conn.call([("CLUSTER", "SLOTS")], self.connect_timeout_s)
        else:
            conn = RedisConnection(address, connect_timeout_s=self.connect_timeout_s)
            try:
                await conn.connect()
                (reply,) = await conn.call([("CLUSTER", "SLOTS")], self.connect_timeout_s)
            finally:
                await conn.close()
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    async def _apply(self, source: RedisAddress, reply: Any) -> None:
        slots: list[_Node | None] = [None] * SLOTS
        masters: set[str] = set()
        for entry in reply:
            start, end, master, *replicas = entry
            address = self._address(source, master)
            masters.add(address.name)
            node = self._node(address)
            for slot in range(int(start), int(end) + 1):
                slots[slot] = node
            for replica in replicas:
                r = self._address(source, replica)
                self.known[r.name] = r
        if [n.address.name if n else None for n in slots] != [
            n.address.name if n else None for n in self.slots
        ]:
            log.info(
                "redis cluster slot map changed", extra={"masters": sorted(masters), "source": source.name}
            )
        self.slots = slots
        for name in [n for n in self.nodes if n not in masters]:
            gone = self.nodes.pop(name)
            log.info("redis cluster node left the slot map", extra={"node": name})
            await gone.conn.close()
            if self.health is not None:
                await self.health.forget(name)

    def _address(self, source: RedisAddress, entry: Sequence[Any]) -> RedisAddress:
        host = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
        address = source.at(host or source.host, int(entry[1]))
        self.known[address.name] = address
        return address

    def _node(self, address: RedisAddress) -> _Node:
        node = self.nodes.get(address.name)
        if node is None:
            node = _Node(
                address,
                scripts=self.scripts,
                health=self.health,
                connect_timeout_s=self.connect_timeout_s,
                probe_timeout_s=self.probe_timeout_s,
                backoff=self.backoff,
                follows_redirects=True,
            )
            self.nodes[address.name] = node
            node.conn.open_soon()
        return node

    async def _keep_fresh(self) -> None:
        """Refresh every ``refresh_s``; while a node is down or a MOVED came, at once and then
        with the jittered backoff, until the map is whole again."""
        fast = self.backoff.start()
        event = self._refresh_now
        assert event is not None
        loop = asyncio.get_running_loop()
        while not self._closed:
            healthy = self._healthy()
            if healthy:
                fast.reset()
            due = loop.time() + (self.refresh_s if healthy else fast.next())
            while (left := due - loop.time()) > 0:  # a node lost meanwhile cuts the wait short
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, 0.25))
                if event.is_set() or (healthy and not self._healthy()):
                    break
            event.clear()
            try:
                await self.refresh()
            except RedisError as exc:
                log.warning("redis cluster slot map refresh failed: %s", exc)
            except Exception:  # never let the map go stale for good
                log.exception("redis cluster slot map refresh failed")

    def _healthy(self) -> bool:
        return self.connected and not (self.health is not None and self.health.open_nodes)

    def _node_of(self, cmd: Command) -> _Node:
        slot = command_slot(cmd)
        node = self.slots[slot] if slot is not None else next(iter(self.nodes.values()), None)
        if node is None:
            raise RedisUnavailable("redis cluster slot map not known yet")
        return node

    def send(self, commands: Sequence[Command], *, urgent: bool = True) -> asyncio.Future[list[Any]]:
        """Queue a batch on its nodes' connections without waiting (one future for all)."""
        groups = self._group(commands)
        if len(groups) == 1:
            ((node, _),) = groups.items()
            return node.conn.send(commands, urgent=urgent)
        futures = [node.conn.send([commands[i] for i in idx], urgent=urgent) for node, idx in groups.items()]
        return asyncio.ensure_future(asyncio.gather(*futures))

    def _group(self, commands: Sequence[Command]) -> dict[_Node, list[int]]:
        groups: dict[_Node, list[int]] = {}
        for i, cmd in enumerate(commands):
            groups.setdefault(self._node_of(cmd), []).append(i)
        return groups

    async def call(self, commands: Sequence[Command], timeout_s: float, *, urgent: bool = True) -> list[Any]:
        """Send each node its commands, all at once; follow redirects within the time left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        replies: list[Any] = [None] * len(commands)
        pending = [(self._group(commands), False)]
        for _hop in range(3):
            if not pending:
                break
            groups, asking = pending.pop()
            moved: dict[_Node, list[int]] = {}
            ask: dict[_Node, list[int]] = {}
            left = max(deadline - loop.time(), 0.0005)
            results = await asyncio.gather(
                *(
                    self._send_group(node, [commands[i] for i in idx], left, asking, urgent)
                    for node, idx in groups.items()
                ),
                return_exceptions=True,
            )
            for (node, idx), result in zip(groups.items(), results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, RedisError):
                        raise result
                    for i in idx:
                        replies[i] = result
                    continue
                for i, reply in zip(idx, result, strict=True):
                    replies[i] = reply
                    if _redirect(reply):
                        kind, slot, where = str(reply).split(" ", 2)
                        host, _, port = where.rpartition(":")
                        target = self._node(node.address.at(host or node.address.host, int(port)))
                        if kind == "MOVED":
                            self.slots[int(slot)] = target
                            moved.setdefault(target, []).append(i)
                        else:
                            ask.setdefault(target, []).append(i)
            if moved:
                assert self._refresh_now is not None
                self._refresh_now.set()
                pending.append((moved, False))
            if ask:
                pending.append((ask, True))
        if all(isinstance(r, RedisError) for r in replies):
            raise replies[0]
        return replies

    async def _send_group(
        self, node: _Node, commands: list[Command], timeout_s: float, asking: bool, urgent: bool
    ) -> list[Any]:
        if not node.conn.connected:
            await node.conn.ready(min(timeout_s, self.connect_timeout_s))
        if not asking:
            return await node.call(commands, timeout_s, urgent)
        interleaved: list[Command] = []
        for cmd in commands:
            interleaved += [("ASKING",), cmd]
        return (await node.call(interleaved, timeout_s, urgent))[1::2]

    async def close(self) -> None:
        """Close every node's connection for good."""
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        for node in self.nodes.values():
            await node.conn.close()


def make_driver(
    target: RedisTarget,
    *,
    scripts: Sequence[Command] = (),
    health: RedisHealth | None = None,
    connect_timeout_s: float = 0.2,
    probe_timeout_s: float = 0.02,
    refresh_s: float = 10.0,
) -> SingleNodeDriver | ClusterDriver:
    """The driver for a parsed Redis URL."""
    if target.cluster:
        return ClusterDriver(
            target,
            scripts=scripts,
            health=health,
            connect_timeout_s=connect_timeout_s,
            probe_timeout_s=probe_timeout_s,
            refresh_s=refresh_s,
        )
    return SingleNodeDriver(
        target.seeds[0],
        scripts=scripts,
        health=health,
        connect_timeout_s=connect_timeout_s,
        probe_timeout_s=probe_timeout_s,
    )
