"""A thin asyncio Redis connection for the hot path: hiredis parsing and automatic pipelining.

Why not redis-py's asyncio client on the hot path: it spends 110-320 µs of Python per call and
its pipelines ask ``SCRIPT EXISTS`` before every EVALSHA batch (a second round trip). This
connection packs commands with ``hiredis.pack_command``, parses with ``hiredis.Reader``, and
coalesces every batch queued in one event-loop tick into a single socket write, so all Checks that
arrive together share one round trip (the idea of envoy ratelimit's pipeline window). Replies come
back in order, so each batch simply takes the next N replies. Work nobody waits for (stored
answers, the decision log) is sent "lazily": it rides along with the next urgent write, or goes
out on its own after ``lazy_flush_s`` — each separate write would wake redis-server again.

Failure behaviour is explicit and fast, because callers have a millisecond budget:
- no retries here; a lost connection fails every pending batch at once with RedisUnavailable and
  is reopened in the background (bounded connect timeout, capped backoff);
- a batch that is not answered within its timeout fails with RedisTimeout; if the oldest pending
  batch has been waiting longer than ``stall_s`` the connection is presumed dead and reset.
redis-py stays in use everywhere off the hot path (CLI, tools).

TLS (``rediss://``) wraps the same protocol in the event loop's own TLS transport, with the CA
file, client certificate, server name and verification of ``TlsOptions``. A password is never
sent in plaintext to an address off this host unless the address explicitly allows it.
The drivers built on this connection (single node, cluster) are in gate/redisdriver.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis

from gate.backoff import REDIS_BACKOFF, BackoffPolicy

log = logging.getLogger(__name__)

Command = Sequence[str | bytes | int | float]


class RedisError(Exception):
    """Base of every Redis failure the gate treats as 'features unavailable'."""


class RedisUnavailable(RedisError):
    """No usable connection (never opened, lost, or reconnecting)."""


class RedisTimeout(RedisError):
    """The reply did not arrive within the time allowed."""


class RedisReplyError(RedisError):
    """Redis answered with an error (script error, NOSCRIPT, OOM, ...)."""


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """How to speak TLS to Redis (``rediss://``): whom to trust, who we are, whom we expect."""

    ca_file: str | None = None  # None: the system's trust store
    cert_file: str | None = None  # client certificate (Redis ``tls-auth-clients yes``)
    key_file: str | None = None
    server_name: str | None = None  # SNI and the name checked in the server's certificate
    verify: bool = True  # False: encrypt, but accept any certificate (never in production)

    def context(self) -> ssl.SSLContext:
        """The client SSLContext (built once per option set; loading a CA file is not free)."""
        return _ssl_context(self)


@functools.lru_cache(maxsize=16)
def _ssl_context(tls: TlsOptions) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect to one Redis node, parsed from a redis://, rediss:// or unix://
    URL (a cluster URL is a list of them: ``RedisTarget``)."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = None
    username: str | None = None
    unix_path: str | None = None
    tls: TlsOptions | None = None
    allow_plaintext_password: bool = False

    @classmethod
    def from_url(cls, url: str, tls: TlsOptions | None = None) -> RedisAddress:
        """Parse ``redis[s]://[[user]:password@]host[:port][/db]`` or ``unix:///path?db=N``;
        ``rediss://`` uses ``tls`` (default: the system's trust store, verified)."""
        target = RedisTarget.from_url(url, tls)
        if target.cluster:
            raise ValueError("a cluster url names several nodes: use RedisTarget.from_url")
        return target.seeds[0]

    @property
    def name(self) -> str:
        """``host:port`` (or the socket path): how logs and per-node breakers name the node."""
        return self.unix_path or f"{self.host}:{self.port}"

    @property
    def local(self) -> bool:
        """True for a unix socket or a loopback address: nothing crosses a network."""
        if self.unix_path or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    @property
    def plaintext_password(self) -> bool:
        """True when connecting would send the password unencrypted over a network, and that
        was not explicitly allowed."""
        return (
            bool(self.password) and self.tls is None and not self.local and not self.allow_plaintext_password
        )

    def at(self, host: str, port: int) -> RedisAddress:
        """The same credentials and TLS options for another node (a cluster's)."""
        return replace(self, host=host, port=port, unix_path=None)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed Redis URL: one node, or the seed nodes of a cluster
    (``redis+cluster://host:port[,host:port...]``, ``rediss+cluster://`` with TLS)."""

    seeds: tuple[RedisAddress, ...]
    cluster: bool = False

    @classmethod
    def from_url(
        cls, url: str, tls: TlsOptions | None = None, *, allow_plaintext_password: bool = False
    ) -> RedisTarget:
        """Parse any URL of ``SCHEMES``; raises ValueError naming what is wrong."""
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in SCHEMES:
            raise ValueError("redis url must use " + ", ".join(f"{s}://" for s in SCHEMES))
        password = unquote(parts.password) if parts.password else None
        username = unquote(parts.username) if parts.username else None
        if scheme == "unix":
            db = 0
            for item in parts.query.split("&"):
                if item.startswith("db="):
                    db = int(item[3:])
            return cls((RedisAddress(unix_path=parts.path, db=db, password=password, username=username),))
        secure = scheme.startswith("rediss")
        cluster = scheme.endswith("+cluster")
        base = RedisAddress(
            password=password,
            username=username,
            tls=(tls or TlsOptions()) if secure else None,
            allow_plaintext_password=allow_plaintext_password,
        )
        path = parts.path.lstrip("/")
        if cluster and path not in ("", "0"):
            raise ValueError("a redis cluster has only database 0")
        db = int(path or 0)
        hosts = parts.netloc.rpartition("@")[2]
        seeds = []
        for item in hosts.split(","):
            host, port = _host_port(item)
            seeds.append(replace(base, host=host, port=port, db=db))
        if not seeds or (len(seeds) > 1 and not cluster):
            raise ValueError("only a cluster url may name several hosts")
        return cls(tuple(seeds), cluster)


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = item.partition(":")
    if port and not port.isdigit():
        raise ValueError(f"bad port in redis url: {item!r}")
    return host or "127.0.0.1", int(port or 6379)


class _Batch:
    __slots__ = ("future", "remaining", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[list[Any]], n: int, sent_at: float) -> None:
        self.future = future
        self.remaining = n
        self.replies: list[Any] = []
        self.sent_at = sent_at


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: RedisConnection) -> None:
        self.owner = owner
        self.reader = hiredis.Reader()
        self.pending: collections.deque[_Batch] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's are not subclasses of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        while (reply := reader.gets()) is not False:
            if not pending:  # a reply nobody asked for: the stream is out of step, drop it
                self.owner._abort("unexpected reply")
                return
            batch = pending[0]
            batch.replies.append(reply)
            batch.remaining -= 1
            if batch.remaining == 0:
                pending.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self, exc)

    def fail_all(self, error: RedisError) -> None:
        while self.pending:
            batch = self.pending.popleft()
            if not batch.future.done():
                batch.future.set_exception(error)
                batch.future.exception()  # mark retrieved: a timed-out caller is gone


class RedisConnection:
    """One pipelined connection to Redis, reopened in the background when lost.

    ``on_connect`` batches (e.g. SCRIPT LOAD) are sent first on every new connection.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        connect_timeout_s: float = 0.2,
        stall_s: float = 0.5,
        backoff: BackoffPolicy = REDIS_BACKOFF,
        lazy_flush_s: float = 0.002,
        on_connect: Sequence[Command] = (),
    ) -> None:
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.stall_s = stall_s
        self.backoff = backoff
        self.lazy_flush_s = lazy_flush_s
        self.on_connect = list(on_connect)
        self._proto: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer: list[bytes] = []
        self._flush_soon = False
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        """True while a connection is open and usable."""
        return self._proto is not None

    def open_soon(self) -> None:
        """Start opening the connection in the background (with backoff), unless it is open."""
        if self._proto is None:
            self._ensure_reconnecting()

    async def ready(self, timeout_s: float) -> None:
        """Wait at most ``timeout_s`` for the connection to be open (raises RedisUnavailable)."""
        if self._proto is not None:
            return
        self._ensure_reconnecting()
        task = self._reconnect_task
        if task is not None:
            await asyncio.wait((task,), timeout=timeout_s)  # never raises, never cancels the task
        if self._proto is None:
            raise RedisUnavailable(f"redis connection to {self.address.name} is down")

    async def connect(self) -> None:
        """Open the connection now (raises RedisUnavailable if it cannot within the timeout)."""
        loop = self._loop = asyncio.get_running_loop()
        a = self.address
        if a.plaintext_password:
            raise RedisUnavailable(
                f"refusing to send the redis password in plaintext to {a.name}: use rediss:// "
                "(or allow it with GATE_REDIS_ALLOW_PLAINTEXT_PASSWORD)"
            )
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if a.unix_path:
                    _, proto = await loop.create_unix_connection(lambda: _Protocol(self), a.unix_path)
                elif a.tls is not None:
                    _, proto = await loop.create_connection(
                        lambda: _Protocol(self),
                        a.host,
                        a.port,
                        ssl=a.tls.context(),
                        server_hostname=a.tls.server_name or a.host,
                    )
                else:
                    _, proto = await loop.create_connection(lambda: _Protocol(self), a.host, a.port)
                transport = proto.transport
                if transport is not None and transport.get_extra_info("sockname") == transport.get_extra_info(
                    "peername"
                ):  # a TCP self-connect to a port nothing listens on: no Redis at all
                    transport.abort()
                    raise ConnectionRefusedError("connected to itself")
                self._proto = proto
                hello: list[Command] = []
                if a.password:
                    hello.append(("AUTH", a.username, a.password) if a.username else ("AUTH", a.password))
                if a.db:
                    hello.append(("SELECT", a.db))
                hello.extend(self.on_connect)
                if hello:
                    replies = await self.send(hello)
                    errors = [r for r in replies if isinstance(r, hiredis.ReplyError)]
                    if errors:
                        raise RedisReplyError(str(errors[0]))
        except (OSError, TimeoutError, RedisError) as exc:  # ssl.SSLError is an OSError
            self._drop()
            raise RedisUnavailable(f"cannot connect to redis at {a.name}: {_why(exc)}") from None

    def send(self, commands: Sequence[Command], *, urgent: bool = True) -> asyncio.Future[list[Any]]:
        """Queue a batch; its future resolves to the list of replies, in order.

        Urgent batches are written at the end of this loop tick, with everything queued so far;
        lazy ones wait for the next urgent write or ``lazy_flush_s``, whichever comes first.
        Error replies come back as ``hiredis.ReplyError`` items, not exceptions, so one failed
        command does not hide the others' results.
        """
        proto, loop = self._proto, self._loop
        if proto is None or loop is None:
            self._ensure_reconnecting()
            raise RedisUnavailable("redis connection is down")
        future: asyncio.Future[list[Any]] = loop.create_future()
        buf = self._buffer
        for cmd in commands:
            buf.append(hiredis.pack_command(tuple(cmd)))  # type: ignore[arg-type]
        proto.pending.append(_Batch(future, len(commands), time.monotonic()))
        if urgent:
            if not self._flush_soon:
                self._flush_soon = True
                loop.call_soon(self._flush)
        elif self._lazy_timer is None:
            self._lazy_timer = loop.call_later(self.lazy_flush_s, self._flush)
        return future

    async def call(self, commands: Sequence[Command], timeout_s: float, *, urgent: bool = True) -> list[Any]:
        """Send a batch and wait at most ``timeout_s`` for all its replies."""
        future = self.send(commands, urgent=urgent)
        assert self._loop is not None
        handle = self._loop.call_later(timeout_s, self._expire, future)
        try:
            return await future
        finally:
            handle.cancel()

    def _expire(self, future: asyncio.Future[list[Any]]) -> None:
        if future.done():
            return
        future.set_exception(RedisTimeout("redis reply timed out"))
        proto = self._proto
        if proto is not None and proto.pending and time.monotonic() - proto.pending[0].sent_at > self.stall_s:
            self._abort("redis stalled")

    def _flush(self) -> None:
        self._flush_soon = False
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self._buffer and self._proto is not None and self._proto.transport is not None:
            self._proto.transport.write(b"".join(self._buffer))
        self._buffer.clear()

    def _abort(self, why: str) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None:
            log.warning("resetting redis connection: %s", why)
            proto.transport.abort()

    def _drop(self) -> None:
        proto, self._proto = self._proto, None
        self._buffer.clear()
        if proto is not None:
            proto.fail_all(RedisUnavailable("redis connection lost"))
            if proto.transport is not None:
                proto.transport.abort()

    def _lost(self, proto: _Protocol, exc: Exception | None) -> None:
        proto.fail_all(RedisUnavailable("redis connection lost"))
        if self._proto is proto:
            self._proto = None
            self._buffer.clear()
            if not self._closed:
                log.warning("redis connection lost")
                self._ensure_reconnecting()

    def _ensure_reconnecting(self) -> None:
        if self._closed or (self._reconnect_task is not None and not self._reconnect_task.done()):
            return
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        backoff = self.backoff.start()
        while not self._closed and self._proto is None:
            try:
                await self.connect()
                log.info("redis connection restored", extra={"node": self.address.name})
                return
            except RedisUnavailable:
                await asyncio.sleep(backoff.next())

    async def close(self) -> None:
        """Close for good: fail pending batches and stop reconnecting."""
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        self._drop()


def _why(exc: BaseException) -> str:
    """A short reason for a failed connect: the TLS verification message, or the error's type."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason})"
    if isinstance(exc, RedisError):
        return str(exc)
    return type(exc).__name__
