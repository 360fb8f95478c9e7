"""The baseline for ``make bench``: the gate's own gRPC stack with no work behind it.

It serves the real ``refundgate.v1.RefundGate`` service (so the load generator sends the very same
CheckRequest bytes to both servers and the server parses them with the same generated code),
plus ``grpc.health.v1``; ``Check`` answers a fixed CheckResponse of a realistic size without
looking at the request. Same grpc.aio server, same channel options, same SO_REUSEPORT forking
as ``gate.server.serve``: the difference between the two servers is the gate's work.

    python -m bench.echo --listen 127.0.0.1:50061 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gate.server import fork_workers, run_loop
from gate.settings import EVENT_LOOPS, Settings
from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RefundGate"].full_name
MAX_MESSAGE_BYTES = 64 * 1024  # as gate.settings.Settings.max_message_bytes


def fixed_response() -> pb.CheckResponse:
    """A CheckResponse shaped like a typical real answer (APPROVE with a score, no reasons)."""
    return pb.CheckResponse(
        refund_id="rf:0123456789abcdef:000123",
        decision=pb.DECISION_APPROVE,
        score=0.0123456789,
        model_version="echo-1",
        degraded=False,
        replayed=False,
        decision_id="d-0123456789abcdef01234567",
    )


class EchoService(pb_grpc.RefundGateServicer):
    """RefundGate whose Check does nothing but answer; RecordEvents accepts everything."""

    def __init__(self) -> None:
        self._response = fixed_response()

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:
        """Answer the fixed response."""
        return self._response

    async def RecordEvents(
        self, request: pb.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEventsResponse:
        """Accept every event."""
        return pb.RecordEventsResponse(accepted=len(request.events))


async def run_server(listen: str, *, reuse_port: bool) -> None:
    """Serve until SIGTERM/SIGINT, health SERVING from the start."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_RefundGateServicer_to_server(EchoService(), server)
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
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(1.0)


def serve(listen: str, workers: int, event_loop: str) -> int:
    """Run one server, or fork ``workers`` processes sharing the port, on the event loop the
    gate uses (as the gate does)."""
    if workers == 1:
        run_loop(event_loop, run_server(listen, reuse_port=False))
        return 0
    return fork_workers(workers, lambda _: run_loop(event_loop, run_server(listen, reuse_port=True)))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``--listen HOST:PORT --workers N --event-loop uvloop|asyncio``."""
    parser = argparse.ArgumentParser(prog="bench.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50061")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=Settings().event_loop)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    sys.exit(serve(args.listen, args.workers, args.event_loop))


if __name__ == "__main__":
    main()
