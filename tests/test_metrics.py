"""The go-grpc-prometheus interceptor, the handler wrapper it is built on, the Muster
metrics and the /metrics endpoint, against a real grpc.aio server and real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry

from muster.server.interceptors._wrap import RpcInfo, RpcType, guard_handler
from muster.server.interceptors.metrics import (
    DEFAULT_BUCKETS,
    GrpcServerMetrics,
    MetricsInterceptor,
)
from muster.server.metrics import MusterMetrics, QueueStats, StateGauge
from muster.server.metrics.http import MetricsServer, start_metrics_server
from muster.v1 import task_pb2

SERVICE = "test.v1.Probe"

# --- handlers of each call type and style (raw bytes: no serializers) ----------------


async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def deny(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "who are you")


async def boom(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    raise RuntimeError("handler bug")


async def not_found(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    context.set_code(grpc.StatusCode.NOT_FOUND)
    return b""


async def slow(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await asyncio.sleep(30)
    return b""


def unimplemented(request: bytes, context: Any) -> bytes:
    """What a generated ``*Servicer`` base class does for a method nobody implemented."""
    context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    context.set_details("Method not implemented!")
    raise NotImplementedError("Method not implemented!")


async def count(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


async def count_writer(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    for i in range(int(request)):
        await context.write(str(i).encode())


class Countdown:
    """A response stream that is an async iterator object, not a generator."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> Countdown:
        return self

    async def __anext__(self) -> bytes:
        if self.n == 0:
            raise StopAsyncIteration
        self.n -= 1
        return str(self.n).encode()


def countdown(request: bytes, context: Any) -> Countdown:
    return Countdown(int(request))


def count_sync(request: bytes, context: Any) -> Iterator[bytes]:
    yield from (b"a", b"b")


async def total(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> bytes:
    n = 0
    async for message in requests:
        n += int(message)
    return str(n).encode()


async def total_reader(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> bytes:
    n = 0
    while (message := await context.read()) is not grpc.aio.EOF:
        n += int(message)
    return str(n).encode()


async def chat(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message + b"!"


async def chat_rw(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    while (message := await context.read()) is not grpc.aio.EOF:
        await context.write(message + b"?")


async def hang(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message
    await asyncio.sleep(30)


async def stream_deny(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")


async def session(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    """Like the agent stream: the first message under a timeout, then a reader task."""
    first = await asyncio.wait_for(anext(requests), 5)
    await context.write(b"welcome " + first)

    async def reader() -> None:
        async for message in requests:
            await context.write(message.upper())

    await asyncio.create_task(reader())


CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller")


async def whoami(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return CALLER.get().encode()


HANDLERS: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Deny": grpc.unary_unary_rpc_method_handler(deny),
    "Boom": grpc.unary_unary_rpc_method_handler(boom),
    "NotFound": grpc.unary_unary_rpc_method_handler(not_found),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
    "Unimplemented": grpc.unary_unary_rpc_method_handler(unimplemented),
    "Guarded": grpc.unary_unary_rpc_method_handler(whoami),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "CountWriter": grpc.unary_stream_rpc_method_handler(count_writer),
    "CountSync": grpc.unary_stream_rpc_method_handler(count_sync),
    "Countdown": grpc.unary_stream_rpc_method_handler(countdown),
    "Total": grpc.stream_unary_rpc_method_handler(total),
    "TotalReader": grpc.stream_unary_rpc_method_handler(total_reader),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "ChatRW": grpc.stream_stream_rpc_method_handler(chat_rw),
    "Hang": grpc.stream_stream_rpc_method_handler(hang),
    "StreamDeny": grpc.stream_stream_rpc_method_handler(stream_deny),
    "Session": grpc.stream_stream_rpc_method_handler(session),
    "GuardedChat": grpc.stream_stream_rpc_method_handler(chat),
}


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """An auth-style interceptor built with guard_handler: refuses calls without a
    ``caller`` header, and hands the caller to the handler through a ContextVar."""

    def __init__(self) -> None:
        self.seen: list[RpcInfo] = []

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if not details.method.rpartition("/")[2].startswith("Guarded"):
            return handler
        return guard_handler(handler, details.method, self.check)

    async def check(self, info: RpcInfo, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.seen.append(info)
        caller = dict(context.invocation_metadata() or ()).get("caller")
        if not caller:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no caller")
        CALLER.set(str(caller))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def guard() -> GuardInterceptor:
    return GuardInterceptor()


@pytest.fixture
async def channel(
    registry: CollectorRegistry, guard: GuardInterceptor
) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[MetricsInterceptor(GrpcServerMetrics(registry)), guard])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            yield chan
    finally:
        await server.stop(None)


def sample(
    registry: CollectorRegistry, name: str, rpc_type: str, method: str, **labels: str
) -> float | None:
    return registry.get_sample_value(
        name,
        {"grpc_type": rpc_type, "grpc_service": SERVICE, "grpc_method": method, **labels},
    )


def counts(registry: CollectorRegistry, rpc_type: str, method: str, code: str) -> tuple[Any, ...]:
    """(started, handled with code, received, sent, histogram count) of one method."""
    return (
        sample(registry, "grpc_server_started_total", rpc_type, method),
        sample(registry, "grpc_server_handled_total", rpc_type, method, grpc_code=code),
        sample(registry, "grpc_server_msg_received_total", rpc_type, method),
        sample(registry, "grpc_server_msg_sent_total", rpc_type, method),
        sample(registry, "grpc_server_handling_seconds_count", rpc_type, method),
    )


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait for server-side bookkeeping that ends after the client saw the status."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def expect_counts(
    registry: CollectorRegistry, rpc_type: str, method: str, code: str, expected: tuple[Any, ...]
) -> None:
    """:func:`counts` reaches ``expected`` (the server's side of a call may end after the
    client saw its status: on a loaded machine the last counter can lag a little)."""
    with contextlib.suppress(AssertionError):
        await eventually(lambda: counts(registry, rpc_type, method, code) == expected)
    assert counts(registry, rpc_type, method, code) == expected


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


# --- the gRPC interceptor ------------------------------------------------------------


async def test_unary_ok_counts_one_message_each_way(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    echo_call = channel.unary_unary(path("Echo"))
    assert await echo_call(b"hi") == b"hi"
    assert await echo_call(b"again") == b"again"

    await expect_counts(registry, "unary", "Echo", "OK", (2, 2, 2, 2, 2))
    assert (
        sample(registry, "grpc_server_handled_total", "unary", "Echo", grpc_code="UNKNOWN") is None
    )


async def test_unary_abort_is_counted_with_its_code(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(path("Deny"))(b"x")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The request arrived; no response was sent.
    await expect_counts(registry, "unary", "Deny", "UNAUTHENTICATED", (1, 1, 1, 0, 1))
    assert sample(registry, "grpc_server_handled_total", "unary", "Deny", grpc_code="OK") is None


async def test_unary_exception_is_unknown(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(path("Boom"))(b"x")
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    await expect_counts(registry, "unary", "Boom", "UNKNOWN", (1, 1, 1, 0, 1))


async def test_code_set_without_abort_is_reported(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(path("NotFound"))(b"x")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (
        sample(registry, "grpc_server_handled_total", "unary", "NotFound", grpc_code="NOT_FOUND")
        == 1
    )


async def test_sync_stub_of_generated_servicer_is_unimplemented(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(path("Unimplemented"))(b"x")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    await expect_counts(registry, "unary", "Unimplemented", "UNIMPLEMENTED", (1, 1, 1, 0, 1))


async def test_deadline_is_deadline_exceeded(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(path("Slow"))(b"x", timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(
        lambda: sample(registry, "grpc_server_handling_seconds_count", "unary", "Slow") == 1
    )
    await expect_counts(registry, "unary", "Slow", "DEADLINE_EXCEEDED", (1, 1, 1, 0, 1))
    # The handler ran until the deadline (0.2 s), not less, and was stopped there.
    assert sample(registry, "grpc_server_handling_seconds_bucket", "unary", "Slow", le="0.1") == 0
    assert sample(registry, "grpc_server_handling_seconds_bucket", "unary", "Slow", le="5.0") == 1


@pytest.mark.parametrize("method", ["Count", "CountWriter"])
async def test_server_stream_counts_every_message(
    channel: grpc.aio.Channel, registry: CollectorRegistry, method: str
) -> None:
    responses = [m async for m in channel.unary_stream(path(method))(b"3")]
    assert responses == [b"0", b"1", b"2"]
    await expect_counts(registry, "server_stream", method, "OK", (1, 1, 1, 3, 1))


async def test_sync_generator_stream(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    responses = [m async for m in channel.unary_stream(path("CountSync"))(b"")]
    assert responses == [b"a", b"b"]
    await expect_counts(registry, "server_stream", "CountSync", "OK", (1, 1, 1, 2, 1))


async def test_async_iterator_object_stream(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    responses = [m async for m in channel.unary_stream(path("Countdown"))(b"2")]
    assert responses == [b"1", b"0"]
    await expect_counts(registry, "server_stream", "Countdown", "OK", (1, 1, 1, 2, 1))


@pytest.mark.parametrize("method", ["Total", "TotalReader"])
async def test_client_stream_counts_every_message(
    channel: grpc.aio.Channel, registry: CollectorRegistry, method: str
) -> None:
    response = await channel.stream_unary(path(method))(iter([b"1", b"2", b"3", b"4"]))
    assert response == b"10"
    await expect_counts(registry, "client_stream", method, "OK", (1, 1, 4, 1, 1))


@pytest.mark.parametrize(("method", "suffix"), [("Chat", b"!"), ("ChatRW", b"?")])
async def test_bidi_stream_counts_every_message(
    channel: grpc.aio.Channel, registry: CollectorRegistry, method: str, suffix: bytes
) -> None:
    call = channel.stream_stream(path(method))(iter([b"a", b"b"]))
    assert [m async for m in call] == [b"a" + suffix, b"b" + suffix]
    await expect_counts(registry, "bidi_stream", method, "OK", (1, 1, 2, 2, 1))


async def test_stream_read_from_another_task(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    call = channel.stream_stream(path("Session"))(iter([b"hi", b"a", b"b"]))
    assert [m async for m in call] == [b"welcome hi", b"A", b"B"]
    await expect_counts(registry, "bidi_stream", "Session", "OK", (1, 1, 3, 3, 1))


async def test_cancelled_stream_is_cancelled(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    call = channel.stream_stream(path("Hang"))()
    await call.write(b"ping")
    assert await call.read() == b"ping"
    call.cancel()

    await eventually(
        lambda: sample(registry, "grpc_server_handling_seconds_count", "bidi_stream", "Hang") == 1
    )
    await expect_counts(registry, "bidi_stream", "Hang", "CANCELLED", (1, 1, 1, 1, 1))


async def test_abort_inside_a_stream(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    call = channel.stream_stream(path("StreamDeny"))(iter([b"a", b"b"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    handled = sample(
        registry,
        "grpc_server_handled_total",
        "bidi_stream",
        "StreamDeny",
        grpc_code="PERMISSION_DENIED",
    )
    assert handled == 1
    assert sample(registry, "grpc_server_msg_sent_total", "bidi_stream", "StreamDeny") == 1


async def test_unknown_method_is_not_counted(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(path("Nope"))(b"x")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert sample(registry, "grpc_server_started_total", "unary", "Nope") is None


async def test_histogram_has_go_default_buckets(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    await channel.unary_unary(path("Echo"))(b"x")
    for bound in DEFAULT_BUCKETS:
        assert (
            sample(registry, "grpc_server_handling_seconds_bucket", "unary", "Echo", le=str(bound))
            == 1
        )
    assert sample(registry, "grpc_server_handling_seconds_bucket", "unary", "Echo", le="+Inf") == 1


# --- the wrapper as an auth interceptor uses it --------------------------------------


async def test_guard_refusal_is_seen_by_the_outer_metrics(
    channel: grpc.aio.Channel, registry: CollectorRegistry, guard: GuardInterceptor
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(path("Guarded"))(b"x")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await expect_counts(registry, "unary", "Guarded", "UNAUTHENTICATED", (1, 1, 1, 0, 1))
    assert guard.seen == [RpcInfo(path("Guarded"), SERVICE, "Guarded", RpcType.UNARY)]


async def test_guard_passes_a_context_var_to_the_handler(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    reply = await channel.unary_unary(path("Guarded"))(b"x", metadata=(("caller", "alice"),))
    assert reply == b"alice"
    await expect_counts(registry, "unary", "Guarded", "OK", (1, 1, 1, 1, 1))


async def test_guard_refuses_a_stream_before_it_reads(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    call = channel.stream_stream(path("GuardedChat"))(iter([b"a"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await expect_counts(registry, "bidi_stream", "GuardedChat", "UNAUTHENTICATED", (1, 1, 0, 0, 1))

    call = channel.stream_stream(path("GuardedChat"))(iter([b"a"]), metadata=(("caller", "c"),))
    assert [m async for m in call] == [b"a!"]
    await expect_counts(registry, "bidi_stream", "GuardedChat", "OK", (2, 1, 1, 1, 2))


def test_rpc_info_splits_the_method_path() -> None:
    info = RpcInfo.of("/muster.v1.TaskService/Submit", RpcType.of(False, True))
    assert (info.service, info.name, info.rpc_type.value) == (
        "muster.v1.TaskService",
        "Submit",
        "server_stream",
    )
    assert RpcType.of(True, False).value == "client_stream"
    assert RpcType.of(True, True).value == "bidi_stream"
    assert RpcType.of(False, False).value == "unary"


def test_initialize_creates_zero_series_for_every_method() -> None:
    registry = CollectorRegistry()
    metrics = GrpcServerMetrics(registry)
    metrics.initialize(task_pb2.DESCRIPTOR.services_by_name["TaskService"])
    service = task_pb2.DESCRIPTOR.services_by_name["TaskService"]
    method = service.methods[0]
    rpc_type = RpcType.of(method.client_streaming, method.server_streaming).value
    labels = {
        "grpc_type": rpc_type,
        "grpc_service": "muster.v1.TaskService",
        "grpc_method": method.name,
    }
    assert registry.get_sample_value("grpc_server_started_total", labels) == 0
    assert (
        registry.get_sample_value(
            "grpc_server_handled_total", {**labels, "grpc_code": "RESOURCE_EXHAUSTED"}
        )
        == 0
    )


def test_go_code_names_option() -> None:
    metrics = GrpcServerMetrics(CollectorRegistry(), go_code_names=True)
    assert metrics.code_label(grpc.StatusCode.CANCELLED) == "Canceled"
    assert metrics.code_label(grpc.StatusCode.UNAUTHENTICATED) == "Unauthenticated"
    assert (
        GrpcServerMetrics(CollectorRegistry()).code_label(grpc.StatusCode.CANCELLED) == "CANCELLED"
    )


# --- Muster's own metrics ------------------------------------------------------------

MUSTER_METRICS = (
    "muster_agents_connected",
    "muster_queue_depth",
    "muster_queue_oldest_age_seconds",
    "muster_schedule_to_start_seconds",
    "muster_task_run_seconds",
    "muster_tasks_finished_total",
    "muster_tasks_submitted_total",
    "muster_certificates_issued_total",
    "muster_certificates_revoked_total",
    "muster_certificate_expiry_seconds",
    "muster_quota_decisions_total",
    "muster_audit_queue_depth",
    "muster_audit_spool_bytes",
    "muster_llm_tokens_total",
    "muster_llm_cost_usd_total",
    "muster_budget_remaining_usd",
    "muster_budget_limit_usd",
    "muster_budget_reservations_total",
    "muster_auth_failures_total",
    "muster_task_refusals_total",
    "muster_trust_bundle_version",
)


def test_queue_snapshot_replaces_every_pool_and_kind() -> None:
    registry = CollectorRegistry()
    metrics = MusterMetrics(registry)
    gpu_render = {"pool": "gpu", "kind": "render"}
    metrics.update_queues(
        {
            ("gpu", "render"): QueueStats(3, 12.5),
            ("gpu", "echo"): QueueStats(1, 2.0),
            ("cpu", "echo"): QueueStats(0, 0.0),
        }
    )
    assert registry.get_sample_value("muster_queue_depth", gpu_render) == 3
    assert registry.get_sample_value("muster_queue_oldest_age_seconds", gpu_render) == 12.5
    assert registry.get_sample_value("muster_queue_depth", {"pool": "gpu", "kind": "echo"}) == 1
    assert registry.get_sample_value("muster_queue_depth", {"pool": "cpu", "kind": "echo"}) == 0

    metrics.update_queues({("cpu", "echo"): QueueStats(7, 1.0)})
    assert registry.get_sample_value("muster_queue_depth", gpu_render) is None
    assert registry.get_sample_value("muster_queue_depth", {"pool": "cpu", "kind": "echo"}) == 7


def test_state_gauge_push_and_callback() -> None:
    registry = CollectorRegistry()
    metrics = MusterMetrics(registry)
    agents = metrics.agents_connected
    agents.inc("default")
    agents.inc("default")
    agents.inc("gpu")
    agents.dec("default")
    assert registry.get_sample_value("muster_agents_connected", {"pool": "default"}) == 1
    assert registry.get_sample_value("muster_agents_connected", {"pool": "gpu"}) == 1

    sessions = {"default": 5.0}
    agents.set_function(lambda: sessions)
    sessions["edge"] = 2.0
    assert registry.get_sample_value("muster_agents_connected", {"pool": "edge"}) == 2
    assert registry.get_sample_value("muster_agents_connected", {"pool": "gpu"}) is None

    with pytest.raises(ValueError, match="labels"):
        agents.set(("a", "b"), 1)


def test_broken_callback_drops_its_series_not_the_scrape() -> None:
    registry = CollectorRegistry()
    gauge = StateGauge("probe_state", "A state gauge.", ("pool",), registry)
    gauge.set_function(lambda: 1 / 0)  # type: ignore[arg-type, return-value]
    metrics = MusterMetrics(registry)
    metrics.tasks_submitted.inc()
    assert registry.get_sample_value("muster_tasks_submitted_total") == 1
    assert registry.get_sample_value("probe_state", {"pool": "x"}) is None


def test_certificate_expiry_is_computed_at_scrape_time() -> None:
    now = [dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()]
    registry = CollectorRegistry()
    metrics = MusterMetrics(registry, clock=lambda: now[0])
    metrics.watch_certificate_expiry(
        lambda: {
            "root": dt.datetime(2040, 1, 1, tzinfo=dt.UTC),
            "server": dt.datetime(2030, 1, 2),  # naive means UTC
        }
    )
    assert (
        registry.get_sample_value("muster_certificate_expiry_seconds", {"certificate": "server"})
        == 86400
    )
    now[0] += 3600
    assert (
        registry.get_sample_value("muster_certificate_expiry_seconds", {"certificate": "server"})
        == 82800
    )
    root = registry.get_sample_value("muster_certificate_expiry_seconds", {"certificate": "root"})
    assert root == dt.datetime(2040, 1, 1, tzinfo=dt.UTC).timestamp() - now[0]


def test_series_that_alerts_count_exist_at_zero_from_the_start() -> None:
    # increase() cannot see a counter's first step if its series appears at 1: the rules in
    # deploy/prometheus/alerts.yml need these at 0 before the first event.
    registry = CollectorRegistry()
    MusterMetrics(registry)
    expected = {
        "muster_tasks_finished_total": ("outcome", ("succeeded", "failed", "cancelled")),
        "muster_budget_reservations_total": ("outcome", ("reserved", "refused", "degraded")),
        "muster_streams_replaced_total": ("reason", ("reconnect", "renewal")),
        "muster_task_refusals_total": ("reason", ("signature_invalid", "signer_untrusted")),
    }
    for name, (label, values) in expected.items():
        for value in values:
            assert registry.get_sample_value(name, {label: value}) == 0, (name, value)


def test_budget_gauges_show_limit_and_remaining_by_scope() -> None:
    registry = CollectorRegistry()
    metrics = MusterMetrics(registry)
    metrics.budget_limit_usd.update({"global": 10.0, "tenant:acme": 2.5})
    metrics.budget_remaining_usd.update({"global": 7.5, "tenant:acme": 0.0})
    sample = registry.get_sample_value
    assert sample("muster_budget_limit_usd", {"scope": "tenant:acme"}) == 2.5
    assert sample("muster_budget_remaining_usd", {"scope": "global"}) == 7.5
    metrics.budget_limit_usd.update({"global": 10.0})  # a budget removed: its series goes
    assert sample("muster_budget_limit_usd", {"scope": "tenant:acme"}) is None


def test_quota_decisions_are_counted_by_limit_and_outcome() -> None:
    registry = CollectorRegistry()
    metrics = MusterMetrics(registry)
    metrics.quota_decision("submission", "allowed")
    metrics.quota_decision("submission", "allowed")
    metrics.quota_decision("submission", "rejected")
    labels = {"limit": "submission", "outcome": "allowed"}
    assert registry.get_sample_value("muster_quota_decisions_total", labels) == 2
    with pytest.raises(ValueError, match="outcome"):
        metrics.quota_decision("submission", "maybe")


def test_every_muster_metric_is_exported_with_help() -> None:
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    MusterMetrics(registry)
    text = generate_latest(registry).decode()
    for name in MUSTER_METRICS:
        family = name.removesuffix("_total")
        assert f"# HELP {family}" in text or f"# HELP {name}" in text, name


# --- the /metrics endpoint -----------------------------------------------------------


async def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` over a real socket; return status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def get(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *headers, "", ""]).encode()


@pytest.fixture
async def endpoint() -> AsyncIterator[MetricsServer]:
    registry = CollectorRegistry()
    MusterMetrics(registry).tasks_submitted.inc(3)
    GrpcServerMetrics(registry).initialize(task_pb2.DESCRIPTOR.services_by_name["TaskService"])
    async with await start_metrics_server(registry, "127.0.0.1", 0, read_timeout=0.3) as server:
        yield server


async def test_get_metrics(endpoint: MetricsServer) -> None:
    assert endpoint.port != 0
    status, headers, body = await http(endpoint.port, get("/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert int(headers["content-length"]) == len(body)
    text = body.decode()
    assert "muster_tasks_submitted_total 3.0" in text
    assert 'grpc_server_started_total{grpc_method="Submit"' in text
    for name in MUSTER_METRICS:
        assert name.removesuffix("_total") in text


async def test_query_string_is_ignored_and_openmetrics_negotiated(endpoint: MetricsServer) -> None:
    accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
    status, headers, body = await http(endpoint.port, get("/metrics?x=1", accept))
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


async def test_head_has_no_body(endpoint: MetricsServer) -> None:
    status, headers, body = await http(endpoint.port, get("/metrics").replace(b"GET", b"HEAD", 1))
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


async def test_healthz(endpoint: MetricsServer) -> None:
    assert await http(endpoint.port, get("/healthz")) == (
        200,
        {"content-type": "text/plain; charset=utf-8", "content-length": "3", "connection": "close"},
        b"ok\n",
    )


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (get("/nope"), 404),
        (get("/metrics").replace(b"GET", b"POST", 1), 405),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (get("/metrics", "X-Big: " + "a" * 10_000), 431),
        (b"GET /metrics HTTP/1.1\r\n", 408),  # never finishes its head
    ],
)
async def test_bad_requests(endpoint: MetricsServer, raw: bytes, status: int) -> None:
    got, headers, _ = await http(endpoint.port, raw)
    assert got == status
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_close_stops_listening() -> None:
    server = await start_metrics_server(CollectorRegistry(), "127.0.0.1", 0)
    port = server.port
    # A client that connects and says nothing must not keep close() waiting.
    _idle = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.close(), 2)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    _idle[1].close()
