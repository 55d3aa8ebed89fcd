"""Any input, a clean status (issue 9, item 1).

Example tests: undecodable bytes on every method of both listeners get
INVALID_ARGUMENT with a short message; out-of-range Durations, Timestamps, enums,
integers and page tokens get INVALID_ARGUMENT naming the field.

Property test (hypothesis): random bytes, random messages built from the protobuf
descriptors (extreme numbers, undefined enum values, Durations and Timestamps out of
range, control characters) and byte-level mutations of those, sent to every RPC of
every service on a real server: the api listener with an admin token (TaskService,
AdminService, EnrollmentService, health, reflection) and the agent listener with a
real enrolled agent's mTLS credentials (Connect, Renew). It asserts that no call ends
UNKNOWN or INTERNAL, that no status carries Python exception text, that the server
stays healthy (health check SERVING after), and that a *refused* call changes nothing.

Why only refused calls are compared: with an admin token, a mutated message may well
be a valid request (a CreateApiToken with a random valid name) that rightly creates
something. So the row counts (tasks, API tokens, bootstrap tokens, tenants, agents,
certificates, budgets, pool settings, and audit events that record a change) are
compared before and after each call that did not end OK. Audit rows that record a
refusal (outcome ``denied``, ``auth.*``, ``agent.suspicious``), a stream's connect
and disconnect, and work moving through a stream (``task.assign``, ``task.finish``,
``task.requeue``: a Connect whose Hello was welcomed before a later message was
refused did real work first) are the server doing its job and are not counted; every
other audit row (a token, budget, agent, certificate or task created, changed or
deleted) is.

The hypothesis run happens in a worker thread with blocking gRPC channels, while the
server keeps running on the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import descriptor as pbd
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from muster import AsyncClient
from muster.server.app import ServerHandle
from muster.server.interceptors.decode import nul_field
from muster.server.storage import models
from muster.v1 import admin_pb2, agent_pb2, common_pb2, enrollment_pb2, task_pb2
from tests.agentsim import Enrolled, Enroller, make_csr
from tests.conftest import client_config

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("MUSTER_HOSTILE_EXAMPLES", "150"))
"""Examples per service; raise it for a longer hunt (the suite keeps to 150)."""
BAD_STATUSES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
LEAKS = ("Traceback", "Unexpected <class", "Error parsing", "Exception", "DecodeError")
GARBAGE = b"\xff\xff\xff\xff"
CSR = make_csr()[0]
"""One valid CSR (made once: a strategy must draw the same way every time)."""

SERVICES: dict[str, pbd.ServiceDescriptor] = {
    "task": task_pb2.DESCRIPTOR.services_by_name["TaskService"],
    "admin": admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    "enrollment": enrollment_pb2.DESCRIPTOR.services_by_name["EnrollmentService"],
    "health": health_pb2.DESCRIPTOR.services_by_name["Health"],
    "reflection": reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    "agent": agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
}


def path(method: pbd.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# Channels


class Target:
    """A blocking channel to one listener with the credentials it needs."""

    def __init__(self, server: ServerHandle, agent: Enrolled | None) -> None:
        if agent is None:
            bundle = (server.config.ca_dir / "bundle.pem").read_bytes()
            self.channel = grpc.secure_channel(
                server.api_address, grpc.ssl_channel_credentials(bundle)
            )
            self.metadata: tuple[tuple[str, str], ...] = (
                ("authorization", f"Bearer {client_config(server).token}"),
            )
        else:
            self.channel = grpc.secure_channel(agent.endpoint, agent.credentials())
            self.metadata = ()

    def call(
        self, method: pbd.MethodDescriptor, payloads: list[bytes], timeout: float = 5.0
    ) -> tuple[grpc.StatusCode, str]:
        """Send raw request bytes; the final status code and details."""
        name = path(method)
        try:
            if method.client_streaming:
                responses = self.channel.stream_stream(name)(
                    iter(payloads), metadata=self.metadata, timeout=timeout
                )
                for _ in responses:
                    pass
            elif method.server_streaming:
                responses = self.channel.unary_stream(name)(
                    payloads[0], metadata=self.metadata, timeout=timeout
                )
                for _ in responses:
                    pass
            else:
                self.channel.unary_unary(name)(payloads[0], metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""  # type: ignore[attr-defined]
        return grpc.StatusCode.OK, ""

    def close(self) -> None:
        self.channel.close()


# What is counted


DISPATCH_ACTIONS = ("task.assign", "task.requeue", "task.finish", "task.wait", "task.budget_wait")
"""Work moving through a stream: a Connect welcomed before one of its later messages is
refused has rightly been assigned work, finished it or released it."""

COUNTED = (
    models.Task,
    models.ApiToken,
    models.BootstrapToken,
    models.Tenant,
    models.Agent,
    models.Certificate,
    models.Budget,
    models.PoolSettings,
)


async def counts(server: ServerHandle) -> dict[str, int]:
    """Row counts of what a call could create, change or delete (one query: it runs twice
    per example)."""
    await server.flush_audit()
    audit = models.AuditEvent
    changes = (
        select(func.count())
        .select_from(audit)
        .where(
            audit.outcome != "denied",
            ~audit.action.startswith("stream."),
            ~audit.action.startswith("auth."),
            audit.action.not_in(("agent.suspicious", *DISPATCH_ACTIONS)),
        )
    )
    names = [model.__tablename__ for model in COUNTED] + ["audit_events (changes)"]
    queries = [select(func.count()).select_from(model) for model in COUNTED] + [changes]
    async with server.db.transaction() as session:
        row = (await session.execute(select(*(q.scalar_subquery() for q in queries)))).one()
    return dict(zip(names, row, strict=True))


# Strategies

INT_BOUNDS = {
    pbd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    pbd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

INTERESTING_TEXT = [
    "",
    "default",
    "echo",
    "sleep",
    "admin",
    "admin\n",
    "web-01\n",
    "a\x00b",
    "\x00",
    "x\u202egnp.exe",
    "global",
    "tenant:acme",
    "pool:default",
    "task:abc",
    "month",
    "day",
    "claude-sonnet-4-5",
    "web-*",
    "muster.v1.TaskService",
    "grpc.health.v1.Health",
    "muster/v1/task.proto",
    "bWF4|eA==",
    "MjAyNi0wMS0wMVQwMDowMDowMHxhYmM=",  # a page token with a naive time
    "x" * 300,
    "{}",
    '{"type": "object"}',
    '{"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": []}',
]


def interesting_ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, 1000, 1001, 10**15 + 1, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


DURATION_SECONDS = interesting_ints(-(2**63), 2**63 - 1) | st.sampled_from(
    [2**62, 315_576_000_000, 315_576_000_001, -1, 86400 * 31, 3600]
)
TIMESTAMP_SECONDS = interesting_ints(-(2**63), 2**63 - 1) | st.sampled_from(
    [253_402_300_800, 253_402_300_799, -62_135_596_801, 1_900_000_000, 4_102_444_800]
)
NANOS = interesting_ints(-(2**31), 2**31 - 1) | st.sampled_from([-1, 999_999_999, 10**9])


def well_known(descriptor: pbd.Descriptor) -> st.SearchStrategy[Message] | None:
    if descriptor.full_name == Duration.DESCRIPTOR.full_name:
        return st.builds(Duration, seconds=DURATION_SECONDS, nanos=NANOS)
    if descriptor.full_name == Timestamp.DESCRIPTOR.full_name:
        return st.builds(Timestamp, seconds=TIMESTAMP_SECONDS, nanos=NANOS)
    return None


def scalar(field: pbd.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_BOUNDS:
        return interesting_ints(*INT_BOUNDS[kind])
    if kind == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == pbd.FieldDescriptor.TYPE_DOUBLE:
        return st.floats() | st.sampled_from([0.0, -1.0, 1e300, 5e-7, 1_000_000.5])
    if kind == pbd.FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == pbd.FieldDescriptor.TYPE_ENUM:
        defined = [v.number for v in field.enum_type.values]
        return st.sampled_from(defined) | interesting_ints(-(2**31), 2**31 - 1)
    if kind == pbd.FieldDescriptor.TYPE_STRING:
        return st.sampled_from(INTERESTING_TEXT) | st.text(max_size=40)
    if kind == pbd.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64) | st.sampled_from([b"", b"{}", CSR])
    raise AssertionError(f"unhandled field type {kind}")


@st.composite
def messages(draw: st.DrawFn, descriptor: pbd.Descriptor, depth: int = 0) -> Message:
    """A message of ``descriptor``'s type with random fields set (any values the wire
    format allows, most of them out of the server's ranges)."""
    special = well_known(descriptor)
    if special is not None:
        return draw(special)
    cls: type[Message] = _message_class(descriptor)
    message = cls()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        if field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            entry = field.message_type
            if entry.GetOptions().map_entry:
                key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
                keys = draw(st.lists(scalar(key_field), max_size=3))
                target = getattr(message, field.name)
                for key in keys:
                    if value_field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
                        if depth < 3:
                            target[key].CopyFrom(
                                draw(messages(value_field.message_type, depth + 1))
                            )
                    else:
                        target[key] = draw(scalar(value_field))
                continue
            if depth >= 3:
                continue
            if repeated:
                for item in draw(st.lists(messages(entry, depth + 1), max_size=3)):
                    getattr(message, field.name).add().CopyFrom(item)
            else:
                getattr(message, field.name).CopyFrom(draw(messages(entry, depth + 1)))
        elif repeated:
            getattr(message, field.name).extend(draw(st.lists(scalar(field), max_size=3)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    return message


def _message_class(descriptor: pbd.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with bytes flipped, cut, inserted or doubled."""
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "double"]))
        if how == "flip" and buffer:
            at = draw(st.integers(0, len(buffer) - 1))
            buffer[at] ^= draw(st.integers(1, 255))
        elif how == "cut" and buffer:
            buffer = buffer[: draw(st.integers(0, len(buffer) - 1))]
        elif how == "insert":
            at = draw(st.integers(0, len(buffer)))
            buffer[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            buffer = buffer + buffer
    return bytes(buffer)


def seeds(method: pbd.MethodDescriptor, agent: Enrolled | None) -> list[Message]:
    """Valid requests that reach deeper than random ones, to mutate."""
    hello = agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(agent_version="t", capabilities=["echo"], max_concurrency=1)
    )
    known: dict[str, list[Message]] = {
        "Submit": [task_pb2.SubmitRequest(kind="echo", payload=b"{}")],
        "List": [task_pb2.ListTasksRequest(states=[common_pb2.TASK_STATE_QUEUED])],
        "CreateApiToken": [
            admin_pb2.CreateApiTokenRequest(
                name="bot", role=admin_pb2.ROLE_SUBMITTER, ttl=Duration(seconds=60)
            )
        ],
        "CreateBootstrapToken": [
            admin_pb2.CreateBootstrapTokenRequest(pool="default", ttl=Duration(seconds=60))
        ],
        "QueryAudit": [admin_pb2.QueryAuditRequest(since=Timestamp(seconds=1), limit=5)],
        "SetBudget": [admin_pb2.SetBudgetRequest(scope="global", limit_micros=10, period="day")],
        "Enroll": [enrollment_pb2.EnrollRequest(token="mbt_0", csr_pem=CSR, name="x")],
        "Connect": [hello],
        "Renew": [agent_pb2.RenewRequest(csr_pem=CSR)],
        "ServerReflectionInfo": [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="muster.v1.Task"),
        ],
        "Check": [health_pb2.HealthCheckRequest(service="")],
    }
    return known.get(method.name, [])


def payloads(method: pbd.MethodDescriptor, agent: Enrolled | None) -> st.SearchStrategy[bytes]:
    structured = messages(method.input_type).map(_serialize)
    valid = seeds(method, agent)
    sources: list[st.SearchStrategy[bytes]] = [
        st.binary(max_size=64),
        structured,
        structured.flatmap(mutated),
    ]
    if valid:
        seeded = st.sampled_from([m.SerializeToString() for m in valid])
        sources += [seeded, seeded.flatmap(mutated)]
    return st.one_of(sources)


def _serialize(message: Message) -> bytes:
    try:
        return message.SerializeToString()
    except Exception:  # e.g. a value the encoder refuses: send garbage instead
        return GARBAGE


def requests(
    method: pbd.MethodDescriptor, agent: Enrolled | None
) -> st.SearchStrategy[list[bytes]]:
    one = payloads(method, agent)
    if not method.client_streaming:
        return one.map(lambda p: [p])
    if method.name == "Connect":
        hello = seeds(method, agent)[0].SerializeToString()
        # Mostly a valid Hello first, so the messages after it reach the session.
        return st.one_of(
            st.lists(one, min_size=1, max_size=3),
            st.lists(one, min_size=1, max_size=3).map(lambda rest: [hello, *rest]),
        )
    return st.lists(one, min_size=1, max_size=3)


# The property


def run_property(
    server: ServerHandle,
    loop: asyncio.AbstractEventLoop,
    service: pbd.ServiceDescriptor,
    agent: Enrolled | None,
    max_examples: int,
) -> None:
    target = Target(server, agent)
    methods = list(service.methods)

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def hostile(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(methods), label="method")
        sent = data.draw(requests(method, agent), label="payloads")
        before = on_loop(counts(server))
        # Streams that would wait for more (Watch, health Watch) end at the deadline.
        timeout = 0.1 if method.server_streaming else 5.0
        code, details = target.call(method, sent, timeout)
        assert code not in BAD_STATUSES, (path(method), code, details)
        assert not any(leak in details for leak in LEAKS), (path(method), details)
        if code is not grpc.StatusCode.OK:
            assert on_loop(counts(server)) == before, (path(method), code, details)

    try:
        hostile()
    finally:
        target.close()


def serving(server: ServerHandle) -> None:
    bundle = (server.config.ca_dir / "bundle.pem").read_bytes()
    with grpc.secure_channel(server.api_address, grpc.ssl_channel_credentials(bundle)) as ch:
        response = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def scan_local_constants_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let hypothesis read the local modules' constants here, on the main thread, and keep
    that for the run instead of parsing newly imported modules from the worker thread.

    CPython before 3.11.8 and 3.12.2 (gh-106905) shares one counter between threads that
    build ASTs at the same time: hypothesis's ``ast.parse`` in the worker thread racing
    one on the main thread (3.11's traceback printing parses source lines) fails with
    ``SystemError: AST constructor recursion depth mismatch``.
    """
    from hypothesis.internal.conjecture import providers

    constants = providers._get_local_constants()
    monkeypatch.setattr(providers, "_get_local_constants", lambda: constants)


@pytest.mark.parametrize("name", list(SERVICES))
async def test_hostile_messages_get_a_clean_status_and_change_nothing(
    name: str,
    server: ServerHandle,
    enroller: Enroller,
    client: AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scan_local_constants_once(monkeypatch)
    agent = None
    if name == "agent":
        agent = await enroller.enroll("sim-01")
        # Queued work, so that a Hello is answered with assignments and the messages
        # after it meet attempts the stream holds.
        for _ in range(3):
            await client.submit("echo", b"{}")
    await asyncio.to_thread(
        run_property, server, asyncio.get_running_loop(), SERVICES[name], agent, EXAMPLES
    )
    await asyncio.to_thread(serving, server)


# Examples


@pytest.fixture
async def agent(enroller: Enroller) -> Enrolled:
    return await enroller.enroll("sim-02")


async def test_undecodable_bytes_are_invalid_argument_on_every_method(
    server: ServerHandle, agent: Enrolled
) -> None:
    """Before: UNKNOWN on unary methods, INTERNAL on Connect and reflection, with the
    Python exception in the details."""

    def check() -> list[str]:
        seen = []
        api, mtls = Target(server, None), Target(server, agent)
        try:
            for name, service in SERVICES.items():
                target = mtls if name == "agent" else api
                for method in service.methods:
                    code, details = target.call(method, [GARBAGE])
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (path(method), code)
                    assert details == (
                        f"request is not a valid {method.input_type.full_name} message"
                    ), details
                    seen.append(path(method))
        finally:
            api.close()
            mtls.close()
        return seen

    seen = await asyncio.to_thread(check)
    assert "/muster.v1.AgentService/Connect" in seen
    assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in seen
    await asyncio.to_thread(serving, server)


async def test_an_undecodable_message_later_in_a_stream_is_invalid_argument(
    server: ServerHandle, agent: Enrolled
) -> None:
    hello = agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(agent_version="t", capabilities=["echo"], max_concurrency=1)
    ).SerializeToString()
    reflect = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()

    def check() -> None:
        api, mtls = Target(server, None), Target(server, agent)
        try:
            connect = SERVICES["agent"].methods_by_name["Connect"]
            assert mtls.call(connect, [hello, GARBAGE])[0] == grpc.StatusCode.INVALID_ARGUMENT
            info = SERVICES["reflection"].methods_by_name["ServerReflectionInfo"]
            assert api.call(info, [reflect, GARBAGE])[0] == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            api.close()
            mtls.close()

    await asyncio.to_thread(check)


RANGE_CASES: list[tuple[str, Callable[[], Message], str]] = [
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(kind="echo", start_to_close_timeout=Duration(seconds=2**62)),
        "start_to_close_timeout: not a valid Duration",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(
            kind="echo", schedule_to_start_timeout=Duration(seconds=315_576_000_000)
        ),
        "schedule_to_start_timeout: at most 30 days",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(kind="echo", start_to_close_timeout=Duration(seconds=-5)),
        "start_to_close_timeout: must not be negative",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(kind="echo", schedule_to_start_timeout=Duration(nanos=-1)),
        "schedule_to_start_timeout: must not be negative",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(
            kind="echo", start_to_close_timeout=Duration(seconds=1, nanos=-1)
        ),
        "start_to_close_timeout: not a valid Duration",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(kind="echo", deadline=Timestamp(seconds=253_402_300_800)),
        "deadline: not a valid Timestamp",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(kind="echo", deadline=Timestamp(seconds=253_402_300_799)),
        "deadline: at most ten years from now",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(
            kind="echo", deadline=Timestamp(seconds=1_900_000_000, nanos=-1)
        ),
        "deadline: not a valid Timestamp",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(kind="echo", max_attempts=-1),
        "max_attempts:",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(kind="echo", priority=2**31 - 1),
        "priority:",
    ),
    (
        "Submit",
        lambda: task_pb2.SubmitRequest(kind="echo", max_cost_usd=float("nan")),
        "max_cost_usd:",
    ),
    (
        "List",
        lambda: task_pb2.ListTasksRequest(states=[common_pb2.TASK_STATE_QUEUED, 99]),  # type: ignore[list-item]
        "states: 99 is not a TaskState value",
    ),
    ("List", lambda: task_pb2.ListTasksRequest(page_size=-1), "page_size:"),
    (
        "List",
        # base64 of "2026-01-01T00:00:00|abc": a time without a zone.
        lambda: task_pb2.ListTasksRequest(page_token="MjAyNi0wMS0wMVQwMDowMDowMHxhYmM="),
        "page_token: not a token from a previous response",
    ),
    (
        "List",
        # base64 of "0001-01-01T00:00:00+01:00|abc": before the first representable time.
        lambda: task_pb2.ListTasksRequest(page_token="MDAwMS0wMS0wMVQwMDowMDowMCswMTowMHxhYmM="),
        "page_token: not a token from a previous response",
    ),
    (
        "CreateApiToken",
        lambda: admin_pb2.CreateApiTokenRequest(
            name="bot", role=admin_pb2.ROLE_SUBMITTER, ttl=Duration(seconds=315_576_000_000)
        ),
        "ttl: at most 10 years",
    ),
    (
        "CreateApiToken",
        lambda: admin_pb2.CreateApiTokenRequest(
            name="bot", role=admin_pb2.ROLE_SUBMITTER, ttl=Duration(seconds=-60)
        ),
        "ttl: must not be negative",
    ),
    (
        "CreateApiToken",
        lambda: admin_pb2.CreateApiTokenRequest(name="bot", role=7),  # type: ignore[arg-type]
        "role: must be ROLE_SUBMITTER, ROLE_ADMIN or ROLE_VIEWER",
    ),
    (
        "CreateBootstrapToken",
        lambda: admin_pb2.CreateBootstrapTokenRequest(ttl=Duration(seconds=2**62)),
        "ttl: not a valid Duration",
    ),
    (
        "CreateBootstrapToken",
        lambda: admin_pb2.CreateBootstrapTokenRequest(ttl=Duration(seconds=-1)),
        "ttl: must not be negative",
    ),
    (
        "CreateBootstrapToken",
        lambda: admin_pb2.CreateBootstrapTokenRequest(max_uses=-5),
        "max_uses:",
    ),
    (
        "QueryAudit",
        lambda: admin_pb2.QueryAuditRequest(since=Timestamp(seconds=2**62)),
        "since: not a valid Timestamp",
    ),
    (
        "QueryAudit",
        lambda: admin_pb2.QueryAuditRequest(until=Timestamp(seconds=-(2**62))),
        "until: not a valid Timestamp",
    ),
    ("QueryAudit", lambda: admin_pb2.QueryAuditRequest(limit=-1), "limit:"),
    (
        "SetBudget",
        lambda: admin_pb2.SetBudgetRequest(scope="global", limit_micros=-1),
        "limit_micros:",
    ),
]


async def test_out_of_range_fields_are_invalid_argument_naming_the_field(
    server: ServerHandle,
) -> None:
    """Before: a 2^62 s timeout, a year-10000 deadline, the largest Duration as a TTL,
    an undefined TaskState and a zone-less page token gave INTERNAL; a negative timeout
    or TTL was taken as the default."""
    task_methods = SERVICES["task"].methods_by_name
    admin_methods = SERVICES["admin"].methods_by_name

    def check() -> None:
        api = Target(server, None)
        try:
            for name, build, expected in RANGE_CASES:
                method = task_methods.get(name) or admin_methods[name]
                code, details = api.call(method, [build().SerializeToString()])
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, expected, code, details)
                assert details.startswith(expected), (name, expected, details)
        finally:
            api.close()

    before = await counts(server)
    await asyncio.to_thread(check)
    assert await counts(server) == before


async def test_zero_durations_still_mean_the_default(server: ServerHandle) -> None:
    """0 is "the server default" for task timeouts and "never expires" for a TTL."""

    def check() -> None:
        api = Target(server, None)
        try:
            submit = SERVICES["task"].methods_by_name["Submit"]
            zero = task_pb2.SubmitRequest(
                kind="echo", start_to_close_timeout=Duration(), schedule_to_start_timeout=Duration()
            )
            assert api.call(submit, [zero.SerializeToString()])[0] == grpc.StatusCode.OK
            create = SERVICES["admin"].methods_by_name["CreateApiToken"]
            token = admin_pb2.CreateApiTokenRequest(
                name="forever", role=admin_pb2.ROLE_SUBMITTER, ttl=Duration()
            )
            assert api.call(create, [token.SerializeToString()])[0] == grpc.StatusCode.OK
        finally:
            api.close()

    await asyncio.to_thread(check)


def unknown_key_type_csr() -> bytes:
    """A CSR whose key algorithm OID is not one cryptography knows (1.1.840.10045.2.1
    for id-ecPublicKey 1.2.840.10045.2.1): what the property test found."""
    der = x509.load_pem_x509_csr(CSR).public_bytes(serialization.Encoding.DER)
    bad = der.replace(bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("298648ce3d0201"))
    assert bad != der
    return bad


async def test_a_csr_with_an_unknown_key_type_is_invalid_argument(
    server: ServerHandle, enroller: Enroller, agent: Enrolled
) -> None:
    """Before: cryptography's UnsupportedAlgorithm escaped as INTERNAL from Renew (and
    from Enroll with a good token)."""
    csr = unknown_key_type_csr()
    token = await enroller.token()

    def check() -> None:
        api, mtls = Target(server, None), Target(server, agent)
        try:
            renew = SERVICES["agent"].methods_by_name["Renew"]
            code, details = mtls.call(
                renew, [agent_pb2.RenewRequest(csr_pem=csr).SerializeToString()]
            )
            assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "csr_pem")
            enroll = SERVICES["enrollment"].methods_by_name["Enroll"]
            request = enrollment_pb2.EnrollRequest(token=token, csr_pem=csr, name="web-09")
            code, details = api.call(enroll, [request.SerializeToString()])
            assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "csr_pem")
        finally:
            api.close()
            mtls.close()

    await asyncio.to_thread(check)


async def test_a_nul_in_any_string_is_invalid_argument_naming_the_field(
    server: ServerHandle, agent: Enrolled
) -> None:
    """Before: a NUL reached Postgres from Hello.in_flight (INTERNAL), Hello.capabilities
    (a claim failing as "database unavailable") and every unchecked string field."""
    in_flight = agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(
            agent_version="t",
            capabilities=["echo"],
            max_concurrency=1,
            in_flight=[common_pb2.AttemptRef(task_id="a\x00b", attempt=1)],
        )
    )
    kinds = agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(agent_version="t", capabilities=["echo", "e\x00"], max_concurrency=1)
    )
    hello = agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(agent_version="t", capabilities=["echo"], max_concurrency=1)
    )
    result = agent_pb2.AgentMessage(
        result=agent_pb2.Result(task_id="x\x00", attempt=1, outcome=agent_pb2.OUTCOME_SUCCEEDED)
    )
    connect = SERVICES["agent"].methods_by_name["Connect"]
    check = SERVICES["health"].methods_by_name["Check"]
    submit = SERVICES["task"].methods_by_name["Submit"]

    def run() -> None:
        api, mtls = Target(server, None), Target(server, agent)
        try:
            for sent, expected in [
                ([in_flight], "hello.in_flight[0].task_id: NUL characters are not allowed"),
                ([kinds], "hello.capabilities[1]: NUL characters are not allowed"),
                ([hello, result], "result.task_id: NUL characters are not allowed"),
            ]:
                payloads = [m.SerializeToString() for m in sent]
                assert mtls.call(connect, payloads) == (grpc.StatusCode.INVALID_ARGUMENT, expected)
            request = health_pb2.HealthCheckRequest(service="\x00").SerializeToString()
            assert api.call(check, [request]) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "service: NUL characters are not allowed",
            )
            request = task_pb2.SubmitRequest(kind="echo", selector={"zone": "a\x00"})
            assert api.call(submit, [request.SerializeToString()]) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "selector['zone']: NUL characters are not allowed",
            )
        finally:
            api.close()
            mtls.close()

    before = await counts(server)
    await asyncio.to_thread(run)
    assert await counts(server) == before


def test_the_nul_check_names_the_path_and_spares_executor_text() -> None:
    assert nul_field(task_pb2.SubmitRequest(kind="echo", selector={"a\x00": "b"})) == "selector"
    message = agent_pb2.AgentMessage(
        result=agent_pb2.Result(task_id="t", error="stderr\x00", usage=common_pb2.Usage(model="m"))
    )
    assert nul_field(message) is None  # the dispatcher stores it escaped
    assert nul_field(agent_pb2.AgentMessage(progress=agent_pb2.Progress(message="\x00"))) is None
    message.result.usage.model = "m\x00"
    assert nul_field(message) == "result.usage.model"
