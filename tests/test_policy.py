"""Decisions: thresholds from the manifest, guard rules that only raise, the degraded policy."""

from __future__ import annotations

import pytest

from gate import policy
from gate.features import FEATURE_INDEX, FEATURE_NAMES

T = policy.Thresholds(hold=0.5, reject=0.9)
CALM = policy.DegradedPolicy(approve_below_minor=1000)


def facts(**kw: object) -> policy.Facts:
    base: dict[str, object] = {
        "amount_minor": 500,
        "order_amount_minor": 1000,
        "order_amount_asked": 500,
        "blocked": (),
        "degraded": False,
    }
    base.update(kw)
    return policy.Facts(**base)  # type: ignore[arg-type]


def attribution(**by_feature: float) -> list[float]:
    out = [0.0] * len(FEATURE_NAMES)
    for name, value in by_feature.items():
        out[FEATURE_INDEX[name]] = value
    return out


@pytest.mark.parametrize(
    ("score", "decision"),
    [(0.1, policy.APPROVE), (0.5, policy.HOLD), (0.89, policy.HOLD), (0.9, policy.REJECT)],
)
def test_score_thresholds(score: float, decision: str) -> None:
    behaviour = attribution(acct_inr_delivered_30d=1.0)
    verdict = policy.decide(score, T, facts(), CALM, lambda: policy.code_weights(behaviour))
    assert verdict.decision == decision


def test_approve_has_no_reasons_and_never_asks_for_attribution() -> None:
    def explain() -> list[float]:
        raise AssertionError("attribution computed for an approval")

    assert policy.decide(0.1, T, facts(), CALM, explain) == policy.Verdict(policy.APPROVE, ())


def test_refund_exceeding_the_order_is_rejected_whatever_the_score() -> None:
    verdict = policy.decide(0.01, T, facts(amount_minor=1001), CALM)
    assert verdict == policy.Verdict(policy.REJECT, ("REFUND_EXCEEDS_ORDER",))


def test_split_refunds_adding_up_past_the_order_are_rejected() -> None:
    verdict = policy.decide(0.01, T, facts(order_amount_asked=1200), CALM)
    assert verdict.decision == policy.REJECT
    assert verdict.reasons[0] == "REFUND_EXCEEDS_ORDER"


def test_blocklist_rejects() -> None:
    verdict = policy.decide(0.01, T, facts(blocked=("account", "ip")), CALM)
    assert verdict.decision == policy.REJECT
    assert verdict.reasons == ("BLOCKLISTED_ACCOUNT", "BLOCKLISTED_IP")


def test_model_reasons_come_from_the_features_that_pushed_the_score_up() -> None:
    explain = attribution(
        acct_inr_delivered_30d=0.9,
        not_received_but_delivered=0.5,
        dev_accounts_7d=0.3,
        m_refunds_24h=0.2,
        log10_amount=-2.0,
    )
    verdict = policy.decide(0.6, T, facts(), CALM, lambda: policy.code_weights(explain))
    assert verdict.reasons == (
        "SERIAL_NOT_RECEIVED",
        "NOT_RECEIVED_BUT_DELIVERED",
        "MANY_ACCOUNTS_ON_DEVICE",
    )


def test_degraded_approves_only_small_calm_refunds() -> None:
    small = policy.decide(0.1, T, facts(degraded=True, amount_minor=999), CALM)
    large = policy.decide(0.1, T, facts(degraded=True, amount_minor=1000), CALM)
    unscored = policy.decide(None, T, facts(degraded=True), CALM)
    assert small == policy.Verdict(policy.APPROVE, ("FEATURES_UNAVAILABLE",))
    assert large.decision == policy.HOLD and "FEATURES_UNAVAILABLE" in large.reasons
    assert unscored.decision == policy.HOLD


def test_degraded_never_lowers_a_reject() -> None:
    behaviour = attribution(dev_accounts_7d=1.0)
    verdict = policy.decide(0.95, T, facts(degraded=True), CALM, lambda: policy.code_weights(behaviour))
    assert verdict.decision == policy.REJECT


def test_model_never_rejects_on_request_context_alone() -> None:
    context = attribution(account_age_days=0.8, log10_amount=0.5, not_received_but_delivered=0.4)
    verdict = policy.decide(0.95, T, facts(), CALM, lambda: policy.code_weights(context))
    assert verdict.decision == policy.HOLD
    assert "NEW_ACCOUNT" in verdict.reasons


def test_model_rejects_with_behavioural_evidence_among_its_reasons() -> None:
    evidence = attribution(account_age_days=0.8, dev_accounts_24h=0.3)
    verdict = policy.decide(0.95, T, facts(), CALM, lambda: policy.code_weights(evidence))
    assert verdict.decision == policy.REJECT
    assert verdict.reasons == ("NEW_ACCOUNT", "MANY_ACCOUNTS_ON_DEVICE")


def test_reject_without_behaviour_is_allowed_when_the_limit_is_off() -> None:
    context = attribution(account_age_days=0.8)
    limits = policy.RejectLimits(needs_behaviour=False)
    verdict = policy.decide(0.95, T, facts(), CALM, lambda: policy.code_weights(context), limits)
    assert verdict.decision == policy.REJECT


def test_a_returned_item_is_at_most_held() -> None:
    evidence = attribution(acct_refunds_24h=1.0)
    verdict = policy.decide(0.99, T, facts(item_returned=True), CALM, lambda: policy.code_weights(evidence))
    assert verdict.decision == policy.HOLD


def test_a_returned_item_is_rejected_when_a_guard_rule_fires() -> None:
    verdict = policy.decide(0.99, T, facts(item_returned=True, amount_minor=1500), CALM)
    assert verdict.decision == policy.REJECT
    assert verdict.reasons[0] == "REFUND_EXCEEDS_ORDER"


def test_a_returned_item_may_be_rejected_when_the_limit_is_off() -> None:
    evidence = attribution(acct_refunds_24h=1.0)
    limits = policy.RejectLimits(returned_at_most_hold=False)
    verdict = policy.decide(
        0.99, T, facts(item_returned=True), CALM, lambda: policy.code_weights(evidence), limits
    )
    assert verdict.decision == policy.REJECT


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        policy.Thresholds(hold=0.9, reject=0.5)
    with pytest.raises(ValueError):
        policy.Thresholds(hold=0.0, reject=0.5)


def test_a_reason_weighs_the_evidence_of_all_its_features() -> None:
    explain = attribution(account_age_days=0.5, acct_refunds_24h=0.3, dev_refunds_1h=0.2, ip_refunds_24h=0.1)
    verdict = policy.decide(0.6, T, facts(), CALM, lambda: policy.code_weights(explain))
    assert verdict.reasons[:2] == ("HIGH_REFUND_VELOCITY", "NEW_ACCOUNT")
