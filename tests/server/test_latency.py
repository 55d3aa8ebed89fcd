"""What one task's round trip waits for: no step waits for work it does not need.
Ordering is checked with held steps, not with clocks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from muster import AsyncClient, TaskState
from muster.server.services import waiting
from muster.v1 import agent_pb2
from tests.agentsim import Enroller, SimAgent
from tests.server.test_eager_dispatch import idle, until

GUARD = 10.0
"""Seconds before a step that should not wait at all counts as stuck (a hang guard, not
a measurement)."""


async def test_an_eagerly_assigned_submit_skips_the_presence_check(
    enroller: Enroller, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of who could run a task runs in the group commit's queue; for a task
    pushed at once to an idle agent it has nothing to say, and the task's Accepted and
    Result would queue behind it."""
    agent = SimAgent.of(await enroller.enroll("eager"))
    await agent.hello(max_concurrency=1, capabilities=("echo",))
    # The stream's first look for work, after Welcome, is over: now it is idle (waiting
    # for the claim statement alone raced the end of that look, and the submit queued).
    await until(idle(enroller.server, "eager"))
    checking, release = asyncio.Event(), asyncio.Event()
    original = waiting.check_submitted

    async def held_check(*args: Any, **kwargs: Any) -> Any:
        checking.set()
        await release.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(waiting, "check_submitted", held_check)
    try:
        task = await asyncio.wait_for(client.submit("echo", b"{}"), GUARD)
        assignment = await agent.expect("assignment")
        assert assignment.task_id == task.task_id
        assert (task.state, task.submit_warning) == (TaskState.QUEUED, "")
        assert not checking.is_set()
        agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
        ack = await agent.finish(assignment, output=b"{}")
        assert ack.status == agent_pb2.ACK_STATUS_RECORDED
        # The agent is busy now: the next task queues, and its Submit is checked.
        queued = asyncio.create_task(client.submit("sleep", b"{}"))
        await asyncio.wait_for(checking.wait(), GUARD)
    finally:
        release.set()
    assert (await queued).submit_warning.startswith("no agent of pool default has offered")
    await agent.close()


async def test_credit_back_to_an_empty_queue_costs_no_claim(
    enroller: Enroller, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that finished a task grants its credit again; when its last claim found
    nothing and no work was announced since, the stream does not ask the database (a
    claim finding nothing would share the group commit with other tasks' Results). Work
    announced meanwhile is claimed when the credit comes."""
    store = enroller.server.db.tasks
    original_claim = store._claim_many
    claims: list[int] = []

    async def claim(*args: Any, **kwargs: Any) -> Any:
        try:
            return await original_claim(*args, **kwargs)
        finally:
            claims.append(1)

    monkeypatch.setattr(store, "_claim_many", claim)
    agent = SimAgent.of(await enroller.enroll("thrifty"))
    await agent.hello(max_concurrency=1, capabilities=("echo",))
    ready = idle(enroller.server, "thrifty")
    await until(ready)  # the first look, after Welcome, found the queue empty

    async def run_one(assignment: agent_pb2.Assignment) -> None:
        agent.send(accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=1))
        assert (await agent.finish(assignment)).status == agent_pb2.ACK_STATUS_RECORDED
        agent.send(credit=agent_pb2.Credit(credits=1))

    for _ in range(3):  # each pushed at once (eager), each credit back: no claim
        task = await client.submit("echo", b"{}")
        assignment = await agent.expect("assignment")
        assert assignment.task_id == task.task_id
        await run_one(assignment)
        await until(ready)  # the credit arrived, and the stream did not go looking
    assert len(claims) == 1
    await client.submit("echo", b"{}")
    busy = await agent.expect("assignment")

    # While the agent is busy a task is queued (announced); the credit claims it.
    queued = await client.submit("echo", b"{}")
    await run_one(busy)
    assignment = await asyncio.wait_for(agent.expect("assignment"), GUARD)
    assert assignment.task_id == queued.task_id
    assert len(claims) == 2
    await agent.close()


async def test_an_attempt_that_ends_at_once_is_written_once(
    enroller: Enroller, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Accepted waits ACCEPT_DELAY before it is written: a Result that comes first
    ends the attempt in one UPDATE that records the Accepted's time as its start. One
    that does not come in time leaves the Accepted to be written as before; meanwhile
    a read shows the task as the write will."""
    store = enroller.server.db.tasks
    original_accept = store._accept_many
    accepts: list[int] = []

    async def accept_many(*args: Any, **kwargs: Any) -> Any:
        accepts.append(1)
        return await original_accept(*args, **kwargs)

    monkeypatch.setattr(store, "_accept_many", accept_many)
    agent = SimAgent.of(await enroller.enroll("brisk"))
    await agent.hello(max_concurrency=1, capabilities=("echo", "sleep"))

    task = await client.submit("echo", b"{}")
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
    assert (await agent.finish(assignment)).status == agent_pb2.ACK_STATUS_RECORDED
    done = await client.get(task.task_id)
    assert done.state is TaskState.SUCCEEDED
    assert done.started_at is not None and done.finished_at is not None
    assert done.started_at <= done.finished_at
    assert accepts == []
    agent.send(credit=agent_pb2.Credit(credits=1))

    slow = await client.submit("sleep", b"{}")
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=slow.task_id, attempt=1))
    async with asyncio.timeout(GUARD):  # shown RUNNING as soon as the Accepted is in
        while (running := await client.get(slow.task_id)).state is not TaskState.RUNNING:
            await asyncio.sleep(0.01)
    async with asyncio.timeout(GUARD):  # and written once the delay passed with no Result
        while not accepts:
            await asyncio.sleep(0.01)
    assert accepts == [1]
    assert await client.get(slow.task_id) == running  # written as it was shown
    assert (await agent.finish(assignment)).status == agent_pb2.ACK_STATUS_RECORDED
    finished = await client.get(slow.task_id)
    assert (finished.state, finished.started_at) == (TaskState.SUCCEEDED, running.started_at)
    await agent.close()


async def test_a_watch_gets_the_end_without_reading_it_again(
    enroller: Enroller, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Watch reads its task once; the Result that ends it on this replica hands the
    watcher the ended row (the payload kept from that read)."""
    store = enroller.server.db.tasks
    original_read = store.read
    reads: list[str] = []

    async def read(conn: Any, task_id: str) -> Any:
        reads.append(task_id)
        return await original_read(conn, task_id)

    monkeypatch.setattr(store, "read", read)
    agent = SimAgent.of(await enroller.enroll("watched"))
    await agent.hello(max_concurrency=1, capabilities=("echo",))
    task = await client.submit("echo", b'{"n": 1}')
    assignment = await agent.expect("assignment")
    watching = asyncio.create_task(client.wait(task.task_id, timeout=GUARD))
    async with asyncio.timeout(GUARD):  # the Watch's first read: it holds the task now
        while not reads:
            await asyncio.sleep(0.01)
    assert (await agent.finish(assignment, output=b'{"n": 2}')).status == (
        agent_pb2.ACK_STATUS_RECORDED
    )
    done = await watching
    assert (done.state, done.payload, done.output) == (
        TaskState.SUCCEEDED,
        b'{"n": 1}',
        b'{"n": 2}',
    )
    assert reads == [task.task_id]
    assert done == await client.get(task.task_id)  # as a read shows it
    await agent.close()
