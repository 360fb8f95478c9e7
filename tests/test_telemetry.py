"""What SREs see, checked with real parts: a Prometheus scrape over HTTP, spans exported over
OTLP to an in-test receiver, and the decision log in Redis."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gate.devredis import RedisProcess, free_port
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc
from tests.conftest import RunningGate, make_request
from tests.gateproc import start_gate_process

RAW_IDS = ("acct:tel-secret", "ord:tel-secret", "m:tel-secret", "dev:tel-secret", "rf:tel-", "198.51.100.77")
RAW_AMOUNT = "987654"  # may appear in the decision log's features, never in telemetry


def secret_request(n: int) -> pb.CheckRequest:
    return make_request(
        refund_id=f"rf:tel-{n}",
        account_id="acct:tel-secret",
        order_id=f"ord:tel-secret{n}",
        merchant_id="m:tel-secret",
        device_id="dev:tel-secret",
        ip="198.51.100.77",
        amount_minor=987654,
        order_amount_minor=9876540,
    )


def scrape(address: str) -> dict[str, float]:
    """Prometheus text format → {series: value}, with a real HTTP request."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def total(metrics: dict[str, float], pattern: str) -> float:
    return sum(v for k, v in metrics.items() if re.fullmatch(pattern, k))


def test_prometheus_series_move_with_checks(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path
) -> None:
    admin = f"127.0.0.1:{free_port()}"
    gate = start_gate_process(redis_proc.url, bundle_dir, "--metrics-listen", admin)
    try:
        before = scrape(admin)
        with grpc.insecure_channel(gate.target) as channel:
            stub = pb_grpc.RefundGateStub(channel)
            for i in range(5):
                stub.Check(make_request(refund_id=f"rf:p{i}", order_id=f"o:p{i}"))
            with pytest.raises(grpc.RpcError):
                stub.Check(make_request(currency="bad"))
        after = scrape(admin)  # a refusal's duration is recorded before the refusal is sent
    finally:
        gate.stop()
    assert (
        total(after, r"refundgate_decisions_total\{.*\}") - total(before, r"refundgate_decisions_total\{.*\}")
        == 5
    )
    assert total(after, r"refundgate_check_duration_seconds_count\{.*\}") == 6
    assert total(after, r'refundgate_invalid_requests_total\{.*method="Check".*\}') == 1
    for stage in ("velocity", "score", "policy"):
        assert total(after, rf'refundgate_stage_duration_seconds_count\{{.*stage="{stage}".*\}}') == 5
    buckets = {
        re.search(r'le="([^"]+)"', k).group(1)  # type: ignore[union-attr]
        for k in after
        if k.startswith("refundgate_check_duration_seconds_bucket")
    }
    assert {"0.0005", "0.001", "0.002", "0.005", "0.02"} <= buckets  # millisecond buckets
    assert total(after, r"refundgate_breaker_open\{.*\}") == 0


class Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """A minimal OTLP/gRPC collector that keeps what it is sent."""

    def __init__(self) -> None:
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.traces.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()
            self.metrics.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    def spans(self) -> list[Span]:
        return [
            s for req in self.traces for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans
        ]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    sink = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield sink, port
    server.stop(0)


CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def test_spans_reach_an_otlp_receiver_as_one_tree_without_raw_ids(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path, receiver: tuple[Receiver, int]
) -> None:
    sink, port = receiver
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    }
    gate = start_gate_process(redis_proc.url, bundle_dir, env=env)
    with grpc.insecure_channel(gate.target) as channel:
        stub = pb_grpc.RefundGateStub(channel)
        traceparent = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
        for i in range(3):
            stub.Check(secret_request(i), metadata=traceparent)
        with pytest.raises(grpc.RpcError):
            stub.Check(make_request(currency="nope"), metadata=traceparent)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    gate.stop()  # shutdown flushes the span processor

    spans = sink.spans()
    servers = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert len(servers) == 4, "3 Checks and 1 invalid Check; health checks are not traced"
    for server in servers:
        assert server.name == "refundgate.v1.RefundGate/Check"
        assert server.trace_id.hex() == CALLER_TRACE
        assert server.parent_span_id.hex() == CALLER_SPAN
        attrs = {a.key: a.value for a in server.attributes}
        assert attrs["rpc.system"].string_value == "grpc"
        assert attrs["rpc.service"].string_value == "refundgate.v1.RefundGate"
        assert attrs["rpc.method"].string_value == "Check"
    codes = sorted(
        next(a.value.int_value for a in s.attributes if a.key == "rpc.grpc.status_code") for s in servers
    )
    assert codes == [0, 0, 0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    decided = [s for s in servers if any(a.key == "refundgate.decision" for a in s.attributes)]
    assert len(decided) == 3
    for server in decided:
        children = {s.name: s for s in spans if s.parent_span_id == server.span_id}
        assert set(children) == {"velocity", "score", "policy"}
        attrs = {a.key: a.value for a in server.attributes}
        assert attrs["refundgate.degraded"].bool_value is False
        assert attrs["refundgate.breaker"].string_value == "closed"
        assert attrs["refundgate.model_version"].string_value == "test-model-1"
    exported = b"".join(r.SerializeToString() for r in [*sink.traces, *sink.metrics])
    assert sink.metrics, "metrics are exported over OTLP too"
    for raw in (*RAW_IDS, RAW_AMOUNT):
        assert raw.encode() not in exported, raw


async def test_decision_log_holds_exactly_the_decisions_made(gate: RunningGate, rdb: redis.Redis) -> None:
    made = [await gate.stub.Check(secret_request(i)) for i in range(4)]
    replayed = await gate.stub.Check(secret_request(0))
    with pytest.raises(grpc.aio.AioRpcError):
        await gate.stub.Check(make_request(currency="nope"))
    assert replayed.replayed
    assert gate.gate.decision_log is not None
    await gate.gate.decision_log.flush()
    await gate.gate.redis.call([("PING",)], timeout_s=2)
    entries = [json.loads(fields[b"d"]) for _, fields in rdb.xrange("rg:decisions")]
    assert [e["decision_id"] for e in entries] == [r.decision_id for r in made]
    for entry, resp in zip(entries, made, strict=True):
        assert entry["score"] == resp.score and entry["model_version"] == resp.model_version
        assert entry["decision"] == pb.Decision.Name(resp.decision).removeprefix("DECISION_")
        assert len(entry["features"]) > 40 and entry["latency_ms"] > 0
    dump = json.dumps(entries)
    for raw in RAW_IDS:
        assert raw not in dump, raw


def test_decisions_tail_prints_the_log(redis_proc: RedisProcess, rdb: redis.Redis) -> None:
    from tests.test_cli import run_cli

    for i in range(3):
        rdb.xadd("rg:decisions", {"d": json.dumps({"decision_id": f"d-{i}"})})
    out = run_cli("decisions", "tail", "-n", "2", env={"GATE_REDIS_URL": redis_proc.url})
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["decision_id"] for line in out.stdout.splitlines()] == ["d-1", "d-2"]
