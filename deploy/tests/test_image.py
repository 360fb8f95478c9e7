"""The container image, built and run for real: `make image-test` (a step of .ci/run).

Builds deploy/Containerfile with podman (runc) from a Debian base made by
deploy/image/debian-base.sh (no image registry is reachable from CI; Debian's archive is),
runs it read-only, non-root and without capabilities against a redis-server started here (host
network), and checks Check, grpc.health.v1, GateAdmin on a mounted model directory, the image
size, and a clean exit after the drain on SIGTERM. Slow on a cold machine (debootstrap and pip,
a few minutes); the base tarball and podman's layers are cached for the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gate.devredis import RedisProcess, free_port, start_redis
from model.synthetic import build_synthetic_bundle
from refundgate.v1 import admin_pb2, admin_pb2_grpc
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/refund-gate:test"
MAX_IMAGE_BYTES = 300_000_000
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(ROOT / "deploy" / "image" / "containers.conf"),
    "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin",  # runc and debootstrap live there
}
INSTALL = "podman, runc and debootstrap are needed: apt-get install -y podman runc debootstrap (.ci/run does)"


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run podman with runc (crun fails on these machines) and this project's containers.conf."""
    out = subprocess.run(
        ["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )
    if check:
        assert out.returncode == 0, f"podman {' '.join(args)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def image() -> str:
    """The image, built from the cached Debian base (say how long each part took)."""
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool, path=ENV["PATH"]) is None:
            pytest.fail(INSTALL)
    start = time.monotonic()
    base = subprocess.run(
        [str(ROOT / "deploy" / "image" / "debian-base.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env=ENV,
        check=False,
    )
    assert base.returncode == 0, base.stderr[-3000:]
    built_base = time.monotonic()
    ca = ["-v", f"{HOST_CA}:/run/ca.crt:ro", "--build-arg", "PIP_CA=/run/ca.crt"] if HOST_CA.is_file() else []
    podman(
        "build",
        "--network",
        "host",
        *ca,
        "--build-arg",
        f"BASE={base.stdout.strip()}",
        "-f",
        str(ROOT / "deploy" / "Containerfile"),
        "-t",
        IMAGE,
        str(ROOT),
        timeout=1200,
    )
    print(f"\nbase image {built_base - start:.1f} s, image build {time.monotonic() - built_base:.1f} s")
    # Earlier builds' images, and cached layers unused for a week: the disk stays bounded.
    podman("image", "prune", "--force", "--filter", "label=org.opencontainers.image.title=refund-gate")
    podman("image", "prune", "--force", "--filter", "until=168h")
    return IMAGE


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    proc = start_redis()
    yield proc
    proc.stop()


@dataclass
class Container:
    """A gate running in the image: its name and where it listens (host network)."""

    name: str
    target: str
    admin: str

    def logs(self) -> str:
        out = podman("logs", self.name)
        return out.stdout + out.stderr

    def terminate(self) -> int:
        """SIGTERM, then the exit code once the container has stopped."""
        podman("kill", "--signal", "TERM", self.name)
        return int(podman("wait", self.name, timeout=120).stdout.strip())


def run_gate(image: str, redis_url: str, *args: str, env: dict[str, str] | None = None) -> Container:
    """Start the image detached: read-only root, no capabilities, no privilege gain, the image's
    own non-root user; wait until health says SERVING."""
    name = f"refund-gate-test-{uuid.uuid4().hex[:8]}"
    port, admin = free_port(), free_port()
    settings = {
        "GATE_REDIS_URL": redis_url,
        "GATE_LISTEN": f"127.0.0.1:{port}",
        "GATE_METRICS_LISTEN": "",
        "GATE_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "GATE_ID_HASH_KEY": "container-test-key-0123456789",
        "GATE_DRAIN_S": "1",
        "GATE_GRACE_S": "2",
        **(env or {}),
    }
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        *(f"--env={k}={v}" for k, v in settings.items()),
        *args,
        image,
    )
    container = Container(name, f"127.0.0.1:{port}", f"127.0.0.1:{admin}")
    try:
        with grpc.insecure_channel(container.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            for update in watch:
                if update.status == health_pb2.HealthCheckResponse.SERVING:
                    break
    except BaseException:
        print(container.logs()[-3000:])
        podman("rm", "--force", name, check=False)
        raise
    return container


@pytest.fixture
def gate(image: str, redis_proc: RedisProcess) -> Iterator[Container]:
    container = run_gate(image, redis_proc.url)
    yield container
    podman("rm", "--force", container.name, check=False)


def check_request() -> pb.CheckRequest:
    now = time.time()
    req = pb.CheckRequest(
        refund_id=f"rf:{uuid.uuid4().hex[:12]}",
        account_id="acct:container",
        order_id="ord:1",
        merchant_id="m:1",
        amount_minor=2500,
        order_amount_minor=5000,
        currency="EUR",
        reason=pb.REFUND_REASON_DAMAGED,
        item_category=pb.ITEM_CATEGORY_PHYSICAL,
        delivery_status=pb.DELIVERY_STATUS_DELIVERED,
        payment_method=pb.PAYMENT_METHOD_CARD,
    )
    req.order_created_at.FromNanoseconds(int((now - 3 * 86400) * 1e9))
    return req


def test_the_image_is_at_most_300_mb(image: str) -> None:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    print(f"\nimage size {size / 1e6:.1f} MB")
    assert size <= MAX_IMAGE_BYTES


def test_the_image_runs_refund_gate_serve_as_a_numeric_non_root_user(image: str) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["refund-gate", "serve"]


def test_check_answers_a_decision_from_the_default_bundle(gate: Container) -> None:
    with grpc.insecure_channel(gate.target) as channel:
        resp = pb_grpc.RefundGateStub(channel).Check(check_request(), timeout=5)
    assert resp.decision in (pb.DECISION_APPROVE, pb.DECISION_HOLD_FOR_REVIEW, pb.DECISION_REJECT)
    assert not resp.degraded
    assert resp.model_version == (ROOT / "model" / "bundles" / "current").resolve().name


def test_grpc_health_is_serving_for_the_service_and_overall(gate: Container) -> None:
    with grpc.insecure_channel(gate.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "refundgate.v1.RefundGate"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_sigterm_drains_then_exits_cleanly(gate: Container) -> None:
    with grpc.insecure_channel(gate.target) as channel:
        pb_grpc.RefundGateStub(channel).Check(check_request(), timeout=5)
    assert gate.terminate() == 0
    logs = gate.logs()
    assert "Traceback" not in logs, logs[-3000:]
    messages = [json.loads(line)["message"] for line in logs.splitlines() if line.startswith("{")]
    assert messages.index("draining") < messages.index("shutting down"), messages


def test_a_mounted_model_directory_replaces_the_bundle_inside(
    image: str, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    build_synthetic_bundle(models / "mounted-1", version="mounted-1")
    (models / "current").symlink_to("mounted-1")  # relative: the same inside the container
    container = run_gate(image, redis_proc.url, "--volume", f"{models}:/models:ro")
    try:
        with grpc.insecure_channel(container.admin) as channel:
            status = admin_pb2_grpc.GateAdminStub(channel).GetModelStatus(
                admin_pb2.GetModelStatusRequest(), timeout=5
            )
        assert status.live.version == "mounted-1"
    finally:
        podman("rm", "--force", container.name, check=False)
