import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_QUEUED: _ClassVar[TaskState]
    TASK_STATE_ASSIGNED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_SUCCEEDED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]
    TASK_STATE_TIMED_OUT: _ClassVar[TaskState]

class WaitingReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WAITING_REASON_UNSPECIFIED: _ClassVar[WaitingReason]
    WAITING_REASON_NO_AGENT_IN_POOL: _ClassVar[WaitingReason]
    WAITING_REASON_NO_AGENT_FOR_KIND: _ClassVar[WaitingReason]
    WAITING_REASON_NO_AGENT_MATCHES_SELECTOR: _ClassVar[WaitingReason]
    WAITING_REASON_CONCURRENCY_LIMIT: _ClassVar[WaitingReason]
    WAITING_REASON_BUDGET: _ClassVar[WaitingReason]
    WAITING_REASON_PROVIDER_BACKOFF: _ClassVar[WaitingReason]
    WAITING_REASON_QUOTA_STORE: _ClassVar[WaitingReason]
    WAITING_REASON_RETRY_BACKOFF: _ClassVar[WaitingReason]
    WAITING_REASON_AGENTS_BUSY: _ClassVar[WaitingReason]

class RefusalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUSAL_REASON_UNSPECIFIED: _ClassVar[RefusalReason]
    REFUSAL_REASON_SIGNATURE_MISSING: _ClassVar[RefusalReason]
    REFUSAL_REASON_SIGNATURE_INVALID: _ClassVar[RefusalReason]
    REFUSAL_REASON_SIGNATURE_EXPIRED: _ClassVar[RefusalReason]
    REFUSAL_REASON_SIGNATURE_MISMATCH: _ClassVar[RefusalReason]
    REFUSAL_REASON_SIGNER_UNTRUSTED: _ClassVar[RefusalReason]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_QUEUED: TaskState
TASK_STATE_ASSIGNED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_SUCCEEDED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState
TASK_STATE_TIMED_OUT: TaskState
WAITING_REASON_UNSPECIFIED: WaitingReason
WAITING_REASON_NO_AGENT_IN_POOL: WaitingReason
WAITING_REASON_NO_AGENT_FOR_KIND: WaitingReason
WAITING_REASON_NO_AGENT_MATCHES_SELECTOR: WaitingReason
WAITING_REASON_CONCURRENCY_LIMIT: WaitingReason
WAITING_REASON_BUDGET: WaitingReason
WAITING_REASON_PROVIDER_BACKOFF: WaitingReason
WAITING_REASON_QUOTA_STORE: WaitingReason
WAITING_REASON_RETRY_BACKOFF: WaitingReason
WAITING_REASON_AGENTS_BUSY: WaitingReason
REFUSAL_REASON_UNSPECIFIED: RefusalReason
REFUSAL_REASON_SIGNATURE_MISSING: RefusalReason
REFUSAL_REASON_SIGNATURE_INVALID: RefusalReason
REFUSAL_REASON_SIGNATURE_EXPIRED: RefusalReason
REFUSAL_REASON_SIGNATURE_MISMATCH: RefusalReason
REFUSAL_REASON_SIGNER_UNTRUSTED: RefusalReason

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "payload", "pool", "selector", "priority", "state", "attempt", "max_attempts", "owner", "idempotency_key", "agent_id", "output", "error", "cancel_requested", "schedule_to_start_timeout", "start_to_close_timeout", "deadline", "created_at", "updated_at", "started_at", "finished_at", "usage", "waiting_reason", "submitted_by", "max_cost_micros", "attempt_usage", "output_schema", "waiting_reason_code", "waiting_until", "signature", "trace_id")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_TO_START_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    START_TO_CLOSE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_BY_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_USAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    WAITING_UNTIL_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: str
    payload: bytes
    pool: str
    selector: _containers.ScalarMap[str, str]
    priority: int
    state: TaskState
    attempt: int
    max_attempts: int
    owner: str
    idempotency_key: str
    agent_id: str
    output: bytes
    error: str
    cancel_requested: bool
    schedule_to_start_timeout: _duration_pb2.Duration
    start_to_close_timeout: _duration_pb2.Duration
    deadline: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    usage: Usage
    waiting_reason: str
    submitted_by: str
    max_cost_micros: int
    attempt_usage: _containers.RepeatedCompositeFieldContainer[AttemptUsage]
    output_schema: str
    waiting_reason_code: WaitingReason
    waiting_until: _timestamp_pb2.Timestamp
    signature: TaskSignature
    trace_id: str
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[str] = ..., payload: _Optional[bytes] = ..., pool: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., priority: _Optional[int] = ..., state: _Optional[_Union[TaskState, str]] = ..., attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., owner: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., agent_id: _Optional[str] = ..., output: _Optional[bytes] = ..., error: _Optional[str] = ..., cancel_requested: _Optional[bool] = ..., schedule_to_start_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., start_to_close_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., waiting_reason: _Optional[str] = ..., submitted_by: _Optional[str] = ..., max_cost_micros: _Optional[int] = ..., attempt_usage: _Optional[_Iterable[_Union[AttemptUsage, _Mapping]]] = ..., output_schema: _Optional[str] = ..., waiting_reason_code: _Optional[_Union[WaitingReason, str]] = ..., waiting_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., signature: _Optional[_Union[TaskSignature, _Mapping]] = ..., trace_id: _Optional[str] = ...) -> None: ...

class AttemptUsage(_message.Message):
    __slots__ = ("attempt", "agent_id", "usage")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    agent_id: str
    usage: Usage
    def __init__(self, attempt: _Optional[int] = ..., agent_id: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cost_micros", "model", "cache_creation_input_tokens", "cache_read_input_tokens", "reported_cost_micros", "cache_creation_1h_input_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CACHE_CREATION_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    CACHE_CREATION_1H_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cost_micros: int
    model: str
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    reported_cost_micros: int
    cache_creation_1h_input_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_micros: _Optional[int] = ..., model: _Optional[str] = ..., cache_creation_input_tokens: _Optional[int] = ..., cache_read_input_tokens: _Optional[int] = ..., reported_cost_micros: _Optional[int] = ..., cache_creation_1h_input_tokens: _Optional[int] = ...) -> None: ...

class TraceContext(_message.Message):
    __slots__ = ("traceparent", "tracestate")
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    TRACESTATE_FIELD_NUMBER: _ClassVar[int]
    traceparent: str
    tracestate: str
    def __init__(self, traceparent: _Optional[str] = ..., tracestate: _Optional[str] = ...) -> None: ...

class AttemptRef(_message.Message):
    __slots__ = ("task_id", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class TaskSignature(_message.Message):
    __slots__ = ("statement", "signature", "key_id", "public_key")
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    statement: bytes
    signature: bytes
    key_id: str
    public_key: bytes
    def __init__(self, statement: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class TaskStatement(_message.Message):
    __slots__ = ("kind", "payload_sha256", "pool", "selector", "max_cost_micros", "allowed_tools", "output_schema_sha256", "not_after", "nonce")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_SHA256_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    payload_sha256: bytes
    pool: str
    selector: _containers.ScalarMap[str, str]
    max_cost_micros: int
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    output_schema_sha256: bytes
    not_after: _timestamp_pb2.Timestamp
    nonce: bytes
    def __init__(self, kind: _Optional[str] = ..., payload_sha256: _Optional[bytes] = ..., pool: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., max_cost_micros: _Optional[int] = ..., allowed_tools: _Optional[_Iterable[str]] = ..., output_schema_sha256: _Optional[bytes] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., nonce: _Optional[bytes] = ...) -> None: ...
