"""SubmitMany on a real server over real TLS, on both backends: one result per item in
request order, idempotency per item and within one request, one bad item failing only
itself, the submission rate limit counted per item, whole-request errors, one audit
record per task created, and the tasks running on an agent's stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.server.app import ServerHandle, start_server
from muster.server.services.submit_many import submit_many as submit_many_items
from muster.server.storage import models
from muster.signing import task_id_for
from muster.v1 import agent_pb2, task_pb2
from tests.agentsim import Enroller, SimAgent
from tests.conftest import client_config, server_config
from tests.server.test_signed_submit import submit_request

pytestmark = pytest.mark.slow


def item(kind: str = "echo", payload: bytes = b"{}", **fields: object) -> task_pb2.SubmitRequest:
    return task_pb2.SubmitRequest(kind=kind, payload=payload, **fields)  # type: ignore[arg-type]


async def submit_many(
    client: AsyncClient, items: list[task_pb2.SubmitRequest]
) -> list[task_pb2.SubmitManyResult]:
    """The raw call, so the test sees exactly what the server sent."""
    request = task_pb2.SubmitManyRequest(items=items)
    response = await client._stub.SubmitMany(request, metadata=client._transport.metadata)
    assert len(response.results) == len(items)
    return list(response.results)


async def raw_status(
    server: ServerHandle,
    items: list[task_pb2.SubmitRequest],
    token: str | None = None,
    *,
    authorization: bool = True,
) -> grpc.aio.AioRpcError:
    """The error a whole-request refusal ends the call with."""
    async with AsyncClient(client_config(server, token)) as client:
        metadata = [
            (k, v) for k, v in client._transport.metadata if authorization or k != "authorization"
        ]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client._stub.SubmitMany(
                task_pb2.SubmitManyRequest(items=items), metadata=metadata
            )
    return caught.value


async def task_rows(server: ServerHandle) -> int:
    async with server.db.transaction() as session:
        return int(
            (await session.execute(select(func.count()).select_from(models.Task))).scalar_one()
        )


async def audited_submits(admin: AsyncAdminClient, server: ServerHandle) -> list[str]:
    await server.flush_audit()
    return sorted(e.target for e in await admin.query_audit(action="task.submit", limit=1000))


async def test_each_item_gets_its_own_result_in_order_and_one_bad_item_fails_only_itself(
    server: ServerHandle, client: AsyncClient, admin: AsyncAdminClient
) -> None:
    items = [
        item(payload=b'{"n":0}', priority=5),
        item(kind=""),  # no kind
        item(payload=b'{"n":2}', pool="other", selector={"gpu": "yes"}),
        item(priority=5000),  # out of range
        item(payload=b'{"n":4}', max_attempts=7),
    ]
    results = await submit_many(client, items)
    assert [r.WhichOneof("outcome") for r in results] == [
        "response",
        "error",
        "response",
        "error",
        "response",
    ]
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results[1].error.message.startswith("kind: required")
    assert results[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results[3].error.message.startswith("priority: must be between")
    assert not results[3].error.HasField("retry_after")
    accepted = [results[i].response for i in (0, 2, 4)]
    assert [r.task.payload for r in accepted] == [b'{"n":0}', b'{"n":2}', b'{"n":4}']
    assert all(r.created for r in accepted)
    assert accepted[0].task.priority == 5
    assert (accepted[1].task.pool, dict(accepted[1].task.selector)) == ("other", {"gpu": "yes"})
    assert accepted[2].task.max_attempts == 7
    # No agent is enrolled: every accepted item carries Submit's warning.
    assert all(r.warning for r in accepted)
    for response in accepted:
        stored = await client.get(response.task.task_id)
        assert (stored.state, stored.payload) == (TaskState.QUEUED, response.task.payload)
    assert await task_rows(server) == 3
    assert await audited_submits(admin, server) == sorted(r.task.task_id for r in accepted)


async def test_idempotency_keys_work_per_item_and_within_one_request(
    server: ServerHandle, client: AsyncClient, admin: AsyncAdminClient
) -> None:
    earlier = await client.submit("echo", b"first", idempotency_key="k-old")
    results = await submit_many(
        client,
        [
            item(payload=b"again", idempotency_key="k-old"),
            item(payload=b"one", idempotency_key="k-new"),
            item(payload=b"two", idempotency_key="k-new"),
            item(payload=b"plain"),
            item(payload=b"three", idempotency_key="k-new"),
        ],
    )
    responses = [r.response for r in results]
    assert all(r.WhichOneof("outcome") == "response" for r in results)
    assert (responses[0].task.task_id, responses[0].created) == (earlier.task_id, False)
    assert responses[0].task.payload == b"first"
    # Within one request the first item with a key creates the task; later ones get it.
    assert responses[1].created and responses[1].task.payload == b"one"
    for later in (responses[2], responses[4]):
        assert (later.task.task_id, later.created) == (responses[1].task.task_id, False)
        assert later.task.payload == b"one"
    assert responses[3].created
    # The whole request again: every item finds its task, nothing new is stored.
    again = await submit_many(client, [item(payload=b"x", idempotency_key="k-new")])
    assert (again[0].response.task.task_id, again[0].response.created) == (
        responses[1].task.task_id,
        False,
    )
    assert await task_rows(server) == 3
    created = [earlier.task_id, responses[1].task.task_id, responses[3].task.task_id]
    assert await audited_submits(admin, server) == sorted(created)


async def test_a_repeated_key_after_a_failed_item_is_tried_on_its_own(
    server: ServerHandle, client: AsyncClient
) -> None:
    results = await submit_many(
        client,
        [item(priority=5000, idempotency_key="k"), item(payload=b"ok", idempotency_key="k")],
    )
    assert results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results[1].response.created and results[1].response.task.payload == b"ok"
    assert await task_rows(server) == 1


async def test_whole_request_errors_are_a_clear_status(
    server: ServerHandle, admin: AsyncAdminClient
) -> None:
    empty = await raw_status(server, [])
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert empty.details() == "items: at least one item is required"
    too_many = await raw_status(server, [item()] * 1001)
    assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert too_many.details() == "items: 1001 items; at most 1000 per call (split the batch)"
    unauthenticated = await raw_status(server, [item()], authorization=False)
    assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED
    _, secret = await admin.create_api_token("bob", "submitter")
    wrong = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")
    assert (await raw_status(server, [item()], token=wrong)).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert await task_rows(server) == 0


async def test_a_request_larger_than_the_message_cap_is_resource_exhausted(
    tmp_path: Path, backend: dict[str, object]
) -> None:
    handle = await start_server(
        server_config(
            tmp_path / "data", max_payload_bytes=1024, max_message_bytes=1024 + 65536, **backend
        )
    )
    try:
        refused = await raw_status(handle, [item(payload=b"x" * 1000)] * 100)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await task_rows(handle) == 0
    finally:
        await handle.stop(grace=1.0)


async def test_the_submission_rate_limit_counts_each_item(
    tmp_path: Path, backend: dict[str, object]
) -> None:
    handle = await start_server(
        server_config(tmp_path / "data", submission_rate=0.001, submission_burst=3, **backend)
    )
    try:
        async with AsyncClient(client_config(handle)) as client:
            results = await submit_many(client, [item(payload=bytes([n])) for n in range(5)])
        accepted = [r for r in results if r.WhichOneof("outcome") == "response"]
        refused = [r.error for r in results if r.WhichOneof("outcome") == "error"]
        assert len(accepted) == 3 and len(refused) == 2
        for error in refused:
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "submissions exceeded" in error.message
            assert error.retry_after.ToTimedelta().total_seconds() > 100
        assert await task_rows(handle) == 3
    finally:
        await handle.stop(grace=1.0)


async def test_submitted_tasks_run_on_an_agent(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("batcher"))
    await agent.hello(max_concurrency=8)
    results = await submit_many(client, [item(payload=bytes([n])) for n in range(8)])
    task_ids = [r.response.task.task_id for r in results]
    assert len(set(task_ids)) == 8
    assignments = [await agent.expect("assignment") for _ in task_ids]
    assert {a.task_id for a in assignments} == set(task_ids)
    for assignment in assignments:
        agent.send(
            accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=assignment.attempt)
        )
        ack = await agent.finish(assignment, output=assignment.payload)
        assert ack.status == agent_pb2.ACK_STATUS_RECORDED
    for n, task_id in enumerate(task_ids):
        done = await client.wait(task_id, timeout=10)
        assert (done.state, done.output) == (TaskState.SUCCEEDED, bytes([n]))
    await agent.close()


async def test_items_run_together_but_a_repeated_key_waits_for_its_earlier_item() -> None:
    """The order SubmitMany promises, seen from the one Submit path it calls: unkeyed
    items run while a keyed one is still in flight, and an item repeating a key starts
    only once the earlier item with that key has been answered."""
    events: list[str] = []
    release = asyncio.Event()

    async def submit_one(request: task_pb2.SubmitRequest) -> task_pb2.SubmitResponse:
        name = request.payload.decode()
        events.append(f"start {name}")
        if name == "first":
            await release.wait()  # answered only after "plain" has started
        if name == "plain":
            release.set()
        await asyncio.sleep(0)
        events.append(f"end {name}")
        return task_pb2.SubmitResponse()

    response = await submit_many_items(
        [
            item(payload=b"first", idempotency_key="k"),
            item(payload=b"again", idempotency_key="k"),
            item(payload=b"plain"),
        ],
        submit_one,
    )
    assert len(response.results) == 3
    assert events.index("start plain") < events.index("end first")
    assert events.index("end first") < events.index("start again")


async def test_accepted_items_share_the_group_commits_transactions(
    server: ServerHandle, client: AsyncClient
) -> None:
    group = server.db.group
    before = (group.transactions, group.items)
    results = await submit_many(client, [item(payload=str(n).encode()) for n in range(300)])
    assert all(r.WhichOneof("outcome") == "response" for r in results)
    transactions, items = group.transactions - before[0], group.items - before[1]
    # Each item is an insert and a warning check: 600 items; one by one would be 600.
    assert items >= 600
    assert transactions <= 30


async def test_signed_items_are_checked_each_and_a_repeated_envelope_is_one_task(
    server: ServerHandle, client: AsyncClient, admin: AsyncAdminClient
) -> None:
    signed = submit_request()
    tampered = submit_request()
    tampered.payload = b"altered after signing"
    results = await submit_many(client, [signed, tampered, signed])
    first, bad, again = results
    assert first.response.created
    assert first.response.task.task_id == task_id_for(signed.signature.statement)
    assert first.response.task.signature == signed.signature
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.error.message.startswith("signature")
    assert (again.response.task.task_id, again.response.created) == (
        first.response.task.task_id,
        False,
    )
    # Another tenant's copy of the envelope is refused, that item alone.
    _, secret = await admin.create_api_token("mallory", "submitter", tenant="elsewhere")
    async with AsyncClient(client_config(server, secret)) as mallory:
        copied, fresh = await submit_many(mallory, [signed, item(payload=b"own")])
    assert copied.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert "another tenant submitted this signed task" in copied.error.message
    assert fresh.response.created
    assert await task_rows(server) == 2
