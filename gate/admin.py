"""The GateAdmin listener: operators' view of the gate, on its own port, never the refund-facing one.

It binds ``GATE_ADMIN_LISTEN`` (loopback by default). With ``GATE_ADMIN_TOKEN`` set, every call
must carry ``authorization: Bearer <token>`` (compared in constant time), else UNAUTHENTICATED;
settings refuse an admin listener off loopback without a token. Answers name bundle versions and
model-directory slots, never filesystem paths.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath

import grpc

from gate.reloader import ModelHolder
from refundgate.v1 import admin_pb2, admin_pb2_grpc

_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s:'\"(),]+")


def without_paths(text: str) -> str:
    """``text`` with every absolute path replaced by its last component (a slot or version)."""
    return _ABSOLUTE_PATH.sub(lambda m: PurePosixPath(m.group()).name, text)


class GateAdminService(admin_pb2_grpc.GateAdminServicer):
    """Operators' view of the gate's models."""

    def __init__(self, holder: ModelHolder) -> None:
        self.holder = holder

    async def GetModelStatus(
        self, request: admin_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModelStatus:
        """Live, shadow and previous bundles and the last refusal."""
        h = self.holder
        status = admin_pb2.ModelStatus(refusals=h.refusals, reloads=h.reloads)
        for field, bundle in (("live", h.bundle), ("shadow", h.shadow), ("previous", h.previous)):
            if bundle is not None:
                info = getattr(status, field)
                info.version = bundle.version
                info.engine, info.num_trees = bundle.model.engine, bundle.model.num_trees
                info.hold_threshold = bundle.thresholds.hold
                info.reject_threshold = bundle.thresholds.reject
                info.loaded_at.FromNanoseconds(int(bundle.loaded_at * 1e9))
        if h.last_refusal is not None:
            r = h.last_refusal
            status.last_refusal.slot = PurePosixPath(r.path).name
            status.last_refusal.reason = without_paths(r.reason)
            status.last_refusal.at.FromNanoseconds(int(r.at * 1e9))
        return status


class BearerToken(grpc.aio.ServerInterceptor):
    """Admits a call only with ``authorization: Bearer <token>``; others get UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(_request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "GateAdmin needs 'authorization: Bearer <token>' metadata with GATE_ADMIN_TOKEN",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def admits(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        """True when ``metadata`` carries the token (constant-time comparison)."""
        sent = b""
        for key, value in metadata or ():
            if key == "authorization":
                sent = value if isinstance(value, bytes) else value.encode()
        return hmac.compare_digest(sent, self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self.admits(handler_call_details.invocation_metadata):  # type: ignore[attr-defined]
            return await continuation(handler_call_details)
        return self._deny  # every GateAdmin method is unary-unary


def create_admin_server(address: str, token: str, holder: ModelHolder) -> tuple[grpc.aio.Server, int]:
    """A GateAdmin server bound to ``address`` (port 0 picks one); returns it and its port.

    Raises OSError when the address cannot be bound."""
    interceptors = (BearerToken(token),) if token else ()
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    admin_pb2_grpc.add_GateAdminServicer_to_server(GateAdminService(holder), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises where older versions returned 0
        raise OSError(str(exc)) from None
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port
