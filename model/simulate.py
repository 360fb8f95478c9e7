"""Seeded simulator of marketplace refund traffic, the input of refund-gate's training pipeline.

The simulator emits exactly what a real caller sends the gate, in time order: ``pb.Event``
messages for RecordEvents (ORDER_PLACED, ORDER_DELIVERED, REFUND_OUTCOME) and ``pb.CheckRequest``
messages for Check, each wrapped in a `SimRecord` with the ground-truth label and the scenario
that produced it. The training pipeline replays the records through the gate's own code against
a real Redis, so every velocity feature is computed point in time, exactly as when serving.

How it works: a `_World` holds the accounts, merchants and one random generator; a heap holds
future actions ``(time, sequence, function, args)``. Popping an action runs it at its time; it
returns the record it emits (or None) and may schedule further actions, never in the past. So
records come out in non-decreasing time without holding the whole run in memory, and the same
seed gives the same records.

Every behaviour is one small function: ``_start_<scenario>`` creates the actors of a scenario
and schedules their first action; refund policies (``_legit_refunds``, ``_serial_inr_refunds``,
...) decide, when an order is placed, which refunds its buyer will ask for and when. To add a
scenario: add its name to `LEGIT_SCENARIOS` or `ABUSE_SCENARIOS`, its knobs to `SimConfig`, a
``_start_`` function to `_STARTERS`, and a section to model/README.md.

Run ``python -m model.simulate --events 1000000 --out sim.jsonl`` (see `main`).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import sys
import time
from bisect import bisect
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar, cast

from model.records import Record, write_records
from refundgate.v1 import refund_gate_pb2 as pb

MINUTE = 60
HOUR = 3_600
DAY = 86_400
WEEK = 7 * DAY

LEGIT_SCENARIOS: tuple[str, ...] = (
    "legit_normal",  # ordinary refunds: damaged / not as described / changed mind, mostly returned
    "legit_partial",  # partial refunds (goodwill, one item of several), rarely a second partial
    "legit_big_merchant",  # refunds at the one very large merchant: many, at a normal ratio
    "legit_inr_in_transit",  # honest "not received" on a late parcel, still in transit
    "legit_inr_lost",  # honest "not received" on a parcel the carrier lost
    "legit_stolen_parcel",  # honest "not received" on a parcel stolen after delivery
    "legit_household_device",  # several accounts of one household on one device and IP
    "legit_traveller",  # an account changing IP and city while travelling
    "legit_gift_card_buyer",  # many digital orders, never a refund (events only)
    "legit_bracketing",  # several sizes of one item from one shop, all but one sent back
    "legit_porch_theft",  # a long-standing clean account's first "not received" on a delivered parcel
    "legit_defective_batch",  # a shop's faulty batch: its buyers refund at once, mostly returned
    "legit_campus_ip",  # a campus or office NAT: many accounts, many of them new, on one IP
    "legit_digital_mistake",  # an established buyer's quick refund of a wrong gift card or top-up
    "legit_bnpl_returner",  # pay-later "try before you buy": orders and returns a lot
)
ABUSE_SCENARIOS: tuple[str, ...] = (
    "serial_inr_delivered",
    "cashout_ring",
    "account_farm",
    "account_hopping",
    "bnpl_cashout",
    "refund_exceeds_order",
    "serial_changed_mind",
)
_ABUSE = frozenset(ABUSE_SCENARIOS)

_DEFAULT_START = datetime(2026, 1, 5, tzinfo=UTC)


def _count(default: int) -> int:
    """A population count: `SimConfig.resized` multiplies it, every other knob stays."""
    return field(default=default, metadata={"scales": True})


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the simulation; defaults give about 385k records, 8 % of checks abusive.

    Counts marked with ``_count`` scale with `resized` / `scaled`; rates and ranges do not.
    Ranges are inclusive ``(low, high)`` tuples.
    """

    # Seed of the single random generator: same seed and knobs, same records.
    seed: int = 7
    # Simulated window: orders are placed in [start, start + weeks); nothing is emitted after it.
    weeks: int = 6
    start: datetime = _DEFAULT_START
    # Weeks of ordinary history before the window (orders, deliveries, refunds of the honest
    # population, no abuse): the counters a deployed gate holds; no row of training or
    # evaluation comes from them.
    warmup_weeks: int = 3
    # Scenarios left out of this world entirely (leave-behaviour-out evaluation, model/train.py).
    exclude: tuple[str, ...] = ()
    # Days after the window during which outcomes of its refunds still arrive (no new orders or
    # refunds): the history a model owner exports today holds the late chargebacks of last
    # month's refunds. At least the labels' maturity window (model/labels.py), so every refund
    # of the window can get its label.
    outcome_tail_days: float = 60.0

    # --- Population ---
    # Ordinary shoppers (legit_normal and its refund situations).
    n_accounts: int = _count(20_000)
    # Regular merchants; the big merchant and the colluding shops come on top.
    n_merchants: int = _count(500)
    # Mean orders per week of an ordinary account (log-normal spread across accounts).
    orders_per_week: float = 1.5
    # Share of ordinary accounts that sign up during the window (young accounts).
    new_account_share: float = 0.12
    # Share of accounts whose creation time the caller does not know (account_created_at unset).
    unknown_age_share: float = 0.04
    # Share of accounts that never send a device id; share with a second device.
    no_device_share: float = 0.06
    second_device_share: float = 0.3
    # Share of home connections on IPv6.
    ipv6_share: float = 0.05
    # Share of an ordinary account's requests made over its city's carrier-NAT mobile IPs.
    mobile_share: float = 0.25
    # Carrier-NAT addresses per city. Scaled with the population, so an address serves about as
    # many accounts at any size; a request picks one with weight 1/rank (a few busy addresses,
    # many quiet ones), so IPs shared by a handful up to hundreds of accounts are ordinary.
    carrier_ips_per_city: int = _count(6)
    # Share of merchants selling in USD (all others EUR).
    usd_merchant_share: float = 0.08
    # Share of merchants without parcel tracking (no ORDER_DELIVERED, status UNKNOWN).
    untracked_merchant_share: float = 0.05

    # --- Logistics ---
    # Share of parcels lost for good; share delivered 4-14 days late.
    lost_rate: float = 0.012
    late_rate: float = 0.04

    # --- Legitimate refunds ---
    # Base refund probability of an order (times account propensity, merchant and category).
    refund_rate: float = 0.12
    # Share of damaged / not-as-described / other refunds that are partial.
    partial_share: float = 0.2
    # Share of lost parcels, and of late parcels, whose buyer honestly claims "not received".
    lost_claim_rate: float = 0.85
    late_claim_rate: float = 0.35
    # Share of delivered parcels stolen from the doorstep (honest claim on a DELIVERED order).
    stolen_parcel_rate: float = 0.003
    # Share of ordinary orders placed at the one big merchant.
    big_merchant_share: float = 0.15
    # Households sharing one device and IP, and their size.
    n_households: int = _count(500)
    household_size: tuple[int, int] = (2, 5)
    # Travellers: accounts with trips of several city legs.
    n_travellers: int = _count(300)
    # Gift-card buyers: frequent digital orders, never a refund.
    n_gift_card_buyers: int = _count(150)
    gift_card_orders_per_week: float = 4.0

    # Bracketing (model/README.md, Honest behaviour): accounts that order 2-4 sizes or colours of
    # one item at one shop (separate orders, or one order refunded item by item) and send back
    # all but one; sessions per week; share of returns the shop has scanned by the request.
    n_bracketers: int = _count(400)
    bracket_sizes: tuple[int, int] = (2, 4)
    bracket_sessions_per_week: float = 0.5
    bracket_returned_rate: float = 0.9
    bracket_single_order_share: float = 0.5
    # Porch theft on long-standing clean accounts: accounts that shop for years without a claim,
    # then one delivered parcel is stolen in the window and they claim "not received" once.
    n_porch_theft_accounts: int = _count(400)
    # Defective batches: shops whose batch goes bad for some days; share of its orders in those
    # days that come back as damaged / not as described, and share of those returned.
    defective_batches: int = _count(4)
    defective_days: tuple[float, float] = (3.0, 8.0)
    defective_refund_share: float = 0.45
    defective_returned_rate: float = 0.75
    # Campus or office NAT: sites with one or a few public IPs shared by many accounts, a share
    # of them signing up in the window (a new term, new hires); they shop and refund as usual.
    n_campuses: int = _count(8)
    campus_size: tuple[int, int] = (40, 120)
    campus_new_share: float = 0.4
    # Digital mistakes: established accounts that buy a gift card or top-up and ask for a quick
    # refund once (wrong value, charged twice, bought by a child).
    n_digital_mistakes: int = _count(300)
    # Pay-later returners: BNPL "try before you buy" shoppers; share of their orders refunded
    # (returned) and share of their orders at the shops that later turn (bnpl_cashout).
    n_bnpl_returners: int = _count(400)
    bnpl_return_rate: float = 0.4
    bnpl_returner_bnpl_shop_share: float = 0.3

    # --- Outcomes (REFUND_OUTCOME events) ---
    # Share of legit refunds approved on review (the rest are PAID).
    legit_review_share: float = 0.15
    # Share of abusive refunds rejected on review (days), confirmed as abuse (weeks), and
    # charged back (card, wallet, BNPL; one to seven weeks); the rest are PAID: undetected.
    abuse_rejected_rate: float = 0.1
    abuse_confirmed_rate: float = 0.3
    abuse_chargeback_rate: float = 0.15
    # Share of refunds whose outcome never reaches the feed.
    outcome_missing_rate: float = 0.04

    # --- Abuse ---
    # Orders per week of the accounts behind the serial scenarios (and account hopping).
    abuser_orders_per_week: float = 2.0
    # serial_inr_delivered: accounts, and share of their delivered orders claimed "not received".
    serial_inr_accounts: int = _count(50)
    serial_inr_claim_rate: float = 0.5
    # cashout_ring: rings (one colluding digital shop each), accounts per ring, buy+refund cycles.
    cashout_rings: int = _count(3)
    cashout_ring_size: tuple[int, int] = (30, 50)
    cashout_cycles: tuple[int, int] = (1, 4)
    # account_farm: farms (one device pool and IP pool each), accounts per farm, orders each,
    # and share of delivered farm orders that get a small refund.
    account_farms: int = _count(10)
    farm_size: tuple[int, int] = (12, 30)
    farm_orders: tuple[int, int] = (1, 3)
    farm_refund_rate: float = 0.7
    # account_hopping: taken-over accounts, refunds in the burst, burst length in hours.
    account_hoppers: int = _count(50)
    hop_refunds: tuple[int, int] = (3, 8)
    hop_burst_hours: tuple[float, float] = (1.0, 8.0)
    # bnpl_cashout: shops that turn, cashout orders per shop, days the cashout lasts, and share
    # of cashout orders refunded.
    bnpl_shops: int = _count(3)
    bnpl_orders_per_shop: tuple[int, int] = (80, 130)
    bnpl_days: tuple[float, float] = (7.0, 14.0)
    bnpl_refund_rate: float = 0.85
    # refund_exceeds_order: accounts, share of delivered orders claimed, and share of claims
    # split into partial refunds that add up past the order (the others ask for more at once).
    exceeds_accounts: int = _count(40)
    exceeds_claim_rate: float = 0.45
    exceeds_split_share: float = 0.5
    # serial_changed_mind: accounts, and share of delivered orders refunded without return.
    changed_mind_accounts: int = _count(50)
    changed_mind_claim_rate: float = 0.55

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("SimConfig.start must be timezone-aware")
        if self.weeks < 1:
            raise ValueError("SimConfig.weeks must be at least 1")
        unknown = set(self.exclude) - set(LEGIT_SCENARIOS) - _ABUSE
        if unknown:
            raise ValueError(f"SimConfig.exclude names unknown scenarios: {sorted(unknown)}")

    def resized(self, factor: float) -> SimConfig:
        """This config with every population count multiplied by ``factor`` (at least 1 each).

        Rates stay, so the mix stays; at very small sizes the minimum of one ring, farm or shop
        per scenario makes abuse more frequent than at the default size.
        """
        if factor <= 0:
            raise ValueError("factor must be positive")
        counts = {
            f.name: max(1, round(getattr(self, f.name) * factor))
            for f in fields(self)
            if f.metadata.get("scales")
        }
        return replace(self, **counts)

    @property
    def export_at(self) -> float:
        """When this world's history is exported: the end of the outcome tail (epoch seconds)."""
        return self.start.timestamp() + self.weeks * WEEK + self.outcome_tail_days * DAY

    def shifted(self, seed: int, *, spread: float = 0.5) -> SimConfig:
        """Another world for evaluation: a new seed, every population count multiplied by a
        factor in [1 / (1 + spread), 1 + spread] and every rate, share and range by one in
        [1 - spread / 2, 1 + spread / 2] (shares stay below 1), and nothing excluded.

        The model never trains on it, so it shows how the model does when the mix and the
        behaviours' parameters differ from what it learned (model/README.md, Shifted world).
        """
        rng = random.Random(seed)
        knobs: dict[str, Any] = {"seed": seed, "exclude": ()}
        fixed = {
            "seed",
            "weeks",
            "start",
            "warmup_weeks",
            "exclude",
            "carrier_ips_per_city",
            "outcome_tail_days",
        }
        for f in fields(self):
            if f.name in fixed:
                continue
            value = getattr(self, f.name)
            if f.metadata.get("scales"):
                knobs[f.name] = max(1, round(value * rng.uniform(1 / (1 + spread), 1 + spread)))
            elif isinstance(value, float):
                scaled = value * rng.uniform(1 - spread / 2, 1 + spread / 2)
                knobs[f.name] = min(scaled, 0.98) if value < 1 else scaled
            elif isinstance(value, tuple):
                factor = rng.uniform(1 - spread / 2, 1 + spread / 2)
                low, high = (v * factor for v in value)
                if isinstance(value[0], int):
                    low, high = max(1, round(low)), max(1, round(high))
                knobs[f.name] = (low, max(low, high))
        return replace(self, **knobs)

    @classmethod
    def scaled(cls, events: int, **knobs: Any) -> SimConfig:
        """A config with the given knobs, resized so that a run yields about ``events`` records.

        ``SimConfig.scaled(events=1_000_000, seed=3)``. Records grow linearly with the
        population, so a pilot run (10,000 ordinary accounts, about 2 s) measures records per
        unit of size; the result lands within a few percent of ``events``.
        """
        if events <= 0:
            raise ValueError("events must be positive")
        cfg = cls(**knobs)
        pilot_factor = min(1.0, 10_000 / cfg.n_accounts)
        pilot_records = sum(1 for _ in simulate(cfg.resized(pilot_factor)))
        return cfg.resized(pilot_factor * events / pilot_records)


@dataclass(frozen=True, slots=True)
class SimRecord:
    """One message a caller would send, with its ground truth.

    Exactly one of ``event`` and ``check`` is set. ``scenario`` names the behaviour that produced
    the record: for order events, the scenario of the actor that placed the order; for a check
    and its REFUND_OUTCOME, the refund's (an ordinary account's refund is named after its
    situation, e.g. ``legit_inr_lost``).
    """

    at: float  # epoch seconds; records come in non-decreasing `at`
    event: pb.Event | None
    check: pb.CheckRequest | None
    label: int  # checks: 1 abuse, 0 legitimate; events: -1
    scenario: str

    def record(self) -> Record:
        """The history record (model/records.py) of this message: the scenario as its segment,
        the ground truth left behind (labels come from the REFUND_OUTCOME events)."""
        return Record(self.at, self.event, self.check, self.scenario)


# --- World ------------------------------------------------------------------------------------

_PHYSICAL = pb.ITEM_CATEGORY_PHYSICAL
_DIGITAL = pb.ITEM_CATEGORY_DIGITAL_GOODS
_SERVICE = pb.ITEM_CATEGORY_SERVICE
_INR = pb.REFUND_REASON_ITEM_NOT_RECEIVED
_DAMAGED = pb.REFUND_REASON_DAMAGED
_NAD = pb.REFUND_REASON_NOT_AS_DESCRIBED
_CHANGED_MIND = pb.REFUND_REASON_CHANGED_MIND
_DUPLICATE = pb.REFUND_REASON_DUPLICATE_CHARGE
_OTHER = pb.REFUND_REASON_OTHER

# (code, weight): where accounts live; the last three are US cities.
_CITIES = (
    ("BER", 6),
    ("HAM", 3),
    ("MUC", 3),
    ("CGN", 2),
    ("FRA", 2),
    ("PAR", 7),
    ("LYS", 2),
    ("MRS", 2),
    ("MAD", 5),
    ("BCN", 4),
    ("ROM", 4),
    ("MIL", 4),
    ("AMS", 3),
    ("RTM", 1.5),
    ("BRU", 2),
    ("VIE", 2.5),
    ("ZRH", 1.5),
    ("WAW", 3),
    ("KRK", 1.5),
    ("PRG", 2),
    ("LIS", 2),
    ("DUB", 1.5),
    ("CPH", 1.5),
    ("STO", 2),
    ("HEL", 1),
    ("ATH", 1.5),
    ("BUD", 1.5),
    ("NYC", 1.5),
    ("LAX", 1),
    ("CHI", 0.8),
)
_PAYMENTS = (
    (pb.PAYMENT_METHOD_CARD, 52),
    (pb.PAYMENT_METHOD_WALLET, 20),
    (pb.PAYMENT_METHOD_BNPL, 12),
    (pb.PAYMENT_METHOD_BANK_TRANSFER, 8),
    (pb.PAYMENT_METHOD_STORE_CREDIT, 5),
    (pb.PAYMENT_METHOD_OTHER, 3),
)
_CHARGEABLE = frozenset({pb.PAYMENT_METHOD_CARD, pb.PAYMENT_METHOD_WALLET, pb.PAYMENT_METHOD_BNPL})
# Merchant main category: physical 75 %, digital 12 %, service 13 %.
_MERCHANT_CATEGORIES = ((_PHYSICAL, 75), (_DIGITAL, 12), (_SERVICE, 13))
# Refund propensity by category, indexed by ItemCategory number.
_CATEGORY_REFUND_FACTOR = (0.0, 1.0, 0.4, 0.6)
# Gift card / game currency face values in whole units: what people buy, what rings cash out.
_GIFT_CARDS = (5, 10, 15, 20, 25, 25, 50, 50, 100, 150)
_CASHOUT_CARDS = (25, 50, 50, 100, 100, 150, 200)
# First octets of residential and of hosting (proxy, VPN) IPv4 ranges.
_RESIDENTIAL = (
    31,
    37,
    46,
    62,
    77,
    78,
    79,
    80,
    81,
    82,
    83,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
    91,
    92,
    93,
    94,
    95,
    109,
    176,
    178,
    188,
    212,
    213,
    217,
)
_HOSTING = (5, 23, 45, 104, 138, 146, 159, 167, 185, 193, 194, 195)

T = TypeVar("T")


class _Choice(Generic[T]):
    """Weighted choice with precomputed cumulative weights (O(log n) per pick)."""

    __slots__ = ("cum", "items")

    def __init__(self, pairs: Sequence[tuple[T, float]]) -> None:
        self.items = [item for item, _ in pairs]
        self.cum = list(itertools.accumulate(weight for _, weight in pairs))

    def pick(self, rng: random.Random) -> T:
        return self.items[bisect(self.cum, rng.random() * self.cum[-1])]


@dataclass(slots=True, eq=False)
class _Merchant:
    id: str
    currency: str
    category: int  # what it mostly sells
    refund_mult: float  # its refund propensity relative to the average merchant
    tracked: bool  # shares parcel tracking (ORDER_DELIVERED events, delivery status)


@dataclass(slots=True, eq=False)
class _Account:
    id: str
    created_at: int
    age_known: bool  # the caller knows created_at and sends it
    devices: list[str]  # first one is the main device; empty: no device id sent
    ips: list[str]  # connections it uses besides the mobile network
    city: str
    payment: int  # preferred payment method
    mobile_share: float  # share of requests over the city's carrier-NAT IPs
    refund_propensity: float = 1.0


@dataclass(slots=True, eq=False)
class _Order:
    id: str
    account: _Account
    merchant: _Merchant
    scenario: str  # of the actor that placed it
    amount: int
    currency: str
    category: int
    payment: int
    created_at: int
    context: tuple[str, str, str]  # device, ip, city at placement
    shipped_at: int | None  # None: never shipped (cancelled, or a shop that never ships)
    expected_at: int | None  # when an on-time parcel would arrive
    delivered_at: int | None  # None: never delivered (lost, cancelled)
    late: bool = False
    lost: bool = False
    claimed: bool = False  # a refund was planned for it when it was placed


@dataclass(slots=True, eq=False)
class _Refund:
    """A refund the buyer will ask for; its label follows from the scenario."""

    at: int
    amount: int
    reason: int
    returned: bool  # item_returned as the caller reports it at request time
    scenario: str
    context: tuple[str, str, str] | None = None  # device, ip, city; None: the account's own


Action = Callable[..., SimRecord | None]
RefundPolicy = Callable[["_World", _Order], list[_Refund]]


@dataclass(slots=True, eq=False)
class _Shopper:
    """An account that places orders at a steady rate and asks for refunds by its policy."""

    account: _Account
    scenario: str
    orders_per_week: float
    merchants: _Choice[_Merchant]
    policy: RefundPolicy
    history: list[_Order] | None = None  # kept only when a scenario needs past orders


class _World:
    """State of one run: random generator, action heap, population, id counters."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.start = int(cfg.start.timestamp())
        self.end = self.start + cfg.weeks * WEEK
        self.origin = self.start - cfg.warmup_weeks * WEEK  # the honest history begins here
        self.tail_end = self.end + int(cfg.outcome_tail_days * DAY)  # the last outcomes
        self.now = self.origin
        self.defective: dict[int, tuple[int, int]] = {}  # id(merchant) -> bad batch (from, until)
        self._heap: list[tuple[int, int, Action, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._orders = itertools.count(1)
        self._refunds = itertools.count(1)
        self._events = itertools.count(1)
        self._taken: set[str] = set()
        self.cities = _Choice(_CITIES)
        self.city_codes = [code for code, _ in _CITIES]
        self.payments = _Choice(_PAYMENTS)
        # Carrier-NAT addresses per city: many unrelated accounts share them, unevenly.
        self.carrier_ips = {
            code: _Choice(
                [(self.ipv4(_RESIDENTIAL), 1 / rank) for rank in range(1, cfg.carrier_ips_per_city + 1)]
            )
            for code in self.city_codes
        }
        self._make_merchants()

    # Engine.

    def at(self, t: float, action: Action, *args: Any) -> None:
        """Schedule ``action(world, *args)`` at time ``t`` (dropped if after the window)."""
        when = int(t)
        if when < self.now:
            raise ValueError(f"cannot schedule {action.__name__} in the past")
        if when < self.end or (action is _report_outcome and when < self.tail_end):
            heapq.heappush(self._heap, (when, next(self._seq), action, args))

    def run(self) -> Iterator[SimRecord]:
        """Run actions in time order until the window ends; yield what they emit."""
        heap = self._heap
        while heap:
            self.now, _, action, args = heapq.heappop(heap)
            record = action(self, *args)
            if record is not None:
                yield record

    # Random helpers.

    def uniform_time(self, margin: float = 0.0) -> int:
        """A uniform time in the window, at least ``margin`` seconds before its end."""
        return int(self.start + self.rng.uniform(0, max(0.0, self.end - self.start - margin)))

    def staggered(self, i: int, n: int, *, lead: float = 0.0, margin: float = 0.0) -> int:
        """A time in the i-th of n equal slices of the window without its first ``lead`` and
        last ``margin`` seconds: the n groups of a scenario spread over the whole window, so
        every time split of the data sees some."""
        span = max(0.0, self.end - self.start - lead - margin)
        return int(self.start + lead + (i + self.rng.random()) * span / n)

    def daytime(self, t: float) -> int:
        """Move a time in the buyer's night (0-7 h CET) to a random time of that day (7-22 h)."""
        hour = int(t // HOUR + 1) % 24
        if hour < 7:
            t += self.rng.uniform(7 - hour, 22 - hour) * HOUR
        return int(t)

    def next_visit(self, orders_per_week: float) -> int:
        """Time of a shopper's next order: Poisson arrivals, nights skipped."""
        return self.daytime(self.now + self.rng.expovariate(orders_per_week / WEEK))

    def aged_created(self) -> int:
        """Creation time of an established account: median about a year before the window,
        at most about 16 years."""
        days = min(6_000.0, max(1.0, self.rng.lognormvariate(math.log(400), 1.1)))
        return self.start - int(days * DAY)

    def price(self, category: int) -> int:
        """An order amount in minor units for the category."""
        if category == _DIGITAL:
            return self.rng.choice(_GIFT_CARDS) * 100
        median = 4_500 if category == _PHYSICAL else 6_000
        return max(99, int(self.rng.lognormvariate(math.log(median), 0.85)) // 100 * 100 + 99)

    def reason(self, *pairs: tuple[int, float]) -> int:
        """A refund reason drawn from (reason, weight) pairs."""
        return self.rng.choices([r for r, _ in pairs], [w for _, w in pairs])[0]

    # Identifiers.

    def unique(self, prefix: str, bits: int) -> str:
        """A random, never repeated id such as ``acct:3fa9c01b2e``."""
        while True:
            value = f"{prefix}:{self.rng.getrandbits(bits):0{bits // 4}x}"
            if value not in self._taken:
                self._taken.add(value)
                return value

    def device(self) -> str:
        """A new device fingerprint id."""
        return f"dev:{self.rng.getrandbits(64):016x}"

    def ipv4(self, first_octets: Sequence[int]) -> str:
        """A random IPv4 address in one of the given /8 ranges."""
        r = self.rng
        return f"{r.choice(first_octets)}.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}"

    def home_ip(self) -> str:
        """A residential connection: IPv4, or IPv6 for ``ipv6_share`` of homes."""
        r = self.rng
        if r.random() < self.cfg.ipv6_share:
            return (
                f"2a02:{r.getrandbits(16):x}:{r.getrandbits(16):x}:{r.getrandbits(16):x}"
                f"::{r.randrange(1, 65_536):x}"
            )
        return self.ipv4(_RESIDENTIAL)

    # Population.

    def _make_merchants(self) -> None:
        """Regular merchants with Zipf popularity, the big merchant and the colluding shops."""
        cfg, r = self.cfg, self.rng
        categories = _Choice(_MERCHANT_CATEGORIES)
        regular = [self._merchant(categories.pick(r)) for _ in range(cfg.n_merchants)]
        weights = [1.0 / rank**0.8 for rank in range(1, len(regular) + 1)]
        r.shuffle(weights)
        self.big_merchant = self._merchant(_PHYSICAL)
        self.big_merchant.tracked, self.big_merchant.refund_mult = True, 1.0
        big_weight = sum(weights) * cfg.big_merchant_share / (1 - cfg.big_merchant_share)
        # Colluding digital shops: ordinary-looking, with a mid-table share of legit sales.
        self.cashout_shops = [self._merchant(_DIGITAL) for _ in range(cfg.cashout_rings)]
        shop_weights = [1.0 / r.randint(20, 200) ** 0.8 for _ in self.cashout_shops]
        # BNPL shops are well-known physical merchants, but not the very largest ones.
        ranked = sorted(range(len(regular)), key=lambda i: -weights[i])
        popular = ranked[len(ranked) // 20 : len(ranked) // 5]
        physical = [i for i in popular if regular[i].category == _PHYSICAL]
        self.bnpl_shops = [regular[i] for i in r.sample(physical, min(cfg.bnpl_shops, len(physical)))]
        everyone = [
            *zip(regular, weights, strict=True),
            (self.big_merchant, big_weight),
            *zip(self.cashout_shops, shop_weights, strict=True),
        ]
        self.all_merchants = _Choice(everyone)
        self.physical_merchants = _Choice([(m, w) for m, w in everyone if m.category == _PHYSICAL])
        self.digital_merchants = _Choice([(m, w) for m, w in everyone if m.category == _DIGITAL])

    def _merchant(self, category: int) -> _Merchant:
        r = self.rng
        return _Merchant(
            id=self.unique("m", 24),
            currency="USD" if r.random() < self.cfg.usd_merchant_share else "EUR",
            category=category,
            refund_mult=r.lognormvariate(0.0, 0.4),
            tracked=r.random() >= self.cfg.untracked_merchant_share,
        )

    def account(
        self,
        created_at: float,
        *,
        devices: list[str] | None = None,
        ips: list[str] | None = None,
        city: str | None = None,
        mobile_share: float | None = None,
    ) -> _Account:
        """A new account; unspecified traits are drawn like an ordinary shopper's."""
        cfg, r = self.cfg, self.rng
        if devices is None:
            devices = [] if r.random() < cfg.no_device_share else [self.device()]
            if devices and r.random() < cfg.second_device_share:
                devices.append(self.device())
        return _Account(
            id=self.unique("acct", 40),
            created_at=int(created_at),
            age_known=r.random() >= cfg.unknown_age_share,
            devices=devices,
            ips=[self.home_ip()] if ips is None else ips,
            city=self.cities.pick(r) if city is None else city,
            payment=self.payments.pick(r),
            mobile_share=cfg.mobile_share if mobile_share is None else mobile_share,
        )

    def context(self, acct: _Account) -> tuple[str, str, str]:
        """Device, IP and city of one request by the account, now."""
        r = self.rng
        devices = acct.devices
        if not devices:
            device = ""
        elif len(devices) == 1 or r.random() < 0.7:
            device = devices[0]
        else:
            device = r.choice(devices[1:])
        if r.random() < acct.mobile_share:
            ip = self.carrier_ips[acct.city].pick(r)
        else:
            ip = acct.ips[0] if len(acct.ips) == 1 else r.choice(acct.ips)
        return device, ip, acct.city

    # Orders.

    def order(
        self,
        acct: _Account,
        merchant: _Merchant,
        scenario: str,
        *,
        category: int | None = None,
        amount: int | None = None,
        payment: int | None = None,
    ) -> _Order:
        """A new order placed now, with its logistics drawn (shipping, delay, loss)."""
        cfg, r, now = self.cfg, self.rng, self.now
        if category is None:
            category = merchant.category if r.random() < 0.92 else _PHYSICAL
        if payment is None:
            payment = acct.payment if r.random() < 0.8 else self.payments.pick(r)
        order = _Order(
            id=f"ord:{next(self._orders):09d}",
            account=acct,
            merchant=merchant,
            scenario=scenario,
            amount=self.price(category) if amount is None else amount,
            currency=merchant.currency,
            category=category,
            payment=payment,
            created_at=now,
            context=self.context(acct),
            shipped_at=None,
            expected_at=None,
            delivered_at=None,
        )
        if category == _PHYSICAL:
            order.shipped_at = now + int(r.uniform(3, 40) * HOUR)
            order.expected_at = order.shipped_at + int(DAY * r.lognormvariate(math.log(2.2), 0.45))
            if r.random() < cfg.lost_rate:
                order.lost = True
            elif r.random() < cfg.late_rate:
                order.late = True
                order.delivered_at = order.expected_at + int(r.uniform(4, 14) * DAY)
            else:
                order.delivered_at = order.expected_at
        else:  # codes arrive within seconds, services are rendered within days
            done = now + (r.randint(3, 120) if category == _DIGITAL else int(r.uniform(1, 10) * DAY))
            order.shipped_at = order.expected_at = order.delivered_at = done
        return order

    def cancel(self, order: _Order) -> None:
        """The order is cancelled before shipping: nothing will ship or arrive."""
        order.shipped_at = order.expected_at = order.delivered_at = None
        order.lost = order.late = False

    def launch(self, order: _Order, refunds: list[_Refund]) -> SimRecord:
        """Schedule the order's delivery and refunds; return its ORDER_PLACED record."""
        if order.delivered_at is not None and order.merchant.tracked:
            self.at(order.delivered_at, _deliver, order)
        order.claimed = bool(refunds)
        for refund in refunds:
            self.at(max(refund.at, order.created_at + MINUTE), _request_refund, order, refund)
        return self._placed(order)

    def delivery_status(self, order: _Order) -> int:
        """What logistics says about the order now, as the caller reports it."""
        now = self.now
        if not order.merchant.tracked:
            return pb.DELIVERY_STATUS_UNKNOWN
        if order.delivered_at is not None and order.delivered_at <= now:
            return pb.DELIVERY_STATUS_DELIVERED
        if order.shipped_at is None or now < order.shipped_at:
            return pb.DELIVERY_STATUS_NOT_SHIPPED
        if order.lost and now - order.shipped_at > 7 * DAY:
            return pb.DELIVERY_STATUS_UNKNOWN  # tracking went silent
        return pb.DELIVERY_STATUS_IN_TRANSIT

    # Messages.

    def _event(self, order: _Order, event_type: pb.EventType) -> pb.Event:
        event = pb.Event(
            event_id=f"ev:{next(self._events):010d}",
            type=event_type,
            account_id=order.account.id,
            merchant_id=order.merchant.id,
            order_id=order.id,
        )
        event.occurred_at.seconds = self.now
        return event

    def _placed(self, order: _Order) -> SimRecord:
        acct = order.account
        event = self._event(order, pb.EVENT_TYPE_ORDER_PLACED)
        event.amount_minor = order.amount
        event.currency = order.currency
        event.item_category = cast(pb.ItemCategory, order.category)
        event.payment_method = cast(pb.PaymentMethod, order.payment)
        event.device_id, event.ip, event.geo_city = order.context
        if acct.age_known:
            event.account_created_at.seconds = acct.created_at
        return SimRecord(float(self.now), event, None, -1, order.scenario)

    def delivered(self, order: _Order) -> SimRecord:
        """The ORDER_DELIVERED record of the order, now."""
        event = self._event(order, pb.EVENT_TYPE_ORDER_DELIVERED)
        return SimRecord(float(self.now), event, None, -1, order.scenario)

    def check(self, order: _Order, refund: _Refund) -> SimRecord:
        """The CheckRequest of a refund, now; schedules the refund's outcome."""
        acct = order.account
        device, ip, city = refund.context or self.context(acct)
        req = pb.CheckRequest(
            refund_id=f"rf:{next(self._refunds):09d}",
            account_id=acct.id,
            order_id=order.id,
            merchant_id=order.merchant.id,
            amount_minor=refund.amount,
            order_amount_minor=order.amount,
            currency=order.currency,
            reason=cast(pb.RefundReason, refund.reason),
            item_category=cast(pb.ItemCategory, order.category),
            delivery_status=cast(pb.DeliveryStatus, self.delivery_status(order)),
            item_returned=refund.returned,
            payment_method=cast(pb.PaymentMethod, order.payment),
            device_id=device,
            ip=ip,
            geo_city=city,
        )
        req.order_created_at.seconds = order.created_at
        req.requested_at.seconds = self.now
        if acct.age_known:
            req.account_created_at.seconds = acct.created_at
        label = 1 if refund.scenario in _ABUSE else 0
        self._schedule_outcome(order, req.refund_id, refund, label)
        return SimRecord(float(self.now), None, req, label, refund.scenario)

    def _schedule_outcome(self, order: _Order, refund_id: str, refund: _Refund, label: int) -> None:
        """Decide what the back office will report about the refund, and when."""
        cfg, r = self.cfg, self.rng
        if r.random() < cfg.outcome_missing_rate:
            return
        u = r.random()
        rejected = cfg.abuse_rejected_rate
        confirmed = rejected + cfg.abuse_confirmed_rate
        charged_back = confirmed + cfg.abuse_chargeback_rate
        if label == 0 and u < cfg.legit_review_share:
            outcome, delay = pb.REFUND_OUTCOME_REVIEW_APPROVED, r.uniform(2, 7) * DAY
        elif label == 0:
            outcome, delay = pb.REFUND_OUTCOME_PAID, r.uniform(0.5, 3) * DAY
        elif u < rejected:
            outcome, delay = pb.REFUND_OUTCOME_REVIEW_REJECTED, r.uniform(1, 5) * DAY
        elif u < confirmed:
            outcome, delay = pb.REFUND_OUTCOME_CONFIRMED_ABUSE, r.uniform(4, 25) * DAY
        elif u < charged_back and order.payment in _CHARGEABLE:
            outcome, delay = pb.REFUND_OUTCOME_CHARGEBACK, r.uniform(15, 50) * DAY
        else:  # undetected
            outcome, delay = pb.REFUND_OUTCOME_PAID, r.uniform(0.5, 3) * DAY
        self.at(self.now + delay, _report_outcome, order, refund_id, refund, outcome)

    def outcome(self, order: _Order, refund_id: str, refund: _Refund, outcome: int) -> SimRecord:
        """The REFUND_OUTCOME record of a refund, now."""
        event = self._event(order, pb.EVENT_TYPE_REFUND_OUTCOME)
        event.refund_id = refund_id
        event.outcome = cast(pb.RefundOutcome, outcome)
        event.amount_minor = refund.amount
        event.currency = order.currency
        return SimRecord(float(self.now), event, None, -1, refund.scenario)


# --- Actions: functions (world, *args) -> record or None, run from the heap -------------------


def _deliver(w: _World, order: _Order) -> SimRecord:
    return w.delivered(order)


def _request_refund(w: _World, order: _Order, refund: _Refund) -> SimRecord:
    return w.check(order, refund)


def _report_outcome(w: _World, order: _Order, refund_id: str, refund: _Refund, outcome: int) -> SimRecord:
    return w.outcome(order, refund_id, refund, outcome)


def _shop(w: _World, shopper: _Shopper) -> SimRecord:
    """Place the shopper's next order, plan its refunds, schedule the following visit."""
    order = w.order(shopper.account, shopper.merchants.pick(w.rng), shopper.scenario)
    if shopper.history is not None:
        shopper.history.append(order)
    w.at(w.next_visit(shopper.orders_per_week), _shop, shopper)
    return w.launch(order, shopper.policy(w, order))


def _enroll(
    w: _World,
    acct: _Account,
    scenario: str,
    orders_per_week: float,
    merchants: _Choice[_Merchant],
    policy: RefundPolicy,
) -> _Shopper:
    """Make the account a shopper and schedule its first order.

    An account that signs up during the window orders within hours of signing up.
    """
    shopper = _Shopper(acct, scenario, orders_per_week, merchants, policy)
    since = w.start if scenario in _ABUSE else w.origin  # honest accounts have a history
    if acct.created_at >= since:
        first = acct.created_at + w.rng.expovariate(1 / (4 * HOUR))
    else:
        first = since + w.rng.expovariate(orders_per_week / WEEK)
    w.at(w.daytime(first), _shop, shopper)
    return shopper


def _no_refunds(w: _World, order: _Order) -> list[_Refund]:
    return []


# --- Legitimate behaviour ---------------------------------------------------------------------


def _legit_refunds(w: _World, order: _Order) -> list[_Refund]:
    """Refunds an honest buyer asks for; the situation names the refund of an ordinary account.

    Households and travellers keep their own scenario name for every refund.
    """
    cfg, r = w.cfg, w.rng

    def named(situation: str) -> str:
        return situation if order.scenario == "legit_normal" else order.scenario

    batch = w.defective.get(id(order.merchant))
    if (
        batch is not None
        and batch[0] <= order.created_at < batch[1]
        and order.delivered_at is not None
        and r.random() < cfg.defective_refund_share
    ):
        at = w.daytime(order.delivered_at + r.uniform(0.3, 4) * DAY)
        reason = w.reason((_DAMAGED, 60), (_NAD, 40))
        returned = r.random() < cfg.defective_returned_rate
        return [_Refund(at, order.amount, reason, returned, "legit_defective_batch")]
    if order.category == _PHYSICAL and order.expected_at is not None:
        if order.lost:
            if r.random() >= cfg.lost_claim_rate:
                return []
            at = w.daytime(order.expected_at + r.uniform(2, 10) * DAY)
            return [_Refund(at, order.amount, _INR, False, named("legit_inr_lost"))]
        if order.late and r.random() < cfg.late_claim_rate:  # still in transit when asked
            at = order.expected_at + int(r.uniform(1, 3) * DAY)
            return [_Refund(at, order.amount, _INR, False, named("legit_inr_in_transit"))]
        if order.delivered_at is not None and r.random() < cfg.stolen_parcel_rate:
            at = w.daytime(order.delivered_at + r.uniform(0.2, 3) * DAY)
            return [_Refund(at, order.amount, _INR, False, named("legit_stolen_parcel"))]
    chance = (
        cfg.refund_rate
        * order.account.refund_propensity
        * order.merchant.refund_mult
        * _CATEGORY_REFUND_FACTOR[order.category]
    )
    if r.random() >= chance:
        return []
    base = "legit_big_merchant" if order.merchant is w.big_merchant else "legit_normal"
    if order.category == _PHYSICAL:
        return _physical_refunds(w, order, named(base), named("legit_partial"))
    if order.category == _DIGITAL:
        return [_digital_refund(w, order, named(base))]
    return _service_refunds(w, order, named(base), named("legit_partial"))


def _physical_refunds(w: _World, order: _Order, scenario: str, partial_scenario: str) -> list[_Refund]:
    """An honest refund of a physical order: most go back to the merchant first."""
    r = w.rng
    reason = w.reason((_DAMAGED, 30), (_NAD, 30), (_CHANGED_MIND, 30), (_DUPLICATE, 5), (_OTHER, 5))
    created, shipped, delivered = order.created_at, order.shipped_at, order.delivered_at
    if reason == _DUPLICATE:
        return [_Refund(created + int(r.uniform(0.5, 48) * HOUR), order.amount, reason, False, scenario)]
    assert shipped is not None and delivered is not None  # lost parcels are handled above
    if reason == _CHANGED_MIND and r.random() < 0.15:
        # Cancelled before shipping: nothing to return, "changed my mind" without a return.
        at = created + int(r.uniform(0.1, 0.9) * (shipped - created))
        w.cancel(order)
        return [_Refund(at, order.amount, reason, False, scenario)]
    at = w.daytime(delivered + r.uniform(1, 12) * DAY)
    if reason == _CHANGED_MIND:  # refunded on return, some already on the drop-off scan
        return [_Refund(at, order.amount, reason, r.random() < 0.85, scenario)]
    if r.random() < w.cfg.partial_share:
        return _partial_refunds(w, order, at, reason, partial_scenario)
    return [_Refund(at, order.amount, reason, r.random() < 0.7, scenario)]


def _partial_refunds(w: _World, order: _Order, at: int, reason: int, scenario: str) -> list[_Refund]:
    """One partial refund (goodwill, one item of several); sometimes a second, never past the
    order amount together."""
    r = w.rng
    first = max(1, int(order.amount * r.uniform(0.15, 0.7)))
    refunds = [_Refund(at, first, reason, r.random() < 0.15, scenario)]
    if r.random() < 0.15:
        second = max(1, int((order.amount - first) * r.uniform(0.2, 0.9)))
        later = w.daytime(at + r.uniform(1, 7) * DAY)
        refunds.append(_Refund(later, second, _DAMAGED, False, scenario))
    return refunds


def _digital_refund(w: _World, order: _Order, scenario: str) -> _Refund:
    """Wrong card, double charge, a code that does not work or never arrived (the shop shows it
    delivered): asked quickly, nothing returned."""
    r = w.rng
    reason = w.reason((_DUPLICATE, 30), (_CHANGED_MIND, 30), (_NAD, 25), (_INR, 15))
    at = order.created_at + 2 * MINUTE + int(r.expovariate(1 / (3 * HOUR)))
    return _Refund(at, order.amount, reason, False, scenario)


def _service_refunds(w: _World, order: _Order, scenario: str, partial_scenario: str) -> list[_Refund]:
    """A cancelled booking before the service, or a complaint after it."""
    r = w.rng
    assert order.delivered_at is not None  # services are always scheduled
    if r.random() < 0.4:
        at = order.created_at + int(r.uniform(0.05, 0.9) * (order.delivered_at - order.created_at))
        w.cancel(order)
        return [_Refund(at, order.amount, _CHANGED_MIND, False, scenario)]
    at = w.daytime(order.delivered_at + r.uniform(0.5, 5) * DAY)
    reason = w.reason((_NAD, 70), (_OTHER, 30))
    if r.random() < 0.3:
        return [_Refund(at, max(1, int(order.amount * r.uniform(0.2, 0.6))), reason, False, partial_scenario)]
    return [_Refund(at, order.amount, reason, False, scenario)]


def _start_ordinary(w: _World) -> None:
    """Ordinary shoppers; their refunds make up legit_normal, _partial, _big_merchant, _inr_*
    and legit_stolen_parcel. Refund propensity varies a lot: some honest buyers return much."""
    cfg, r = w.cfg, w.rng
    for _ in range(cfg.n_accounts):
        created = w.uniform_time() if r.random() < cfg.new_account_share else w.aged_created()
        acct = w.account(created)
        acct.refund_propensity = r.lognormvariate(-0.32, 0.8)  # mean 1
        rate = r.lognormvariate(math.log(cfg.orders_per_week) - 0.245, 0.7)  # mean orders_per_week
        _enroll(w, acct, "legit_normal", rate, w.all_merchants, _legit_refunds)


def _start_legit_household_device(w: _World) -> None:
    """Households: 2-5 accounts sharing one family device (70 % of requests) and one home IP;
    one household in five has a young member."""
    cfg, r = w.cfg, w.rng
    for _ in range(cfg.n_households):
        shared_device, home, city = w.device(), w.home_ip(), w.cities.pick(r)
        young = r.random() < 0.2
        for member in range(r.randint(*cfg.household_size)):
            created = w.uniform_time() if young and member == 0 else w.aged_created()
            acct = w.account(created, devices=[shared_device, w.device()], ips=[home], city=city)
            _enroll(w, acct, "legit_household_device", cfg.orders_per_week, w.all_merchants, _legit_refunds)


def _start_legit_traveller(w: _World) -> None:
    """Travellers: trips of 2-5 legs of 0.5-3 days, each leg in another city on hotel, café and
    roaming IPs, several a day; they shop and refund as usual on the way."""
    cfg, r = w.cfg, w.rng
    for _ in range(cfg.n_travellers):
        acct = w.account(w.aged_created(), mobile_share=0.3)
        _enroll(w, acct, "legit_traveller", cfg.orders_per_week * 1.3, w.all_merchants, _legit_refunds)
        t = w.start + r.uniform(0, 10) * DAY
        while t < w.end:
            legs = r.randint(2, 5)
            w.at(t, _travel_leg, acct, (acct.city, acct.ips), legs)
            t += legs * 3 * DAY + r.uniform(3, 12) * DAY


def _travel_leg(w: _World, acct: _Account, home: tuple[str, list[str]], legs: int) -> None:
    """Move the traveller to a new city (or home when no legs are left)."""
    r = w.rng
    if legs == 0:
        acct.city, acct.ips = home
        return
    acct.city = r.choice([c for c in w.city_codes if c != acct.city])
    acct.ips = [w.ipv4(_HOSTING), w.ipv4(_RESIDENTIAL), w.ipv4(_RESIDENTIAL)]
    w.at(w.now + r.uniform(0.5, 3) * DAY, _travel_leg, acct, home, legs - 1)


def _start_legit_gift_card_buyer(w: _World) -> None:
    """Gift-card buyers: many digital orders, often at the same shops, never a refund;
    a third are young accounts."""
    cfg, r = w.cfg, w.rng
    for _ in range(cfg.n_gift_card_buyers):
        created = w.uniform_time(margin=WEEK) if r.random() < 0.3 else w.aged_created()
        _enroll(
            w,
            w.account(created),
            "legit_gift_card_buyer",
            cfg.gift_card_orders_per_week,
            w.digital_merchants,
            _no_refunds,
        )


def _start_legit_bracketing(w: _World) -> None:
    """Bracketers: ordinary accounts that now and then buy one item in several sizes or colours
    at one physical shop and send back all but one (refunds asked on the return)."""
    cfg, r = w.cfg, w.rng
    for _ in range(cfg.n_bracketers):
        acct = w.account(w.aged_created() if r.random() < 0.85 else w.uniform_time(margin=2 * WEEK))
        acct.refund_propensity = 0.6
        _enroll(w, acct, "legit_bracketing", cfg.orders_per_week * 0.6, w.all_merchants, _legit_refunds)
        t = max(w.origin, acct.created_at) + r.expovariate(cfg.bracket_sessions_per_week / WEEK)
        w.at(w.daytime(t), _bracket, acct)


def _bracket(w: _World, acct: _Account) -> SimRecord:
    """One bracketing session: 2-4 pieces of one item at one shop, all but one returned."""
    cfg, r = w.cfg, w.rng
    w.at(w.next_visit(cfg.bracket_sessions_per_week), _bracket, acct)
    shop = w.physical_merchants.pick(r)
    sizes = r.randint(*cfg.bracket_sizes)
    piece = w.price(_PHYSICAL)
    back = r.sample(range(sizes), sizes - 1)  # all but one go back

    def refund(order: _Order, amount: int, k: int) -> _Refund:
        assert order.delivered_at is not None
        at = w.daytime(order.delivered_at + r.uniform(2, 14) * DAY + k * r.uniform(0, 2) * HOUR)
        reason = w.reason((_CHANGED_MIND, 55), (_NAD, 40), (_DAMAGED, 5))
        return _Refund(at, amount, reason, r.random() < cfg.bracket_returned_rate, "legit_bracketing")

    if r.random() < cfg.bracket_single_order_share:  # one order, refunded piece by piece
        order = w.order(acct, shop, "legit_bracketing", category=_PHYSICAL, amount=piece * sizes)
        if order.delivered_at is None:
            return w.launch(order, [])
        return w.launch(order, [refund(order, piece, k) for k in range(len(back))])
    first = None
    for k in range(sizes):  # one order per piece, placed within minutes
        order = w.order(acct, shop, "legit_bracketing", category=_PHYSICAL, amount=piece)
        refunds = [refund(order, piece, k)] if k in back and order.delivered_at is not None else []
        placed = w.launch(order, refunds)
        if first is None:
            first = placed
        else:
            w.at(w.now, _emit, placed)
    assert first is not None
    return first


def _emit(w: _World, record: SimRecord) -> SimRecord:
    """Emit a record built by an earlier action at the same time (one action, one record)."""
    return record


def _start_legit_porch_theft(w: _World) -> None:
    """Long-standing accounts with a clean history; once in the window a delivered parcel is
    stolen from the doorstep and they claim "not received"."""
    cfg, r = w.cfg, w.rng
    for _ in range(cfg.n_porch_theft_accounts):
        acct = w.account(w.start - int(r.uniform(1.5, 12) * 365 * DAY))
        acct.refund_propensity = 0.5
        shopper = _enroll(
            w, acct, "legit_porch_theft", cfg.orders_per_week * 1.2, w.physical_merchants, _legit_refunds
        )
        shopper.history = []
        w.at(w.start + r.uniform(3 * DAY, w.end - w.start - 4 * DAY), _porch_theft, shopper)


def _porch_theft(w: _World, shopper: _Shopper) -> None:
    """Claim "not received" on the newest parcel delivered in the last days (or wait for one)."""
    r, now = w.rng, w.now
    assert shopper.history is not None
    recent = [  # a parcel nothing else was claimed on: the theft is its only refund
        o
        for o in shopper.history
        if o.delivered_at is not None and 0 <= now - o.delivered_at < 3 * DAY and not o.claimed
    ]
    if not recent or not recent[-1].merchant.tracked:
        w.at(now + 2 * DAY, _porch_theft, shopper)
        return
    order = recent[-1]
    order.claimed = True
    refund = _Refund(w.daytime(now + r.uniform(0.1, 1) * DAY), order.amount, _INR, False, "legit_porch_theft")
    w.at(refund.at, _request_refund, order, refund)


def _start_legit_defective_batch(w: _World) -> None:
    """Shops whose batch goes bad for some days: many of its buyers refund, most send it back."""
    cfg, r = w.cfg, w.rng
    shops = [w.physical_merchants.pick(r) for _ in range(cfg.defective_batches)]
    for i, shop in enumerate(shops):
        t0 = w.staggered(i, len(shops), margin=2 * WEEK)
        w.defective[id(shop)] = (t0, t0 + int(r.uniform(*cfg.defective_days) * DAY))


def _start_legit_campus_ip(w: _World) -> None:
    """Campus or office sites: one to three public IPs for everyone on site (70 % of their
    requests), a share of accounts new in the window, ordinary shopping and refunds."""
    cfg, r = w.cfg, w.rng
    for i in range(cfg.n_campuses):
        ips = [w.ipv4(_RESIDENTIAL) for _ in range(r.randint(1, 3))]
        city = w.cities.pick(r)
        term = w.staggered(i, cfg.n_campuses, margin=2 * WEEK)
        for _ in range(r.randint(*cfg.campus_size)):
            new = r.random() < cfg.campus_new_share
            created = term + r.uniform(0, 5) * DAY if new else w.aged_created()
            acct = w.account(created, ips=ips, city=city, mobile_share=0.3)
            _enroll(w, acct, "legit_campus_ip", cfg.orders_per_week, w.all_merchants, _legit_refunds)


def _start_legit_digital_mistake(w: _World) -> None:
    """Established accounts that shop as usual and once buy a gift card or top-up by mistake
    (wrong value, charged twice, a child's purchase) and ask for it back within the hour."""
    cfg = w.cfg
    for _ in range(cfg.n_digital_mistakes):
        acct = w.account(w.aged_created())
        _enroll(w, acct, "legit_digital_mistake", cfg.orders_per_week, w.all_merchants, _legit_refunds)
        w.at(w.daytime(w.uniform_time(margin=DAY)), _digital_mistake, acct)


def _digital_mistake(w: _World, acct: _Account) -> SimRecord:
    r = w.rng
    order = w.order(acct, w.digital_merchants.pick(r), "legit_digital_mistake", category=_DIGITAL)
    reason = w.reason((_DUPLICATE, 45), (_CHANGED_MIND, 35), (_OTHER, 20))
    refund = _Refund(
        w.now + int(r.uniform(3, 50) * MINUTE), order.amount, reason, False, "legit_digital_mistake"
    )
    return w.launch(order, [refund])


def _start_legit_bnpl_returner(w: _World) -> None:
    """Pay-later shoppers who order to try at home and send much back (refund on return)."""
    cfg, r = w.cfg, w.rng
    shops = w.bnpl_shops or [w.physical_merchants.pick(r)]
    physical = w.physical_merchants
    weights = [b - a for a, b in zip([0.0, *physical.cum[:-1]], physical.cum, strict=True)]
    total, prefer = sum(weights), cfg.bnpl_returner_bnpl_shop_share
    merchants = _Choice(
        [(m, (1 - prefer) * wt / total) for m, wt in zip(physical.items, weights, strict=True)]
        + [(m, prefer / len(shops)) for m in shops]
    )
    for _ in range(cfg.n_bnpl_returners):
        acct = w.account(w.aged_created() if r.random() < 0.8 else w.uniform_time(margin=2 * WEEK))
        acct.payment = pb.PAYMENT_METHOD_BNPL
        _enroll(w, acct, "legit_bnpl_returner", cfg.orders_per_week, merchants, _bnpl_returns)


def _bnpl_returns(w: _World, order: _Order) -> list[_Refund]:
    cfg, r = w.cfg, w.rng
    if order.delivered_at is None or order.category != _PHYSICAL or r.random() >= cfg.bnpl_return_rate:
        return _legit_refunds(w, order)
    at = w.daytime(order.delivered_at + r.uniform(2, 20) * DAY)
    reason = w.reason((_CHANGED_MIND, 60), (_NAD, 35), (_DAMAGED, 5))
    return [_Refund(at, order.amount, reason, r.random() < 0.92, "legit_bnpl_returner")]


# --- Abuse ------------------------------------------------------------------------------------


def _start_serial_inr_delivered(w: _World) -> None:
    """Established-looking accounts that claim "not received" on parcels shown as delivered."""
    cfg, r = w.cfg, w.rng
    for _ in range(cfg.serial_inr_accounts):
        created = w.uniform_time(margin=3 * WEEK) if r.random() < 0.15 else w.aged_created()
        _enroll(
            w,
            w.account(created),
            "serial_inr_delivered",
            cfg.abuser_orders_per_week,
            w.physical_merchants,
            _serial_inr_refunds,
        )


def _serial_inr_refunds(w: _World, order: _Order) -> list[_Refund]:
    r = w.rng
    if (
        order.category != _PHYSICAL
        or order.delivered_at is None
        or not order.merchant.tracked
        or r.random() >= w.cfg.serial_inr_claim_rate
    ):
        return []
    at = w.daytime(order.delivered_at + r.uniform(0.3, 4) * DAY)
    return [_Refund(at, order.amount, _INR, False, "serial_inr_delivered")]


def _start_cashout_ring(w: _World) -> None:
    """Per ring: a colluding digital shop and fresh accounts, on a few shared devices and proxy
    IPs, that buy gift cards there and ask for a refund minutes later."""
    cfg, r = w.cfg, w.rng
    for i, shop in enumerate(w.cashout_shops):
        t0 = w.staggered(i, len(w.cashout_shops), margin=2 * WEEK)
        devices = [w.device() for _ in range(r.randint(3, 6))]
        ips = [w.ipv4(_HOSTING) for _ in range(r.randint(4, 12))]
        home = w.cities.pick(r)
        for _ in range(r.randint(*cfg.cashout_ring_size)):
            first = t0 + r.uniform(0, 14) * DAY
            acct = w.account(
                first - r.uniform(10 * MINUTE, 3 * DAY),
                devices=[r.choice(devices)] if r.random() < 0.7 else [w.device()],
                ips=r.sample(ips, 2),
                city=home if r.random() < 0.7 else w.cities.pick(r),
                mobile_share=0.1,
            )
            acct.payment = pb.PAYMENT_METHOD_CARD if r.random() < 0.7 else pb.PAYMENT_METHOD_WALLET
            if r.random() < 0.3:  # camouflage: one ordinary order without refund first
                since = max(acct.created_at, w.start)
                w.at(since + r.uniform(0.1, 0.8) * (first - since), _single_order, acct, "cashout_ring")
            w.at(first, _cashout_cycle, shop, acct, r.randint(*cfg.cashout_cycles))


def _cashout_cycle(w: _World, shop: _Merchant, acct: _Account, cycles: int) -> SimRecord:
    """Buy a gift card at the colluding shop, ask for a refund 2-55 minutes later."""
    r = w.rng
    order = w.order(
        acct,
        shop,
        "cashout_ring",
        category=_DIGITAL,
        amount=r.choice(_CASHOUT_CARDS) * 100,
        payment=acct.payment,
    )
    reason = w.reason((_INR, 35), (_DUPLICATE, 30), (_CHANGED_MIND, 20), (_NAD, 15))
    refund = _Refund(w.now + int(r.uniform(2, 55) * MINUTE), order.amount, reason, False, "cashout_ring")
    if cycles > 1:
        w.at(w.now + r.uniform(2 * HOUR, 4 * DAY), _cashout_cycle, shop, acct, cycles - 1)
    return w.launch(order, [refund])


def _single_order(w: _World, acct: _Account, scenario: str) -> SimRecord:
    """One ordinary order without refund (abusers' legitimate-looking traffic)."""
    return w.launch(w.order(acct, w.all_merchants.pick(w.rng), scenario), [])


def _start_account_farm(w: _World) -> None:
    """Per farm: new accounts created hours apart on one or two devices and a few IPs, each
    placing 1-3 orders and asking for small refunds."""
    cfg, r = w.cfg, w.rng
    for i in range(cfg.account_farms):
        t: float = w.staggered(i, cfg.account_farms, margin=10 * DAY)
        devices = [w.device() for _ in range(r.randint(1, 2))]
        ips = [w.ipv4(_RESIDENTIAL if r.random() < 0.5 else _HOSTING) for _ in range(r.randint(1, 3))]
        city = w.cities.pick(r)
        for _ in range(r.randint(*cfg.farm_size)):
            t += r.uniform(0.5, 8) * HOUR
            own = r.random() >= 0.85  # a few use a fresh fingerprint; the IPs stay shared
            acct = w.account(
                t, devices=[w.device() if own else r.choice(devices)], ips=ips, city=city, mobile_share=0.0
            )
            w.at(t + r.uniform(0.5, 48) * HOUR, _farm_order, acct, r.randint(*cfg.farm_orders))


def _farm_order(w: _World, acct: _Account, orders: int) -> SimRecord:
    """One farm order; when delivered, a small refund: a partial one, or a cheap order in full."""
    r = w.rng
    order = w.order(acct, w.physical_merchants.pick(r), "account_farm")
    refunds = []
    if order.delivered_at is not None and r.random() < w.cfg.farm_refund_rate:
        amount = order.amount if order.amount < 2_500 else int(order.amount * r.uniform(0.1, 0.4))
        reason = w.reason((_DAMAGED, 45), (_NAD, 45), (_OTHER, 10))
        at = order.delivered_at + int(r.uniform(0.3, 3) * DAY)
        refunds.append(_Refund(at, amount, reason, r.random() < 0.1, "account_farm"))
    if orders > 1:
        w.at(w.now + r.uniform(1, 5) * DAY, _farm_order, acct, orders - 1)
    return w.launch(order, refunds)


def _start_account_hopping(w: _World) -> None:
    """Established accounts that shop normally until taken over; then a burst of refunds on
    their recent orders from new IPs, cities and devices within hours."""
    cfg, r = w.cfg, w.rng
    for _ in range(cfg.account_hoppers):
        acct = w.account(w.start - r.uniform(90, 2_000) * DAY)
        shopper = _enroll(
            w, acct, "account_hopping", cfg.abuser_orders_per_week * 1.25, w.all_merchants, _no_refunds
        )
        shopper.history = []
        w.at(w.start + r.uniform(10 * DAY, w.end - w.start - 3 * DAY), _take_over, shopper)


def _take_over(w: _World, shopper: _Shopper) -> None:
    """Ask for refunds on the account's recent delivered orders, each from another place."""
    cfg, r, now = w.cfg, w.rng, w.now
    assert shopper.history is not None
    recent = [
        o
        for o in shopper.history
        if o.delivered_at is not None and o.delivered_at <= now and now - o.created_at < 45 * DAY
    ]
    if len(recent) < 2:  # too little to steal yet
        w.at(now + 2 * DAY, _take_over, shopper)
        return
    targets = recent[-r.randint(*cfg.hop_refunds) :]
    burst = r.uniform(*cfg.hop_burst_hours) * HOUR
    devices = [w.device(), w.device(), ""]
    city = shopper.account.city
    for t, order in zip(sorted(now + r.uniform(0, burst) for _ in targets), targets, strict=True):
        city = r.choice([c for c in w.city_codes if c != city])
        ip = w.ipv4(_HOSTING if r.random() < 0.6 else _RESIDENTIAL)
        reason = w.reason((_NAD, 35), (_DAMAGED, 25), (_INR, 25), (_OTHER, 15))
        refund = _Refund(
            int(t), order.amount, reason, False, "account_hopping", context=(r.choice(devices), ip, city)
        )
        w.at(t, _request_refund, order, refund)


def _start_bnpl_cashout(w: _World) -> None:
    """Per shop: from a turning point, BNPL orders by fresh and mule accounts that are refunded
    within three days; their rate rises until the shop stops."""
    cfg, r = w.cfg, w.rng
    for i, shop in enumerate(w.bnpl_shops):
        turn = w.staggered(i, len(w.bnpl_shops), lead=WEEK, margin=10 * DAY)
        span = r.uniform(*cfg.bnpl_days) * DAY
        n = r.randint(*cfg.bnpl_orders_per_shop)
        mules = [
            w.account(turn - r.uniform(HOUR, 10 * DAY) if r.random() < 0.6 else w.aged_created())
            for _ in range(max(3, n // 3))
        ]
        for _ in range(n):  # density rising linearly over the span
            w.at(turn + span * math.sqrt(r.random()), _bnpl_order, shop, r.choice(mules))


def _bnpl_order(w: _World, shop: _Merchant, acct: _Account) -> SimRecord:
    """A pricey BNPL order at the turned shop, mostly never shipped, refunded within 72 h;
    the shop marks some as returned."""
    r = w.rng
    amount = max(2_999, int(r.lognormvariate(math.log(15_000), 0.5)) // 100 * 100 + 99)
    order = w.order(
        acct, shop, "bnpl_cashout", category=_PHYSICAL, amount=amount, payment=pb.PAYMENT_METHOD_BNPL
    )
    if r.random() < 0.7:
        w.cancel(order)
    refunds = []
    if r.random() < w.cfg.bnpl_refund_rate:
        reason = w.reason((_CHANGED_MIND, 40), (_NAD, 20), (_OTHER, 20), (_DUPLICATE, 20))
        at = w.now + int(r.uniform(1, 72) * HOUR)
        refunds.append(_Refund(at, order.amount, reason, r.random() < 0.4, "bnpl_cashout"))
    return w.launch(order, refunds)


def _start_refund_exceeds_order(w: _World) -> None:
    """Established accounts asking for more than they paid, at once or in split partials."""
    cfg = w.cfg
    for _ in range(cfg.exceeds_accounts):
        _enroll(
            w,
            w.account(w.aged_created()),
            "refund_exceeds_order",
            cfg.abuser_orders_per_week,
            w.physical_merchants,
            _exceeding_refunds,
        )


def _exceeding_refunds(w: _World, order: _Order) -> list[_Refund]:
    cfg, r = w.cfg, w.rng
    if order.delivered_at is None or r.random() >= cfg.exceeds_claim_rate:
        return []
    at = w.daytime(order.delivered_at + r.uniform(0.5, 6) * DAY)
    if r.random() >= cfg.exceeds_split_share:  # "and the shipping, and my trouble"
        amount = int(order.amount * r.uniform(1.1, 2.5))
        reason = w.reason((_DAMAGED, 40), (_NAD, 40), (_OTHER, 20))
        return [_Refund(at, amount, reason, r.random() < 0.5, "refund_exceeds_order")]
    refunds: list[_Refund] = []
    total = 0
    while total <= order.amount * 1.02 or len(refunds) < 2:  # each part below the order
        part = int(order.amount * r.uniform(0.35, 0.7))
        reason = w.reason((_DAMAGED, 40), (_NAD, 40), (_OTHER, 20))
        refunds.append(_Refund(at, max(1, part), reason, False, "refund_exceeds_order"))
        total += part
        at = w.daytime(at + r.uniform(0.1, 3) * DAY)
    return refunds


def _start_serial_changed_mind(w: _World) -> None:
    """Established accounts refunding delivered orders as "changed my mind", never returning."""
    cfg = w.cfg
    for _ in range(cfg.changed_mind_accounts):
        _enroll(
            w,
            w.account(w.aged_created()),
            "serial_changed_mind",
            cfg.abuser_orders_per_week,
            w.physical_merchants,
            _unreturned_refunds,
        )


def _unreturned_refunds(w: _World, order: _Order) -> list[_Refund]:
    r = w.rng
    if order.delivered_at is None or r.random() >= w.cfg.changed_mind_claim_rate:
        return []
    at = w.daytime(order.delivered_at + r.uniform(1, 12) * DAY)
    amount = order.amount if r.random() < 0.85 else int(order.amount * r.uniform(0.5, 0.9))
    return [_Refund(at, amount, _CHANGED_MIND, False, "serial_changed_mind")]


# Called in this order at the start of a run; each creates its actors and schedules them. Keyed
# by the scenario it starts (SimConfig.exclude leaves one out; ordinary shoppers always run).
_STARTERS: dict[str, Callable[[_World], None]] = {
    "legit_normal": _start_ordinary,
    "legit_household_device": _start_legit_household_device,
    "legit_traveller": _start_legit_traveller,
    "legit_gift_card_buyer": _start_legit_gift_card_buyer,
    "legit_defective_batch": _start_legit_defective_batch,
    "serial_inr_delivered": _start_serial_inr_delivered,
    "cashout_ring": _start_cashout_ring,
    "account_farm": _start_account_farm,
    "account_hopping": _start_account_hopping,
    "bnpl_cashout": _start_bnpl_cashout,
    "refund_exceeds_order": _start_refund_exceeds_order,
    "serial_changed_mind": _start_serial_changed_mind,
    "legit_bracketing": _start_legit_bracketing,
    "legit_porch_theft": _start_legit_porch_theft,
    "legit_campus_ip": _start_legit_campus_ip,
    "legit_digital_mistake": _start_legit_digital_mistake,
    "legit_bnpl_returner": _start_legit_bnpl_returner,
}


# --- Public entry points ----------------------------------------------------------------------


def simulate(cfg: SimConfig, *, progress: bool = False) -> Iterator[SimRecord]:
    """Yield the run's records in non-decreasing time; a progress bar on stderr if asked."""
    world = _World(cfg)
    for scenario, start in _STARTERS.items():
        if scenario not in cfg.exclude or scenario == "legit_normal":
            start(world)
    if not progress:
        yield from world.run()
        return
    bar = _Progress(sys.stderr, world.origin, world.end)
    count = 0
    for count, record in enumerate(world.run(), 1):
        if count & 0xFFF == 0:
            bar.update(world.now, count)
        yield record
    bar.finish(count)


def records(cfg: SimConfig, *, progress: bool = False) -> Iterator[Record]:
    """The run as history records (model/records.py): what a model owner's export holds."""
    for rec in simulate(cfg, progress=progress):
        yield rec.record()


class _Progress:
    """A plain-text progress bar over simulated time, redrawn at most five times a second."""

    WIDTH = 30

    def __init__(self, stream: TextIO, start: int, end: int) -> None:
        self.stream, self.start, self.span = stream, start, end - start
        self.began = self.last = time.monotonic()

    def update(self, now: int, count: int) -> None:
        tick = time.monotonic()
        if tick - self.last >= 0.2:
            self.last = tick
            self._draw(min(1.0, (now - self.start) / self.span), count, tick)

    def finish(self, count: int) -> None:
        self._draw(1.0, count, time.monotonic())
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, done: float, count: int, tick: float) -> None:
        filled = int(done * self.WIDTH)
        rate = count / max(tick - self.began, 1e-9)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done:4.0%} {count:,} records {rate:,.0f}/s"
        )
        self.stream.flush()


def _summary(counts: Counter[tuple[str, int]], stream: TextIO) -> None:
    """Per scenario: events, legitimate checks, abusive checks."""
    stream.write(f"{'scenario':<24}{'events':>10}{'checks 0':>10}{'checks 1':>10}\n")
    for scenario in (*LEGIT_SCENARIOS, *ABUSE_SCENARIOS):
        stream.write(
            f"{scenario:<24}{counts[scenario, -1]:>10}{counts[scenario, 0]:>10}{counts[scenario, 1]:>10}\n"
        )
    legit = sum(n for (_, label), n in counts.items() if label == 0)
    abuse = sum(n for (_, label), n in counts.items() if label == 1)
    stream.write(
        f"records {sum(counts.values()):,}; checks {legit + abuse:,}, "
        f"abusive {abuse / max(legit + abuse, 1):.1%}\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: simulate, write JSON lines to --out (or just count), print the scenario mix."""
    parser = argparse.ArgumentParser(
        prog="python -m model.simulate",
        description="Simulate marketplace refund traffic as JSON lines (see model/README.md).",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help="about this many records (default: the default config, ~385k)",
    )
    parser.add_argument("--seed", type=int, default=SimConfig.seed)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="history file to write (model/README.md, History format; .gz compresses; default: none)",
    )
    parser.add_argument("--exclude", nargs="*", default=[], metavar="SCENARIO", help="scenarios to leave out")
    args = parser.parse_args(argv)
    knobs: dict[str, Any] = {"seed": args.seed, "exclude": tuple(args.exclude)}
    cfg = SimConfig(**knobs) if args.events is None else SimConfig.scaled(args.events, **knobs)
    counts: Counter[tuple[str, int]] = Counter()

    def counted() -> Iterator[Record]:
        for rec in simulate(cfg, progress=True):
            counts[rec.scenario, rec.label] += 1
            yield rec.record()

    if args.out is not None:
        write_records(counted(), args.out)
    else:
        for _ in counted():
            pass
    _summary(counts, sys.stderr)


if __name__ == "__main__":
    main()
