"""The one settings object: built from ``GATE_*`` environment variables and command-line flags.

Every knob is a field here, documented next to its default, validated once at start-up and
printed once (secrets masked). Nothing else in the package reads the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEV_ID_KEY = "refund-gate-dev-key-not-secret"
"""Key for hashing ids before they reach Redis. Fine for a laptop, never for production:
set ``GATE_ID_HASH_KEY`` to a secret so that a Redis dump cannot be joined back to account ids."""

EVENT_LOOPS = ("uvloop", "asyncio")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "model" / "bundles"


class SettingsError(ValueError):
    """A setting is missing or out of range; raised at start-up, before serving."""


def _meta(doc: str, *, secret: bool = False) -> dict[str, Any]:
    return {"doc": doc, "secret": secret}


@dataclass(frozen=True, slots=True)
class Settings:
    """Effective configuration of one gate process. Field ``x`` is env ``GATE_X``, flag ``--x``."""

    listen: str = field(
        default="127.0.0.1:50051", metadata=_meta("host:port the RefundGate gRPC service binds.")
    )
    workers: int = field(
        default=1,
        metadata=_meta("Server processes sharing the port through SO_REUSEPORT (1 = this process only)."),
    )
    event_loop: str = field(
        default="uvloop",
        metadata=_meta(
            "Event loop of each worker: 'uvloop' (libuv, in C: about a tenth less CPU per call than "
            "asyncio's own loop, docs/BENCHMARKS.md) or 'asyncio'."
        ),
    )
    redis_url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata=_meta(
            "Redis holding the velocity counters and stored replies (redis://[:password@]host:port/db).",
            secret=True,
        ),
    )
    redis_connect_timeout_ms: float = field(
        default=200.0,
        metadata=_meta("Time allowed to open a Redis connection; off the hot path, in the background."),
    )
    model_dir: Path = field(
        default=DEFAULT_MODEL_DIR,
        metadata=_meta(
            "Directory with 'current' (and optionally 'shadow'): symlinks or directories holding "
            "model bundles, watched and hot-reloaded; or a single bundle directory."
        ),
    )
    model_poll_s: float = field(
        default=1.0, metadata=_meta("How often the model directory is checked for a new bundle.")
    )
    budget_ms: float = field(
        default=25.0,
        metadata=_meta("Time one Check may take end to end, unless the caller's deadline is shorter."),
    )
    deadline_margin_ms: float = field(
        default=2.0, metadata=_meta("Kept back from the caller's deadline for the response to travel back.")
    )
    score_reserve_ms: float = field(
        default=3.0,
        metadata=_meta(
            "Kept back from the budget for scoring, policy and the response after Redis; it also "
            "covers the event loop's ~1 ms timer granularity and the gRPC work outside the handler."
        ),
    )
    breaker_failures: int = field(
        default=5,
        metadata=_meta("Consecutive Redis failures that open the circuit breaker (then Checks skip Redis)."),
    )
    allow_client_time: bool = field(
        default=False,
        metadata=_meta(
            "Trust requested_at/occurred_at far from the server clock (replays, backfills, simulations)."
        ),
    )
    clock_skew_s: float = field(
        default=300.0,
        metadata=_meta("Largest distance between a client timestamp and the server clock when not trusted."),
    )
    id_hash_key: str = field(
        default=DEV_ID_KEY,
        metadata=_meta(
            "Secret key for the keyed hash of ids in Redis keys; the default is a documented dev key.",
            secret=True,
        ),
    )
    key_prefix: str = field(
        default="rg", metadata=_meta("Prefix of every Redis key, so several gates can share one Redis.")
    )
    replay_ttl_s: int = field(
        default=8 * 86400,
        metadata=_meta(
            "How long a decision is kept for retries with the same refund_id (idempotency horizon)."
        ),
    )
    degraded_approve_below_minor: int = field(
        default=5000,
        metadata=_meta("Degraded policy: without velocity features, APPROVE only below this refund amount."),
    )
    max_concurrency: int = field(
        default=64,
        metadata=_meta(
            "Calls held per process, counting those still queued inside gRPC core, at which every "
            "new Check and RecordEvents is answered RESOURCE_EXHAUSTED at once (once they have "
            "stood admission_window_ms); also the most Checks running at once. Throughput peaks at "
            "8-32 in flight per process; more only queues, ~1-2 ms per call held."
        ),
    )
    shed_start: int = field(
        default=32,
        metadata=_meta(
            "Calls held per process past which a share of new Checks and RecordEvents, rising "
            "linearly to all at max_concurrency, is answered RESOURCE_EXHAUSTED at once, once the "
            "backlog has stood admission_window_ms (capped at max_concurrency)."
        ),
    )
    admission_window_ms: float = field(
        default=60.0,
        metadata=_meta(
            "Calls held count against shed_start only once they have stood this long (the fewest "
            "over the window): a burst that drains faster is served whole."
        ),
    )
    admission_sample_ms: float = field(
        default=10.0,
        metadata=_meta(
            "How often the calls held are read from gRPC core's counters while between shed_start "
            "and max_concurrency (5x less often below, 2x above; only while calls arrive). A read "
            "is channelz rendering JSON under the GIL, 0.1-1 ms."
        ),
    )
    max_message_bytes: int = field(default=64 * 1024, metadata=_meta("Largest request message accepted."))
    max_events_per_call: int = field(default=1000, metadata=_meta("Largest RecordEvents batch."))
    telemetry: bool = field(
        default=True,
        metadata=_meta(
            "Traces and metrics (exported only as OTEL_* configures). Off only to measure their cost."
        ),
    )
    decision_log: bool = field(
        default=True,
        metadata=_meta(
            "Append every decision to the Redis Stream '<key_prefix>:decisions' (off the hot path)."
        ),
    )
    decision_log_maxlen: int = field(
        default=1_000_000, metadata=_meta("Approximate cap of the decision stream's length.")
    )
    decision_log_queue: int = field(
        default=10_000,
        metadata=_meta("Decisions waiting to be written; beyond it they are dropped and counted."),
    )
    # --- Deployment: listeners beside the service, shutdown (docs/DEPLOY.md) -----------------
    metrics_listen: str = field(
        default="127.0.0.1:9464",
        metadata=_meta(
            "host:port of the Prometheus /metrics HTTP endpoint (read-only: no ids, no paths); "
            "empty disables it. With several workers, worker i listens on port + i."
        ),
    )
    admin_listen: str = field(
        default="127.0.0.1:50052",
        metadata=_meta(
            "host:port of the GateAdmin gRPC listener, never the refund-facing port; empty disables "
            "it. Off loopback it needs admin_token. With several workers, worker i listens on port + i."
        ),
    )
    admin_token: str = field(
        default="",
        metadata=_meta(
            "Bearer token every GateAdmin call must send ('authorization: Bearer <token>'), at "
            "least 16 characters; required when admin_listen is off loopback.",
            secret=True,
        ),
    )
    drain_s: float = field(
        default=5.0,
        metadata=_meta(
            "On SIGTERM: health turns NOT_SERVING at once and calls are still answered this long, "
            "so load balancers and Kubernetes endpoints stop sending before the listener closes "
            "(SIGINT, or a second signal, skips it)."
        ),
    )
    grace_s: float = field(
        default=5.0,
        metadata=_meta("After the drain: time given to in-flight calls before the server stops."),
    )
    log_level: str = field(default="INFO", metadata=_meta("Log level of the gate's JSON logs."))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``GATE_*`` variables, then explicit overrides (e.g. flags); validate."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"GATE_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, f.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(unknown)}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings that cannot work, with a message saying which and why."""
        problems: list[str] = []
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            problems.append("listen must be host:port")
        if urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            problems.append("redis_url must start with redis://, rediss:// or unix://")
        if self.workers < 1:
            problems.append("workers must be >= 1")
        if self.event_loop not in EVENT_LOOPS:
            problems.append(f"event_loop must be one of {', '.join(EVENT_LOOPS)}")
        if not 1.0 <= self.budget_ms <= 10_000:
            problems.append("budget_ms must be within 1..10000")
        if self.score_reserve_ms < 0 or self.score_reserve_ms >= self.budget_ms:
            problems.append("score_reserve_ms must be >= 0 and below budget_ms")
        if self.deadline_margin_ms < 0:
            problems.append("deadline_margin_ms must be >= 0")
        if self.redis_connect_timeout_ms <= 0:
            problems.append("redis_connect_timeout_ms must be > 0")
        if len(self.id_hash_key) < 16:
            problems.append("id_hash_key must be at least 16 characters")
        if not self.key_prefix or "{" in self.key_prefix or "}" in self.key_prefix:
            problems.append("key_prefix must be non-empty and contain no braces")
        if self.replay_ttl_s < 60:
            problems.append("replay_ttl_s must be >= 60")
        if self.model_poll_s <= 0:
            problems.append("model_poll_s must be > 0")
        if self.breaker_failures < 1:
            problems.append("breaker_failures must be >= 1")
        if self.max_concurrency < 1 or self.max_events_per_call < 1:
            problems.append("max_concurrency and max_events_per_call must be >= 1")
        if self.shed_start < 1:
            problems.append("shed_start must be >= 1")
        if not 0.1 <= self.admission_sample_ms <= 1000:
            problems.append("admission_sample_ms must be within 0.1..1000")
        if not self.admission_sample_ms <= self.admission_window_ms <= 60_000:
            problems.append("admission_window_ms must be within admission_sample_ms..60000")
        problems += self._deployment_problems()
        if self.decision_log_maxlen < 1000 or self.decision_log_queue < 1:
            problems.append("decision_log_maxlen must be >= 1000 and decision_log_queue >= 1")
        if self.max_message_bytes < 1024:
            problems.append("max_message_bytes must be >= 1024")
        if self.degraded_approve_below_minor < 0:
            problems.append("degraded_approve_below_minor must be >= 0")
        if problems:
            raise SettingsError("invalid settings: " + "; ".join(problems))

    def _deployment_problems(self) -> list[str]:
        problems: list[str] = []
        for name in ("metrics_listen", "admin_listen"):
            value = getattr(self, name)
            if value and not (value.rpartition(":")[0] and value.rpartition(":")[2].isdigit()):
                problems.append(f"{name} must be host:port or empty")
        if self.admin_token and len(self.admin_token) < 16:
            problems.append("admin_token must be at least 16 characters")
        if self.admin_listen and not self.admin_token and not is_loopback(self.admin_listen):
            problems.append(
                f"admin_listen {self.admin_listen} is off loopback: set admin_token (GATE_ADMIN_TOKEN) "
                "or listen on 127.0.0.1"
            )
        ports = [p for p in (_port(self.listen), _port(self.metrics_listen), _port(self.admin_listen)) if p]
        if len(ports) != len(set(ports)):
            problems.append("listen, metrics_listen and admin_listen must use different ports")
        if not 0 <= self.drain_s <= 300:
            problems.append("drain_s must be within 0..300")
        if not 0 <= self.grace_s <= 300:
            problems.append("grace_s must be within 0..300")
        return problems

    def describe(self) -> dict[str, Any]:
        """Effective settings for the start-up log, secrets masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                value = _mask(f.name, value)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed, validated."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    @property
    def uses_dev_key(self) -> bool:
        """True when ids are hashed with the public dev key."""
        return self.id_hash_key == DEV_ID_KEY


def is_loopback(address: str) -> bool:
    """True when ``host:port`` listens on a loopback address only (127.0.0.0/8, ::1, localhost)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def _port(address: str) -> int:
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else 0


def _mask(name: str, value: Any) -> str:
    if not value:
        return ""
    if name == "redis_url":
        parts = urlsplit(str(value))
        if parts.password:
            return str(value).replace(f":{parts.password}@", ":***@")
        return str(value)
    return "dev-default" if value == DEV_ID_KEY else "***"


def _parse(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        return raw
    except ValueError:
        raise SettingsError(f"GATE_{name.upper()}: cannot parse {raw!r}") from None


def settings_fields() -> list[dataclasses.Field[Any]]:
    """The settings fields, for building command-line flags from one definition."""
    return list(fields(Settings))
