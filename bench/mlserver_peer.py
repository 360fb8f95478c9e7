"""MLServer's LightGBM runtime as a peer of ``make bench`` (``bench.run --peers mlserver``).

MLServer (Seldon) serves the same ``model.txt`` through its LightGBM runtime over the Open
Inference Protocol (KServe V2) gRPC API, ``inference.GRPCInferenceService/ModelInfer``: the model
only, no Redis, no policy. It lives in its own virtualenv, never in the gate's, and is not part of
``make test``::

    python3 -m venv .venv-mlserver
    .venv-mlserver/bin/pip install mlserver==1.7.1 mlserver-lightgbm==1.7.1

One MLServer process (``parallel_workers: 0``: inference in the process that serves gRPC, as the
issue's table measured it), whatever ``--workers`` says; the load generator then sends each Check's
feature row (request features, velocity missing) as one FP64 tensor of shape [1, features].
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

MODEL_NAME = "refund-model"
SERVICE = "inference.GRPCInferenceService"
INFER_METHOD = f"/{SERVICE}/ModelInfer"
READY_METHOD = f"/{SERVICE}/ModelReady"


class Unavailable(Exception):
    """MLServer cannot be run here (no virtualenv, or it does not start); the message says why."""


@dataclass
class Running:
    """A started MLServer."""

    proc: subprocess.Popen[bytes]
    port: int
    workers: list[int]
    log_path: Path


def start(venv: Path, model_dir: Path, workers: int, out: Path) -> Running:
    """Lay out a model repository for ``model_dir``'s model.txt and start ``mlserver start``."""
    mlserver = venv / "bin" / "mlserver"
    if not mlserver.exists():
        raise Unavailable(f"{mlserver} not found (see bench/mlserver_peer.py for how to make the venv)")
    from gate.devredis import free_port

    out = out.resolve()  # mlserver runs in it: a relative path would be taken from there
    shutil.rmtree(out, ignore_errors=True)
    model = out / MODEL_NAME
    model.mkdir(parents=True)
    shutil.copy(model_dir / "model.txt", model / "model.txt")
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": MODEL_NAME,
                "implementation": "mlserver_lightgbm.LightGBMModel",
                "parameters": {"uri": "./model.txt"},
            }
        )
    )
    port = free_port()
    (out / "settings.json").write_text(
        json.dumps(
            {
                "grpc_port": port,
                "http_port": free_port(),
                "metrics_port": free_port(),
                "host": "127.0.0.1",
                "parallel_workers": 0,
                "debug": False,
            }
        )
    )
    log_path = out / "mlserver.log"
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            [str(mlserver), "start", str(out)],
            cwd=out,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return Running(proc, port, [proc.pid], log_path)


def wait_ready(ml: Running, timeout_s: float) -> None:
    """Until the model answers ready on ModelReady (raises Unavailable past ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{ml.port}") as channel:
        ready = channel.unary_unary(READY_METHOD)
        while time.monotonic() < deadline:
            if ml.proc.poll() is not None:
                raise Unavailable(f"mlserver exited with {ml.proc.returncode}; see {ml.log_path}")
            try:
                if ready(ready_request(MODEL_NAME), timeout=1.0) == b"\x08\x01":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise Unavailable(f"mlserver not ready within {timeout_s} s; see {ml.log_path}")


# Open Inference Protocol messages, encoded by hand (the gate's venv has no MLServer): field
# numbers of grpc_service.proto (ModelInferRequest: model_name 1, inputs 5; InferInputTensor:
# name 1, datatype 2, shape 3, contents 5; InferTensorContents: fp64_contents 7; ModelReadyRequest:
# name 1).


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def ready_request(model: str) -> bytes:
    """A serialized ModelReadyRequest."""
    return _field(1, model.encode())


def infer_request(model: str, row: list[float]) -> bytes:
    """A serialized ModelInferRequest of one FP64 row (NaN: missing)."""
    shape = _varint(1) + _varint(len(row))
    values = struct.pack(f"<{len(row)}d", *(math.nan if v is None else v for v in row))
    tensor = _field(1, b"input-0") + _field(2, b"FP64") + _field(3, shape) + _field(5, _field(7, values))
    return _field(1, model.encode()) + _field(5, tensor)
