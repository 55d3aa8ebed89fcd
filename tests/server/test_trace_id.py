"""A task submitted inside a trace shows its trace id (``Task.trace_id``) on a real server,
both backends, with tracing itself off in the server and the client: the context is
stored as the caller sent it, and the id is what a tracing backend finds the task by."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context as otel_context

from muster import AsyncClient, TaskSpec, tracing
from muster.server.app import ServerHandle
from muster.v1 import task_pb2

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@contextmanager
def inside_remote_trace() -> Iterator[None]:
    """The caller runs inside a trace someone else started (as a traced program would)."""
    parent = tracing.parent_from(TRACEPARENT)
    assert parent is not None
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


async def test_a_task_submitted_inside_a_trace_shows_its_trace_id(
    server: ServerHandle, client: AsyncClient
) -> None:
    assert not tracing.enabled()
    with inside_remote_trace():
        traced = await client.submit("echo", b"{}")
        [many] = await client.submit_many([TaskSpec("echo", b"{}")])
    plain = await client.submit("echo", b"{}")
    assert many.task is not None
    for task_id in (traced.task_id, many.task.task_id):
        assert (await client.get(task_id)).trace_id == TRACE_ID
    assert (await client.get(plain.task_id)).trace_id == ""
    listed = {t.task_id: t.trace_id for t in await client.list()}
    assert listed[traced.task_id] == TRACE_ID and listed[plain.task_id] == ""


async def test_a_traceparent_that_does_not_parse_is_ignored(
    server: ServerHandle, client: AsyncClient
) -> None:
    items = [task_pb2.SubmitRequest(kind="echo", payload=b"{}")]
    request = task_pb2.SubmitManyRequest(items=items)
    metadata = (*client._transport.metadata, ("traceparent", "00-not-a-trace-01"))
    response = await client._stub.SubmitMany(request, metadata=metadata)
    task = await client.get(response.results[0].response.task.task_id)
    assert task.trace_id == ""
