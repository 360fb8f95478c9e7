"""Reading the decision log with its outcomes: features by name, outcomes joined by refund.

The decision stream (gate/decisionlog.py) holds feature rows as values with a ``feature_spec``
id; the hash ``<stream>:feature_specs`` maps each id to its ordered names. The outcomes stream
holds every REFUND_OUTCOME that RecordEvents counted, by hashed refund id; a retried event may
appear twice, so one entry per hashed event id is kept. `joined_records` yields each decision as
one self-contained JSON object: features as ``{name: value}`` (null for NaN) and ``outcomes`` as
``[{"at", "outcome", "event"}]`` in time order, the outcome by its RefundOutcome name. That is
the line format of `refund-gate model export-decisions`, and what `model/decisions.py` trains on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import redis

from gate.backtest import read_stream
from gate.decisionlog import decisions_key, outcomes_key, specs_key
from refundgate.v1 import refund_gate_pb2 as pb

Outcome = dict[str, Any]  # {"at": float, "outcome": "REFUND_OUTCOME_...", "event": hash}


def read_specs(client: redis.Redis, prefix: str) -> dict[str, list[str]]:
    """Feature spec id -> ordered feature names, as the gates logging to ``prefix`` wrote them."""
    raw = cast(dict[bytes, bytes], client.hgetall(specs_key(prefix)))
    return {k.decode(): [str(n) for n in json.loads(v)] for k, v in raw.items()}


def read_outcomes(client: redis.Redis, prefix: str) -> dict[str, list[Outcome]]:
    """Hashed refund id -> its outcomes, oldest first, one per event."""
    return group_outcomes(
        json.loads(raw) for raw in read_stream(client, outcomes_key(prefix), field=b"o") if raw
    )


def group_outcomes(entries: Iterable[Mapping[str, Any]]) -> dict[str, list[Outcome]]:
    """Outcome entries (as OutcomeLog writes them) grouped by refund, deduplicated by event."""
    seen: set[str] = set()
    by_refund: dict[str, list[Outcome]] = {}
    for entry in entries:
        event = str(entry["event"])
        if event in seen:
            continue
        seen.add(event)
        outcome = pb.RefundOutcome.Name(int(entry["outcome"]))
        by_refund.setdefault(str(entry["refund"]), []).append(
            {"at": float(entry["at"]), "outcome": outcome, "event": event}
        )
    for outcomes in by_refund.values():
        outcomes.sort(key=lambda o: o["at"])
    return by_refund


def named_features(body: Mapping[str, Any], specs: Mapping[str, Sequence[str]]) -> dict[str, Any] | None:
    """A logged decision's features by name, or None when its names are unknown (no spec id,
    or an id missing from the specs hash). Already-named features are returned as they are."""
    features = body.get("features")
    if isinstance(features, dict):
        return features
    names = specs.get(str(body.get("feature_spec")))
    if names is None or not isinstance(features, list) or len(features) != len(names):
        return None
    return dict(zip(names, features, strict=True))


def join(
    body: dict[str, Any], specs: Mapping[str, Sequence[str]], outcomes: Mapping[str, list[Outcome]]
) -> dict[str, Any]:
    """One decision with its features by name (when known) and its refund's outcomes."""
    named = named_features(body, specs)
    if named is not None:
        body["features"] = named
    body["outcomes"] = outcomes.get(str(body.get("refund")), [])
    return body


def joined_records(client: redis.Redis, prefix: str) -> Iterator[dict[str, Any]]:
    """Every logged decision, oldest first, joined (see the module docstring). Unreadable
    records are yielded as ``{"unreadable": reason}``."""
    specs = read_specs(client, prefix)
    outcomes = read_outcomes(client, prefix)
    for raw in read_stream(client, decisions_key(prefix)):
        try:
            body = json.loads(raw)
        except ValueError:
            yield {"unreadable": "not valid JSON"}
            continue
        if not isinstance(body, dict):
            yield {"unreadable": "not a JSON object"}
            continue
        yield join(body, specs, outcomes)
