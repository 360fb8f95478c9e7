"""Server reflection, v1 and v1alpha, as grpcurl / buf curl use it: list the services, and decode
an error answer's google.rpc.Status and BadRequest from descriptors fetched by reflection alone
(a fresh descriptor pool, no generated google.rpc code)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2

from tests.conftest import RunningGate, make_request

VERSIONS = ("grpc.reflection.v1", "grpc.reflection.v1alpha")


class Reflection:
    """A reflection client over one version's stream (the two versions share their wire format,
    so the v1alpha message classes encode v1 requests too)."""

    def __init__(self, channel: grpc.aio.Channel, version: str) -> None:
        self.call = channel.stream_stream(
            f"/{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )

    async def ask(
        self, request: reflection_pb2.ServerReflectionRequest
    ) -> reflection_pb2.ServerReflectionResponse:
        async for response in self.call(iter([request]), timeout=5):
            return response
        raise AssertionError("no reflection response")

    async def services(self) -> set[str]:
        resp = await self.ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        return {s.name for s in resp.list_services_response.service}

    async def add_file_of(self, symbol: str, pool: descriptor_pool.DescriptorPool) -> None:
        """Add the file defining ``symbol`` and its dependencies to ``pool``."""
        resp = await self.ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
        assert resp.HasField("file_descriptor_response"), (symbol, resp.error_response.error_message)
        files = {}
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto

        def add(name: str) -> None:
            try:
                pool.FindFileByName(name)
                return
            except KeyError:
                pass
            for dep in files[name].dependency:
                add(dep)
            pool.AddSerializedFile(files[name].SerializeToString())

        for name in files:
            add(name)

    async def message(self, full_name: str, data: bytes, pool: descriptor_pool.DescriptorPool) -> Message:
        await self.add_file_of(full_name, pool)
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
        return cls.FromString(data)


@pytest.mark.parametrize("version", VERSIONS)
async def test_reflection_lists_the_services_in_both_versions(gate: RunningGate, version: str) -> None:
    names = await Reflection(gate.channel, version).services()
    assert {
        "refundgate.v1.RefundGate",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert "refundgate.v1.GateAdmin" not in names  # on its own listener (gate/admin.py)


async def test_reflection_v1_describes_itself(gate: RunningGate) -> None:
    pool = descriptor_pool.DescriptorPool()
    await Reflection(gate.channel, "grpc.reflection.v1").add_file_of(
        "grpc.reflection.v1.ServerReflection", pool
    )
    service = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
    assert service.methods_by_name["ServerReflectionInfo"].input_type.full_name == (
        "grpc.reflection.v1.ServerReflectionRequest"
    )


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_bad_request_is_decoded_through_reflection_alone(gate: RunningGate, version: str) -> None:
    check = gate.channel.unary_unary("/refundgate.v1.RefundGate/Check")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(make_request(refund_id="rf:refl", currency="euro").SerializeToString(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailer = dict(info.value.trailing_metadata() or ())["grpc-status-details-bin"]
    assert isinstance(trailer, bytes)

    client = Reflection(gate.channel, version)
    pool = descriptor_pool.DescriptorPool()  # nothing but what reflection sends
    status = await client.message("google.rpc.Status", trailer, pool)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # type: ignore[attr-defined]
    [detail] = status.details  # type: ignore[attr-defined]
    type_name = detail.type_url.rpartition("/")[2]
    assert type_name == "google.rpc.BadRequest"
    bad = await client.message(type_name, detail.value, pool)
    fields = {v.field: v.description for v in bad.field_violations}  # type: ignore[attr-defined]
    assert list(fields) == ["currency"], fields
    assert fields["currency"]
