"""Every expected failure of every command, as a real process: one line on stderr, never a
traceback, and the exit status the help documents (gate.cli.EXIT_STATUS)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gate.cli import BROKEN_PIPE, EXIT_STATUS, FAILED, INTERRUPTED, USAGE
from gate.devredis import RedisProcess, free_port
from tests.gateproc import CLI

DOWN = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The single line on stderr (and proof that it is single and no traceback)."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("refund-gate"), lines
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_every_exit_status_is_documented_in_the_help() -> None:
    documented = {int(line.split()[0]) for line in EXIT_STATUS.splitlines()[1:] if line.split()[0].isdigit()}
    assert documented == {0, FAILED, USAGE, INTERRUPTED, BROKEN_PIPE}
    assert "exit status:" in run_cli("--help").stdout


def test_malformed_json_is_one_line_naming_the_field() -> None:
    out = run_cli("check", "--json", '{"refund_id": 5}')
    assert out.returncode == USAGE
    line = one_line(out)
    assert "--json" in line and "refund_id" in line


def test_json_that_is_not_json_is_one_line() -> None:
    out = run_cli("check", "--json", "{")
    assert out.returncode == USAGE
    assert "--json" in one_line(out)


def test_an_unknown_enum_value_lists_the_valid_ones() -> None:
    out = run_cli("check", "--reason", "nope")
    assert out.returncode == USAGE
    line = one_line(out)
    assert "--reason" in line and "DAMAGED" in line and "CHANGED_MIND" in line


def test_an_unknown_command_is_one_line() -> None:
    out = run_cli("frobnicate")
    assert out.returncode == USAGE
    assert "frobnicate" in one_line(out)


def test_check_against_no_gate_prints_the_error_and_one_line() -> None:
    out = run_cli("check", "--target", f"127.0.0.1:{free_port()}", "--timeout-ms", "500")
    assert out.returncode == FAILED
    assert json.loads(out.stdout)["code"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert "Check answered" in one_line(out)


@pytest.mark.parametrize("command", [("blocklist", "list"), ("blocklist", "show", "--ip", "1.2.3.4")])
def test_blocklist_with_redis_down_is_one_line(command: tuple[str, ...]) -> None:
    out = run_cli(*command, "--redis-url", DOWN)
    assert out.returncode == FAILED
    assert DOWN in one_line(out)


def test_decisions_with_redis_down_is_one_line() -> None:
    out = run_cli("decisions", "tail", env={"GATE_REDIS_URL": DOWN})
    assert out.returncode == FAILED
    assert DOWN in one_line(out)


def test_redis_password_never_reaches_the_error_line() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    out = run_cli("blocklist", "list", "--redis-url", url)
    assert out.returncode == FAILED
    line = one_line(out)
    assert "hunter2" not in line and ":***@" in line


def test_an_out_of_range_variable_names_the_variable_and_the_flag_once() -> None:
    out = run_cli("serve", env={"GATE_BUDGET_MS": "-1"})
    assert out.returncode == USAGE
    line = one_line(out)
    assert "GATE_BUDGET_MS" in line and "--budget-ms" in line
    assert "score_reserve" not in line  # no cascade from the one mistake


def test_an_out_of_range_flag_names_the_variable_and_the_flag() -> None:
    out = run_cli("serve", "--admission-sample-ms", "0")
    assert out.returncode == USAGE
    line = one_line(out)
    assert "GATE_ADMISSION_SAMPLE_MS" in line and "--admission-sample-ms" in line
    assert "admission_window" not in line


def test_an_unparseable_variable_is_one_line() -> None:
    out = run_cli("serve", env={"GATE_WORKERS": "many"})
    assert out.returncode == USAGE
    line = one_line(out)
    assert "GATE_WORKERS" in line and "--workers" in line and "'many'" in line


def test_bad_settings_refuse_the_blocklist_too() -> None:
    out = run_cli("blocklist", "list", env={"GATE_KEY_PREFIX": "{x}"})
    assert out.returncode == USAGE
    assert "GATE_KEY_PREFIX" in one_line(out)


def test_serve_on_a_busy_port_is_one_line(busy_port: int, bundle_dir: Path, redis_proc: RedisProcess) -> None:
    out = run_cli(
        "serve",
        "--listen",
        f"127.0.0.1:{busy_port}",
        "--admin-listen",
        "",
        "--metrics-listen",
        "",
        "--model-dir",
        str(bundle_dir),
        "--redis-url",
        redis_proc.url,
    )
    assert out.returncode == USAGE
    # The JSON log lines (settings, error) go to stderr as well; the user's line is the last.
    assert "Traceback" not in out.stderr, out.stderr
    [line] = [x for x in out.stderr.splitlines() if not x.startswith("{")]
    assert line.startswith("refund-gate: cannot bind") and str(busy_port) in line and "GATE_LISTEN" in line


def test_a_missing_bundle_directory_is_one_line(tmp_path: Path) -> None:
    out = run_cli("model", "validate", str(tmp_path / "nowhere"))
    assert out.returncode == USAGE
    assert "nowhere" in one_line(out)


def test_output_into_a_closed_pipe_is_one_line(bundle_dir: Path) -> None:
    """`refund-gate model validate DIR | head -0`: the reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [*CLI, "model", "validate", str(bundle_dir)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == BROKEN_PIPE
    assert proc.stderr.splitlines() == ["refund-gate: the output's reader went away (broken pipe); stopped"]


def test_ctrl_c_while_following_the_decision_log_exits_quietly(
    redis_proc: RedisProcess, rdb: redis.Redis
) -> None:
    rdb.xadd("rg:decisions", {"d": json.dumps({"decision_id": "d-1"})})
    proc = subprocess.Popen(
        [*CLI, "decisions", "tail", "--follow", "--redis-url", redis_proc.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["decision_id"] == "d-1"  # it is following now
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == INTERRUPTED
    assert err == ""
