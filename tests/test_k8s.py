"""The Kubernetes manifests (deploy/k8s): every overlay renders with `kubectl kustomize`, every
object validates offline against the Kubernetes 1.33 schemas (kubernetes-validate, strict), and
what makes the gate deployable holds in the rendered objects: native sidecar, gRPC probes with
the right service names, security context, settings and secrets, model volume, drain."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gate.server import SERVICE_NAME

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/shared"]
KUBERNETES = "1.33.0"
CRDS = {("monitoring.coreos.com/v1", "PodMonitor")}  # no schema offline: checked below instead
INSTALL_KUBECTL = (
    "kubectl is not on PATH. Install it (Debian/Ubuntu: apt-get install -y kubernetes-client, or "
    "your distribution's kubectl); .ci/run does this."
)


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(INSTALL_KUBECTL)
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in render(overlay) if o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    return found


def gate_container(overlay: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod template that runs the gate, and the gate's container in it."""
    for deployment in objects(overlay, "Deployment"):
        pod = deployment["spec"]["template"]
        spec = pod["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["name"] == "refund-gate":
                return pod, container
    raise AssertionError(f"no refund-gate container in {overlay}")


def settings(overlay: str) -> dict[str, str]:
    """GATE_* values the gate container gets from its ConfigMap."""
    _, container = gate_container(overlay)
    (ref,) = [e["configMapRef"]["name"] for e in container["envFrom"]]
    data: dict[str, str] = one(overlay, "ConfigMap", ref)["data"]
    return data


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_kubernetes_1_33_strict(overlay: str) -> None:
    for obj in render(overlay):
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_monitor_selects_gate_pods_and_a_named_metrics_port(overlay: str) -> None:
    pod, container = gate_container(overlay)
    monitors = objects(overlay, "PodMonitor")
    assert monitors, "nothing scrapes the gate"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    metrics_port = int(settings(overlay)["GATE_METRICS_LISTEN"].rpartition(":")[2])
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        scraped = [ports[e["port"]] for e in monitor["spec"]["podMetricsEndpoints"]]
        workers = int(settings(overlay)["GATE_WORKERS"])
        assert sorted(scraped) == [metrics_port + i for i in range(workers)]  # worker i: port + i


def test_the_gate_is_a_native_sidecar_of_the_refund_service() -> None:
    deployment = one("base", "Deployment", "refund-service")
    (gate,) = [
        c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "refund-gate"
    ]
    assert gate["restartPolicy"] == "Always"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_grpc_health_for_the_right_services(overlay: str) -> None:
    _, container = gate_container(overlay)
    port = int(settings(overlay)["GATE_LISTEN"].rpartition(":")[2])
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": SERVICE_NAME}
    assert container["livenessProbe"]["grpc"] == {"port": port, "service": ""}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gate_runs_non_root_read_only_without_capabilities(overlay: str) -> None:
    pod, container = gate_container(overlay)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"] and security["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gate_has_cpu_and_memory_requests_and_limits(overlay: str) -> None:
    _, container = gate_container(overlay)
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_a_secret_and_settings_from_a_config_map(overlay: str) -> None:
    _, container = gate_container(overlay)
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert {"GATE_ID_HASH_KEY", "GATE_REDIS_URL"} <= from_secret.keys()
    assert not {"GATE_ID_HASH_KEY", "GATE_REDIS_URL", "GATE_ADMIN_TOKEN"} & settings(overlay).keys()
    assert all(k.startswith("GATE_") for k in settings(overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_directory_is_a_read_only_volume(overlay: str) -> None:
    pod, container = gate_container(overlay)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == settings(overlay)["GATE_MODEL_DIR"]]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert one(overlay, "PersistentVolumeClaim", claim)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_termination_grace_period_covers_drain_and_grace(overlay: str) -> None:
    pod, _ = gate_container(overlay)
    drain, grace = float(settings(overlay)["GATE_DRAIN_S"]), float(settings(overlay)["GATE_GRACE_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= drain + grace + 5


def test_the_shared_gate_drains_for_endpoint_propagation() -> None:
    assert float(settings("overlays/shared")["GATE_DRAIN_S"]) >= 5
    _, container = gate_container("overlays/shared")
    readiness = container["readinessProbe"]
    # Out of the Service's endpoints well within the drain.
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < float(
        settings("overlays/shared")["GATE_DRAIN_S"]
    )


def test_the_shared_gate_has_a_service_and_a_disruption_budget_on_its_pods() -> None:
    pod, container = gate_container("overlays/shared")
    labels = pod["metadata"]["labels"]
    service = one("overlays/shared", "Service", "refund-gate")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}
    pdb = one("overlays/shared", "PodDisruptionBudget", "refund-gate")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_with_a_shared_gate_the_refund_service_has_no_sidecar() -> None:
    spec = one("overlays/shared", "Deployment", "refund-service")["spec"]["template"]["spec"]
    assert not spec.get("initContainers")
    (service,) = spec["containers"]
    target = {e["name"]: e["value"] for e in service["env"]}["REFUND_GATE_TARGET"]
    assert target.endswith(
        f"refund-gate:{one('overlays/shared', 'Service', 'refund-gate')['spec']['ports'][0]['port']}"
    )
