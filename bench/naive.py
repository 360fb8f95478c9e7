"""The naive peer for ``make bench``: the refund check as a user would write it in an afternoon.

A grpc.aio server of the same ``refundgate.v1.RefundGate`` service (generated servicer, the
framework parses the request), one redis-py asyncio pipeline of five counters per Check (refunds
per account, device, IP, merchant and order, each an INCR with a 30-day expiry), a feature row of
the served model's features filled from the request and those counters (the rest missing), and
``lightgbm.Booster.predict`` on it with ``OMP_NUM_THREADS=1`` (LightGBM's default OpenMP team spins
on every core and made this peer 2.5-4x slower). Thresholds from the bundle's manifest. No
validation, no retries, no degraded mode, no telemetry, no decision log: what it does not do is the
gate's extra work, so Check / naive says what that work costs against the part both do.

    python -m bench.naive --listen 127.0.0.1:50071 --workers 2 --redis-url redis://... --model-dir ...
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before lightgbm (and its OpenMP runtime) is loaded

import argparse
import asyncio
import json
import math
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import lightgbm as lgb
import numpy as np
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gate.server import fork_workers, run_loop
from gate.settings import EVENT_LOOPS, Settings
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RefundGate"].full_name
TTL_S = 30 * 86400


class NaiveService(pb_grpc.RefundGateServicer):
    """Check: five counters, one predict, two thresholds."""

    def __init__(self, model_dir: Path, redis_url: str) -> None:
        manifest = json.loads((model_dir / "manifest.json").read_text())
        self.features: list[str] = manifest["features"]
        self.version = str(manifest["version"])
        self.hold = float(manifest["thresholds"]["hold"])
        self.reject = float(manifest["thresholds"]["reject"])
        self.booster = lgb.Booster(model_file=str(model_dir / "model.txt"))
        self.index = {name: i for i, name in enumerate(self.features)}
        self.redis = aioredis.Redis.from_url(redis_url)

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:
        """Count, score, decide."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for kind, entity in (
                ("acct", request.account_id),
                ("dev", request.device_id),
                ("ip", request.ip),
                ("m", request.merchant_id),
                ("ord", request.order_id),
            ):
                pipe.incr(f"naive:{kind}:{entity}")
                pipe.expire(f"naive:{kind}:{entity}", TTL_S)
            counts = (await pipe.execute())[::2]
        row = np.full(len(self.features), math.nan)
        now = time.time()
        order_at = request.order_created_at.seconds
        values = {
            "minutes_order_to_request": (now - order_at) / 60.0 if order_at else math.nan,
            "refund_order_ratio": request.amount_minor / max(request.order_amount_minor, 1),
            "log10_amount": math.log10(max(request.amount_minor, 1)),
            "reason_code": float(request.reason),
            "item_category": float(request.item_category),
            "delivery_status": float(request.delivery_status),
            "payment_method": float(request.payment_method),
            "item_returned": float(request.item_returned),
            "acct_refunds_30d": float(counts[0]),
            "dev_refunds_24h": float(counts[1]),
            "ip_refunds_24h": float(counts[2]),
            "m_refunds_7d": float(counts[3]),
            "order_refund_requests": float(counts[4]),
        }
        created = request.account_created_at.seconds
        if created:
            values["account_age_days"] = (now - created) / 86400.0
        for name, value in values.items():
            if name in self.index:
                row[self.index[name]] = value
        score = float(self.booster.predict(row.reshape(1, -1))[0])
        decision = (
            pb.DECISION_REJECT
            if score >= self.reject
            else pb.DECISION_HOLD_FOR_REVIEW
            if score >= self.hold
            else pb.DECISION_APPROVE
        )
        return pb.CheckResponse(
            refund_id=request.refund_id,
            decision=decision,
            score=score,
            model_version=self.version,
            decision_id="d-" + uuid.uuid4().hex[:24],
        )

    async def RecordEvents(
        self, request: pb.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEventsResponse:
        """Accept every event (the naive stack keeps no order history)."""
        return pb.RecordEventsResponse(accepted=len(request.events))


async def run_server(listen: str, model_dir: Path, redis_url: str, *, reuse_port: bool) -> None:
    """Serve until SIGTERM/SIGINT, health SERVING from the start."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    pb_grpc.add_RefundGateServicer_to_server(NaiveService(model_dir, redis_url), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot bind {listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``--listen --workers --redis-url --model-dir --event-loop``."""
    parser = argparse.ArgumentParser(prog="bench.naive", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50071")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=Settings().event_loop)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")

    def serve(reuse_port: bool) -> None:
        main = run_server(args.listen, args.model_dir, args.redis_url, reuse_port=reuse_port)
        run_loop(args.event_loop, main)

    if args.workers == 1:
        serve(False)
        sys.exit(0)
    sys.exit(fork_workers(args.workers, lambda _: serve(True)))


if __name__ == "__main__":
    main()
