import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetModelStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("version", "engine", "loaded_at", "num_trees", "hold_threshold", "reject_threshold")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    NUM_TREES_FIELD_NUMBER: _ClassVar[int]
    HOLD_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REJECT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    version: str
    engine: str
    loaded_at: _timestamp_pb2.Timestamp
    num_trees: int
    hold_threshold: float
    reject_threshold: float
    def __init__(self, version: _Optional[str] = ..., engine: _Optional[str] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., num_trees: _Optional[int] = ..., hold_threshold: _Optional[float] = ..., reject_threshold: _Optional[float] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("slot", "reason", "at")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    slot: str
    reason: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, slot: _Optional[str] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("live", "shadow", "previous", "last_refusal", "refusals", "reloads")
    LIVE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    LAST_REFUSAL_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    live: ModelInfo
    shadow: ModelInfo
    previous: ModelInfo
    last_refusal: Refusal
    refusals: int
    reloads: int
    def __init__(self, live: _Optional[_Union[ModelInfo, _Mapping]] = ..., shadow: _Optional[_Union[ModelInfo, _Mapping]] = ..., previous: _Optional[_Union[ModelInfo, _Mapping]] = ..., last_refusal: _Optional[_Union[Refusal, _Mapping]] = ..., refusals: _Optional[int] = ..., reloads: _Optional[int] = ...) -> None: ...
