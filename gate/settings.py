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

from gate.redisclient import RedisTarget, TlsOptions

DEV_ID_KEY = "refund-gate-dev-key-not-secret"
"""Key for hashing ids before they reach Redis. Fine for a laptop, never for production:
set ``GATE_ID_HASH_KEY`` to a secret so that a Redis dump cannot be joined back to account ids."""

EVENT_LOOPS = ("uvloop", "asyncio")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "model" / "bundles"


GROUPS: dict[str, tuple[str, dict[str, str]]] = {
    "server": (
        "where the gRPC service listens, its processes, and how much it takes on",
        {
            "listen": "host:port of the RefundGate gRPC service",
            "workers": "server processes sharing the port (SO_REUSEPORT)",
            "event_loop": "event loop of each worker: uvloop or asyncio",
            "max_concurrency": "calls held per process at which every new call is refused",
            "shed_start": "calls held per process past which a rising share is refused",
            "admission_window_ms": "how long a backlog must stand before shedding starts",
            "admission_sample_ms": "how often the calls held are read from gRPC core",
            "max_message_bytes": "largest request message accepted",
            "max_events_per_call": "largest RecordEvents batch",
            "drain_s": "on SIGTERM, time answering while health says NOT_SERVING",
            "grace_s": "then, time given to in-flight calls",
            "admin_listen": "host:port of GateAdmin's own gRPC listener (worker i: port + i); empty: none",
            "admin_token": "bearer token GateAdmin requires; required off loopback",
        },
    ),
    "Redis": (
        "the velocity store, the stored replies and the decision log",
        {
            "redis_url": "redis[s]://[:password@]host:port/db or redis[s]+cluster://host:port,...",
            "redis_connect_timeout_ms": "time allowed to open a Redis connection",
            "redis_tls_ca_file": "CA bundle that verifies the Redis server (rediss://)",
            "redis_tls_cert_file": "client certificate for mutual TLS (with the key file)",
            "redis_tls_key_file": "private key of the client certificate",
            "redis_tls_server_name": "server name to verify instead of the URL's host",
            "redis_tls_verify": "verify the server's certificate (off only for tests)",
            "redis_allow_plaintext_password": "allow a password over plain redis:// off this host",
            "redis_cluster_refresh_s": "how often the cluster's slot map is re-read",
            "velocity_health_interval_s": "interval over which the degraded share is judged",
            "velocity_health_degraded_share": "share of degraded Checks that turns velocity NOT_SERVING",
            "degraded_answers_max": "degraded answers kept per worker so retries get the same",
            "outage_journal_max": "refunds decided during an outage kept to count afterwards",
            "breaker_failures": "consecutive Redis failures that open the circuit breaker",
            "key_prefix": "prefix of every Redis key",
            "id_hash_key": "secret key hashing ids in Redis keys; set one in production",
            "replay_ttl_s": "how long a decision is kept for retries of its refund_id",
            "decision_log": "append every decision to the stream <key_prefix>:decisions",
            "decision_log_maxlen": "approximate cap of the decision stream's length",
            "decision_log_queue": "decisions waiting to be written before they are dropped",
        },
    ),
    "model": (
        "the model bundles served, watched and hot-reloaded",
        {
            "model_dir": "directory with current (and shadow) bundle links, or one bundle",
            "model_poll_s": "how often the model directory is checked for a new bundle",
            "bundle_public_key": "Ed25519 public key file: serve only bundles signed by it",
        },
    ),
    "budget and policy": (
        "how long a Check may take and what it trusts",
        {
            "budget_ms": "time one Check may take, unless the caller's deadline is shorter",
            "deadline_margin_ms": "kept back from the caller's deadline for the response",
            "score_reserve_ms": "kept back from the budget for scoring and policy after Redis",
            "degraded_approve_below_minor": "without velocity features, APPROVE only below this amount",
            "reject_needs_behaviour": "the model REJECTs only with a behavioural (velocity) reason",
            "returned_at_most_hold": "a refund whose item came back is at most held (guard rules aside)",
            "allow_client_time": "trust client timestamps far from the server clock (replays)",
            "clock_skew_s": "largest client clock distance accepted when not trusted",
        },
    ),
    "telemetry": (
        "metrics, traces and logs (exporters: OTEL_* variables)",
        {
            "telemetry": "traces and metrics; off only to measure their cost",
            "metrics_listen": "host:port of /metrics (worker i: port + i); empty disables it",
            "log_level": "level of the JSON logs",
        },
    ),
}
"""``serve --help``: each setting in one group, with a one-line summary (the full text is its
field's doc below)."""


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
            "Redis holding the velocity counters and stored replies: redis://[:password@]host:port/db, "
            "rediss:// (TLS), unix:///path, or a cluster: redis+cluster://host:port[,host:port...] "
            "(rediss+cluster:// with TLS).",
            secret=True,
        ),
    )
    redis_tls_ca_file: str = field(
        default="",
        metadata=_meta("rediss://: CA certificates (PEM) to verify Redis with; empty: the system's."),
    )
    redis_tls_cert_file: str = field(
        default="", metadata=_meta("rediss://: client certificate (PEM), for Redis's tls-auth-clients.")
    )
    redis_tls_key_file: str = field(
        default="", metadata=_meta("rediss://: the client certificate's private key (PEM).")
    )
    redis_tls_server_name: str = field(
        default="",
        metadata=_meta("rediss://: name expected in Redis's certificate (and sent as SNI); empty: the host."),
    )
    redis_tls_verify: bool = field(
        default=True,
        metadata=_meta(
            "rediss://: verify Redis's certificate and name. Off only for a lab: anyone can listen."
        ),
    )
    redis_allow_plaintext_password: bool = field(
        default=False,
        metadata=_meta(
            "Allow sending the Redis password unencrypted (redis://) to an address off this host; "
            "otherwise such a URL is refused at start."
        ),
    )
    redis_cluster_refresh_s: float = field(
        default=10.0,
        metadata=_meta(
            "Cluster: how often the slot map is read again when all is well (at once on MOVED, "
            "and within a second while a node is down)."
        ),
    )
    velocity_health_interval_s: float = field(
        default=1.0,
        metadata=_meta("Interval over which the share of degraded Checks is judged (and logged if bad)."),
    )
    velocity_health_degraded_share: float = field(
        default=0.5,
        metadata=_meta(
            "Share of an interval's Checks degraded by Redis at which the velocity health entry "
            "turns NOT_SERVING (also while any node's circuit breaker is open)."
        ),
    )
    degraded_answers_max: int = field(
        default=100_000,
        metadata=_meta("Answers given degraded that each worker remembers, so their retries get them again."),
    )
    outage_journal_max: int = field(
        default=100_000,
        metadata=_meta(
            "Refunds decided without Redis that each worker keeps to count once Redis is back; "
            "past it the oldest are dropped (and counted)."
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
    bundle_public_key: str = field(
        default="",
        metadata=_meta(
            "PEM file of the Ed25519 public key(s) model bundles must be signed with "
            "(`refund-gate model sign`); the gate then refuses, at start and at every reload, a "
            "bundle unsigned, signed by another key, or whose files do not match. Empty: "
            "signatures are not required."
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
    reject_needs_behaviour: bool = field(
        default=True,
        metadata=_meta(
            "The model may REJECT only when a reason backed by velocity counters (behaviour) is among"
            " the reasons given; otherwise it HOLDs. Never rejects on request context alone."
        ),
    )
    returned_at_most_hold: bool = field(
        default=True,
        metadata=_meta(
            "A refund whose item came back (item_returned) is at most HOLD_FOR_REVIEW unless a guard"
            " rule (refund exceeds order, blocklist) fires."
        ),
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
            "Append every decision to the Redis Stream '<key_prefix>:decisions' (off the hot path), "
            "and every refund outcome RecordEvents counts to '<key_prefix>:outcomes' (to join them)."
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
        """Refuse settings that cannot work: one message naming each bad setting's variable and
        flag. A check that compares two settings runs only when the other one is valid itself,
        so one mistake gives one complaint."""
        problems: list[str] = []

        def need(ok: bool, name: str, requirement: str) -> bool:
            if not ok:
                problems.append(f"{describe_setting(name)} {requirement} (got {self._shown(name)})")
            return ok

        host, _, port = self.listen.rpartition(":")
        need(bool(host) and port.isdigit(), "listen", "must be host:port")
        try:
            target = self.redis_target()
        except ValueError as exc:
            problems.append(f"{describe_setting('redis_url')}: {exc}")
        else:
            exposed = [a.name for a in target.seeds if a.plaintext_password]
            need(
                not exposed,
                "redis_url",
                f"would send its password in plaintext to {exposed[0] if exposed else ''}; use rediss:// "
                f"(or set {describe_setting('redis_allow_plaintext_password')})",
            )
        for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file"):
            path = getattr(self, name)
            need(not path or Path(path).is_file(), name, "must name an existing file")
        need(
            bool(self.redis_tls_cert_file) == bool(self.redis_tls_key_file),
            "redis_tls_key_file",
            f"and {describe_setting('redis_tls_cert_file')} go together",
        )
        need(self.redis_cluster_refresh_s > 0, "redis_cluster_refresh_s", "must be > 0")
        need(self.velocity_health_interval_s > 0, "velocity_health_interval_s", "must be > 0")
        need(
            0 < self.velocity_health_degraded_share <= 1,
            "velocity_health_degraded_share",
            "must be within (0, 1]",
        )
        need(self.degraded_answers_max >= 1, "degraded_answers_max", "must be >= 1")
        need(self.outage_journal_max >= 1, "outage_journal_max", "must be >= 1")
        need(self.workers >= 1, "workers", "must be >= 1")
        need(self.event_loop in EVENT_LOOPS, "event_loop", f"must be one of {', '.join(EVENT_LOOPS)}")
        if need(1.0 <= self.budget_ms <= 10_000, "budget_ms", "must be within 1..10000"):
            need(
                0 <= self.score_reserve_ms < self.budget_ms,
                "score_reserve_ms",
                f"must be >= 0 and below {describe_setting('budget_ms')}",
            )
        else:
            need(self.score_reserve_ms >= 0, "score_reserve_ms", "must be >= 0")
        need(self.deadline_margin_ms >= 0, "deadline_margin_ms", "must be >= 0")
        need(self.redis_connect_timeout_ms > 0, "redis_connect_timeout_ms", "must be > 0")
        need(len(self.id_hash_key) >= 16, "id_hash_key", "must be at least 16 characters")
        need(
            bool(self.key_prefix) and "{" not in self.key_prefix and "}" not in self.key_prefix,
            "key_prefix",
            "must be non-empty and contain no braces",
        )
        need(self.replay_ttl_s >= 60, "replay_ttl_s", "must be >= 60")
        need(self.model_poll_s > 0, "model_poll_s", "must be > 0")
        need(self.breaker_failures >= 1, "breaker_failures", "must be >= 1")
        need(self.max_concurrency >= 1, "max_concurrency", "must be >= 1")
        need(self.max_events_per_call >= 1, "max_events_per_call", "must be >= 1")
        need(self.shed_start >= 1, "shed_start", "must be >= 1")
        if need(0.1 <= self.admission_sample_ms <= 1000, "admission_sample_ms", "must be within 0.1..1000"):
            need(
                self.admission_sample_ms <= self.admission_window_ms <= 60_000,
                "admission_window_ms",
                f"must be within {describe_setting('admission_sample_ms')}..60000",
            )
        else:
            need(self.admission_window_ms <= 60_000, "admission_window_ms", "must be <= 60000")
        problems += self._deployment_problems()
        need(self.decision_log_maxlen >= 1000, "decision_log_maxlen", "must be >= 1000")
        need(self.decision_log_queue >= 1, "decision_log_queue", "must be >= 1")
        need(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024")
        need(self.degraded_approve_below_minor >= 0, "degraded_approve_below_minor", "must be >= 0")
        if self.bundle_public_key:
            problems += self._key_problems()
        if problems:
            raise SettingsError("invalid settings: " + "; ".join(problems))

    def _shown(self, name: str) -> str:
        value = getattr(self, name)
        if name == "id_hash_key":
            return f"{len(value)} characters"
        return repr(_mask(name, value) if name == "redis_url" else value)

    def _key_problems(self) -> list[str]:
        from gate.signing import KeyFileError, load_public_keys

        try:
            load_public_keys(Path(self.bundle_public_key))
        except KeyFileError as exc:
            return [f"{describe_setting('bundle_public_key')}: {exc}"]
        return []

    def _deployment_problems(self) -> list[str]:
        problems: list[str] = []
        for name in ("metrics_listen", "admin_listen"):
            value = getattr(self, name)
            if value and not (value.rpartition(":")[0] and value.rpartition(":")[2].isdigit()):
                problems.append(f"{describe_setting(name)} must be host:port or empty")
        if self.admin_token and len(self.admin_token) < 16:
            problems.append(f"{describe_setting('admin_token')} must be at least 16 characters")
        if self.admin_listen and not self.admin_token and not is_loopback(self.admin_listen):
            problems.append(
                f"admin_listen {self.admin_listen} is off loopback: set admin_token (GATE_ADMIN_TOKEN) "
                "or listen on 127.0.0.1"
            )
        ports = [p for p in (_port(self.listen), _port(self.metrics_listen), _port(self.admin_listen)) if p]
        if len(ports) != len(set(ports)):
            problems.append("listen, metrics_listen and admin_listen must use different ports")
        if not 0 <= self.drain_s <= 300:
            problems.append(f"{describe_setting('drain_s')} must be within 0..300")
        if not 0 <= self.grace_s <= 300:
            problems.append(f"{describe_setting('grace_s')} must be within 0..300")
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

    def redis_target(self) -> RedisTarget:
        """The parsed Redis URL with the TLS settings (raises ValueError naming the problem)."""
        tls = TlsOptions(
            ca_file=self.redis_tls_ca_file or None,
            cert_file=self.redis_tls_cert_file or None,
            key_file=self.redis_tls_key_file or None,
            server_name=self.redis_tls_server_name or None,
            verify=self.redis_tls_verify,
        )
        return RedisTarget.from_url(
            self.redis_url, tls, allow_plaintext_password=self.redis_allow_plaintext_password
        )

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
        kind = "true or false" if isinstance(default, bool) else f"a {type(default).__name__}"
        shown = "(secret)" if name == "id_hash_key" else repr(raw)
        raise SettingsError(f"{describe_setting(name)}: cannot parse {shown} as {kind}") from None


def describe_setting(name: str) -> str:
    """How a user sets field ``name``: its name, variable and flag, e.g.
    ``budget_ms (GATE_BUDGET_MS, --budget-ms)``."""
    return f"{name} (GATE_{name.upper()}, --{name.replace('_', '-')})"


def settings_fields() -> list[dataclasses.Field[Any]]:
    """The settings fields, for building command-line flags from one definition."""
    return list(fields(Settings))
