"""Velocity counters in Redis: the key layout, the Lua scripts, and one round trip per Check.

Layout (every key of one script shares one hash tag, so it works unchanged on Redis Cluster):

    {p}:{r:<h>}           one refund id: its request fingerprint, then its stored answer
                          (SET NX GET decides retries and reused ids, atomically, for all)
    {p}:{a:<h>}:L<n>      account log: fixed-width records of refunds, orders and deliveries,
                          one string per 8-day bucket n (the pair and the order are filters of it)
    {p}:{a:<h>}:e:<e>     one account event, for deduplication
    {p}:{a:<h>}:x         the account's abuse outcomes (times)
    {p}:{a:<h>}:t         the account's tenure counters: u32 orders, deliveries, refunds, "not
                          received" claims and returned items over about 13 months (BITFIELD,
                          counted by the scripts exactly when they count the refund or event)
    {p}:{d:<h>}:L<n>      device log: refunds asked from it and accounts seen on it, per day n
    {p}:{i:<h>}:L<n>      IP log: the same
    {p}:{m:<h>}:c2        merchant counters: a ring of 9 day slots of u32 (day, refunds, ...,
                          refunds per hour), one BITFIELD to count, one GET to read
    {p}:{m:<h>}:q:<r>     one refund (or :e:<e> one order event) of the merchant, for dedup
    {p}:{X:<h>}:bl        blocklist entry of an account (a), device (d) or IP (i)

``<h>`` is a keyed hash of the id (BLAKE2b keyed with GATE_ID_HASH_KEY), so a Redis dump shows no
raw identifier; records hold 32-bit prefixes of those hashes. Every key has a TTL; every log is
capped per bucket (a full bucket keeps its newest half).

Redis's Lua machinery is the cost to beat (docs/BENCHMARKS.md §6): every key, argument and reply
value that crosses into a script, and every ``redis.call``. So the scripts only write (a few
native commands on names, records and TTLs computed here), and the logs and counters are read
with plain MGET/GET beside them and turned into windows here. Logs are exact below their caps;
merchant windows are sliding estimates from day counters. A Check sends one pipeline: the refund
key's SET NX GET; for the account, device and IP an MGET of the entity's keys then its script;
for the merchant its script then a GET of its ring. Logs carry each refund's id, so a retry,
even one racing its original, is counted once when they are read.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from importlib import resources
from typing import TYPE_CHECKING, Any

from gate.features import (
    F_BNPL,
    F_CM_UNRETURNED,
    F_DIGITAL_QUICK,
    F_INR,
    F_INR_DELIVERED,
    F_RETURNED,
    Source,
)
from gate.redisclient import Command, RedisError, RedisReplyError
from gate.redisdriver import RedisDriver
from refundgate.v1 import refund_gate_pb2 as pb

if TYPE_CHECKING:
    from gate.decisionlog import OutcomeLog

ACCOUNT_FIELDS = (
    "refunds_1h",
    "refunds_24h",
    "refunds_7d",
    "refunds_30d",
    "amount_30d",
    "inr_30d",
    "inr_delivered_30d",
    "digital_quick_7d",
    "cm_unreturned_30d",
    "orders_30d",
    "ips_24h",
    "cities_24h",
    "devices_30d",
    "abuse_90d",
    "pair_refunds_30d",
    "pair_orders_30d",
    "order_refunds",
    "order_amount",
    "order_delivered",
    "returned_30d",
    "unreturned_30d",
    "pair_unreturned_30d",
    "delivered_30d",
    "orders_total",
    "delivered_total",
    "prior_refunds",
    "prior_returned",
    "prior_inr",
)
ENTITY_FIELDS = ("accounts_24h", "accounts_7d", "refunds_1h", "refunds_24h")
MERCHANT_FIELDS = (
    "refunds_1h",
    "refunds_24h",
    "refunds_7d",
    "digital_quick_24h",
    "bnpl_refunds_7d",
    "orders_7d",
    "bnpl_orders_7d",
    "returned_7d",
)
BAD_OUTCOMES = frozenset(
    {pb.REFUND_OUTCOME_CONFIRMED_ABUSE, pb.REFUND_OUTCOME_CHARGEBACK, pb.REFUND_OUTCOME_REVIEW_REJECTED}
)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
MONTH_MS = 30 * DAY_MS
_NONE = frozenset({0})  # the id of "no IP / city / device" in records

# Account log: one string per 16-day bucket; a Check reads the current one and two before it,
# so every 30-day window is complete. Record: kind, refund or event id, content tag, time (ms),
# amount, flags, merchant, order, IP, city, device (ids: 32-bit prefixes of their hashes). Kind
# and id come first: the script looks for them to skip a retry.
ACCOUNT_RECORD = struct.Struct("<BIIqqBIIIII")
ACCOUNT_BUCKET_MS = 16 * DAY_MS
ACCOUNT_BUCKETS = 3
ACCOUNT_CAP = 2 * ACCOUNT_RECORD.size * 88  # 176 records per 16 days, then the newest half
ABUSE_RECORD = struct.Struct("<q")
ABUSE_CAP = 2 * ABUSE_RECORD.size * 32
ABUSE_TTL_MS = 91 * DAY_MS
# Account tenure counters: u32 each (BITFIELD integers are big-endian), kept 400 days from the
# last write. Read before this Check's script runs: counts before this refund.
T_ORDERS, T_DELIVERED, T_REFUNDS, T_INR, T_RETURNED = range(5)
TENURE = struct.Struct(">5I")
TENURE_TTL_MS = 400 * DAY_MS
_T_ZERO = (0,) * 5
# Device and IP log: one string per 4-day bucket; a Check reads the current one and two before
# it, so the 7-day windows are complete.
# Record: kind, refund id, content tag, time (ms), account.
ENTITY_RECORD = struct.Struct("<BIIqI")
ENTITY_BUCKET_MS = 4 * DAY_MS
ENTITY_BUCKETS = 3
ENTITY_CAP = 2 * ENTITY_RECORD.size * 96  # 192 records per 4 days, then the newest half
# Merchant counters: one ring string of 9 day slots; a slot is u32 (BITFIELD integers are
# big-endian): its day number, refunds, quick digital refunds, BNPL refunds, orders, BNPL orders,
# refunds whose item came back, then refunds in each hour. A Check reads today and the seven days before.
M_DAY, M_REFUNDS, M_QUICK, M_BNPL_REFUNDS, M_ORDERS, M_BNPL_ORDERS, M_RETURNED, M_HOURS = range(8)
M_SLOT = M_HOURS + 24  # u32 per slot
MERCHANT_SLOTS = 9
MERCHANT_RING = struct.Struct(f">{M_SLOT * MERCHANT_SLOTS}I")
MERCHANT_DAYS = 8
MERCHANT_TTL_MS = MERCHANT_SLOTS * DAY_MS
_M_ZERO = (0,) * M_SLOT
REFUND, ORDER, DELIVERED, SEEN, TOMBSTONE = b"R"[0], b"O"[0], b"V"[0], b"A"[0], b"U"[0]

REPLY_MAGIC = b"rg1"
FP_LEN = 16
MARKER_LEN = len(REPLY_MAGIC) + FP_LEN  # a refund key's value: magic, fingerprint, [answer]


class Status(IntEnum):
    """What Redis said of a refund or event: new, a retry, or a reused id."""

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


LOG_SCRIPT = Script.load("log")
MERCHANT_SCRIPT = Script.load("merchant")
SCRIPTS = (LOG_SCRIPT, MERCHANT_SCRIPT)
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


@functools.lru_cache(maxsize=1 << 16)
def id32(h: str) -> int:
    """The 32-bit prefix of a hashed id that records carry (0: no id)."""
    return int.from_bytes(base64.urlsafe_b64decode(h[:8])[:4], "little") if h else 0


class Keys:
    """Redis key names; the only place that knows them (layout: the module docstring).

    ``kind`` is the entity's letter: a(ccount), d(evice), i(p), m(erchant).
    """

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _of(self, kind: str, h: str) -> str:
        return f"{self.prefix}:{{{kind}:{h}}}"  # the hash tag: every key of one entity

    def refund(self, h: str) -> str:
        """One refund id: its request fingerprint, then its stored answer."""
        return self._of("r", h)

    def log(self, kind: str, h: str, bucket: int | str) -> str:
        """One bucket of an account, device or IP log (``"*"``: a pattern for all of them)."""
        return f"{self._of(kind, h)}:L{bucket}"

    def abuse(self, h: str) -> str:
        """An account's abuse outcomes."""
        return f"{self._of('a', h)}:x"

    def tenure(self, h: str) -> str:
        """An account's tenure counters."""
        return f"{self._of('a', h)}:t"

    def event(self, kind: str, h: str, event: str) -> str:
        """One event id of an account or merchant, for deduplication."""
        return f"{self._of(kind, h)}:e:{event}"

    def merchant_refund(self, h: str, refund: str) -> str:
        """One refund id of a merchant, for deduplication."""
        return f"{self._of('m', h)}:q:{refund}"

    def ring(self, h: str) -> str:
        """A merchant's ring of day counters."""
        return f"{self._of('m', h)}:c2"

    def blocklist(self, kind: str, h: str) -> str:
        """The blocklist entry of an account (a), device (d) or IP (i)."""
        return f"{self._of(kind, h)}:bl"

    @property
    def blocklist_index(self) -> str:
        """Sorted set of every blocklist entry (member kind:hash, score = added at, ms)."""
        return f"{self.prefix}:blocklist"


def normalize_ip(ip: str) -> str:
    """One spelling per address, so '::1' and '0:0::1' count as the same IP."""
    return ipaddress.ip_address(ip).compressed if ip else ""


def fingerprint(req: pb.CheckRequest) -> bytes:
    """Identity of a request's content, ignoring requested_at (a retry may restamp it)."""
    copy = pb.CheckRequest()
    copy.CopyFrom(req)
    copy.ClearField("requested_at")
    return hashlib.blake2b(copy.SerializeToString(deterministic=True), digest_size=FP_LEN).digest()


@dataclass(frozen=True, slots=True)
class RefundFacts:
    """What the velocity store needs of one validated refund request; ids already hashed.

    The derived fields are computed once, here, because a Check uses each several times.
    """

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
    fingerprint: bytes
    marker: bytes = field(init=False)  # the refund key's value until the answer is stored
    tag: int = field(init=False)  # content tag: two requests with one refund id differ in it
    account_record: bytes = field(init=False)  # this refund in the account log
    entity_record: bytes = field(init=False)  # ... in the device and IP logs

    def __post_init__(self) -> None:
        tag = int.from_bytes(self.fingerprint[:4], "little")
        init = object.__setattr__
        init(self, "marker", REPLY_MAGIC + self.fingerprint)
        init(self, "tag", tag)
        init(
            self,
            "account_record",
            ACCOUNT_RECORD.pack(
                REFUND,
                id32(self.refund),
                tag,
                self.at_ms,
                self.amount,
                self.flags,
                id32(self.merchant),
                id32(self.order),
                id32(self.ip),
                id32(self.city),
                id32(self.device),
            ),
        )
        init(
            self,
            "entity_record",
            ENTITY_RECORD.pack(REFUND, id32(self.refund), tag, self.at_ms, id32(self.account)),
        )


@dataclass(slots=True)
class CheckVelocity:
    """Result of the Check round trip.

    ``counters`` holds each entity's windows, or None where that entity's script failed (its
    features stay NaN and the decision is degraded). ``status`` is the refund key's verdict,
    the authority on retries and reused ids; None if it could not be read. ``stored_reply`` is
    the serialized answer ``store_reply`` kept for this refund, if any. ``counted`` names the
    entities this request wrote to (a log appended it, the merchant counted it): what ``undo``
    takes back when the refund id turns out to be reused. ``blocked`` names the entities on
    the blocklist, ``failed`` those whose commands failed.
    """

    stored_reply: bytes | None
    status: Status | None
    counters: dict[Source, dict[str, float] | None]
    counted: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every script answered."""
        return not self.failed


def _records(rec: struct.Struct, logs: Sequence[bytes | None]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for raw in logs:
        if raw:
            out.extend(rec.iter_unpack(raw))
    return out


def tenure_counts(f: RefundFacts) -> list[int]:
    """The tenure counters a refund adds to (T_* offsets)."""
    out = [T_REFUNDS]
    if f.flags & F_INR:
        out.append(T_INR)
    if f.flags & F_RETURNED:
        out.append(T_RETURNED)
    return out


def account_windows(
    f: RefundFacts,
    logs: Sequence[bytes | None],
    abuse: bytes | None,
    tenure: bytes | None = None,
    *,
    seen_before: bool = False,
) -> dict[str, float]:
    """The account's windows at f.at_ms from its log buckets, this refund included (each refund
    id counts once; a tombstone takes one back), and its tenure counters before this refund
    (``seen_before``: the refund was counted by an earlier call, a retry, so its own counts
    come off the tenure read)."""
    now = f.at_ms
    mine = ACCOUNT_RECORD.unpack(f.account_record)
    _, rid, _, _, _, _, merchant, order, _, _, _ = mine
    refunds: dict[int, tuple[Any, ...]] = {}
    orders: dict[int, tuple[Any, ...]] = {}
    delivered = 0
    delivered_30d: set[int] = set()
    records = _records(ACCOUNT_RECORD, logs)
    dead = {(r[1], r[2]) for r in records if r[0] == TOMBSTONE} if records else ()
    for r in records:
        kind = r[0]
        if kind == REFUND:
            if r[1] not in refunds and (r[1], r[2]) not in dead:
                refunds[r[1]] = r
        elif kind == ORDER:
            if r[1] not in orders:
                orders[r[1]] = r
        elif kind == DELIVERED:
            if r[7] == order:
                delivered = 1
            if now - r[3] < MONTH_MS:
                delivered_30d.add(r[7])
    refunds.setdefault(rid, mine)
    r1h = r24h = r7d = r30d = amt30 = inr = inrd = dq7 = cm = pair_r = ord_n = ord_amt = 0
    ret30 = pair_unret = unret = 0
    ips: set[int] = set()
    cities: set[int] = set()
    devices: set[int] = set()
    for r in refunds.values():
        age, amount, flags = now - r[3], r[4], r[5]
        if r[7] == order:
            ord_n += 1
            ord_amt += amount
        if age >= MONTH_MS:
            continue
        r30d += 1
        amt30 += amount
        returned = flags & F_RETURNED
        # The behaviour counts are of the refunds before this one: what the account did, not
        # what this request says (its own flags are request features).
        earlier = r[1] != rid
        if returned:
            ret30 += 1
        elif earlier:
            unret += 1
        if r[6] == merchant:
            pair_r += 1
            if earlier and not returned:
                pair_unret += 1
        if flags and earlier:
            inr += flags & F_INR and 1
            inrd += flags & F_INR_DELIVERED and 1
            cm += flags & F_CM_UNRETURNED and 1
        devices.add(r[10])
        if age < WEEK_MS:
            r7d += 1
            if flags & F_DIGITAL_QUICK and earlier:
                dq7 += 1
            if age < DAY_MS:
                r24h += 1
                ips.add(r[8])
                cities.add(r[9])
                if age < HOUR_MS:
                    r1h += 1
    o30 = pair_o = 0
    for r in orders.values():
        age = now - r[3]
        if age < MONTH_MS:
            o30 += 1
            if r[6] == merchant:
                pair_o += 1
            devices.add(r[10])
            if age < DAY_MS:
                ips.add(r[8])
                cities.add(r[9])
    abuse_90d = 0
    if abuse:
        abuse_90d = sum(1 for (t,) in ABUSE_RECORD.iter_unpack(abuse) if now - t < 90 * DAY_MS)
    t = list(TENURE.unpack(tenure[: TENURE.size].ljust(TENURE.size, b"\0")) if tenure else _T_ZERO)
    if seen_before:
        for i in tenure_counts(f):
            t[i] = max(0, t[i] - 1)
    values = (
        r1h,
        r24h,
        r7d,
        r30d,
        amt30,
        inr,
        inrd,
        dq7,
        cm,
        o30,
        len(ips - _NONE),
        len(cities - _NONE),
        len(devices - _NONE),
        abuse_90d,
        pair_r,
        pair_o,
        ord_n,
        ord_amt,
        delivered,
        ret30,
        unret,
        pair_unret,
        len(delivered_30d),
        t[T_ORDERS],
        t[T_DELIVERED],
        t[T_REFUNDS],
        t[T_RETURNED],
        t[T_INR],
    )
    return dict(zip(ACCOUNT_FIELDS, values, strict=True))


def entity_windows(f: RefundFacts, logs: Sequence[bytes | None]) -> dict[str, float]:
    """A device's or IP's windows at f.at_ms, this refund included (each refund id counts
    once; a tombstone takes one back)."""
    now = f.at_ms
    _, rid, _, _, account = ENTITY_RECORD.unpack(f.entity_record)
    refunds: dict[int, int] = {}
    seen: dict[int, int] = {}
    records = _records(ENTITY_RECORD, logs)
    dead = {(r[1], r[2]) for r in records if r[0] == TOMBSTONE} if records else ()
    for kind, r, tag, at, acct in records:
        if kind == TOMBSTONE:
            continue
        if kind == REFUND and r not in refunds and (r, tag) not in dead:
            refunds[r] = at
        if seen.get(acct, at - 1) < at:
            seen[acct] = at
    refunds.setdefault(rid, now)
    if seen.get(account, now) <= now:
        seen[account] = now
    a24h = a7d = r1h = r24h = 0
    for at in seen.values():
        if now - at < WEEK_MS:
            a7d += 1
            if now - at < DAY_MS:
                a24h += 1
    for at in refunds.values():
        if now - at < DAY_MS:
            r24h += 1
            if now - at < HOUR_MS:
                r1h += 1
    return dict(zip(ENTITY_FIELDS, (a24h, a7d, r1h, r24h), strict=True))


def merchant_days(ring: bytes | None, day: int) -> list[tuple[int, ...]]:
    """The counter slots of ``day`` and the seven days before, newest first (zeros for a day
    the ring does not hold)."""
    values = MERCHANT_RING.unpack(ring.ljust(MERCHANT_RING.size, b"\0")) if ring else ()
    out = []
    for d in range(day, day - MERCHANT_DAYS, -1):
        i = d % MERCHANT_SLOTS * M_SLOT
        out.append(values[i : i + M_SLOT] if values and values[i + M_DAY] == d else _M_ZERO)
    return out


def merchant_windows(at_ms: int, ring: bytes | None) -> dict[str, float]:
    """Sliding-window estimates from day counters: the current bucket whole, plus the part of
    the oldest one still inside the window (its count spread evenly)."""
    days = merchant_days(ring, at_ms // DAY_MS)
    hour = at_ms % DAY_MS // HOUR_MS
    this_hour = days[0][M_HOURS + hour]
    last_hour = days[0][M_HOURS + hour - 1] if hour else days[1][M_HOURS + 23]
    left_h = 1.0 - (at_ms % HOUR_MS) / HOUR_MS
    left_d = 1.0 - (at_ms % DAY_MS) / DAY_MS

    def week(i: int) -> float:
        return sum(d[i] for d in days[:7]) + days[7][i] * left_d

    return dict(
        zip(
            MERCHANT_FIELDS,
            (
                this_hour + last_hour * left_h,
                days[0][M_REFUNDS] + days[1][M_REFUNDS] * left_d,
                week(M_REFUNDS),
                days[0][M_QUICK] + days[1][M_QUICK] * left_d,
                week(M_BNPL_REFUNDS),
                week(M_ORDERS),
                week(M_BNPL_ORDERS),
                week(M_RETURNED),
            ),
            strict=True,
        )
    )


def _ring_args(at_ms: int, counters: Sequence[int]) -> list[Any]:
    """Merchant script arguments from the day on: day, its slot, the counters to increment."""
    day = at_ms // DAY_MS
    base = day % MERCHANT_SLOTS * M_SLOT
    return [day, f"#{base + M_DAY}", base * 4, *(f"#{base + c}" for c in counters)]


class VelocityStore:
    """Records refunds and events and reads their windows, one pipelined round trip each."""

    def __init__(
        self,
        driver: RedisDriver,
        *,
        prefix: str,
        hasher: IdHasher,
        replay_ttl_s: int,
        outcomes: OutcomeLog | None = None,
    ) -> None:
        self.driver = driver  # breakers, script reloads and cluster routing are the driver's
        self.keys = Keys(prefix)
        self.hash = hasher
        self.replay_ttl_ms = replay_ttl_s * 1000
        self.outcomes = outcomes  # REFUND_OUTCOME events are appended there too (decisions join them)

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
            fingerprint=fingerprint(req),
        )

    def _log_commands(
        self,
        kind: str,
        h: str,
        head: Sequence[str],
        record: bytes,
        span_ms: int,
        buckets: int,
        cap: int,
        at_ms: int,
        tenure: tuple[str, Sequence[int]] | None = None,
    ) -> tuple[Command, Command]:
        """Read an entity's ``head`` keys and log buckets (current first), then append
        ``record`` to the current bucket unless its refund is already there (and then count it
        in the ``tenure`` key's counters at the given offsets)."""
        bucket = at_ms // span_ms
        logs = [self.keys.log(kind, h, b) for b in range(bucket, bucket - buckets, -1)]
        ttl = _bucket_ttl(at_ms, span_ms, buckets)
        script: Command = ("EVALSHA", LOG_SCRIPT.sha, 1, logs[0], "r", record, ttl, cap)
        if tenure is not None:
            key, offsets = tenure
            script = (
                "EVALSHA",
                LOG_SCRIPT.sha,
                2,
                logs[0],
                key,
                "r",
                record,
                ttl,
                cap,
                TENURE_TTL_MS,
                *(f"#{i}" for i in offsets),
            )
        return (("MGET", *head, *logs), script)

    def _account_commands(self, f: RefundFacts) -> tuple[Command, Command]:
        k = self.keys
        tenure = k.tenure(f.account)
        return self._log_commands(
            "a",
            f.account,
            (k.blocklist("a", f.account), k.abuse(f.account), tenure),
            f.account_record,
            ACCOUNT_BUCKET_MS,
            ACCOUNT_BUCKETS,
            ACCOUNT_CAP,
            f.at_ms,
            (tenure, tenure_counts(f)),
        )

    def _entity_commands(self, kind: str, h: str, f: RefundFacts) -> tuple[Command, Command]:
        return self._log_commands(
            kind,
            h,
            (self.keys.blocklist(kind, h),),
            f.entity_record,
            ENTITY_BUCKET_MS,
            ENTITY_BUCKETS,
            ENTITY_CAP,
            f.at_ms,
        )

    def _append_command(self, kind: str, h: str, record: bytes, at_ms: int) -> Command:
        """Append one record to the current bucket of an account, device or IP log."""
        span, buckets, cap = (
            (ACCOUNT_BUCKET_MS, ACCOUNT_BUCKETS, ACCOUNT_CAP)
            if kind == "a"
            else (ENTITY_BUCKET_MS, ENTITY_BUCKETS, ENTITY_CAP)
        )
        return (
            "EVALSHA",
            LOG_SCRIPT.sha,
            1,
            self.keys.log(kind, h, at_ms // span),
            "a",
            record,
            _bucket_ttl(at_ms, span, buckets),
            cap,
        )

    def _merchant_command(
        self, op: str, merchant: str, dedup: str, at_ms: int, counters: Sequence[int]
    ) -> Command:
        """Count a refund or an order ('c') or take a refund back ('u') in a merchant's ring,
        once per ``dedup`` key."""
        return (
            "EVALSHA",
            MERCHANT_SCRIPT.sha,
            2,
            dedup,
            self.keys.ring(merchant),
            op,
            self.replay_ttl_ms,
            MERCHANT_TTL_MS,
            *_ring_args(at_ms, counters),
        )

    def _merchant_refund_command(self, f: RefundFacts, op: str = "c") -> Command:
        count = [M_REFUNDS, M_HOURS + f.at_ms % DAY_MS // HOUR_MS]
        if f.flags & F_DIGITAL_QUICK:
            count.append(M_QUICK)
        if f.flags & F_BNPL:
            count.append(M_BNPL_REFUNDS)
        if f.flags & F_RETURNED:
            count.append(M_RETURNED)
        return self._merchant_command(
            op, f.merchant, self.keys.merchant_refund(f.merchant, f.refund), f.at_ms, count
        )

    async def record_and_read(self, f: RefundFacts, timeout_s: float) -> CheckVelocity:
        """Record one refund request and read every window, in one round trip.

        Raises RedisError (timeout, connection down) when nothing usable came back.
        """
        named: list[tuple[Source, tuple[Command, Command]]] = [("account", self._account_commands(f))]
        if f.device:
            named.append(("device", self._entity_commands("d", f.device, f)))
        if f.ip:
            named.append(("ip", self._entity_commands("i", f.ip, f)))
        named.append(("merchant", (self._merchant_refund_command(f), ("GET", self.keys.ring(f.merchant)))))
        refund_key = ("SET", self.keys.refund(f.refund), f.marker, "NX", "GET", "PX", self.replay_ttl_ms)
        replies = await self.driver.call([refund_key, *(cmd for _, pair in named for cmd in pair)], timeout_s)
        result = CheckVelocity(
            stored_reply=None,
            status=None,
            counters={"account": None, "device": None, "ip": None, "merchant": None},
        )
        previous = replies[0]
        if isinstance(previous, Exception):  # an error reply, or its node could not answer
            result.failed.append("account")  # no verdict on retries: decide as degraded
        elif previous is None:
            result.status = Status.COUNTED
        elif previous[:MARKER_LEN] == f.marker:
            result.status = Status.DUPLICATE
            result.stored_reply = previous[MARKER_LEN:] or None
        else:
            result.status = Status.CONFLICT
        for i, (source, _) in enumerate(named):
            first, second = replies[1 + 2 * i], replies[2 + 2 * i]
            if isinstance(first, Exception) or isinstance(second, Exception):
                if source not in result.failed:
                    result.failed.append(source)
                continue
            if source == "merchant":  # the script's verdict, then the ring
                wrote = first == Status.COUNTED
                counters = merchant_windows(f.at_ms, second)
            else:  # the keys read before the script ran, then whether it appended
                wrote = second == 1
                counters = (
                    account_windows(
                        f, first[3:], first[1], first[2], seen_before=result.status == Status.DUPLICATE
                    )
                    if source == "account"
                    else entity_windows(f, first[1:])
                )
                if first[0] is not None:
                    result.blocked.append(source)
            if wrote:
                result.counted.append(source)
            if source != "account" or result.status in (Status.COUNTED, Status.DUPLICATE):
                result.counters[source] = counters
        return result

    async def count_late(self, f: RefundFacts, answer: bytes, timeout_s: float) -> Status:
        """Count a refund decided while Redis was unavailable (the outage journal) at its own
        time, and keep its answer for retries when this count is the refund's first. Idempotent
        by refund id, like every write here. Raises RedisError unless every entity took it."""
        velocity = await self.record_and_read(f, timeout_s)
        if velocity.status is None or not velocity.complete:
            raise RedisReplyError("the late refund was not counted everywhere")
        if velocity.status == Status.CONFLICT:
            if velocity.counted:
                await self.undo(f, velocity.counted, timeout_s)
        elif velocity.status == Status.COUNTED:  # this is the refund's first count: its answer too
            self.store_reply(f, answer)
        # DUPLICATE: an earlier call counted it (its answer, if stored, stays; if it was lost, the
        # journal's is not known to be the first, so it is not put on record).
        return velocity.status

    async def undo(self, f: RefundFacts, sources: Sequence[str], timeout_s: float) -> None:
        """Take back a refund the scripts of ``sources`` counted under a reused refund id: a
        tombstone in each log, a decrement of the merchant's counters."""
        rid = id32(f.refund)
        commands: list[Command] = []
        if "account" in sources:
            tomb = ACCOUNT_RECORD.pack(TOMBSTONE, rid, f.tag, f.at_ms, 0, 0, 0, 0, 0, 0, 0)
            commands.append(self._append_command("a", f.account, tomb, f.at_ms))
            take_back: list[Any] = []
            for i in tenure_counts(f):
                take_back += ["OVERFLOW", "SAT", "INCRBY", "u32", f"#{i}", -1]
            commands.append(("BITFIELD", self.keys.tenure(f.account), *take_back))
        tomb = ENTITY_RECORD.pack(TOMBSTONE, rid, f.tag, f.at_ms, 0)
        commands += [
            self._append_command(kind, h, tomb, f.at_ms)
            for kind, h, source in (("d", f.device, "device"), ("i", f.ip, "ip"))
            if source in sources
        ]
        if "merchant" in sources:
            commands.append(self._merchant_refund_command(f, op="u"))
        if commands:
            await self.driver.call(commands, timeout_s)

    def store_reply(self, f: RefundFacts, response: bytes) -> bool:
        """Keep a serialized answer for retries over the refund's key (after its marker, so a
        retry still recognises its content), fire and forget: it rides in the next flush. The
        answer holds no raw identifier (the gate fills them from the request on replay).

        Best effort: if it is lost, a retry finds its refund already counted and, not knowing
        the answer, decides again (``replayed=false``); nothing is counted twice.
        """
        try:
            future = self.driver.send(
                [("SET", self.keys.refund(f.refund), f.marker + response, "XX", "KEEPTTL")], urgent=False
            )
        except RedisError:
            return False
        future.add_done_callback(_consume)
        return True

    async def record_events(
        self, events: Sequence[pb.Event], times_s: Sequence[float], timeout_s: float
    ) -> list[Status]:
        """Count a batch of events in one round trip; the account's dedup key decides
        duplicates (each entity also dedups its own part)."""
        commands: list[Command] = []
        primary: list[int] = []
        for ev, at_s in zip(events, times_s, strict=True):
            primary.append(len(commands))
            commands.extend(self._event_commands(ev, int(at_s * 1000)))
        replies = await self.driver.call(commands, timeout_s)
        for reply in replies:
            if isinstance(reply, Exception):
                raise RedisReplyError(f"event script failed: {reply}")
        return [Status(replies[i]) for i in primary]

    def _event_commands(self, ev: pb.Event, now: int) -> list[Command]:
        """The account's command first (its reply is the event's status), then the others."""
        k, h = self.keys, self.hash
        eid, account = h("e", ev.event_id), h("a", ev.account_id)
        log = k.log("a", account, now // ACCOUNT_BUCKET_MS)
        log_ttl, cap = _bucket_ttl(now, ACCOUNT_BUCKET_MS, ACCOUNT_BUCKETS), ACCOUNT_CAP
        others: list[Command] = []
        if ev.type == pb.EVENT_TYPE_ORDER_PLACED:
            merchant, order = h("m", ev.merchant_id), h("o", ev.order_id)
            device = h("d", ev.device_id) if ev.device_id else ""
            ip = h("i", normalize_ip(ev.ip)) if ev.ip else ""
            city = h("c", ev.geo_city) if ev.geo_city else ""
            record = ACCOUNT_RECORD.pack(
                ORDER,
                id32(eid),
                0,
                now,
                ev.amount_minor,
                0,
                id32(merchant),
                id32(order),
                id32(ip),
                id32(city),
                id32(device),
            )
            count = [M_ORDERS] + ([M_BNPL_ORDERS] if ev.payment_method == pb.PAYMENT_METHOD_BNPL else [])
            others.append(self._merchant_command("c", merchant, k.event("m", merchant, eid), now, count))
            seen = ENTITY_RECORD.pack(SEEN, 0, 0, now, id32(account))
            others.extend(
                self._append_command(kind, eh, seen, now) for kind, eh in (("d", device), ("i", ip)) if eh
            )
        elif ev.type == pb.EVENT_TYPE_ORDER_DELIVERED:
            record = ACCOUNT_RECORD.pack(
                DELIVERED, id32(eid), 0, now, 0, 0, 0, id32(h("o", ev.order_id)), 0, 0, 0
            )
        elif ev.outcome in BAD_OUTCOMES:
            record, log, log_ttl, cap = (ABUSE_RECORD.pack(now), k.abuse(account), ABUSE_TTL_MS, ABUSE_CAP)
        else:
            record = b""  # other outcomes only take their event id
        if ev.type == pb.EVENT_TYPE_REFUND_OUTCOME and self.outcomes is not None:
            others.append(self.outcomes.command(h("r", ev.refund_id), eid, now, ev.outcome))
        script: Command = (
            "EVALSHA",
            LOG_SCRIPT.sha,
            2,
            k.event("a", account, eid),
            log,
            "e",
            self.replay_ttl_ms,
            record,
            log_ttl,
            cap,
        )
        counter = {pb.EVENT_TYPE_ORDER_PLACED: T_ORDERS, pb.EVENT_TYPE_ORDER_DELIVERED: T_DELIVERED}.get(
            ev.type
        )
        if counter is not None:  # counted in the tenure key, once per event id, by the script
            script = (
                "EVALSHA",
                LOG_SCRIPT.sha,
                3,
                k.event("a", account, eid),
                log,
                k.tenure(account),
                *script[5:],
                TENURE_TTL_MS,
                f"#{counter}",
            )
        return [script, *others]


def _bucket_ttl(at_ms: int, span_ms: int, buckets: int) -> int:
    """TTL (ms, from at_ms) of the bucket holding at_ms: until the last Check that reads it
    (the bucket ``buckets - 1`` spans later has ended), plus an hour."""
    end = (at_ms // span_ms + buckets) * span_ms
    return max(end - at_ms, span_ms) + HOUR_MS


def _consume(future: Any) -> None:
    if not future.cancelled():
        future.exception()
