import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RefundReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUND_REASON_UNSPECIFIED: _ClassVar[RefundReason]
    REFUND_REASON_ITEM_NOT_RECEIVED: _ClassVar[RefundReason]
    REFUND_REASON_DAMAGED: _ClassVar[RefundReason]
    REFUND_REASON_NOT_AS_DESCRIBED: _ClassVar[RefundReason]
    REFUND_REASON_CHANGED_MIND: _ClassVar[RefundReason]
    REFUND_REASON_DUPLICATE_CHARGE: _ClassVar[RefundReason]
    REFUND_REASON_OTHER: _ClassVar[RefundReason]

class ItemCategory(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_CATEGORY_UNSPECIFIED: _ClassVar[ItemCategory]
    ITEM_CATEGORY_PHYSICAL: _ClassVar[ItemCategory]
    ITEM_CATEGORY_DIGITAL_GOODS: _ClassVar[ItemCategory]
    ITEM_CATEGORY_SERVICE: _ClassVar[ItemCategory]

class DeliveryStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_STATUS_UNSPECIFIED: _ClassVar[DeliveryStatus]
    DELIVERY_STATUS_NOT_SHIPPED: _ClassVar[DeliveryStatus]
    DELIVERY_STATUS_IN_TRANSIT: _ClassVar[DeliveryStatus]
    DELIVERY_STATUS_DELIVERED: _ClassVar[DeliveryStatus]
    DELIVERY_STATUS_UNKNOWN: _ClassVar[DeliveryStatus]

class PaymentMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYMENT_METHOD_UNSPECIFIED: _ClassVar[PaymentMethod]
    PAYMENT_METHOD_CARD: _ClassVar[PaymentMethod]
    PAYMENT_METHOD_WALLET: _ClassVar[PaymentMethod]
    PAYMENT_METHOD_BNPL: _ClassVar[PaymentMethod]
    PAYMENT_METHOD_BANK_TRANSFER: _ClassVar[PaymentMethod]
    PAYMENT_METHOD_STORE_CREDIT: _ClassVar[PaymentMethod]
    PAYMENT_METHOD_OTHER: _ClassVar[PaymentMethod]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_APPROVE: _ClassVar[Decision]
    DECISION_HOLD_FOR_REVIEW: _ClassVar[Decision]
    DECISION_REJECT: _ClassVar[Decision]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_ORDER_PLACED: _ClassVar[EventType]
    EVENT_TYPE_ORDER_DELIVERED: _ClassVar[EventType]
    EVENT_TYPE_REFUND_OUTCOME: _ClassVar[EventType]

class RefundOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUND_OUTCOME_UNSPECIFIED: _ClassVar[RefundOutcome]
    REFUND_OUTCOME_PAID: _ClassVar[RefundOutcome]
    REFUND_OUTCOME_REVIEW_APPROVED: _ClassVar[RefundOutcome]
    REFUND_OUTCOME_REVIEW_REJECTED: _ClassVar[RefundOutcome]
    REFUND_OUTCOME_CHARGEBACK: _ClassVar[RefundOutcome]
    REFUND_OUTCOME_CONFIRMED_ABUSE: _ClassVar[RefundOutcome]
REFUND_REASON_UNSPECIFIED: RefundReason
REFUND_REASON_ITEM_NOT_RECEIVED: RefundReason
REFUND_REASON_DAMAGED: RefundReason
REFUND_REASON_NOT_AS_DESCRIBED: RefundReason
REFUND_REASON_CHANGED_MIND: RefundReason
REFUND_REASON_DUPLICATE_CHARGE: RefundReason
REFUND_REASON_OTHER: RefundReason
ITEM_CATEGORY_UNSPECIFIED: ItemCategory
ITEM_CATEGORY_PHYSICAL: ItemCategory
ITEM_CATEGORY_DIGITAL_GOODS: ItemCategory
ITEM_CATEGORY_SERVICE: ItemCategory
DELIVERY_STATUS_UNSPECIFIED: DeliveryStatus
DELIVERY_STATUS_NOT_SHIPPED: DeliveryStatus
DELIVERY_STATUS_IN_TRANSIT: DeliveryStatus
DELIVERY_STATUS_DELIVERED: DeliveryStatus
DELIVERY_STATUS_UNKNOWN: DeliveryStatus
PAYMENT_METHOD_UNSPECIFIED: PaymentMethod
PAYMENT_METHOD_CARD: PaymentMethod
PAYMENT_METHOD_WALLET: PaymentMethod
PAYMENT_METHOD_BNPL: PaymentMethod
PAYMENT_METHOD_BANK_TRANSFER: PaymentMethod
PAYMENT_METHOD_STORE_CREDIT: PaymentMethod
PAYMENT_METHOD_OTHER: PaymentMethod
DECISION_UNSPECIFIED: Decision
DECISION_APPROVE: Decision
DECISION_HOLD_FOR_REVIEW: Decision
DECISION_REJECT: Decision
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_ORDER_PLACED: EventType
EVENT_TYPE_ORDER_DELIVERED: EventType
EVENT_TYPE_REFUND_OUTCOME: EventType
REFUND_OUTCOME_UNSPECIFIED: RefundOutcome
REFUND_OUTCOME_PAID: RefundOutcome
REFUND_OUTCOME_REVIEW_APPROVED: RefundOutcome
REFUND_OUTCOME_REVIEW_REJECTED: RefundOutcome
REFUND_OUTCOME_CHARGEBACK: RefundOutcome
REFUND_OUTCOME_CONFIRMED_ABUSE: RefundOutcome

class CheckRequest(_message.Message):
    __slots__ = ("refund_id", "account_id", "order_id", "merchant_id", "amount_minor", "order_amount_minor", "currency", "reason", "item_category", "delivery_status", "item_returned", "payment_method", "order_created_at", "account_created_at", "requested_at", "device_id", "ip", "geo_city")
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    MERCHANT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    ORDER_AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ITEM_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_STATUS_FIELD_NUMBER: _ClassVar[int]
    ITEM_RETURNED_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_METHOD_FIELD_NUMBER: _ClassVar[int]
    ORDER_CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    GEO_CITY_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    account_id: str
    order_id: str
    merchant_id: str
    amount_minor: int
    order_amount_minor: int
    currency: str
    reason: RefundReason
    item_category: ItemCategory
    delivery_status: DeliveryStatus
    item_returned: bool
    payment_method: PaymentMethod
    order_created_at: _timestamp_pb2.Timestamp
    account_created_at: _timestamp_pb2.Timestamp
    requested_at: _timestamp_pb2.Timestamp
    device_id: str
    ip: str
    geo_city: str
    def __init__(self, refund_id: _Optional[str] = ..., account_id: _Optional[str] = ..., order_id: _Optional[str] = ..., merchant_id: _Optional[str] = ..., amount_minor: _Optional[int] = ..., order_amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., reason: _Optional[_Union[RefundReason, str]] = ..., item_category: _Optional[_Union[ItemCategory, str]] = ..., delivery_status: _Optional[_Union[DeliveryStatus, str]] = ..., item_returned: _Optional[bool] = ..., payment_method: _Optional[_Union[PaymentMethod, str]] = ..., order_created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., account_created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., device_id: _Optional[str] = ..., ip: _Optional[str] = ..., geo_city: _Optional[str] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("code", "detail")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    code: str
    detail: str
    def __init__(self, code: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("refund_id", "decision", "score", "reasons", "model_version", "degraded", "replayed", "decision_id")
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    decision: Decision
    score: float
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    model_version: str
    degraded: bool
    replayed: bool
    decision_id: str
    def __init__(self, refund_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., score: _Optional[float] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., model_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., replayed: _Optional[bool] = ..., decision_id: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "type", "occurred_at", "account_id", "merchant_id", "order_id", "amount_minor", "currency", "item_category", "payment_method", "device_id", "ip", "geo_city", "refund_id", "outcome", "account_created_at")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    MERCHANT_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    ITEM_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_METHOD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    GEO_CITY_FIELD_NUMBER: _ClassVar[int]
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    type: EventType
    occurred_at: _timestamp_pb2.Timestamp
    account_id: str
    merchant_id: str
    order_id: str
    amount_minor: int
    currency: str
    item_category: ItemCategory
    payment_method: PaymentMethod
    device_id: str
    ip: str
    geo_city: str
    refund_id: str
    outcome: RefundOutcome
    account_created_at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., account_id: _Optional[str] = ..., merchant_id: _Optional[str] = ..., order_id: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., item_category: _Optional[_Union[ItemCategory, str]] = ..., payment_method: _Optional[_Union[PaymentMethod, str]] = ..., device_id: _Optional[str] = ..., ip: _Optional[str] = ..., geo_city: _Optional[str] = ..., refund_id: _Optional[str] = ..., outcome: _Optional[_Union[RefundOutcome, str]] = ..., account_created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RecordEventsResponse(_message.Message):
    __slots__ = ("accepted", "duplicates")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...
