"""The traffic simulator: deterministic, time-ordered, valid for the gate, and every scenario
leaves the signal it claims to."""

from __future__ import annotations

import ipaddress
import itertools
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gate.validation import validate_check, validate_events
from model.records import parse_line, read_records, record_line
from model.simulate import (
    ABUSE_SCENARIOS,
    LEGIT_SCENARIOS,
    SimConfig,
    SimRecord,
    main,
    simulate,
)
from refundgate.v1 import refund_gate_pb2 as pb

ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
HOUR, DAY = 3_600, 86_400
# About 80k records: every scenario, a few seconds.
SMALL = SimConfig(seed=11).resized(0.2)


@dataclass
class Run:
    """One simulation, indexed for the tests."""

    records: list[SimRecord]
    checks: list[tuple[SimRecord, pb.CheckRequest]] = field(default_factory=list)
    placed: dict[str, pb.Event] = field(default_factory=dict)
    placed_scenario: dict[str, str] = field(default_factory=dict)
    delivered: dict[str, pb.Event] = field(default_factory=dict)
    outcomes: list[tuple[SimRecord, pb.Event]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for rec in self.records:
            if rec.check is not None:
                self.checks.append((rec, rec.check))
                continue
            assert rec.event is not None
            if rec.event.type == pb.EVENT_TYPE_ORDER_PLACED:
                self.placed[rec.event.order_id] = rec.event
                self.placed_scenario[rec.event.order_id] = rec.scenario
            elif rec.event.type == pb.EVENT_TYPE_ORDER_DELIVERED:
                self.delivered[rec.event.order_id] = rec.event
            else:
                self.outcomes.append((rec, rec.event))

    def of(self, scenario: str) -> list[pb.CheckRequest]:
        return [c for rec, c in self.checks if rec.scenario == scenario]


@pytest.fixture(scope="module")
def run() -> Run:
    return Run(list(simulate(SMALL)))


def by_account(checks: Iterable[pb.CheckRequest]) -> dict[str, list[pb.CheckRequest]]:
    out: dict[str, list[pb.CheckRequest]] = defaultdict(list)
    for c in checks:
        out[c.account_id].append(c)
    return out


def minutes_after_order(c: pb.CheckRequest) -> float:
    return (c.requested_at.seconds - c.order_created_at.seconds) / 60


# --- Determinism, order, size -----------------------------------------------------------------


def test_same_seed_gives_byte_identical_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    main(["--events", "12000", "--seed", "5", "--out", str(first)])
    main(["--events", "12000", "--seed", "5", "--out", str(second)])
    data = first.read_bytes()
    assert data == second.read_bytes()
    lines = data.splitlines()
    assert 10_000 < len(lines) < 16_000  # --events is approximate (coarser at tiny sizes)
    for line in lines[:2000]:
        assert record_line(parse_line(line)) == line
    assert not read_records([first]).bad  # the history format, every line good
    err = capsys.readouterr().err
    assert "100%" in err and "cashout_ring" in err  # progress bar, then the scenario mix


def test_different_seed_gives_different_records() -> None:
    def head(seed: int) -> list[str]:
        cfg = SimConfig(seed=seed).resized(0.05)
        return [record_line(r.record()) for r in itertools.islice(simulate(cfg), 3000)]

    assert head(1) == head(1)
    assert head(1) != head(2)


def test_records_come_in_time_order_and_at_matches_the_message(run: Run) -> None:
    times = [rec.at for rec in run.records]
    assert times == sorted(times)
    start = SMALL.start.timestamp()
    origin = start - SMALL.warmup_weeks * 7 * DAY
    assert origin <= times[0] and times[-1] < SMALL.export_at
    window_end = start + SMALL.weeks * 7 * DAY
    after = [rec for rec in run.records if rec.at >= window_end]
    assert after and all(r.event is not None and r.event.type == pb.EVENT_TYPE_REFUND_OUTCOME for r in after)
    for rec in run.records:
        stamp = rec.check.requested_at if rec.check is not None else rec.event.occurred_at
        assert stamp.seconds == rec.at and stamp.nanos == 0


def test_resized_scales_counts_and_keeps_rates() -> None:
    big = SimConfig().resized(2.0)
    assert big.n_accounts == 40_000 and big.cashout_rings == 6 and big.n_merchants == 1_000
    assert big.refund_rate == SimConfig().refund_rate
    assert SimConfig().resized(0.001).cashout_rings == 1
    with pytest.raises(ValueError, match="positive"):
        SimConfig().resized(0)


# --- Contract ---------------------------------------------------------------------------------


def test_every_message_passes_the_gate_validation(run: Run) -> None:
    for rec in run.records:
        if rec.check is not None:
            validate_check(rec.check, now_s=0.0, allow_client_time=True, skew_s=0.0)
        else:
            batch = pb.RecordEventsRequest(events=[rec.event])
            validate_events(batch, now_s=0.0, allow_client_time=True, skew_s=0.0, max_events=1)


def test_every_id_matches_the_contract(run: Run) -> None:
    for _, c in run.checks:
        for value in (c.refund_id, c.account_id, c.order_id, c.merchant_id):
            assert ID.fullmatch(value), value
        assert c.device_id == "" or ID.fullmatch(c.device_id)
    for rec in run.records:
        if (ev := rec.event) is not None:
            for value in (ev.event_id, ev.account_id, ev.merchant_id, ev.order_id):
                assert ID.fullmatch(value), value
            assert ev.device_id == "" or ID.fullmatch(ev.device_id)
    prefixes = {c.refund_id.split(":")[0] for _, c in run.checks}
    prefixes |= {c.account_id.split(":")[0] for _, c in run.checks}
    assert prefixes == {"rf", "acct"}


def test_refund_and_event_ids_are_unique(run: Run) -> None:
    refund_ids = [c.refund_id for _, c in run.checks]
    event_ids = [rec.event.event_id for rec in run.records if rec.event is not None]
    assert len(set(refund_ids)) == len(refund_ids)
    assert len(set(event_ids)) == len(event_ids)


def test_check_amounts_enums_times_and_network(run: Run) -> None:
    unknown_age = no_device = ipv6 = 0
    currencies: Counter[str] = Counter()
    for _, c in run.checks:
        assert c.amount_minor > 0 and c.order_amount_minor > 0
        currencies[c.currency] += 1
        assert c.reason != pb.REFUND_REASON_UNSPECIFIED
        assert c.item_category != pb.ITEM_CATEGORY_UNSPECIFIED
        assert c.payment_method != pb.PAYMENT_METHOD_UNSPECIFIED
        assert c.delivery_status != pb.DELIVERY_STATUS_UNSPECIFIED
        assert c.HasField("order_created_at") and c.HasField("requested_at")
        assert c.order_created_at.seconds <= c.requested_at.seconds
        if c.HasField("account_created_at"):
            assert c.account_created_at.seconds <= c.order_created_at.seconds
        else:
            unknown_age += 1
        assert re.fullmatch(r"[A-Z]{3}", c.geo_city)
        ipv6 += ipaddress.ip_address(c.ip).version == 6
        no_device += c.device_id == ""
    n = len(run.checks)
    assert set(currencies) == {"EUR", "USD"} and currencies["EUR"] > 5 * currencies["USD"]
    assert 0.01 < unknown_age / n < 0.1
    assert 0.005 < ipv6 / n < 0.1
    assert 0.01 < no_device / n < 0.15


def test_order_placed_events_carry_the_order(run: Run) -> None:
    for ev in run.placed.values():
        assert ev.amount_minor > 0 and re.fullmatch(r"[A-Z]{3}", ev.currency)
        assert ev.item_category != pb.ITEM_CATEGORY_UNSPECIFIED
        assert ev.payment_method != pb.PAYMENT_METHOD_UNSPECIFIED
        assert ev.account_id and ev.merchant_id and ev.ip and re.fullmatch(r"[A-Z]{3}", ev.geo_city)
        assert ipaddress.ip_address(ev.ip)
    with_age = sum(ev.HasField("account_created_at") for ev in run.placed.values())
    assert with_age / len(run.placed) > 0.9


def test_order_placed_precedes_refunds_of_the_order_and_matches_them(run: Run) -> None:
    placed_before: set[str] = set()
    for rec in run.records:
        if rec.event is not None and rec.event.type == pb.EVENT_TYPE_ORDER_PLACED:
            placed_before.add(rec.event.order_id)
        elif rec.check is not None:
            c = rec.check
            assert c.order_id in placed_before
            ev = run.placed[c.order_id]
            assert (ev.account_id, ev.merchant_id, ev.currency) == (c.account_id, c.merchant_id, c.currency)
            assert (ev.amount_minor, ev.item_category, ev.payment_method) == (
                c.order_amount_minor,
                c.item_category,
                c.payment_method,
            )
            assert ev.occurred_at.seconds == c.order_created_at.seconds
            assert ev.account_created_at == c.account_created_at


def test_deliveries_follow_orders_and_match_the_status(run: Run) -> None:
    for order_id, ev in run.delivered.items():
        assert ev.occurred_at.seconds >= run.placed[order_id].occurred_at.seconds
    statuses = Counter(c.delivery_status for _, c in run.checks)
    assert set(statuses) == {
        pb.DELIVERY_STATUS_NOT_SHIPPED,
        pb.DELIVERY_STATUS_IN_TRANSIT,
        pb.DELIVERY_STATUS_DELIVERED,
        pb.DELIVERY_STATUS_UNKNOWN,
    }
    for _, c in run.checks:
        delivered = run.delivered.get(c.order_id)
        if c.delivery_status == pb.DELIVERY_STATUS_DELIVERED:
            assert delivered is not None
            assert delivered.occurred_at.seconds <= c.requested_at.seconds
        elif delivered is not None:
            assert delivered.occurred_at.seconds > c.requested_at.seconds


def test_outcomes_reference_earlier_refunds_and_arrive_late_and_incomplete(run: Run) -> None:
    seen: dict[str, tuple[pb.CheckRequest, int]] = {}
    by_label: dict[int, Counter[int]] = {0: Counter(), 1: Counter()}
    for rec in run.records:
        if rec.check is not None:
            seen[rec.check.refund_id] = (rec.check, rec.label)
        elif rec.event is not None and rec.event.type == pb.EVENT_TYPE_REFUND_OUTCOME:
            ev = rec.event
            check, label = seen[ev.refund_id]
            assert ev.account_id == check.account_id and ev.order_id == check.order_id
            assert ev.amount_minor == check.amount_minor > 0
            assert ev.occurred_at.seconds >= check.requested_at.seconds + HOUR
            by_label[label][ev.outcome] += 1
    assert set(by_label[0]) == {pb.REFUND_OUTCOME_PAID, pb.REFUND_OUTCOME_REVIEW_APPROVED}
    bad = {pb.REFUND_OUTCOME_CONFIRMED_ABUSE, pb.REFUND_OUTCOME_CHARGEBACK, pb.REFUND_OUTCOME_REVIEW_REJECTED}
    assert bad <= set(by_label[1])
    abusive = sum(label for _, label in seen.values())
    assert 0.2 < sum(by_label[1][o] for o in bad) / abusive < 0.6  # late and incomplete
    assert by_label[1][pb.REFUND_OUTCOME_PAID] > 0  # undetected abuse


# --- Scenarios and labels ---------------------------------------------------------------------


def test_every_scenario_is_present_with_its_label(run: Run) -> None:
    labels: dict[str, Counter[int]] = defaultdict(Counter)
    for rec in run.records:
        labels[rec.scenario][rec.label] += 1
        assert (rec.label == -1) == (rec.event is not None)
    assert set(labels) == set(LEGIT_SCENARIOS) | set(ABUSE_SCENARIOS)
    for name in LEGIT_SCENARIOS:
        expected = {-1} if name == "legit_gift_card_buyer" else {-1, 0}
        assert set(labels[name]) == expected, name
    for name in ABUSE_SCENARIOS:
        assert set(labels[name]) == {-1, 1}, name
        assert labels[name][1] >= 20, name


def test_default_size_has_hundreds_of_each_abuse_and_a_realistic_share() -> None:
    counts: Counter[str] = Counter()
    legit = 0
    for rec in simulate(SimConfig()):
        if rec.label == 1:
            counts[rec.scenario] += 1
        legit += rec.label == 0
    assert set(counts) == set(ABUSE_SCENARIOS)
    assert min(counts.values()) >= 150, counts
    assert 0.04 < counts.total() / (counts.total() + legit) < 0.11


def test_legit_not_received_claims_in_transit_and_lost(run: Run) -> None:
    in_transit = run.of("legit_inr_in_transit")
    assert {c.reason for c in in_transit} == {pb.REFUND_REASON_ITEM_NOT_RECEIVED}
    tracked = [c for c in in_transit if c.delivery_status != pb.DELIVERY_STATUS_UNKNOWN]
    assert tracked and all(c.delivery_status == pb.DELIVERY_STATUS_IN_TRANSIT for c in tracked)
    # The parcel arrives after the claim (unless after the end of the window).
    assert sum(c.order_id in run.delivered for c in tracked) > 0.7 * len(tracked)
    lost = run.of("legit_inr_lost")
    assert {c.reason for c in lost} == {pb.REFUND_REASON_ITEM_NOT_RECEIVED}
    assert {c.delivery_status for c in lost} == {pb.DELIVERY_STATUS_IN_TRANSIT, pb.DELIVERY_STATUS_UNKNOWN}
    assert not any(c.order_id in run.delivered for c in lost)


def test_legit_household_shares_a_device_between_accounts(run: Run) -> None:
    accounts_on: dict[str, set[str]] = defaultdict(set)
    for order_id, ev in run.placed.items():
        if run.placed_scenario[order_id] == "legit_household_device" and ev.device_id:
            accounts_on[ev.device_id].add(ev.account_id)
    shared = {d for d, accts in accounts_on.items() if len(accts) >= 2}
    assert shared and max(len(a) for a in accounts_on.values()) <= 5
    checks = run.of("legit_household_device")
    assert sum(c.device_id in shared for c in checks) > 0.5 * len(checks)


def test_legit_traveller_changes_ip_and_city(run: Run) -> None:
    seen: dict[str, list[tuple[int, str, str]]] = defaultdict(list)  # time, ip, city
    for order_id, ev in run.placed.items():
        if run.placed_scenario[order_id] == "legit_traveller":
            seen[ev.account_id].append((ev.occurred_at.seconds, ev.ip, ev.geo_city))
    refunds = run.of("legit_traveller")
    for c in refunds:
        seen[c.account_id].append((c.requested_at.seconds, c.ip, c.geo_city))
    cities = {acct: Counter(city for _, _, city in acts) for acct, acts in seen.items()}
    assert statistics.median(len(c) for c in cities.values()) >= 3
    hops = 0
    for acts in seen.values():
        acts.sort()
        hops += sum(b[0] - a[0] < DAY and a[1] != b[1] and a[2] != b[2] for a, b in itertools.pairwise(acts))
    assert hops >= 10  # new IP and city within a day, as a hopping account would look
    home = {acct: c.most_common(1)[0][0] for acct, c in cities.items()}
    away = sum(c.geo_city != home[c.account_id] for c in refunds)
    assert 0.1 * len(refunds) < away < 0.9 * len(refunds)


def test_legit_gift_card_buyers_buy_digital_often_and_never_refund(run: Run) -> None:
    orders = Counter(
        ev.account_id for oid, ev in run.placed.items() if run.placed_scenario[oid] == "legit_gift_card_buyer"
    )
    assert statistics.median(orders.values()) >= 10
    digital = [
        run.placed[oid].item_category == pb.ITEM_CATEGORY_DIGITAL_GOODS
        for oid, s in run.placed_scenario.items()
        if s == "legit_gift_card_buyer"
    ]
    assert sum(digital) > 0.85 * len(digital)
    assert not {c.account_id for _, c in run.checks} & set(orders)


def test_legit_big_merchant_has_many_refunds_at_a_normal_ratio(run: Run) -> None:
    checks = run.of("legit_big_merchant")
    (merchant,) = {c.merchant_id for c in checks}
    refunds = Counter(c.merchant_id for _, c in run.checks)
    orders = Counter(ev.merchant_id for ev in run.placed.values())
    assert orders.most_common(1)[0][0] == merchant
    assert merchant in {m for m, _ in refunds.most_common(3)}
    overall = len(run.checks) / len(run.placed)
    assert 0.5 * overall < refunds[merchant] / orders[merchant] < 1.5 * overall


def test_legit_partial_refunds_stay_within_the_order(run: Run) -> None:
    asked: Counter[str] = Counter()
    for c in run.of("legit_partial"):
        assert c.amount_minor < c.order_amount_minor
        asked[c.order_id] += c.amount_minor
    assert all(total <= run.placed[oid].amount_minor for oid, total in asked.items())
    assert any(n > 1 for n in Counter(c.order_id for c in run.of("legit_partial")).values())


def test_legit_normal_refunds_are_mostly_returned_with_some_risky_signals(run: Run) -> None:
    checks = run.of("legit_normal")
    damaged = [c for c in checks if c.reason in (pb.REFUND_REASON_DAMAGED, pb.REFUND_REASON_NOT_AS_DESCRIBED)]
    assert sum(c.item_returned for c in damaged) > 0.5 * len(damaged)
    assert any(
        c.item_category == pb.ITEM_CATEGORY_DIGITAL_GOODS and minutes_after_order(c) < 60 for c in checks
    )
    assert any(c.reason == pb.REFUND_REASON_CHANGED_MIND and not c.item_returned for c in checks)


def test_abuse_signals_also_appear_in_legit_traffic(run: Run) -> None:
    legit = [c for rec, c in run.checks if rec.label == 0]
    assert (
        sum(
            c.reason == pb.REFUND_REASON_ITEM_NOT_RECEIVED
            and c.delivery_status == pb.DELIVERY_STATUS_DELIVERED
            for c in legit
        )
        > 20
    )
    assert sum(c.payment_method == pb.PAYMENT_METHOD_BNPL for c in legit) > 100
    assert (
        sum(
            c.HasField("account_created_at")
            and c.requested_at.seconds - c.account_created_at.seconds < 14 * DAY
            for c in legit
        )
        > 30
    )
    # Abusers place orders they never ask a refund for.
    refunded = {c.order_id for _, c in run.checks}
    for name in ABUSE_SCENARIOS:
        quiet = [oid for oid, s in run.placed_scenario.items() if s == name and oid not in refunded]
        assert quiet, name


def test_serial_inr_claims_delivered_orders_again_and_again(run: Run) -> None:
    checks = run.of("serial_inr_delivered")
    for c in checks:
        assert c.reason == pb.REFUND_REASON_ITEM_NOT_RECEIVED and not c.item_returned
        assert c.delivery_status == pb.DELIVERY_STATUS_DELIVERED
        assert run.delivered[c.order_id].occurred_at.seconds <= c.requested_at.seconds
    assert statistics.mean(len(v) for v in by_account(checks).values()) >= 3


def test_cashout_ring_refunds_digital_goods_within_the_hour(run: Run) -> None:
    checks = run.of("cashout_ring")
    for c in checks:
        assert c.item_category == pb.ITEM_CATEGORY_DIGITAL_GOODS and not c.item_returned
        assert 0 < minutes_after_order(c) <= 60
        if c.HasField("account_created_at"):
            assert c.requested_at.seconds - c.account_created_at.seconds < 21 * DAY
    shops = {c.merchant_id for c in checks}
    assert len(shops) == SMALL.cashout_rings
    honest = {run.placed_scenario[oid] for oid, ev in run.placed.items() if ev.merchant_id in shops}
    assert honest - {"cashout_ring"}  # the shop also has ordinary customers
    devices = Counter(c.device_id for c in checks if c.device_id)
    assert devices.most_common(1)[0][1] >= 5


def test_account_farm_accounts_are_young_and_share_a_device_or_ip(run: Run) -> None:
    farm = {oid: ev for oid, ev in run.placed.items() if run.placed_scenario[oid] == "account_farm"}
    accounts_on: dict[str, set[str]] = defaultdict(set)
    for ev in farm.values():
        accounts_on[ev.device_id].add(ev.account_id)
        accounts_on[ev.ip].add(ev.account_id)
    checks = run.of("account_farm")
    for c in checks:
        assert len(accounts_on[c.device_id] | accounts_on[c.ip]) >= 5
        assert c.amount_minor <= c.order_amount_minor
        assert c.reason != pb.REFUND_REASON_ITEM_NOT_RECEIVED
        if c.HasField("account_created_at"):
            assert c.requested_at.seconds - c.account_created_at.seconds < 30 * DAY
    assert statistics.median(c.amount_minor for c in checks) < 2_500  # each refunds a little


def test_account_hopping_bursts_refunds_across_ips_and_cities(run: Run) -> None:
    bursts = by_account(run.of("account_hopping"))
    assert bursts
    for checks in bursts.values():
        times = [c.requested_at.seconds for c in checks]
        assert max(times) - min(times) <= SMALL.hop_burst_hours[1] * HOUR
        hops = sorted(checks, key=lambda c: c.requested_at.seconds)
        for before, after in itertools.pairwise(hops):
            assert before.ip != after.ip and before.geo_city != after.geo_city
        assert all(
            c.account_created_at.seconds < SMALL.start.timestamp() - 30 * DAY
            for c in checks
            if c.HasField("account_created_at")
        )
    assert statistics.mean(len(v) for v in bursts.values()) >= 3


def test_bnpl_cashout_spikes_the_shops_refund_ratio(run: Run) -> None:
    checks = run.of("bnpl_cashout")
    for c in checks:
        assert c.payment_method == pb.PAYMENT_METHOD_BNPL
        assert minutes_after_order(c) <= 72 * 60
    for shop in {c.merchant_id for c in checks}:
        cashout = [c for c in checks if c.merchant_id == shop]
        turn = min(c.order_created_at.seconds for c in cashout)
        stop = max(c.requested_at.seconds for c in cashout)

        def ratio(lo: float, hi: float, shop: str = shop) -> float:
            orders = sum(
                lo <= ev.occurred_at.seconds < hi for ev in run.placed.values() if ev.merchant_id == shop
            )
            refunds = sum(lo <= c.requested_at.seconds < hi for _, c in run.checks if c.merchant_id == shop)
            return refunds / orders

        # Honest customers before the turn, pay-later returners among them (legit_bnpl_returner).
        assert ratio(turn, stop) > 2 * ratio(0, turn)


def test_refund_exceeds_order_at_once_or_in_split_parts(run: Run) -> None:
    per_order: dict[str, list[pb.CheckRequest]] = defaultdict(list)
    for c in run.of("refund_exceeds_order"):
        per_order[c.order_id].append(c)
    end = SMALL.start.timestamp() + SMALL.weeks * 7 * DAY
    single = split = 0
    for parts in per_order.values():
        amount = parts[0].order_amount_minor
        if parts[0].amount_minor > amount:
            assert len(parts) == 1
            single += 1
            continue
        assert all(p.amount_minor <= amount for p in parts)
        if sum(p.amount_minor for p in parts) > amount:
            split += 1
        else:  # the remaining parts would come after the end of the window
            assert parts[-1].requested_at.seconds > end - 4 * DAY
    assert single >= 3 and split >= 3


def test_serial_changed_mind_never_returns(run: Run) -> None:
    checks = run.of("serial_changed_mind")
    for c in checks:
        assert c.reason == pb.REFUND_REASON_CHANGED_MIND and not c.item_returned
    assert statistics.mean(len(v) for v in by_account(checks).values()) >= 3


# --- Honest behaviour that looks like abuse -------------------------------------------------


def test_bracketers_send_most_pieces_back_from_one_shop(run: Run) -> None:
    checks = run.of("legit_bracketing")
    assert len(checks) > 100
    assert sum(c.item_returned for c in checks) / len(checks) > 0.8
    pairs = Counter((c.account_id, c.merchant_id) for c in checks)
    assert max(pairs.values()) >= 2  # several pieces of one item at one shop
    fit = {pb.REFUND_REASON_CHANGED_MIND, pb.REFUND_REASON_NOT_AS_DESCRIBED, pb.REFUND_REASON_DAMAGED}
    assert sum(c.reason in fit for c in checks) / len(checks) > 0.85  # "doesn't fit", mostly


def test_porch_theft_is_one_delivered_not_received_claim_of_an_old_account(run: Run) -> None:
    claims = [
        c
        for c in run.of("legit_porch_theft")
        if c.reason == pb.REFUND_REASON_ITEM_NOT_RECEIVED
        and c.delivery_status == pb.DELIVERY_STATUS_DELIVERED
    ]
    assert len(claims) > 20
    ages = [(c.requested_at.seconds - c.account_created_at.seconds) / DAY for c in claims]
    assert min(ages) > 365
    per_account = Counter(c.account_id for c in claims)
    assert sum(1 for n in per_account.values() if n == 1) / len(per_account) > 0.9


def test_honest_accounts_have_history_before_the_window(run: Run) -> None:
    start = SMALL.start.timestamp()
    before = [e for e in run.placed.values() if e.occurred_at.seconds < start]
    assert before, "no warm-up history"
    abusive = {s for s in ABUSE_SCENARIOS}
    assert not [
        o
        for o, e in run.placed.items()
        if e.occurred_at.seconds < start and run.placed_scenario[o] in abusive
    ]


def test_defective_batch_spikes_one_shops_returned_refunds(run: Run) -> None:
    checks = run.of("legit_defective_batch")
    assert len(checks) >= 8  # one batch at this size
    shops = Counter(c.merchant_id for c in checks)
    assert shops.most_common(1)[0][1] >= 8
    assert sum(c.item_returned for c in checks) / len(checks) > 0.6


def test_campus_ip_carries_many_accounts_some_new(run: Run) -> None:
    accounts_by_ip: dict[str, set[str]] = defaultdict(set)
    for c in run.of("legit_campus_ip"):
        accounts_by_ip[c.ip].add(c.account_id)
    assert max(len(a) for a in accounts_by_ip.values()) >= 10


def test_digital_mistakes_are_quick_refunds_of_old_accounts(run: Run) -> None:
    quick = [c for c in run.of("legit_digital_mistake") if c.item_category == pb.ITEM_CATEGORY_DIGITAL_GOODS]
    assert len(quick) > 20
    assert statistics.median(minutes_after_order(c) for c in quick) < 60
    assert min((c.requested_at.seconds - c.account_created_at.seconds) / DAY for c in quick) > 1


def test_bnpl_returners_pay_later_and_send_back(run: Run) -> None:
    checks = run.of("legit_bnpl_returner")
    assert len(checks) > 50
    bnpl = [c for c in checks if c.payment_method == pb.PAYMENT_METHOD_BNPL]
    assert len(bnpl) / len(checks) > 0.6
    assert sum(c.item_returned for c in bnpl) / len(bnpl) > 0.6


def test_excluded_scenarios_do_not_run() -> None:
    cfg = SimConfig(seed=3, exclude=("legit_bracketing", "legit_bnpl_returner")).resized(0.05)
    seen = {r.scenario for r in simulate(cfg) if r.check is not None}
    assert "legit_bracketing" not in seen and "legit_bnpl_returner" not in seen
    with pytest.raises(ValueError, match="unknown scenarios"):
        SimConfig(exclude=("no_such",))


def test_shifted_world_moves_counts_and_rates_but_keeps_the_window() -> None:
    base = SimConfig(exclude=("legit_bracketing",))
    shifted = base.shifted(99)
    assert shifted.seed == 99 and shifted.exclude == ()
    assert shifted.weeks == base.weeks and shifted.outcome_tail_days == base.outcome_tail_days
    assert shifted.n_accounts != base.n_accounts and shifted.refund_rate != base.refund_rate
    assert all(0 < getattr(shifted, n) < 1 for n in ("refund_rate", "bracket_returned_rate", "mobile_share"))
    assert shifted == base.shifted(99)
