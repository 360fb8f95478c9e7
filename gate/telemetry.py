"""OpenTelemetry for the gate, set up in one place: traces, metrics, and their exporters.

Traces: the server span of each RefundGate call follows the RPC semantic conventions
(``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``) and continues the
caller's trace from W3C ``traceparent`` metadata. Children: ``velocity``, ``score``, ``policy``.
Sampling is the SDK's, configured by ``OTEL_TRACES_SAMPLER``/``_ARG``; the default here is
parent-based with a 1 % ratio for root spans. Health checks are not traced. Spans carry decision,
model version, degraded, breaker state and stage latencies — never ids, amounts or bodies.

Export happens only when configured through the standard variables: OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal variant) is set, nothing otherwise — and
without a trace exporter no spans are made at all (the caller's trace context is still set as
current, so log lines carry its trace id). Metrics are also served for Prometheus on the admin
address (localhost by default).

The hot path pays for one sampler decision per call and a handful of histogram records; spans
below the server span exist only when it is sampled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.metrics import Counter, Histogram, Meter, NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

DEFAULT_ROOT_RATIO = 0.01
# Seconds; fine below the millisecond budget, coarse above it.
LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.05,
    0.1,
    0.25,
    1.0,
)
DECISIONS = ("APPROVE", "HOLD_FOR_REVIEW", "REJECT")  # gate/policy.py's decision names
CHECK_OUTCOMES = (
    *DECISIONS,
    "INVALID_ARGUMENT",
    "ALREADY_EXISTS",
    "UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "INTERNAL",
)
"""Every ``outcome`` of the Check duration histogram: a decision or the code of an error answer."""
EVENTS_OUTCOMES = ("OK", "INVALID_ARGUMENT", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL")
STAGES = ("velocity", "score", "policy")
REDIS_ERROR_KINDS = ("no_time", "timeout", "unavailable", "error", "script")
# Histogram series exported at 0 before their first record (see ZeroFilledPrometheusReader).
DECLARED_HISTOGRAMS: Mapping[str, tuple[str, Sequence[str]]] = {
    "refundgate.check.duration": ("outcome", CHECK_OUTCOMES),
    "refundgate.record_events.duration": ("outcome", EVENTS_OUTCOMES),
    "refundgate.stage.duration": ("stage", STAGES),
}
# Server-side codes that mean the server failed (OpenTelemetry RPC conventions); the others
# (INVALID_ARGUMENT, ALREADY_EXISTS, ...) are the caller's business and leave the span unset.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _otlp_configured(signal: str) -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


@dataclass(frozen=True, slots=True)
class Instruments:
    """Every metric the gate records, created once."""

    check_duration: Histogram
    events_duration: Histogram
    stage_duration: Histogram
    decisions: Counter
    redis_errors: Counter
    breaker_opens: Counter
    shed: Counter
    invalid: Counter
    replays: Counter
    model_loads: Counter
    shadow: Counter
    decision_log_dropped: Counter
    outage_journal: Counter


class Telemetry:
    """Tracer, meter and instruments of one gate process."""

    def __init__(
        self,
        *,
        service_name: str = "refund-gate",
        prometheus: bool = True,
        metric_readers: tuple[MetricReader, ...] = (),
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        if not enabled:  # no-op API objects: what the hot path costs without telemetry
            self.tracer_provider: TracerProvider | None = None
            self.meter_provider: MeterProvider | None = None
            self.tracer: trace.Tracer = trace.NoOpTracer()
            self.meter: Meter = NoOpMeter("gate")
            self.m = _instruments(self.meter)
            return
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
        if _otlp_configured("TRACES"):
            self.tracer_provider = _tracer_provider(resource)
            self.tracer = self.tracer_provider.get_tracer("gate")
        else:  # spans nobody exports are pure cost; the caller's trace id still reaches logs
            self.tracer_provider = None
            self.tracer = trace.NoOpTracer()
        readers = list(metric_readers)
        if prometheus:
            readers.append(_zero_filled_prometheus_reader())
        if _otlp_configured("METRICS"):
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        self.meter_provider = MeterProvider(
            resource=resource,
            metric_readers=readers,
            views=[
                View(
                    instrument_type=Histogram, aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS)
                )
            ],
        )
        self.meter = self.meter_provider.get_meter("gate")
        self.m = _instruments(self.meter)
        _announce_series(self.m)

    @contextlib.contextmanager
    def server_span(self, full_method: str, context: grpc.aio.ServicerContext) -> Iterator[Span]:
        """The SERVER span of one call, continuing the caller's trace if it sent one."""
        carrier = _trace_headers(context.invocation_metadata())
        parent = propagate.extract(carrier) if carrier else None
        if self.tracer_provider is None:
            remote = trace.get_current_span(parent) if parent is not None else trace.INVALID_SPAN
            with trace.use_span(remote, end_on_exit=False):
                yield remote
            return
        service, _, method = full_method.lstrip("/").partition("/")
        span = self.tracer.start_span(
            full_method.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        code = grpc.StatusCode.OK
        try:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                yield span
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
            raise
        except BaseException:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()

    @contextlib.contextmanager
    def stage(self, name: str, parent: Span) -> Iterator[Span | None]:
        """A child span for one step, only when the call is sampled."""
        if not parent.is_recording():
            yield None
            return
        with self.tracer.start_as_current_span(name, record_exception=False) as span:
            yield span

    def retro_stage(self, name: str, parent: Span, start: float, end: float) -> None:
        """A child span of a sampled call for a step that already ran from ``start`` to ``end``
        (``time.monotonic()`` seconds), so the step itself never touched the tracer."""
        if not parent.is_recording():
            return
        offset_ns = time.time_ns() - time.monotonic_ns()
        span = self.tracer.start_span(
            name, context=trace.set_span_in_context(parent), start_time=int(start * 1e9) + offset_ns
        )
        span.end(end_time=int(end * 1e9) + offset_ns)

    def shutdown(self) -> None:
        """Flush and stop exporters."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def _tracer_provider(resource: Resource) -> TracerProvider:
    sampler = None
    if "OTEL_TRACES_SAMPLER" not in os.environ:
        sampler = ParentBased(TraceIdRatioBased(DEFAULT_ROOT_RATIO))
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def _trace_headers(metadata: Any) -> dict[str, str] | None:
    if not metadata:
        return None
    carrier = {k: v for k, v in metadata if k in ("traceparent", "tracestate")}
    return carrier or None


_DESCRIPTIONS = {
    "refundgate.check.duration": "Check latency inside the gate, by decision (or error code)",
    "refundgate.record_events.duration": "RecordEvents latency inside the gate, by outcome (OK or code)",
    "refundgate.stage.duration": "Latency of one Check step: velocity, score, policy",
}


def _histogram(meter: Meter, name: str) -> Histogram:
    return meter.create_histogram(name, unit="s", description=_DESCRIPTIONS[name])


def _instruments(meter: Meter) -> Instruments:
    return Instruments(
        check_duration=_histogram(meter, "refundgate.check.duration"),
        events_duration=_histogram(meter, "refundgate.record_events.duration"),
        stage_duration=_histogram(meter, "refundgate.stage.duration"),
        decisions=meter.create_counter(
            "refundgate.decisions", description="Decisions by outcome, model version, degraded"
        ),
        redis_errors=meter.create_counter(
            "refundgate.redis.errors", description="Velocity store failures by kind"
        ),
        breaker_opens=meter.create_counter(
            "refundgate.breaker.opens", description="Times the velocity store's breaker opened"
        ),
        shed=meter.create_counter(
            "refundgate.shed", description="Calls refused with RESOURCE_EXHAUSTED (overload)"
        ),
        invalid=meter.create_counter(
            "refundgate.invalid_requests", description="INVALID_ARGUMENT answers by method"
        ),
        replays=meter.create_counter(
            "refundgate.replays", description="Retries answered from the stored decision"
        ),
        model_loads=meter.create_counter(
            "refundgate.model.loads", description="Model bundle loads by result (loaded, refused)"
        ),
        shadow=meter.create_counter(
            "refundgate.shadow.decisions",
            description="Shadow model verdicts by shadow version and agreement with the live one",
        ),
        decision_log_dropped=meter.create_counter(
            "refundgate.decision_log.dropped",
            description="Decisions not written to the decision log (queue full or Redis down)",
        ),
        outage_journal=meter.create_counter(
            "refundgate.outage_journal",
            description="Refunds decided without Redis: journaled, replayed into Redis, dropped (full)",
        ),
    )


def _announce_series(m: Instruments) -> None:
    """Export every counter series a dashboard or alert reads at 0 from the start: a series
    that first appears already at n hides those n events from increase() and rate()."""
    for result in ("loaded", "refused"):
        m.model_loads.add(0, {"result": result})
    for method in ("Check", "RecordEvents"):
        m.invalid.add(0, {"method": method})
    for kind in REDIS_ERROR_KINDS:
        m.redis_errors.add(0, {"kind": kind})
    for counter in (m.shed, m.breaker_opens, m.decision_log_dropped, m.replays):
        counter.add(0)
    for event in ("journaled", "replayed", "dropped"):
        m.outage_journal.add(0, {"event": event})


def announce_model(m: Instruments, version: str) -> None:
    """Export the decision series of a newly loaded live model at 0 (every decision, degraded
    or not), before it decides anything, so its first decisions count in increase()."""
    for decision in DECISIONS:
        for degraded in (False, True):
            m.decisions.add(0, {"decision": decision, "model_version": version, "degraded": degraded})


def announce_shadow(m: Instruments, version: str) -> None:
    """Export the verdict series of a newly loaded shadow model at 0 (agreeing or not)."""
    for agree in (True, False):
        m.shadow.add(0, {"shadow_version": version, "agree": agree})


def _zero_filled_prometheus_reader() -> MetricReader:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    class ZeroFilledPrometheusReader(PrometheusMetricReader):
        """The Prometheus reader, with every histogram series of DECLARED_HISTOGRAMS present
        from the first scrape: count, sum and buckets 0 until its first record (the SDK has no
        way to create a histogram point without recording a value)."""

        def _receive_metrics(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> None:
            if metrics_data is not None:
                metrics_data = zero_filled(metrics_data)
            super()._receive_metrics(metrics_data, timeout_millis, **kwargs)

    return ZeroFilledPrometheusReader()


def zero_filled(data: MetricsData) -> MetricsData:
    """``data`` with a zero point for every declared histogram series it lacks."""
    now = time.time_ns()
    resources = []
    for rm in data.resource_metrics:
        scopes = []
        for sm in rm.scope_metrics:
            if sm.scope.name != "gate":
                scopes.append(sm)
                continue
            present = {metric.name: metric for metric in sm.metrics}
            metrics = [metric for metric in sm.metrics if metric.name not in DECLARED_HISTOGRAMS]
            for name, (label, values) in DECLARED_HISTOGRAMS.items():
                metrics.append(_with_zero_points(present.get(name), name, label, values, now))
            scopes.append(dataclasses.replace(sm, metrics=metrics))
        resources.append(dataclasses.replace(rm, scope_metrics=scopes))
    return dataclasses.replace(data, resource_metrics=resources)


def _with_zero_points(
    metric: Metric | None, name: str, label: str, values: Sequence[str], now: int
) -> Metric:
    data = metric.data if metric is not None else None
    points = list(data.data_points) if isinstance(data, HistogramData) else []
    seen = {p.attributes.get(label) for p in points if p.attributes is not None}
    start = min((p.start_time_unix_nano for p in points), default=now)
    points += [
        HistogramDataPoint(
            attributes={label: value},
            start_time_unix_nano=start,
            time_unix_nano=now,
            count=0,
            sum=0.0,
            bucket_counts=[0] * (len(LATENCY_BUCKETS) + 1),
            explicit_bounds=LATENCY_BUCKETS,
            min=0.0,
            max=0.0,
        )
        for value in values
        if value not in seen
    ]
    if metric is not None and isinstance(data, HistogramData):
        return dataclasses.replace(metric, data=dataclasses.replace(data, data_points=points))
    return Metric(
        name=name,
        description=_DESCRIPTIONS[name],
        unit="s",
        data=HistogramData(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE),
    )


def observe_breaker(meter: Meter, is_open: Any) -> None:
    """Export the breaker state as a gauge (1 = open) read at collection time."""
    from opentelemetry.metrics import CallbackOptions, Observation

    def read(_: CallbackOptions) -> list[Observation]:
        return [Observation(1 if is_open() else 0)]

    meter.create_observable_gauge(
        "refundgate.breaker.open",
        callbacks=[read],
        description="1 while the velocity store's breaker is open",
    )


def start_prometheus_server(address: str) -> Any:
    """Serve /metrics for Prometheus on ``host:port`` (the admin address)."""
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"))
    return server
