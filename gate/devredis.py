"""Throw-away Redis for tests, training and benchmarks: free ports, no persistence.

One redis-server (``start_redis``), optionally TLS-only with certificates made here
(``make_certs``, with openssl), or a local Redis Cluster of masters and replicas
(``start_cluster``). Not used by the service itself, which connects to the Redis its settings name.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Certs:
    """A test CA and the server and client certificates it signed (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(workdir: Path, names: Sequence[str] = ("localhost", "redis.test")) -> Certs:
    """A CA, a server certificate for ``names`` and 127.0.0.1, and a client certificate."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl not found: apt-get install openssl")
    workdir.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)

    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=rg-test-ca")
    san = ",".join([*(f"DNS:{n}" for n in names), "IP:127.0.0.1"])
    (workdir / "server.ext").write_text(f"subjectAltName={san}\n")
    (workdir / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who, subject in (("server", names[0]), ("client", "rg-gate")):
        run("req", *key, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={subject}")
        run(
            "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{who}.crt", "-days", "2", "-extfile", f"{who}.ext",
        )  # fmt: skip
    return Certs(
        workdir / "ca.crt",
        workdir / "server.crt",
        workdir / "server.key",
        workdir / "client.crt",
        workdir / "client.key",
    )


@dataclass
class RedisProcess:
    """A redis-server child process on 127.0.0.1:port (TLS-only when ``certs`` is set)."""

    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    certs: Certs | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.certs else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return _client(self.port, self.certs, self.password, timeout_s=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _die_with_parent() -> None:
    """Linux: SIGTERM the child when the process that started it dies, even if killed, so an
    interrupted test run leaves no redis-server behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _client(port: int, certs: Certs | None, password: str | None, timeout_s: float) -> redis.Redis:
    if certs is None:
        return redis.Redis(
            port=port, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
    return redis.Redis(
        port=port,
        password=password,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        ssl=True,
        ssl_ca_certs=str(certs.ca),
        ssl_certfile=str(certs.client_cert),
        ssl_keyfile=str(certs.client_key),
    )


def start_redis(
    port: int | None = None,
    timeout_s: float = 10.0,
    *,
    certs: Certs | None = None,
    password: str | None = None,
    client_certs: str = "optional",
    extra_args: Sequence[str] = (),
) -> RedisProcess:
    """Start redis-server and return once it answers PING (or raise with its log).

    With ``certs`` it listens only for TLS (``--tls-port``; ``client_certs`` is its
    ``tls-auth-clients``: yes, no or optional); ``password`` sets ``requirepass``.

    A given port is retried until the timeout: right after a Redis on it was killed, a client
    still connecting to it can hold the port for a moment (a TCP self-connect), and the new
    server then fails to bind.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install redis-server")
    fixed_port = port is not None
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="rg-redis-"))
    log_path = workdir / "redis.log"
    deadline = time.monotonic() + timeout_s
    listen = ["--port", str(port)]
    if certs is not None:
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs.server_cert)]
        listen += ["--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca)]
        listen += ["--tls-auth-clients", client_certs]
    if password:
        listen += ["--requirepass", password]
    while True:
        proc = subprocess.Popen(
            [
                binary,
                *listen,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--protected-mode",
                "no",
                "--logfile",
                str(log_path),
                *extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        if _wait_ready(proc, _client(port, certs, password, timeout_s=1), deadline):
            return RedisProcess(port, proc, workdir, certs, password)
        proc.kill()
        proc.wait(timeout=10)
        if not fixed_port or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(f"redis-server did not start on port {port}:\n{tail}")
        time.sleep(0.1)


def _wait_ready(proc: subprocess.Popen[bytes], client: redis.Redis, deadline: float) -> bool:
    """True once this process answers the client (not another Redis holding the port); False
    if it exited or the deadline passed."""
    try:
        while proc.poll() is None and time.monotonic() <= deadline:
            with contextlib.suppress(redis.ConnectionError):
                if client.info("server")["process_id"] == proc.pid:
                    return True
            time.sleep(0.02)
        return False
    finally:
        client.close()


@dataclass
class RedisCluster:
    """A local Redis Cluster: ``nodes[:masters]`` started as masters, the rest their replicas
    (roles change on failover: ask ``CLUSTER NODES``)."""

    nodes: list[RedisProcess]
    masters: int
    node_timeout_ms: int
    dead: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client(self) -> redis.RedisCluster:
        alive = next(n for n in self.nodes if n not in self.dead)
        return redis.RedisCluster(host="127.0.0.1", port=alive.port, socket_timeout=5)

    def master_of(self, key: str) -> RedisProcess:
        """The node serving ``key``'s slot now."""
        alive = next(n for n in self.nodes if n not in self.dead)
        slot = alive.client().cluster("keyslot", key)
        for start, end, master, *_ in alive.client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == master[1])
        raise LookupError(key)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(
    masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000, timeout_s: float = 30.0
) -> RedisCluster:
    """Start ``masters * (1 + replicas)`` cluster-enabled redis-servers, join them with
    ``redis-cli --cluster create``, and return once every node sees every slot served."""
    args = (
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(node_timeout_ms), "--cluster-replica-validity-factor", "0",
    )  # fmt: skip
    nodes: list[RedisProcess] = []
    try:
        for _ in range(masters * (1 + replicas)):
            nodes.append(start_redis(extra_args=(*args, "--cluster-port", str(free_port()))))
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes)]
        subprocess.run(
            [*create, "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )
        deadline = time.monotonic() + timeout_s
        for node in nodes:
            client = node.client()
            while True:
                info = client.cluster("info")
                settled = info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384
                if settled and int(info.get("cluster_known_nodes", 0)) == len(nodes):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis cluster did not settle: {info}")
                time.sleep(0.05)
            client.close()
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return RedisCluster(nodes, masters, node_timeout_ms)
