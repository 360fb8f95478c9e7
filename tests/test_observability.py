"""The dashboard and the Prometheus rules in deploy/observability/, checked against a real gate.

Every metric a panel or rule names must be on a real gate's /metrics, with the labels and label
values the queries match on; the dashboard must be importable; promtool must accept the rules and
pass their unit tests (alerts.test.yml).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest
import redis

from gate.devredis import RedisProcess, free_port
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc
from tests.conftest import make_request
from tests.faultproxy import FaultProxy
from tests.gateproc import start_gate_process

OBS = Path(__file__).resolve().parent.parent / "deploy" / "observability"
DASHBOARD = OBS / "grafana-dashboard.json"
RULE_FILES = (OBS / "recording-rules.yml", OBS / "alerts.yml")
RULE_TESTS = OBS / "alerts.test.yml"
INSTALL_PROMTOOL = (
    "promtool is not on PATH. Install it (Debian/Ubuntu: "
    "apt-get install -y prometheus, which provides /usr/bin/promtool); "
    ".ci/run installs it when missing."
)

# Labels Prometheus adds when it scrapes; not on /metrics itself.
SCRAPE_LABELS = {"job", "instance"}
METRIC = re.compile(r"(?<![\w:])(refundgate_[a-z0-9_]+)(?![\w:])")
SELECTOR = re.compile(r"(?<![\w:])(refundgate_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Series = dict[str, list[tuple[dict[str, str], float]]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def referenced_text() -> str:
    """Everything the dashboard and the rules query, as one text to search."""
    return "\n".join([*dashboard_exprs(), *(p.read_text() for p in RULE_FILES)])


def scrape(address: str) -> Series:
    """/metrics over HTTP → {metric name: [(labels, value) of each series]}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        out.setdefault(name, []).append((dict(LABEL.findall(labels)), float(value)))
    return out


def values_of(series: Series, name: str, label: str) -> set[str]:
    return {labels[label] for labels, _ in series.get(name, []) if label in labels}


def call_all(stub: pb_grpc.RefundGateStub, requests: Iterable[pb.CheckRequest]) -> list[grpc.StatusCode]:
    """Send the requests at once; return each call's status code."""
    pending = [stub.Check.future(r, timeout=5) for r in requests]
    codes = []
    for f in pending:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())  # type: ignore[attr-defined]
    return codes


def drive_every_metric(redis_proc: RedisProcess, bundle_dir: Path, tmp_path: Path) -> tuple[Series, Series]:
    """Run a real gate (through a fault proxy to Redis) into every state the dashboard and the
    alerts look at; return the scrape taken while Redis was cut off and the final one."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "current").symlink_to(bundle_dir)
    (models / "shadow").symlink_to(bundle_dir)  # a shadow model: its agreement is on the dashboard
    admin = f"127.0.0.1:{free_port()}"
    proxy = FaultProxy(redis_proc.port).start()
    gate = start_gate_process(
        f"redis://127.0.0.1:{proxy.port}/0",
        bundle_dir,
        "--model-dir",
        str(models),
        "--metrics-listen",
        admin,
        "--model-poll-s",
        "0.05",
        "--max-concurrency",
        "2",
        "--breaker-failures",
        "3",
        "--decision-log-queue",
        "1",
        "--budget-ms",
        "25",
    )
    try:
        with grpc.insecure_channel(gate.target) as channel:
            stub = pb_grpc.RefundGateStub(channel)
            first = make_request(refund_id="rf:obs-1", order_id="o:obs-1")
            stub.Check(first)
            # Refund above the order amount: REJECT by the guard rule, whatever the score.
            stub.Check(
                make_request(
                    refund_id="rf:obs-2", order_id="o:obs-2", amount_minor=6000, order_amount_minor=5000
                )
            )
            assert stub.Check(first).replayed  # answered from the stored decision
            with pytest.raises(grpc.RpcError):
                stub.Check(make_request(refund_id="rf:obs-bad", currency="bad"))
            with pytest.raises(grpc.RpcError):
                pb_grpc.RefundGateStub(channel).RecordEvents(pb.RecordEventsRequest())

            # Overload: two slots, each held ~10 ms by Redis latency, twenty calls at once.
            proxy.set_mode("latency", latency_s=0.010)
            codes = call_all(
                stub, (make_request(refund_id=f"rf:obs-s{i}", order_id=f"o:obs-s{i}") for i in range(20))
            )
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes

            # Redis cut off: timeouts, then the breaker opens; degraded decisions (HOLD for
            # amounts above the degraded approve limit); the decision log's queue of 1 overflows.
            proxy.set_mode("blackhole")
            for i in range(8):
                resp = stub.Check(
                    make_request(
                        refund_id=f"rf:obs-d{i}",
                        order_id=f"o:obs-d{i}",
                        amount_minor=6000,
                        order_amount_minor=9000,
                    ),
                    timeout=5,
                )
                assert resp.degraded
            cut_off = scrape(admin)
            proxy.set_mode("pass")

        # A broken shadow bundle replaces it: the watcher refuses it (and keeps serving).
        shadow = tmp_path / "broken-shadow"
        shadow.mkdir()
        (shadow / "manifest.json").write_text("{not json")
        (models / "shadow.new").symlink_to(shadow)
        (models / "shadow.new").replace(models / "shadow")
        deadline = time.monotonic() + 20
        while "refused" not in values_of(final := scrape(admin), "refundgate_model_loads_total", "result"):
            assert time.monotonic() < deadline, "the refused bundle was never counted"
    finally:
        proxy.set_mode("pass")
        gate.stop()
        proxy.stop()
    return cut_off, final


def test_every_metric_and_label_the_dashboard_and_rules_use_is_exported(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path, tmp_path: Path
) -> None:
    cut_off, final = drive_every_metric(redis_proc, bundle_dir, tmp_path)
    # The alert and the panel read refundgate_breaker_open == 1 as "open".
    assert [v for _, v in cut_off["refundgate_breaker_open"]] == [1.0]
    text = referenced_text()

    names = set(METRIC.findall(text))
    assert len(names) >= 10, names
    missing = sorted(n for n in names if n not in final and n not in cut_off)
    assert not missing, f"queried but not exported by the gate: {missing}"

    observed: dict[str, dict[str, set[str]]] = {}
    for series in (cut_off, final):
        for name, samples in series.items():
            for labels, _ in samples:
                for key, value in labels.items():
                    observed.setdefault(name, {}).setdefault(key, set()).add(value)

    problems = []
    for name, matchers in SELECTOR.findall(text):
        for label, op, value in MATCHER.findall(matchers):
            if label in SCRAPE_LABELS:
                continue
            seen = observed.get(name, {}).get(label)
            if seen is None:
                problems.append(f"{name} has no label {label!r}")
            elif op == "=" and value not in seen:
                problems.append(f'{name}{{{label}="{value}"}} never exported (seen: {sorted(seen)})')
            elif op == "=~" and re.fullmatch(r"\w+(\|\w+)*", value):
                problems += [
                    f'{name}{{{label}="{v}"}} never exported (seen: {sorted(seen)})'
                    for v in value.split("|")
                    if v not in seen
                ]
    all_labels = {key for labels in observed.values() for key in labels}
    for group in GROUPING.findall(text):
        for label in (g.strip() for g in group.split(",")):
            if label and label not in SCRAPE_LABELS and label not in all_labels:
                problems.append(f"grouping label {label!r} is on no exported series")
    assert not problems, "\n".join(problems)


def test_dashboard_is_valid_and_every_panel_says_what_it_shows() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${datasource}", name
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for p in panels:
        title = p.get("title", "")
        assert title, p
        assert p.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, title
        assert len(p.get("description", "")) > 40, f"{title}: no useful description"
        assert "ormal" in p["description"], f"{title}: description must say what is normal"
        assert p["targets"], title
        for t in p["targets"]:
            assert t.get("datasource") == p["datasource"], title
            for name, matchers in SELECTOR.findall(t["expr"]):
                assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (
                    f"{title}: {name} ignores the job/instance variables"
                )
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "latency",
        "stage",
        "outcome",
        "model version",
        "degraded",
        "redis",
        "breaker",
        "shed",
        "invalid",
        "replays",
        "model loads",
        "decision log",
        "shadow agreement",
        "recordevents latency",
        "breaker openings",
    ):
        assert topic in titles, f"no panel about {topic}"


def test_every_runbook_points_at_an_existing_section_of_operations_md() -> None:
    operations = (OBS.parent.parent / "docs" / "OPERATIONS.md").read_text()
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', operations))
    anchors |= {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", operations, re.MULTILINE)
    }
    runbooks = re.findall(r'runbook: "docs/OPERATIONS\.md#([^"]+)"', RULE_FILES[1].read_text())
    alerts = re.findall(r"- alert: (\w+)", RULE_FILES[1].read_text())
    assert len(runbooks) == len(alerts) >= 10, "every alert needs a runbook"
    missing = sorted(set(runbooks) - anchors)
    assert not missing, f"runbook anchors missing in docs/OPERATIONS.md: {missing}"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(INSTALL_PROMTOOL)
    return path


def run(*args: str, cwd: Path = OBS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_accepts_the_rules() -> None:
    out = run(promtool(), "check", "rules", *(str(p) for p in RULE_FILES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(RULE_FILES), out.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    out = run(promtool(), "test", "rules", RULE_TESTS.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query (Grafana's variables replaced by sample values)."""
    substitutions = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "1h",
        "$job": ".*",
        "$instance": ".*",
    }
    rules = []
    for i, expr in enumerate(e for e in dashboard_exprs() if not e.startswith("label_values(")):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append(f"      - record: dashboard:panel_query:{i}\n        expr: {json.dumps(expr)}\n")
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text("groups:\n  - name: dashboard\n    rules:\n" + "".join(rules))
    out = run(promtool(), "check", "rules", str(rule_file), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_missing_promtool_fails_with_install_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y prometheus"):
        promtool()


def test_rule_files_fail_promtool_when_broken(tmp_path: Path) -> None:
    """The promtool checks above can fail: a broken copy of the alerts is refused."""
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULE_FILES[1].read_text().replace("> 0.025", "> > 0.025"))
    out = run(promtool(), "check", "rules", str(broken), cwd=tmp_path)
    assert out.returncode != 0
