"""Signed bundles (gate/signing.py, GATE_BUNDLE_PUBLIC_KEY): signed by a trusted key loads; unsigned,
signed by another key, or with a file that no longer matches is refused, by load_bundle, by
`refund-gate model validate/promote`, by a real gate process at start and by a real gate at reload."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gate.bundle import BundleError, load_bundle
from gate.devredis import RedisProcess
from gate.reloader import ModelHolder, ModelWatcher
from gate.settings import Settings, SettingsError
from gate.signing import (
    generate_key,
    key_id,
    load_private_key,
    load_public_keys,
    private_pem,
    public_pem,
    sign_bundle,
)
from refundgate.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import RunningGate, make_request, start_gate, stop_gate
from tests.gateproc import CLI, free_port
from tests.test_bundle import edit_manifest, refresh_checksums
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model owners' key pair ("owner", "owner.pub") and another one ("other", "other.pub")."""
    root = tmp_path_factory.mktemp("keys")
    out: dict[str, Path] = {}
    for name in ("owner", "other"):
        key = generate_key()
        (root / name).write_bytes(private_pem(key))
        (root / f"{name}.pub").write_bytes(public_pem(key.public_key()))
        out[name], out[f"{name}.pub"] = root / name, root / f"{name}.pub"
    return out


def signed_copy(bundle_dir: Path, dest: Path, key: Path, signer: str = "model-owners") -> Path:
    shutil.copytree(bundle_dir, dest)
    assert run_cli("model", "sign", str(dest), "--key", str(key), "--signer", signer).returncode == 0
    return dest


def unsigned(b: Path, keys: dict[str, Path]) -> None:
    (b / "signature.json").unlink()


def by_another_key(b: Path, keys: dict[str, Path]) -> None:
    sign_bundle(b, _private(keys["other"]))


def tampered_model_so(b: Path, keys: dict[str, Path]) -> None:
    data = bytearray((b / "model.so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.so").write_bytes(bytes(data))


def manifest_edited_after_signing(b: Path, keys: dict[str, Path]) -> None:
    edit_manifest(b, lambda m: m["thresholds"].update(hold=0.1))
    refresh_checksums(b)


def _private(path: Path) -> Ed25519PrivateKey:
    return load_private_key(path)


REFUSALS: dict[str, tuple[Callable[[Path, dict[str, Path]], None], str]] = {
    "unsigned": (unsigned, "not signed (no signature.json), and GATE_BUNDLE_PUBLIC_KEY requires a signature"),
    "wrong key": (by_another_key, "not by a trusted key"),
    "tampered model.so": (tampered_model_so, "checksum of model.so is"),
    "manifest edited": (manifest_edited_after_signing, "does not match manifest.json"),
}


def test_a_bundle_signed_by_the_trusted_key_loads_and_names_its_signer(
    bundle_dir: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    b = signed_copy(bundle_dir, tmp_path / "b", keys["owner"])
    trusted = load_public_keys(keys["owner.pub"])
    loaded = load_bundle(b, trusted_keys=trusted)
    assert loaded.signer == f"{key_id(trusted[0])} (model-owners)"
    assert load_bundle(b).signer is None  # nothing required, nothing verified


@pytest.mark.parametrize("case", list(REFUSALS))
def test_load_bundle_refuses_when_signatures_are_required(
    case: str, bundle_dir: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    damage, reason = REFUSALS[case]
    b = signed_copy(bundle_dir, tmp_path / "b", keys["owner"])
    damage(b, keys)
    with pytest.raises(BundleError) as info:
        load_bundle(b, trusted_keys=load_public_keys(keys["owner.pub"]))
    assert reason in str(info.value)


def test_a_key_file_with_two_keys_trusts_both_for_a_rotation(
    bundle_dir: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    both = tmp_path / "both.pub"
    both.write_bytes(keys["owner.pub"].read_bytes() + keys["other.pub"].read_bytes())
    trusted = load_public_keys(both)
    assert len(trusted) == 2
    for name in ("owner", "other"):
        b = signed_copy(bundle_dir, tmp_path / name, keys[name])
        assert load_bundle(b, trusted_keys=trusted).signer is not None


def test_validate_shows_the_signer_verified_or_not(
    bundle_dir: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    b = signed_copy(bundle_dir, tmp_path / "b", keys["owner"])
    kid = key_id(load_public_keys(keys["owner.pub"])[0])
    verified = run_cli("model", "validate", str(b), "--public-key", str(keys["owner.pub"]))
    assert verified.returncode == 0, verified.stderr
    assert f"signature   signed by {kid} (model-owners), verified" in verified.stdout
    assert f"✓ signature   signed by {kid} (model-owners)" in verified.stdout
    claimed = run_cli("model", "validate", str(b))
    assert claimed.returncode == 0
    assert f"signature   signed by {kid} (model-owners), not verified (no public key" in claimed.stdout
    inspected = run_cli("model", "inspect", str(b))
    assert f"signature   signed by {kid} (model-owners), not verified" in inspected.stdout
    assert "signature.json" in inspected.stdout and "(the signature of manifest.json)" in inspected.stdout


@pytest.mark.parametrize("case", ["unsigned", "wrong key", "tampered model.so"])
def test_validate_and_promote_refuse_what_the_gate_would_refuse(
    case: str, bundle_dir: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    damage, reason = REFUSALS[case]
    models = tmp_path / "models"
    good = signed_copy(bundle_dir, models / "good", keys["owner"])
    bad = signed_copy(bundle_dir, models / "bad", keys["owner"])
    damage(bad, keys)
    env = {"GATE_BUNDLE_PUBLIC_KEY": str(keys["owner.pub"])}
    assert run_cli("model", "promote", str(good), env=env).returncode == 0
    verdict = run_cli("model", "validate", str(bad), env=env)
    assert verdict.returncode == 1 and reason in verdict.stdout
    promoted = run_cli("model", "promote", str(bad), env=env)
    assert promoted.returncode == 1 and reason in promoted.stderr
    assert os.readlink(models / "current") == "good"


def test_sign_refuses_a_bundle_the_gate_would_refuse(
    bundle_dir: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    b = tmp_path / "b"
    shutil.copytree(bundle_dir, b)
    tampered_model_so(b, keys)
    out = run_cli("model", "sign", str(b), "--key", str(keys["owner"]))
    assert out.returncode == 1 and "not signing" in out.stderr and "checksum of model.so" in out.stderr
    assert not (b / "signature.json").exists()


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    out = run_cli("model", "keygen", "--out", str(tmp_path / "k"))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    kid = key_id(load_public_keys(tmp_path / "k.pub")[0])
    assert f"key id      {kid}" in out.stdout
    again = run_cli("model", "keygen", "--out", str(tmp_path / "k"))
    assert again.returncode == 1 and "exists; not overwriting" in again.stderr


def test_a_public_key_setting_that_is_no_key_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "nokey.pem").write_text("hello\n")
    with pytest.raises(
        SettingsError, match=r"GATE_BUNDLE_PUBLIC_KEY, --bundle-public-key\): .*nokey\.pem: no PEM public key"
    ):
        Settings.from_env({"GATE_BUNDLE_PUBLIC_KEY": str(tmp_path / "nokey.pem")})
    with pytest.raises(
        SettingsError, match=r"GATE_BUNDLE_PUBLIC_KEY, --bundle-public-key\): .*cannot read the public key"
    ):
        Settings.from_env({"GATE_BUNDLE_PUBLIC_KEY": str(tmp_path / "absent.pem")})


# ---------------------------------------------------------------------------------------------
# a real gate


def serve(redis_url: str, model_dir: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    """`refund-gate serve` with GATE_BUNDLE_PUBLIC_KEY, expected to refuse and exit."""
    return subprocess.run(
        [*CLI, "serve", "--listen", f"127.0.0.1:{free_port()}", "--model-dir", str(model_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GATE_REDIS_URL": redis_url, "GATE_BUNDLE_PUBLIC_KEY": str(public_key)},
    )


@pytest.mark.parametrize("case", ["unsigned", "wrong key", "tampered model.so"])
def test_a_gate_refuses_to_start_on_a_bundle_it_cannot_trust(
    case: str, redis_proc: RedisProcess, bundle_dir: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    damage, reason = REFUSALS[case]
    b = signed_copy(bundle_dir, tmp_path / "b", keys["owner"])
    damage(b, keys)
    out = serve(redis_proc.url, b, keys["owner.pub"])
    assert out.returncode == 2
    refusal = [line for line in out.stderr.splitlines() if line.startswith("refund-gate:")]
    assert len(refusal) == 1 and "model bundle refused" in refusal[0] and reason in refusal[0]
    assert "Traceback" not in out.stderr


def test_a_gate_starts_on_a_signed_bundle_and_serves(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    from tests.gateproc import start_gate_process

    b = signed_copy(bundle_dir, tmp_path / "b", keys["owner"])
    admin = f"127.0.0.1:{free_port()}"
    gate = start_gate_process(
        redis_proc.url, b, "--admin-listen", admin, env={"GATE_BUNDLE_PUBLIC_KEY": str(keys["owner.pub"])}
    )
    status = run_cli("model", "status", "--target", admin)
    logs = gate.stop()
    assert status.returncode == 0 and "live        test-model-1" in status.stdout
    assert any(line.get("message") == "model loaded" for line in logs)


@pytest_asyncio.fixture
async def signed_gate(
    redis_proc: RedisProcess, rdb: redis.Redis, bundle_dir: Path, tmp_path: Path, keys: dict[str, Path]
) -> AsyncIterator[tuple[RunningGate, ModelWatcher]]:
    """A gate over models/current -> a (signed by the owner), requiring the owner's key."""
    models = tmp_path / "models"
    signed_copy(bundle_dir, models / "a", keys["owner"])
    os.symlink("a", models / "current")
    settings = Settings.from_env(
        {"GATE_BUNDLE_PUBLIC_KEY": str(keys["owner.pub"])},
        listen="127.0.0.1:0",
        redis_url=redis_proc.url,
        budget_ms=250.0,
        model_dir=models,
        model_poll_s=3600.0,  # the tests drive check()
    )
    watcher = ModelWatcher.from_settings(settings)
    watcher.load_initial()
    running = await start_gate(settings, watcher)
    yield running, watcher
    await stop_gate(running)


@pytest.mark.parametrize("case", ["unsigned", "wrong key", "tampered model.so"])
async def test_a_gate_refuses_at_reload_a_bundle_it_cannot_trust_and_keeps_serving(
    case: str, signed_gate: tuple[RunningGate, ModelWatcher], bundle_dir: Path, keys: dict[str, Path]
) -> None:
    running, watcher = signed_gate
    damage, reason = REFUSALS[case]
    models = watcher.model_dir
    signed_copy(bundle_dir, models / "b", keys["owner"])
    damage(models / "b", keys)
    os.symlink("b", models / ".current.tmp")
    os.replace(models / ".current.tmp", models / "current")
    await watcher.check()
    assert running.admin_channel is not None
    status = await admin_pb2_grpc.GateAdminStub(running.admin_channel).GetModelStatus(
        admin_pb2.GetModelStatusRequest()
    )
    assert status.refusals == 1 and reason in status.last_refusal.reason
    assert status.live.version == "test-model-1" and status.last_refusal.slot == "current"
    resp = await running.stub.Check(make_request())
    assert resp.model_version == "test-model-1" and not resp.degraded


async def test_a_gate_loads_at_reload_a_bundle_signed_by_the_trusted_key(
    signed_gate: tuple[RunningGate, ModelWatcher], bundle_dir: Path, keys: dict[str, Path]
) -> None:
    running, watcher = signed_gate
    models = watcher.model_dir
    b = signed_copy(bundle_dir, models / "b", keys["owner"])
    edit_manifest(b, lambda m: m.update(version="test-model-2"))
    sign_bundle(b, _private(keys["owner"]), signer="model-owners")
    os.symlink("b", models / ".current.tmp")
    os.replace(models / ".current.tmp", models / "current")
    await watcher.check()
    assert watcher.holder.bundle is not None and watcher.holder.bundle.version == "test-model-2"
    assert watcher.holder.bundle.signer is not None and watcher.holder.refusals == 0
    assert (await running.stub.Check(make_request())).model_version == "test-model-2"


def test_the_watcher_without_a_key_setting_requires_no_signature(tmp_path: Path) -> None:
    watcher = ModelWatcher.from_settings(Settings.from_env({}, model_dir=tmp_path))
    assert watcher.trusted_keys is None and isinstance(watcher.holder, ModelHolder)
