"""The server's own backstops reach TIMED_OUT: schedule-to-start, start-to-close and the
deadline, for a handful of tasks and among hundreds of running ones. Time is a manual
clock the test advances; the reaper passes when it moves, so nothing here sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from muster import AsyncClient, TaskState
from muster.server.app import ServerHandle, start_server
from muster.server.clock import ManualClock, sleep_unless
from muster.server.storage.models import Task
from muster.states import State
from muster.v1 import agent_pb2
from tests.agentsim import Enroller, SimAgent
from tests.conftest import server_config

LOOPS_ON_THE_CLOCK = 2
"""What sleeps on the server's clock between passes: the reaper and the server
certificate's renewal (at least these)."""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def server(
    tmp_path: Path, backend: dict[str, object], clock: ManualClock
) -> AsyncIterator[ServerHandle]:
    """A server on the manual clock. Leases and the accept timeout are far longer than
    any step a test takes, so only the timeout under test can fire."""
    config = server_config(
        tmp_path / "data",
        lease_duration=timedelta(minutes=4),
        accept_timeout=timedelta(minutes=4),
        **backend,
    )
    handle = await start_server(config, clock=clock)
    try:
        await clock.wait_for_sleepers(LOOPS_ON_THE_CLOCK)  # the first passes are done
        yield handle
    finally:
        await handle.stop(grace=1.0)


async def tick(clock: ManualClock, seconds: float) -> None:
    """Advance the clock, then wait until what it woke (the reaper) has made its pass and
    sleeps on it again."""
    parked = clock.sleepers
    clock.advance(seconds)
    await clock.wait_for_sleepers(parked)


async def running(enroller: Enroller, client: AsyncClient, **submit: Any) -> tuple[SimAgent, Any]:
    """An agent that has accepted a task submitted with ``submit``: (agent, assignment)."""
    agent = SimAgent.of(await enroller.enroll("runner"))
    await agent.hello(max_concurrency=1)
    agent.keep_alive()
    task = await client.submit("sleep", b"{}", max_attempts=1, **submit)
    assignment = await agent.expect("assignment")
    assert assignment.task_id == task.task_id
    agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
    await until_state(client, task.task_id, TaskState.RUNNING)
    return agent, assignment


async def until_state(client: AsyncClient, task_id: str, state: TaskState) -> Any:
    """Wait (on the task's own watch stream, not by polling) until it reaches ``state``."""
    async for task in client.watch(task_id):
        if task.state is state:
            return task
    raise AssertionError(f"{task_id} ended without reaching {state}")


async def test_schedule_to_start_timeout(clock: ManualClock, client: AsyncClient) -> None:
    # No agent serves this pool: the task can only wait.
    task = await client.submit("echo", b"", pool="nobody", schedule_to_start_timeout=30)
    await tick(clock, 29)
    assert (await client.get(task.task_id)).state is TaskState.QUEUED
    await tick(clock, 2)
    late = await client.get(task.task_id)
    assert late.state is TaskState.TIMED_OUT
    assert late.error.startswith("schedule-to-start timeout exceeded")
    assert late.finished_at == late.created_at + timedelta(seconds=31)  # the clock's time


async def test_start_to_close_timeout_stops_the_running_attempt(
    clock: ManualClock, enroller: Enroller, client: AsyncClient
) -> None:
    agent, assignment = await running(enroller, client, start_to_close_timeout=60)
    await tick(clock, 59)
    assert (await client.get(assignment.task_id)).state is TaskState.RUNNING
    await tick(clock, 2)
    cancel = await agent.expect("cancel")
    assert (cancel.task_id, cancel.attempt) == (assignment.task_id, 1)
    done = await client.get(assignment.task_id)
    assert done.state is TaskState.TIMED_OUT
    assert done.error == "start-to-close timeout exceeded (attempt 1 of 1)"
    # The agent's late result changes nothing: the attempt already ended (the agent may
    # drop it from its outbox).
    ack = await agent.finish(assignment, output=b"too late")
    assert ack.status == agent_pb2.ACK_STATUS_DUPLICATE
    after = await client.get(assignment.task_id)
    assert (after.state, after.output) == (TaskState.TIMED_OUT, b"")
    await agent.close()


async def test_start_to_close_timeout_retries_while_attempts_remain(
    clock: ManualClock, enroller: Enroller, client: AsyncClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("retrier"))
    await agent.hello(max_concurrency=1)
    agent.keep_alive()
    task = await client.submit("sleep", b"{}", max_attempts=2, start_to_close_timeout=10)
    for attempt in (1, 2):
        assignment = await agent.expect("assignment")
        assert (assignment.task_id, assignment.attempt) == (task.task_id, attempt)
        agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=attempt))
        await until_state(client, task.task_id, TaskState.RUNNING)
        await tick(clock, 11)
        assert (await agent.expect("cancel")).attempt == attempt
        # The agent stops the work and reports it, which frees its slot for the retry.
        await agent.finish(assignment, outcome=agent_pb2.OUTCOME_CANCELLED)
        agent.send(credit=agent_pb2.Credit(credits=1))
    done = await client.get(task.task_id)
    assert (done.state, done.attempt) == (TaskState.TIMED_OUT, 2)
    await agent.close()


async def test_deadline_ends_running_and_queued_tasks(
    clock: ManualClock, enroller: Enroller, client: AsyncClient
) -> None:
    # The deadline is absolute and checked against the real time at Submit; the manual
    # clock started at the real time a moment earlier, so 60 s of it cannot reach a
    # deadline 120 s away, and 200 s must pass it.
    deadline = datetime.now().astimezone() + timedelta(seconds=120)
    agent, assignment = await running(enroller, client, deadline=deadline)
    waiting = await client.submit("echo", b"", pool="nobody", deadline=deadline)
    await tick(clock, 60)
    assert (await client.get(assignment.task_id)).state is TaskState.RUNNING
    assert (await client.get(waiting.task_id)).state is TaskState.QUEUED
    await tick(clock, 140)
    cancel = await agent.expect("cancel")
    assert cancel.task_id == assignment.task_id
    for task_id in (assignment.task_id, waiting.task_id):
        done = await client.get(task_id)
        assert (done.state, done.error) == (TaskState.TIMED_OUT, "deadline exceeded")
    await agent.close()


BUSY = 600
"""Running attempts beside the overdue one: more than one reaper query used to read."""


def _row(n: int, now: datetime, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "task_id": f"t_busy{n:05d}",
        "kind": "sleep",
        "payload": b"",
        "pool": "busy",
        "selector": {},
        "priority": 0,
        "state": State.RUNNING,
        "attempt": 1,
        "max_attempts": 1,
        "owner": "admin",
        "idempotency_key": None,
        "agent_id": "ghost",
        "session_id": "s_ghost",
        "lease_expires_at": now + timedelta(days=1),
        "schedule_to_start_timeout": None,
        "start_to_close_timeout": 3600.0,
        "deadline": None,
        "created_at": now,
        "updated_at": now,
        "queued_at": now,
        "started_at": now,
    }
    return values | overrides


@pytest.mark.parametrize("timeout", ["start_to_close", "deadline", "schedule_to_start"])
async def test_one_overdue_among_hundreds_of_running_times_out(
    timeout: str, clock: ManualClock, server: ServerHandle, client: AsyncClient
) -> None:
    """600 running attempts, and the overdue one written last (where a window of the
    first 500 rows would never reach it): the reaper's query finds it all the same."""
    now = clock.now()
    late: dict[str, Any] = {
        "start_to_close": {"start_to_close_timeout": 5.0},
        "deadline": {"deadline": now + timedelta(seconds=5)},
        "schedule_to_start": {
            "state": State.QUEUED,
            "agent_id": None,
            "session_id": None,
            "lease_expires_at": None,
            "started_at": None,
            "schedule_to_start_timeout": 5.0,
        },
    }[timeout]
    rows = [_row(n, now) for n in range(BUSY)] + [_row(BUSY, now, **late)]
    # One multi-row INSERT, in the order given: the overdue row is the last one written.
    await server.db.batched(lambda conn: conn.execute(insert(Task), rows))
    overdue = f"t_busy{BUSY:05d}"

    await tick(clock, 4)
    assert (await client.get(overdue)).state is not TaskState.TIMED_OUT
    await tick(clock, 2)
    done = await client.get(overdue)
    assert done.state is TaskState.TIMED_OUT
    assert done.error.startswith(
        {
            "start_to_close": "start-to-close timeout exceeded",
            "deadline": "deadline exceeded",
            "schedule_to_start": "schedule-to-start timeout exceeded",
        }[timeout]
    )
    busy = await client.list(states=[TaskState.RUNNING], pool="busy", limit=None)
    assert len(busy) == BUSY  # the others were not touched


async def test_the_most_overdue_come_first_and_the_rest_next_pass(
    clock: ManualClock, server: ServerHandle
) -> None:
    """One reaper pass takes a bounded batch, most overdue first; what is left over is
    still overdue at the next pass, so a backlog drains in order."""
    now = clock.now()
    rows = [_row(n, now, start_to_close_timeout=float(10 + n)) for n in range(5)]
    await server.db.batched(lambda conn: conn.execute(insert(Task), rows))
    later = now + timedelta(seconds=100)
    async with server.db.transaction() as session:
        first = await server.db.tasks.overrun_attempts(session, later, limit=2)
        everything = await server.db.tasks.overrun_attempts(session, later)
        none_yet = await server.db.tasks.overrun_attempts(session, now + timedelta(seconds=10))
    assert [h.task_id for h in first] == ["t_busy00000", "t_busy00001"]
    assert [h.task_id for h in everything] == [f"t_busy{n:05d}" for n in range(5)]
    assert none_yet == []  # exactly at its timeout is not yet past it


async def test_the_manual_clock_wakes_sleepers_only_when_moved() -> None:
    clock = ManualClock()
    start = clock.now()
    stopping = asyncio.Event()
    nap = asyncio.create_task(sleep_unless(clock, stopping, 10))
    await clock.wait_for_sleepers(1)
    clock.advance(9.5)
    await asyncio.sleep(0)
    assert not nap.done() and clock.sleepers == 1
    clock.advance(timedelta(seconds=0.5))
    assert await nap is False  # it slept its time; nothing asked it to stop
    assert clock.now() - start == timedelta(seconds=10)
    stopped = asyncio.create_task(sleep_unless(clock, stopping, 10))
    await clock.wait_for_sleepers(1)
    stopping.set()
    assert await stopped is True
    assert clock.sleepers == 0
    with pytest.raises(ValueError):
        clock.advance(-1)
