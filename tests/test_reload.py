"""Model owners ship new bundles to a running gate: verified hot reload, refusal, rollback,
shadow scoring, and 20 reloads under load without a failed call."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import lightgbm as lgb
import pytest
import pytest_asyncio
import redis

from gate import reloader
from gate.bundle import BundleError
from gate.devredis import RedisProcess
from gate.features import FEATURE_NAMES
from gate.reloader import ModelHolder, ModelWatcher
from gate.settings import Settings
from model.package import golden_rows, write_bundle
from model.synthetic import synthetic_training_set
from refundgate.v1 import admin_pb2, admin_pb2_grpc
from refundgate.v1 import refund_gate_pb2 as pb
from tests.conftest import RunningGate, make_request, start_gate, stop_gate
from tests.test_bundle import edit_manifest, refresh_checksums


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another real model (other trees, other thresholds) to swap with the test bundle."""
    X, y = synthetic_training_set(seed=11)
    booster = lgb.train(
        {
            "objective": "binary",
            "num_leaves": 7,
            "verbosity": -1,
            "seed": 2,
            "deterministic": True,
            "num_threads": 1,
        },
        lgb.Dataset(X, y, feature_name=list(FEATURE_NAMES)),
        num_boost_round=25,
    )
    out = tmp_path_factory.mktemp("second") / "model-b"
    return write_bundle(
        out,
        booster,
        version="model-b",
        thresholds={"hold": 0.3, "reject": 0.8},
        golden_X=golden_rows(X, 30, seed=2),
        metrics={},
        card={},
    )


@pytest.fixture
def model_dir(tmp_path: Path, bundle_dir: Path, second_bundle: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(bundle_dir, root / "a")
    shutil.copytree(second_bundle, root / "b")
    os.symlink("a", root / "current")
    return root


def point(model_dir: Path, slot: str, target: str) -> None:
    """Swap a link atomically, the way `refund-gate model promote` and Kubernetes do."""
    tmp = model_dir / f".{slot}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, model_dir / slot)


@pytest_asyncio.fixture
async def live(
    redis_proc: RedisProcess, rdb: redis.Redis, model_dir: Path
) -> AsyncIterator[tuple[RunningGate, ModelWatcher]]:
    watcher = ModelWatcher(model_dir, ModelHolder(), poll_s=3600)  # the tests drive check()
    watcher.load_initial()
    settings = Settings.from_env({}, listen="127.0.0.1:0", redis_url=redis_proc.url, budget_ms=250.0)
    running = await start_gate(settings, watcher)
    yield running, watcher
    await stop_gate(running)


async def status(running: RunningGate) -> admin_pb2.ModelStatus:
    assert running.admin_channel is not None
    return await admin_pb2_grpc.GateAdminStub(running.admin_channel).GetModelStatus(
        admin_pb2.GetModelStatusRequest()
    )


async def test_swapping_current_loads_the_new_bundle_and_keeps_the_old(live: tuple) -> None:
    running, watcher = live
    assert (await running.stub.Check(make_request())).model_version == "test-model-1"
    point(watcher.model_dir, "current", "b")
    await watcher.check()
    resp = await running.stub.Check(make_request(refund_id="rf:2", order_id="o:2"))
    assert resp.model_version == "model-b"
    st = await status(running)
    assert (st.live.version, st.previous.version, st.live.engine) == ("model-b", "test-model-1", "compiled")
    assert st.live.loaded_at.seconds > 0 and st.live.hold_threshold == 0.3


async def test_rollback_is_instant_because_the_previous_bundle_stays_loaded(
    live: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, watcher = live
    point(watcher.model_dir, "current", "b")
    await watcher.check()
    loads: list[Path] = []
    real_load = reloader.load_bundle
    monkeypatch.setattr(reloader, "load_bundle", lambda p: loads.append(p) or real_load(p))
    point(watcher.model_dir, "current", "a")
    await watcher.check()
    assert loads == [] and watcher.holder.bundle.version == "test-model-1"


def corrupt(path: Path) -> None:
    (path / "model.txt").write_text((path / "model.txt").read_text().replace("0.", "1.", 3))


def truncate(path: Path) -> None:
    data = (path / "model.txt").read_bytes()
    (path / "model.txt").write_bytes(data[: len(data) // 3])


def mismatch(path: Path) -> None:
    edit_manifest(path, lambda m: m["features"].pop())


def half_copied(path: Path) -> None:
    (path / "golden.json").unlink()


def wrong_golden(path: Path) -> None:
    golden = json.loads((path / "golden.json").read_text())
    golden["scores"][0] = 0.5 if golden["scores"][0] != 0.5 else 0.25
    (path / "golden.json").write_text(json.dumps(golden))
    refresh_checksums(path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt, "checksum of model.txt"),
        (truncate, "checksum of model.txt"),
        (mismatch, "feature list differs"),
        (half_copied, "golden.json is missing"),
        (wrong_golden, "golden row 0"),
    ],
)
async def test_a_bad_bundle_is_refused_and_the_live_one_keeps_serving(
    live: tuple, damage: object, reason: str
) -> None:
    running, watcher = live
    bad = watcher.model_dir / "bad"
    shutil.copytree(watcher.model_dir / "b", bad)
    damage(bad)  # type: ignore[operator]
    point(watcher.model_dir, "current", "bad")
    await watcher.check()
    resp = await running.stub.Check(make_request())
    assert resp.model_version == "test-model-1" and not resp.degraded
    st = await status(running)
    assert st.refusals == 1 and reason in st.last_refusal.reason
    assert st.last_refusal.slot == "current"


async def test_shadow_scores_every_request_but_never_decides(live: tuple, rdb: redis.Redis) -> None:
    running, watcher = live
    point(watcher.model_dir, "shadow", "b")
    await watcher.check()
    responses = [
        await running.stub.Check(make_request(refund_id=f"rf:s{i}", order_id=f"o:s{i}")) for i in range(5)
    ]
    assert {r.model_version for r in responses} == {"test-model-1"}
    log = running.gate.decision_log
    assert log is not None
    await log.flush()
    await running.gate.redis.call([("PING",)], timeout_s=2)
    entries = [json.loads(f[b"d"]) for _, f in rdb.xrange("rg:decisions")]
    assert len(entries) == 5
    shadow_model = watcher.holder.shadow.model
    for entry in entries:
        assert entry["model_version"] == "test-model-1"
        assert entry["shadow"]["model_version"] == "model-b"
        row = [math.nan if v is None else v for v in entry["features"]]
        assert entry["shadow"]["score"] == shadow_model.score(row)
    assert (await status(running)).shadow.version == "model-b"
    (watcher.model_dir / "shadow").unlink()
    await watcher.check()
    assert watcher.holder.shadow is None


async def test_twenty_reloads_under_load_fail_no_call_and_mix_no_models(
    live: tuple, rdb: redis.Redis
) -> None:
    running, watcher = live
    models = {"test-model-1": watcher.holder.bundle.model}
    failures: list[grpc.StatusCode] = []
    responses: list[pb.CheckResponse] = []
    started_after: list[int] = []  # swaps completed before each call was sent
    swaps = 0
    stop, answered = asyncio.Event(), asyncio.Event()

    async def caller(k: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            generation = swaps
            try:
                responses.append(
                    await running.stub.Check(
                        make_request(
                            refund_id=f"rf:l{k}-{n}", order_id=f"o:l{k}-{n}", account_id=f"acct:l{k}"
                        )
                    )
                )
                started_after.append(generation)
                answered.set()
            except grpc.aio.AioRpcError as err:
                failures.append(err.code())

    callers = [asyncio.create_task(caller(k)) for k in range(8)]
    for i in range(20):
        target = "b" if i % 2 == 0 else "a"
        point(watcher.model_dir, "current", target)
        await watcher.check()
        expected = "model-b" if target == "b" else "test-model-1"
        assert watcher.holder.bundle.version == expected
        models[expected] = watcher.holder.bundle.model
        swaps += 1
        settled = len(responses)
        while len(responses) < settled + 12:  # let traffic flow on this model
            answered.clear()
            await answered.wait()
        # Calls in flight at the swap may finish on the old model; every call sent after it
        # names the new one.
        after = [r for r, g in zip(responses, started_after, strict=True) if g == swaps]
        assert after and all(r.model_version == expected for r in after)
    stop.set()
    await asyncio.gather(*callers)

    assert failures == []
    assert len(responses) > 100
    log = running.gate.decision_log
    assert log is not None
    await log.flush()
    await running.gate.redis.call([("PING",)], timeout_s=2)
    entries = [json.loads(f[b"d"]) for _, f in rdb.xrange("rg:decisions")]
    assert len(entries) == len(responses)
    for entry in entries:  # each decision was scored entirely by the model it names
        row = [math.nan if v is None else v for v in entry["features"]]
        assert entry["score"] == models[entry["model_version"]].score(row)


async def test_the_collector_runs_again_after_a_load_loaded_or_refused(
    tmp_path: Path, bundle_dir: Path
) -> None:
    frozen = gc.get_freeze_count()
    with pytest.raises(BundleError):
        await reloader._load_in_thread(tmp_path / "nothing here")
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen  # a refused load's leftovers stay collectable
    assert (await reloader._load_in_thread(bundle_dir)).version
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen  # a loaded bundle is frozen out of collections
