"""The committed default bundle, on a world it never trained on (another seed, shifted mixes and
parameters, honest behaviours held out of its training), decided exactly as the gate decides:
it catches the abuse, spares honest customers of every kind, rejects almost none of them, and
explains each abuse scenario by that scenario's own signal.

The sample is simulated afresh and replayed through the gate's own feature path
(model.dataset.build_dataset) against the session's redis-server; decisions and reason codes
come from gate.policy.decide with the bundle's thresholds and path attribution (model.evaluate).
The floors are the product targets (model/README.md) less a margin for a sample this small.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from gate.bundle import load_bundle
from gate.devredis import RedisProcess
from model.dataset import build_dataset
from model.evaluate import (
    SCENARIO_SIGNALS,
    Decisions,
    decide_rows,
    reason_table,
    summarize,
    top_reason,
)
from model.simulate import ABUSE_SCENARIOS, LEGIT_SCENARIOS, SimConfig, records
from model.train import BUNDLES, HELD_OUT_BEHAVIOURS

SAMPLE = SimConfig(seed=11).resized(0.4).shifted(11)  # training used seed 7, without the held-out


@dataclass(frozen=True)
class Decided:
    """The gate's decisions on the sample's refunds in its window (after the honest history)."""

    y: np.ndarray
    scenario: np.ndarray
    decisions: Decisions


@pytest.fixture(scope="module")
def decided(redis_proc: RedisProcess) -> Iterator[Decided]:
    client = redis_proc.client()
    client.flushall()
    data = asyncio.run(build_dataset(records(SAMPLE), redis_proc.url, as_of=SAMPLE.export_at))
    bundle = load_bundle(BUNDLES / "current")
    rows = np.flatnonzero(data.at >= SAMPLE.start.timestamp())
    yield Decided(
        data.y[rows],
        data.scenario[rows],
        decide_rows(bundle.model, bundle.thresholds, data, rows, velocity=True, degraded_policy=None),
    )
    client.flushall()
    client.close()


def test_signals_cover_every_abuse_scenario() -> None:
    assert set(SCENARIO_SIGNALS) == set(ABUSE_SCENARIOS)


def test_the_sample_has_the_behaviours_the_model_never_trained_on(decided: Decided) -> None:
    for name in HELD_OUT_BEHAVIOURS:
        assert (decided.scenario == name).sum() >= 30, name


def test_each_abuse_scenario_is_explained_by_its_own_signal(decided: Decided) -> None:
    table = reason_table(decided.scenario, decided.decisions)
    wrong = {s: table.get(s) for s, codes in SCENARIO_SIGNALS.items() if top_reason(table, s) not in codes}
    assert not wrong, f"most frequent first reason names another signal: {wrong}"


def test_default_bundle_catches_abuse_on_an_unseen_world(decided: Decided) -> None:
    summary = summarize(decided.y, decided.scenario, decided.decisions)
    assert summary["abuse_held_or_rejected"] >= 0.70, summary
    for name in ABUSE_SCENARIOS:
        assert summary["by_scenario"][name]["held_or_rejected"] >= 0.35, (name, summary["by_scenario"][name])


def test_default_bundle_spares_honest_customers_of_every_kind(decided: Decided) -> None:
    summary = summarize(decided.y, decided.scenario, decided.decisions)
    assert summary["legit_held_or_rejected"] <= 0.01, summary
    assert summary["legit_rejected"] <= 0.002, summary
    for name in LEGIT_SCENARIOS:
        segment = summary["by_scenario"].get(name)
        if segment and segment["rows"] >= 200:
            assert segment["held_or_rejected"] <= 0.06, (name, segment)
            assert segment["rejected"] <= 0.01, (name, segment)
