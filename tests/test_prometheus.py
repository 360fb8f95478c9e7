"""A real Prometheus (Debian's `prometheus` package) scraping a real gate every second, with the
shipped recording and alerting rules loaded: what the dashboard and the alerts compute is true
from the first decision, at start-up and after a hot reload.

A counter series that first appears at n hides those n events from increase(); the gate exports
every series the rules read at 0 before it decides anything (start-up, each model load). Queries
are evaluated at the timestamp of the latest scrape, where increase() needs no extrapolation, so
the expected numbers are exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from gate.devredis import RedisProcess, free_port
from model.synthetic import build_synthetic_bundle
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc
from tests.conftest import make_request
from tests.gateproc import GateProcess, start_gate_process

OBS = Path(__file__).resolve().parent.parent / "deploy" / "observability"
RULE_FILES = (OBS / "recording-rules.yml", OBS / "alerts.yml")
INSTALL = (
    "prometheus is not on PATH. Install it (Debian/Ubuntu: apt-get install -y prometheus); "
    ".ci/run installs it when missing."
)
REJECTS = 'refundgate_decisions_total{decision="REJECT", model_version="%s"}'


@dataclass
class Prometheus:
    """A prometheus server on a free port, its data in a temporary directory."""

    proc: subprocess.Popen[bytes]
    url: str

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        with urllib.request.urlopen(
            f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=5
        ) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single sample of ``expr`` (None while it has none)."""
        result = self.query(expr, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, predicate: Any, timeout_s: float = 30.0) -> float:
        """Poll ``expr`` until its value satisfies ``predicate`` (a scrape or rule evaluation
        every second); return that value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.value(expr)
            if value is not None and predicate(value):
                return value
            assert time.monotonic() < deadline, f"{expr} never satisfied the condition (last: {value})"
            time.sleep(0.2)

    def latest_scrape(self, series: str) -> float:
        """Timestamp (s) of the latest sample of one raw series."""
        ts = self.value(f"timestamp({series})")
        assert ts is not None, series
        return ts


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(INSTALL)
    return path


@pytest.fixture
def models(bundle_dir: Path, tmp_path: Path) -> Path:
    """A model directory whose `current` link points at the test bundle."""
    directory = tmp_path / "models"
    directory.mkdir()
    (directory / "current").symlink_to(bundle_dir)
    return directory


@pytest.fixture
def gate_admin(redis_proc: RedisProcess, rdb: object, models: Path) -> Iterator[tuple[GateProcess, str]]:
    admin = f"127.0.0.1:{free_port()}"
    gate = start_gate_process(
        redis_proc.url, models, "--metrics-listen", admin, "--model-poll-s", "0.05", "--allow-client-time"
    )
    yield gate, admin
    gate.stop()


@pytest.fixture
def prometheus(gate_admin: tuple[GateProcess, str], tmp_path: Path) -> Iterator[Prometheus]:
    _, admin = gate_admin
    binary = prometheus_binary()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(p) for p in RULE_FILES],
                "scrape_configs": [{"job_name": "refund-gate", "static_configs": [{"targets": [admin]}]}],
            }
        )
    )
    log = Path(tempfile.mkstemp(prefix="prometheus-", suffix=".log", dir=tmp_path)[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=out,
            cwd=tmp_path,
            env={**os.environ, "HOME": str(tmp_path)},
        )
    prom = Prometheus(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        with urllib.request.urlopen(f"{prom.url}/api/v1/rules", timeout=5) as r:
            groups = json.load(r)["data"]["groups"]
        assert {g["file"] for g in groups} == {str(p) for p in RULE_FILES}, "shipped rules not loaded"
        yield prom
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def decide(target: str, requests: list[pb.CheckRequest]) -> list[pb.CheckResponse]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RefundGateStub(channel)
        return [stub.Check(r, timeout=5) for r in requests]


def guard_rejects(tag: str, n: int) -> list[pb.CheckRequest]:
    """Refunds above their order amount: REJECT by the guard rule, whatever the model says."""
    return [
        make_request(
            refund_id=f"rf:{tag}-{i}", order_id=f"o:{tag}-{i}", amount_minor=6000, order_amount_minor=5000
        )
        for i in range(n)
    ]


def test_every_series_the_rules_read_is_scraped_at_0_before_any_call(prometheus: Prometheus) -> None:
    for series in (
        REJECTS % "test-model-1",
        'refundgate_decisions_total{decision="APPROVE", model_version="test-model-1", degraded="true"}',
        'refundgate_check_duration_seconds_count{outcome="REJECT"}',
        'refundgate_check_duration_seconds_count{outcome="RESOURCE_EXHAUSTED"}',
        'refundgate_record_events_duration_seconds_count{outcome="OK"}',
        "refundgate_shed_total",
        'refundgate_model_loads_total{result="refused"}',
        "refundgate_breaker_opens_total",
    ):
        assert prometheus.wait_for(f"sum({series})", lambda v: True) == 0.0, series


def test_increase_counts_the_first_rejects_and_the_reject_rule_sees_them(
    gate_admin: tuple[GateProcess, str], prometheus: Prometheus
) -> None:
    gate, _ = gate_admin
    raw = REJECTS % "test-model-1" + "[10m]"
    prometheus.wait_for(f"sum({REJECTS % 'test-model-1'})", lambda v: v == 0)  # a scrape saw 0

    responses = decide(
        gate.target, guard_rejects("prom", 5) + [make_request(refund_id=f"rf:ok-{i}") for i in range(3)]
    )
    rejects = sum(r.decision == pb.DECISION_REJECT for r in responses)
    assert rejects >= 5

    prometheus.wait_for(f"sum({REJECTS % 'test-model-1'})", lambda v: v == rejects)
    at = prometheus.latest_scrape(REJECTS.replace('"}', '", degraded="false"}') % "test-model-1")
    assert prometheus.value(f"sum(increase({raw}))", at=at) == rejects
    assert (
        prometheus.value(
            'sum(increase(refundgate_check_duration_seconds_count{outcome="REJECT"}[10m]))', at=at
        )
        == rejects
    )

    ratio = prometheus.wait_for(
        'job_model_version:refundgate_decisions_reject:ratio_increase1h{model_version="test-model-1"}',
        lambda v: v > 0,
    )
    assert ratio == pytest.approx(rejects / len(responses), rel=1e-9)
    assert prometheus.wait_for(
        'job:refundgate_check_duration_seconds_count:rate5m{job="refund-gate"}', lambda v: v > 0
    )


def test_a_hot_reloaded_model_version_is_counted_from_its_first_decision(
    gate_admin: tuple[GateProcess, str], prometheus: Prometheus, models: Path, tmp_path: Path
) -> None:
    gate, _ = gate_admin
    decide(gate.target, guard_rejects("v1", 2))
    new = build_synthetic_bundle(tmp_path / "bundle-2", version="test-model-2")
    link = models / "current.new"
    link.symlink_to(new)
    link.replace(models / "current")

    # The new version's series are scraped at 0 before it decides anything.
    prometheus.wait_for(f"sum({REJECTS % 'test-model-2'})", lambda v: v == 0)
    responses = decide(gate.target, guard_rejects("v2", 5))
    assert {r.model_version for r in responses} == {"test-model-2"}

    prometheus.wait_for(f"sum({REJECTS % 'test-model-2'})", lambda v: v == 5)
    at = prometheus.latest_scrape(REJECTS.replace('"}', '", degraded="false"}') % "test-model-2")
    assert prometheus.value(f"sum(increase({REJECTS % 'test-model-2'}[10m]))", at=at) == 5
    ratio = prometheus.wait_for(
        'job_model_version:refundgate_decisions_reject:ratio_increase1h{model_version="test-model-2"}',
        lambda v: v > 0,
    )
    assert ratio == 1.0
