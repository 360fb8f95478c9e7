"""Domain sense the model cannot unlearn: the committed default bundle, on both engines, never
raises its score when only a monotone feature (gate.features: monotone) moves in its safe
direction, e.g. the item came back, the account is older, the account's history is deeper."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gate.bundle import decode_row
from gate.features import FEATURE_INDEX, FEATURE_NAMES, MONOTONE
from gate.scoring import ENGINE_COMPILED, ENGINE_LIGHTGBM, Model, load_model
from model.train import BUNDLES

CURRENT = (BUNDLES / "current").resolve()
GOLDEN = [decode_row(r) for r in json.loads((CURRENT / "golden.json").read_text())["rows"]]
# Binary and share features move within [0, 1]; counts and days by up to this much.
BOUNDED = {"item_returned", "first_inr_claim", "acct_returned_share_30d", "m_returned_share_7d"}


def _model(engine: str) -> Model:
    so = CURRENT / "model.so" if engine == ENGINE_COMPILED else None
    model = load_model(CURRENT / "model.txt", so, feature_names=FEATURE_NAMES)
    assert model.engine == engine, model.fallback_reason
    return model


MODELS = {engine: _model(engine) for engine in (ENGINE_COMPILED, ENGINE_LIGHTGBM)}


def test_the_bundle_was_trained_with_the_spec_constraints() -> None:
    card = json.loads((CURRENT / "manifest.json").read_text())["model_card"]
    trained = {name: c["direction"] for name, c in card["training"]["monotone_constraints"].items()}
    assert trained == MONOTONE


def _safe_move(name: str, value: float, step: float) -> float:
    """``value`` moved by ``step`` (>= 0) in the direction that must never raise the score."""
    direction = -MONOTONE[name]  # +1 feature: safe is down; -1 feature: safe is up
    if name in BOUNDED:
        target = 1.0 if direction > 0 else 0.0
        return value + (target - value) * min(step, 1.0)
    moved = value + direction * step * 50.0
    return max(moved, 0.0)  # counts, ages and ratios are never negative


@pytest.mark.parametrize("engine", [ENGINE_COMPILED, ENGINE_LIGHTGBM])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    row=st.integers(0, len(GOLDEN) - 1),
    name=st.sampled_from(sorted(MONOTONE)),
    step=st.floats(0.0, 4.0, allow_nan=False),
)
def test_moving_a_monotone_feature_in_its_safe_direction_never_raises_the_score(
    engine: str, row: int, name: str, step: float
) -> None:
    model = MODELS[engine]
    x = list(GOLDEN[row])
    i = FEATURE_INDEX[name]
    if math.isnan(x[i]):
        x[i] = 0.0 if MONOTONE[name] < 0 else 1.0  # a known value to move from
    before = model.score(x)
    x[i] = _safe_move(name, x[i], step)
    after = model.score(x)
    assert after <= before + 1e-12, (name, x[i], before, after)
