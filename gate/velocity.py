"""Velocity counters in Redis: the key layout, the Lua scripts, and one round trip per Check.

Layout (every key of one script shares one hash tag, so it works unchanged on Redis Cluster):

    {p}:{a:<h>}          account sorted set: refunds, orders, deliveries, outcomes, IPs, cities,
                         devices (the account x merchant pair and the order are filters of it)
    {p}:{d:<h>}:a / :r   device: accounts seen (last-seen score) / refund ids (request time)
    {p}:{i:<h>}:a / :r   IP: the same
    {p}:{m:<h>}:r :q :b  merchant refunds / digital-goods quick refunds / BNPL refunds
    {p}:{m:<h>}:o :e     merchant order day buckets / recent order event ids
    {p}:{X:<h>}:bl       blocklist entry of an account (a), device (d) or IP (i)
    {p}:{r:<h>}          stored answer to a refund_id, for retries

``<h>`` is a keyed hash of the id (BLAKE2b keyed with GATE_ID_HASH_KEY), so a Redis dump shows no
raw identifier. Every key has a TTL; every set is trimmed by time and capped in size.

A Check sends one pipeline: GET of the stored answer plus one EVALSHA per entity. Each script
records the refund and returns its windows atomically; the refund id is a member of each entity's
recent set, so a retry, even one racing the original, never counts twice.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from importlib import resources
from typing import Any

import hiredis

from gate.breaker import CircuitBreaker
from gate.features import Source
from gate.redisclient import Command, RedisConnection, RedisError, RedisReplyError, RedisUnavailable
from refundgate.v1 import refund_gate_pb2 as pb

ACCOUNT_FIELDS = (
    "refunds_1h", "refunds_24h", "refunds_7d", "refunds_30d", "amount_30d", "inr_30d",
    "inr_delivered_30d", "digital_quick_7d", "cm_unreturned_30d", "orders_30d", "ips_24h",
    "cities_24h", "devices_30d", "abuse_90d", "pair_refunds_30d", "pair_orders_30d",
    "order_refunds", "order_amount", "order_delivered",
)
ENTITY_FIELDS = ("accounts_24h", "accounts_7d", "refunds_1h", "refunds_24h")
MERCHANT_FIELDS = (
    "refunds_1h", "refunds_24h", "refunds_7d", "digital_quick_24h", "bnpl_refunds_7d",
    "orders_7d", "bnpl_orders_7d",
)
BAD_OUTCOMES = frozenset({pb.REFUND_OUTCOME_CONFIRMED_ABUSE, pb.REFUND_OUTCOME_CHARGEBACK,
                          pb.REFUND_OUTCOME_REVIEW_REJECTED})


class Status(IntEnum):
    """What a script did with the refund or event it was given."""

    COUNTED = 0
    DUPLICATE = 1  # already counted: a retry
    CONFLICT = 2  # the refund id is known with different content


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script shipped in gate/lua, addressed by its SHA1 for EVALSHA."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        """Read ``gate/lua/<name>.lua`` from the package."""
        source = resources.files("gate").joinpath(f"lua/{name}.lua").read_text()
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


ACCOUNT_SCRIPT = Script.load("account")
ENTITY_SCRIPT = Script.load("entity")
MERCHANT_SCRIPT = Script.load("merchant")
SCRIPTS = (ACCOUNT_SCRIPT, ENTITY_SCRIPT, MERCHANT_SCRIPT)
LOAD_SCRIPTS: list[Command] = [("SCRIPT", "LOAD", s.source) for s in SCRIPTS]


class IdHasher:
    """Keyed hash of identifiers: 12 URL-safe characters (72 bits), one namespace per kind."""

    __slots__ = ("_keyed",)

    def __init__(self, key: str) -> None:
        secret = hashlib.blake2b(key.encode(), digest_size=32).digest()
        self._keyed = hashlib.blake2b(key=secret, digest_size=9)  # keyed once, copied per id

    def __call__(self, kind: str, value: str) -> str:
        h = self._keyed.copy()
        h.update(f"{kind}\x00{value}".encode())
        return base64.urlsafe_b64encode(h.digest()).decode()


class Keys:
    """Redis key names; the only place that knows them."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def account(self, h: str) -> tuple[str, str]:
        """The account set and the account's blocklist entry."""
        return f"{self.prefix}:{{a:{h}}}", f"{self.prefix}:{{a:{h}}}:bl"

    def entity(self, kind: str, h: str) -> tuple[str, str, str]:
        """Accounts set, refunds set and blocklist entry of a device (d) or IP (i)."""
        base = f"{self.prefix}:{{{kind}:{h}}}"
        return f"{base}:a", f"{base}:r", f"{base}:bl"

    def merchant(self, h: str) -> tuple[str, str, str, str, str]:
        """Refunds, quick digital refunds, BNPL refunds, order buckets and order event ids."""
        base = f"{self.prefix}:{{m:{h}}}"
        return f"{base}:r", f"{base}:q", f"{base}:b", f"{base}:o", f"{base}:e"

    def reply(self, h: str) -> str:
        """The stored answer to one refund id."""
        return f"{self.prefix}:{{r:{h}}}"

    def blocklist(self, kind: str, h: str) -> str:
        """The blocklist entry of an account (a), device (d) or IP (i)."""
        return f"{self.prefix}:{{{kind}:{h}}}:bl"

    @property
    def blocklist_index(self) -> str:
        """Sorted set of every blocklist entry (member kind:hash, score = added at, ms)."""
        return f"{self.prefix}:blocklist"


def normalize_ip(ip: str) -> str:
    """One spelling per address, so '::1' and '0:0::1' count as the same IP."""
    return ipaddress.ip_address(ip).compressed if ip else ""


@dataclass(frozen=True, slots=True)
class RefundFacts:
    """What the velocity store needs of one validated refund request; ids already hashed."""

    at_ms: int
    refund: str
    account: str
    merchant: str
    order: str
    device: str
    ip: str
    city: str
    amount: int
    flags: int


@dataclass(slots=True)
class CheckVelocity:
    """Result of the Check round trip.

    ``counters`` holds each entity's windows, or None where that entity's script failed (its
    features stay NaN and the decision is degraded). ``status`` is the account script's verdict,
    which every request has and which is the authority on retries.
    """

    stored_reply: bytes | None
    status: Status | None
    counters: dict[Source, dict[str, int] | None]
    counted: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every script answered."""
        return not self.failed


class VelocityStore:
    """Records refunds and events and reads their windows, one pipelined round trip each."""

    def __init__(self, conn: RedisConnection, *, prefix: str, hasher: IdHasher,
                 replay_ttl_s: int, breaker: CircuitBreaker | None = None) -> None:
        self.conn = conn
        self.keys = Keys(prefix)
        self.hash = hasher
        self.replay_ttl_s = replay_ttl_s
        self.breaker = breaker

    def refund_facts(self, req: pb.CheckRequest, at_s: float, flags: int) -> RefundFacts:
        """Hash the ids of a validated request; the only step that sees them raw."""
        h = self.hash
        return RefundFacts(
            at_ms=int(at_s * 1000),
            refund=h("r", req.refund_id),
            account=h("a", req.account_id),
            merchant=h("m", req.merchant_id),
            order=h("o", req.order_id),
            device=h("d", req.device_id) if req.device_id else "",
            ip=h("i", normalize_ip(req.ip)) if req.ip else "",
            city=h("c", req.geo_city) if req.geo_city else "",
            amount=req.amount_minor,
            flags=flags,
        )

    def _check_commands(self, f: RefundFacts, op: str = "r") -> list[tuple[Source, Command]]:
        k = self.keys
        acct, acct_bl = k.account(f.account)
        cmds: list[tuple[Source, Command]] = [("account", (
            "EVALSHA", ACCOUNT_SCRIPT.sha, 2, acct, acct_bl, op, f.at_ms, f.refund, f.amount,
            f.flags, f.merchant, f.order, f.ip, f.city, f.device))]
        entities: tuple[tuple[Source, str], ...] = (("device", f.device), ("ip", f.ip))
        for source, h in entities:
            if h:
                ka, kr, kbl = k.entity(source[0], h)
                cmds.append((source, ("EVALSHA", ENTITY_SCRIPT.sha, 3, ka, kr, kbl, op, f.at_ms,
                                      f.refund, f.account)))
        cmds.append(("merchant", ("EVALSHA", MERCHANT_SCRIPT.sha, 5, *k.merchant(f.merchant), op,
                                  f.at_ms, f.refund, f.flags)))
        return cmds

    async def record_and_read(self, f: RefundFacts, timeout_s: float) -> CheckVelocity:
        """Record one refund request and read every window, in one round trip.

        Raises RedisError (timeout, connection down) when nothing usable came back.
        """
        named = self._check_commands(f)
        commands: list[Command] = [("GET", self.keys.reply(f.refund))]
        commands.extend(cmd for _, cmd in named)
        replies = await self._guarded(commands, timeout_s)
        stored = replies[0] if isinstance(replies[0], bytes) else None
        result = CheckVelocity(stored_reply=stored, status=None,
                               counters={"account": None, "device": None, "ip": None,
                                         "merchant": None})
        for (source, _), reply in zip(named, replies[1:], strict=True):
            if not isinstance(reply, list):
                result.failed.append(source)
                continue
            status = Status(reply[0])
            if status == Status.COUNTED:
                result.counted.append(source)
            if source == "account":
                result.status = status
                if status == Status.CONFLICT:
                    continue
                result.counters["account"] = dict(zip(ACCOUNT_FIELDS, reply[2:], strict=True))
                if reply[1]:
                    result.blocked.append("account")
            elif source == "merchant":
                result.counters["merchant"] = dict(zip(MERCHANT_FIELDS, reply[1:], strict=True))
            else:
                result.counters[source] = dict(zip(ENTITY_FIELDS, reply[2:], strict=True))
                if reply[1]:
                    result.blocked.append(source)
        if result.failed and self.breaker is not None:
            self.breaker.record_failure()  # a script erroring on every call must open it too
        return result

    async def undo(self, f: RefundFacts, sources: Sequence[str], timeout_s: float) -> None:
        """Take back a refund the scripts of ``sources`` counted (a reused refund id)."""
        commands = [cmd for source, cmd in self._check_commands(f, op="u") if source in sources]
        if commands:
            await self._call_scripts(commands, timeout_s)

    def store_reply(self, refund_hash: str, payload: bytes) -> bool:
        """Keep the answer for retries, fire and forget: it rides in the next pipeline flush.

        Best effort: if it is lost, a retry finds its refund already counted and recomputes the
        same decision (same windows, same decision id), so nothing is counted twice.
        """
        try:
            future = self.conn.send([("SET", self.keys.reply(refund_hash), payload, "EX",
                                      self.replay_ttl_s, "NX")], urgent=False)
        except RedisError:
            return False
        future.add_done_callback(_consume)
        return True

    async def record_events(
        self, events: Sequence[pb.Event], times_s: Sequence[float], timeout_s: float
    ) -> list[Status]:
        """Count a batch of events in one round trip; the account script decides duplicates."""
        k, h = self.keys, self.hash
        commands: list[Command] = []
        primary: list[int] = []
        for ev, at_s in zip(events, times_s, strict=True):
            now = int(at_s * 1000)
            eid = h("e", ev.event_id)
            acct, acct_bl = k.account(h("a", ev.account_id))
            primary.append(len(commands))
            if ev.type == pb.EVENT_TYPE_ORDER_PLACED:
                merchant, order = h("m", ev.merchant_id), h("o", ev.order_id)
                device = h("d", ev.device_id) if ev.device_id else ""
                ip = h("i", normalize_ip(ev.ip)) if ev.ip else ""
                city = h("c", ev.geo_city) if ev.geo_city else ""
                account = h("a", ev.account_id)
                commands.append(("EVALSHA", ACCOUNT_SCRIPT.sha, 2, acct, acct_bl, "o", now, eid,
                                 merchant, order, ip, city, device))
                bnpl = "1" if ev.payment_method == pb.PAYMENT_METHOD_BNPL else "0"
                commands.append(("EVALSHA", MERCHANT_SCRIPT.sha, 5, *k.merchant(merchant), "o",
                                 now, eid, bnpl))
                for kind, eh in (("d", device), ("i", ip)):
                    if eh:
                        commands.append(("EVALSHA", ENTITY_SCRIPT.sha, 3, *k.entity(kind, eh), "a",
                                         now, account))
            elif ev.type == pb.EVENT_TYPE_ORDER_DELIVERED:
                commands.append(("EVALSHA", ACCOUNT_SCRIPT.sha, 2, acct, acct_bl, "v", now,
                                 h("o", ev.order_id)))
            else:
                op = "x" if ev.outcome in BAD_OUTCOMES else "p"
                commands.append(("EVALSHA", ACCOUNT_SCRIPT.sha, 2, acct, acct_bl, op, now, eid))
        replies = await self._guarded(commands, timeout_s)
        for reply in replies:
            if not isinstance(reply, list):
                raise RedisReplyError(f"event script failed: {reply}")
        return [Status(replies[i][0]) for i in primary]

    async def _guarded(self, commands: Sequence[Command], timeout_s: float) -> list[Any]:
        """Call through the circuit breaker: refused at once while it is open."""
        breaker = self.breaker
        if breaker is None:
            return await self._call_scripts(commands, timeout_s)
        if not breaker.allow():
            raise RedisUnavailable("circuit breaker open")
        try:
            replies = await self._call_scripts(commands, timeout_s)
        except RedisError:
            breaker.record_failure()
            raise
        breaker.record_success()
        return replies

    async def _call_scripts(self, commands: Sequence[Command], timeout_s: float) -> list[Any]:
        """Send a batch; if Redis lost the scripts (restart, SCRIPT FLUSH) load them and resend.

        Resending is safe because every script is idempotent for the same refund or event id.
        """
        replies = await self.conn.call(commands, timeout_s)
        if any(isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT")
               for r in replies):
            await self.conn.call(LOAD_SCRIPTS, timeout_s)
            replies = await self.conn.call(commands, timeout_s)
        return replies


def _consume(future: Any) -> None:
    if not future.cancelled():
        future.exception()
