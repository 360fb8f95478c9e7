"""A Node caller (npm @grpc/grpc-js, tests/node/check.js) against a real gate process: a decision,
its retry, and an INVALID_ARGUMENT whose BadRequest it decodes with google-proto-files' protos.

Runs where `node` exists; .ci/run installs Node and the packages (npm ci in tests/node)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gate.devredis import RedisProcess
from tests.gateproc import start_gate_process

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"

# Outside CI a machine without node skips these; in CI (.ci/run installs node) a missing node fails.
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None and os.environ.get("CI") != "true",
    reason="node is not installed (.ci/run installs it)",
)


@pytest.fixture(scope="module")
def node_steps(redis_proc: RedisProcess, bundle_dir: Path) -> dict[str, dict[str, object]]:
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("tests/node has no node_modules: run `npm ci --prefix tests/node` (.ci/run does)")
    redis_proc.client().flushall()
    gate = start_gate_process(redis_proc.url, bundle_dir)
    try:
        out = subprocess.run(
            ["node", str(NODE_DIR / "check.js"), gate.target, str(ROOT / "proto")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        gate.stop()
    assert out.returncode == 0, out.stderr
    steps = [json.loads(line) for line in out.stdout.splitlines()]
    return {step.pop("step"): step for step in steps}


def test_node_gets_a_decision(node_steps: dict[str, dict[str, object]]) -> None:
    decided = node_steps["decided"]
    assert decided["decision"] in ("DECISION_APPROVE", "DECISION_HOLD_FOR_REVIEW", "DECISION_REJECT")
    assert decided["model_version"] == "test-model-1"
    assert decided["degraded"] is False and decided["replayed"] is False


def test_a_node_retry_with_the_same_refund_id_gets_the_same_decision(
    node_steps: dict[str, dict[str, object]],
) -> None:
    decided, retried = node_steps["decided"], node_steps["retried"]
    assert retried["replayed"] is True
    assert (retried["decision"], retried["decision_id"]) == (decided["decision"], decided["decision_id"])


def test_node_decodes_the_bad_request_details(node_steps: dict[str, dict[str, object]]) -> None:
    invalid = node_steps["invalid"]
    assert invalid["code"] == "INVALID_ARGUMENT"
    [detail] = invalid["details"]  # type: ignore[misc]
    assert detail["type"] == "google.rpc.BadRequest"
    assert [v["field"] for v in detail["field_violations"]] == ["currency"]
