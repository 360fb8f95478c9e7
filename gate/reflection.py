"""gRPC server reflection, both versions: ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection implements only v1alpha; v1 (what current grpcurl, buf curl and Postman ask
first) has the same messages with the same field numbers under another package, so the same
servicer answers both. Its descriptor is the v1alpha one renamed, added to the default pool so
that v1 describes itself too.

Besides the services, reflection serves every file in the default pool by symbol: the
``google.rpc`` status and error-detail messages are imported here so that a client decoding the
``grpc-status-details-bin`` trailer of an INVALID_ARGUMENT (a ``google.rpc.Status`` holding a
``google.rpc.BadRequest``) can look both up by name.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
ERROR_MESSAGES = (
    status_pb2.Status.DESCRIPTOR.full_name,
    error_details_pb2.BadRequest.DESCRIPTOR.full_name,
    code_pb2.DESCRIPTOR.enum_types_by_name["Code"].full_name,
)
"""Error-model types a client needs to decode the gate's error answers; served by symbol."""


def _add_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool (once)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    alpha = proto.package
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(f".{alpha}.", f".{V1_PACKAGE}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{alpha}.", f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(f".{alpha}.", f".{V1_PACKAGE}.")
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha for ``service_names`` (both reflection services are
    listed too) and every file of the default pool."""
    _add_v1_descriptor()
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )
