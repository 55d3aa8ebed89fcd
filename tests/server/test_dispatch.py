"""Dispatch over the Connect stream: credit, matching, fencing, requeue, cancel, watch."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from muster import AsyncClient, InvalidArgumentError, NotFoundError, TaskState
from muster.server.app import ServerHandle
from muster.v1 import agent_pb2, common_pb2
from tests.agentsim import Enroller, SimAgent

pytestmark = pytest.mark.slow


async def connected(
    enroller: Enroller,
    name: str,
    *,
    concurrency: int = 1,
    labels: dict[str, str] | None = None,
    capabilities: tuple[str, ...] = ("echo", "sleep"),
) -> SimAgent:
    agent = SimAgent.of(await enroller.enroll(name, labels=labels))
    await agent.hello(max_concurrency=concurrency, capabilities=capabilities)
    return agent


async def test_submit_assign_result_ack(enroller: Enroller, client: AsyncClient) -> None:
    agent = await connected(enroller, "d1")
    task = await client.submit("echo", {"msg": "hi"})
    assert task.state is TaskState.QUEUED
    assignment = await agent.expect("assignment")
    assert (assignment.task_id, assignment.attempt, assignment.kind) == (task.task_id, 1, "echo")
    agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
    ack = await agent.finish(assignment, output=assignment.payload)
    assert ack.status == agent_pb2.ACK_STATUS_RECORDED
    done = await client.wait(task.task_id, timeout=10)
    assert done.state is TaskState.SUCCEEDED
    assert done.output_json() == {"msg": "hi"}
    assert done.agent_id == "d1"
    # A resend of the same result (the agent lost our ack) is a duplicate, not an error.
    assert (
        await agent.finish(assignment, output=b"again")
    ).status == agent_pb2.ACK_STATUS_DUPLICATE
    assert (await client.get(task.task_id)).output_json() == {"msg": "hi"}
    await agent.close()


async def test_the_server_pushes_only_while_the_agent_has_credit(
    enroller: Enroller, client: AsyncClient
) -> None:
    agent = await connected(enroller, "credit", concurrency=2)
    ids = [(await client.submit("echo", b"x")).task_id for _ in range(3)]
    first = [await agent.expect("assignment") for _ in range(2)]
    with pytest.raises(TimeoutError):
        await agent.receive(timeout=0.8)
    await agent.finish(first[0])
    agent.send(credit=agent_pb2.Credit(credits=1))
    third = await agent.expect("assignment")
    assert sorted([a.task_id for a in first] + [third.task_id]) == sorted(ids)
    await agent.close()


async def test_matching_by_pool_labels_and_capability(
    enroller: Enroller, client: AsyncClient
) -> None:
    plain = await connected(enroller, "plain", capabilities=("echo",))
    gpu = await connected(enroller, "gpu", labels={"gpu": "yes"}, capabilities=("echo",))
    needs_gpu = await client.submit("echo", b"1", selector={"gpu": "yes"})
    assert (await gpu.expect("assignment")).task_id == needs_gpu.task_id
    sleeper = await client.submit("sleep", b"{}")
    other_pool = await client.submit("echo", b"2", pool="elsewhere")
    for agent in (plain, gpu):
        with pytest.raises(TimeoutError):
            await agent.expect("assignment", timeout=0.6)
    assert (await client.get(sleeper.task_id)).state is TaskState.QUEUED
    assert (await client.get(other_pool.task_id)).state is TaskState.QUEUED
    await plain.close()
    await gpu.close()


async def test_priority_then_age(enroller: Enroller, client: AsyncClient) -> None:
    low = await client.submit("echo", b"low", priority=-1)
    old = await client.submit("echo", b"old")
    high = await client.submit("echo", b"high", priority=5)
    new = await client.submit("echo", b"new")
    agent = await connected(enroller, "prio", concurrency=4)
    order = [(await agent.expect("assignment")).task_id for _ in range(4)]
    assert order == [high.task_id, old.task_id, new.task_id, low.task_id]
    await agent.close()


async def test_a_dropped_stream_requeues_with_the_next_attempt_and_fences_the_old_one(
    enroller: Enroller, client: AsyncClient
) -> None:
    first = await connected(enroller, "drop-1")
    task = await client.submit("echo", b"x")
    stale = await first.expect("assignment")
    await first.close()  # the agent vanishes mid-task
    second = await connected(enroller, "drop-2")
    retry = await second.expect("assignment")
    assert (retry.task_id, retry.attempt) == (task.task_id, 2)
    # The first agent's late result for attempt 1 is rejected as stale.
    again = SimAgent.of(await enroller.enroll("drop-3"))
    await again.hello()
    await second.finish(retry, output=b"ok")
    late = await again.finish(stale, output=b"late")
    assert late.status == agent_pb2.ACK_STATUS_STALE
    done = await client.get(task.task_id)
    assert (done.state, done.attempt, done.output) == (TaskState.SUCCEEDED, 2, b"ok")
    await second.close()
    await again.close()


async def test_an_assignment_not_accepted_in_time_is_requeued(
    enroller: Enroller, client: AsyncClient
) -> None:
    slow = await connected(enroller, "slow")
    task = await client.submit("echo", b"x")
    await slow.expect("assignment")  # never Accepted
    cancel = await slow.expect("cancel", timeout=6)
    assert cancel.task_id == task.task_id
    requeued = await client.get(task.task_id)
    assert requeued.attempt == 2
    await slow.close()


async def test_heartbeats_keep_a_running_lease(enroller: Enroller, client: AsyncClient) -> None:
    agent = await connected(enroller, "hb")
    task = await client.submit("echo", b"x")
    a = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=a.attempt))
    for _ in range(10):  # 5 s, longer than the 3 s lease
        agent.send(
            heartbeat=agent_pb2.Heartbeat(
                in_flight=[common_pb2.AttemptRef(task_id=a.task_id, attempt=1)]
            )
        )
        await asyncio.sleep(0.5)
    current = await client.get(task.task_id)
    assert (current.state, current.attempt) == (TaskState.RUNNING, 1)
    await agent.finish(a)
    await agent.close()


async def test_failed_retryable_results_retry_until_attempts_run_out(
    enroller: Enroller, client: AsyncClient
) -> None:
    agent = await connected(enroller, "retry")
    task = await client.submit("echo", b"x", max_attempts=2)
    a1 = await agent.expect("assignment")
    await agent.finish(a1, outcome=agent_pb2.OUTCOME_FAILED, error="boom", retryable=True)
    agent.send(credit=agent_pb2.Credit(credits=1))
    a2 = await agent.expect("assignment", timeout=5)  # after a 1 s backoff
    assert a2.attempt == 2
    await agent.finish(a2, outcome=agent_pb2.OUTCOME_FAILED, error="boom again", retryable=True)
    done = await client.wait(task.task_id, timeout=5)
    assert done.state is TaskState.FAILED
    assert "boom again" in done.error
    await agent.close()


async def test_cancel_a_queued_task_and_a_running_one(
    enroller: Enroller, client: AsyncClient
) -> None:
    queued = await client.submit("echo", b"x", pool="nobody")
    assert (await client.cancel(queued.task_id, "changed my mind")).state is TaskState.CANCELLED

    agent = await connected(enroller, "cancel")
    running = await client.submit("sleep", b'{"seconds": 60}')
    a = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=1))
    marked = await client.cancel(running.task_id)
    assert marked.cancel_requested
    cancel = await agent.expect("cancel")
    assert (cancel.task_id, cancel.attempt) == (running.task_id, 1)
    await agent.finish(a, outcome=agent_pb2.OUTCOME_CANCELLED)
    assert (await client.wait(running.task_id, timeout=5)).state is TaskState.CANCELLED
    await agent.close()


async def test_watch_streams_every_state_until_terminal(
    enroller: Enroller, client: AsyncClient
) -> None:
    agent = await connected(enroller, "watch")
    task = await client.submit("echo", b"x")
    states: list[TaskState] = []

    async def watch() -> None:
        async for t in client.watch(task.task_id):
            states.append(t.state)

    watcher = asyncio.create_task(watch())
    a = await agent.expect("assignment")
    await asyncio.sleep(0.2)
    agent.send(accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=1))
    await asyncio.sleep(0.2)
    await agent.finish(a)
    await asyncio.wait_for(watcher, 5)
    assert states[0] in (TaskState.QUEUED, TaskState.ASSIGNED)
    assert states[-1] is TaskState.SUCCEEDED
    assert TaskState.RUNNING in states
    await agent.close()


async def test_idempotent_submission(client: AsyncClient) -> None:
    first = await client.submit("echo", b"x", idempotency_key="k-1")
    again = await client.submit("echo", b"different", idempotency_key="k-1")
    assert again.task_id == first.task_id
    assert len(await client.list()) == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": ""}, "kind"),
        ({"kind": "Bad Kind"}, "kind"),
        ({"pool": "No Pool"}, "pool"),
        ({"max_attempts": 50}, "max_attempts"),
        ({"priority": 10_000}, "priority"),
        ({"selector": {"bad key!": "v"}}, "selector"),
        ({"payload": b"x" * ((1 << 20) + 1)}, "payload"),
    ],
)
async def test_invalid_submissions_are_refused_and_store_nothing(
    client: AsyncClient, kwargs: dict[str, object], field: str
) -> None:
    args = {"kind": "echo", "payload": b"x", **kwargs}
    kind = args.pop("kind")
    with pytest.raises(InvalidArgumentError, match=f"^{field}"):
        await client.submit(kind, **args)  # type: ignore[arg-type]
    assert await client.list() == []


async def test_unknown_task_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(NotFoundError):
        await client.get("t_nope")
    with pytest.raises(NotFoundError):
        await client.cancel("t_nope")


async def test_a_silent_stream_is_closed_and_its_work_requeued(
    enroller: Enroller, client: AsyncClient, server: ServerHandle
) -> None:
    agent = await connected(enroller, "silent")
    task = await client.submit("echo", b"x")
    a = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=1))
    assert await asyncio.wait_for(agent.status(), 10) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await client.get(task.task_id)).attempt == 2
    await agent.close()


async def test_a_draining_server_refuses_new_streams(
    enroller: Enroller, server: ServerHandle
) -> None:
    enrolled = await enroller.enroll("late-comer")
    server.hub.drain_all("test: stopping")
    agent = SimAgent.of(enrolled)
    with pytest.raises((grpc.aio.AioRpcError, EOFError)):
        await agent.hello()
    assert await agent.status() == grpc.StatusCode.UNAVAILABLE
    await agent.close()


async def test_idle_streams_do_not_look_for_work_by_themselves(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    agents = [await connected(enroller, f"idle{i}", concurrency=2) for i in range(5)]
    for agent in agents:
        agent.keep_alive(interval=0.2)  # heartbeats come, and must not cost a write
    await asyncio.sleep(0.5)  # each stream looks once when it connects
    before = server.db.group.items
    await asyncio.sleep(2.5)  # more than two poll intervals
    assert server.db.group.items == before
    task = await client.submit("echo", b"wake one")
    got = await asyncio.wait(
        [asyncio.create_task(a.expect("assignment", timeout=5)) for a in agents],
        return_when=asyncio.FIRST_COMPLETED,
    )
    assert [t.result().task_id for t in got[0]] == [task.task_id]
    for pending in got[1]:
        pending.cancel()
    for agent in agents:
        await agent.close()
