"""The user's door, as real processes: serve, check, blocklist, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gate.devredis import RedisProcess, free_port
from tests.gateproc import CLI, start_gate_process


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


@pytest.fixture
def served(redis_proc: RedisProcess, bundle_dir: Path, rdb: object) -> Iterator[str]:
    gate = start_gate_process(redis_proc.url, bundle_dir)
    yield gate.target
    messages = [line["message"] for line in gate.stop()]
    assert "settings" in messages and "shutting down" in messages


def test_check_one_liner_prints_a_decision(served: str) -> None:
    out = run_cli(
        "check",
        "--target",
        served,
        "--account-id",
        "acct:1",
        "--order-id",
        "ord:1",
        "--merchant-id",
        "m:1",
        "--amount",
        "1999",
        "--reason",
        "ITEM_NOT_RECEIVED",
    )
    assert out.returncode == 0, out.stderr
    resp = json.loads(out.stdout)
    assert resp["decision"] in ("DECISION_APPROVE", "DECISION_HOLD_FOR_REVIEW", "DECISION_REJECT")
    assert resp["model_version"] == "test-model-1"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_gate_serves_on_either_event_loop(
    redis_proc: RedisProcess, bundle_dir: Path, rdb: object, loop: str
) -> None:
    gate = start_gate_process(redis_proc.url, bundle_dir, "--event-loop", loop)
    try:
        out = run_cli(
            "check",
            "--target",
            gate.target,
            "--account-id",
            "acct:2",
            "--order-id",
            "ord:2",
            "--merchant-id",
            "m:2",
            "--amount",
            "999",
        )
    finally:
        lines = gate.stop()
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model_version"] == "test-model-1"
    [settings] = [line for line in lines if line["message"] == "settings"]
    assert settings["settings"]["event_loop"] == loop


def test_an_unknown_event_loop_is_refused_at_start() -> None:
    out = run_cli("serve", "--event-loop", "tokio")
    assert out.returncode != 0 and "event_loop" in out.stderr


def test_check_from_json_reports_bad_fields(served: str) -> None:
    body = json.dumps(
        {
            "refund_id": "rf:1",
            "account_id": "a",
            "order_id": "o",
            "merchant_id": "m",
            "amount_minor": "-5",
            "order_amount_minor": "500",
            "currency": "EURO",
        }
    )
    out = run_cli("check", "--target", served, "--json", body)
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["code"] == "INVALID_ARGUMENT"
    assert {v["field"] for v in err["field_violations"]} == {"amount_minor", "currency"}


def test_blocklist_round_trip(redis_proc: RedisProcess, rdb: object) -> None:
    env = {"GATE_REDIS_URL": redis_proc.url}
    assert run_cli("blocklist", "add", "--account", "acct:9", "--note", "fraud ring", env=env).returncode == 0
    shown = json.loads(run_cli("blocklist", "show", "--account", "acct:9", env=env).stdout)
    assert shown["kind"] == "account" and shown["note"] == "fraud ring"
    listed = run_cli("blocklist", "list", env=env).stdout
    assert "acct:9" not in listed and shown["id_hash"] in listed
    assert "unblocked" in run_cli("blocklist", "remove", "--account", "acct:9", env=env).stdout
    assert json.loads(run_cli("blocklist", "show", "--account", "acct:9", env=env).stdout) is None


def test_serve_refuses_a_bad_bundle_loudly(tmp_path: Path, redis_proc: RedisProcess) -> None:
    (tmp_path / "manifest.json").write_text("{")
    out = run_cli(
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--model-dir",
        str(tmp_path),
        "--redis-url",
        redis_proc.url,
    )
    assert out.returncode == 2
    assert "model bundle refused" in out.stderr and "not valid JSON" in out.stderr


def test_serve_refuses_a_model_dir_without_current(tmp_path: Path, redis_proc: RedisProcess) -> None:
    out = run_cli(
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--model-dir",
        str(tmp_path),
        "--redis-url",
        redis_proc.url,
    )
    assert out.returncode == 2
    assert "no model bundle there" in out.stderr


def test_serve_refuses_bad_settings() -> None:
    out = run_cli("serve", "--budget-ms", "0")
    assert out.returncode == 2 and "budget_ms" in out.stderr
