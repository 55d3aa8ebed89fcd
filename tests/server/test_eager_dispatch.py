"""Eager dispatch: a task submitted while a matching stream on this replica is idle with
credit is inserted already assigned to it and pushed at once, with no claim; otherwise
it is queued as before."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.server.app import ServerHandle, start_server
from muster.server.dispatch.session import AgentSession
from muster.server.storage.models import AuditEvent
from muster.server.storage.taskstore import Claimed
from muster.v1 import agent_pb2
from tests.agentsim import Enroller, SimAgent
from tests.conftest import client_config, server_config


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition of the server's own state (no fixed sleep)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def idle(server: ServerHandle, agent_id: str) -> Callable[[], bool]:
    """The agent's stream is welcomed, has credit and is not looking for work."""

    def check() -> bool:
        return any(
            isinstance(s, AgentSession) and s.agent_id == agent_id and s.idle_with_credit
            for s in server.hub.streams()
        )

    return check


async def connected(
    enroller: Enroller,
    server: ServerHandle,
    name: str,
    *,
    concurrency: int = 1,
    labels: dict[str, str] | None = None,
) -> SimAgent:
    agent = SimAgent.of(await enroller.enroll(name, labels=labels))
    await agent.hello(max_concurrency=concurrency, capabilities=("echo",))
    await until(idle(server, name))
    return agent


async def assigns(server: ServerHandle, task_id: str) -> list[dict[str, Any]]:
    async with server.db.transaction() as session:
        rows = await session.execute(
            select(AuditEvent.details).where(
                AuditEvent.action == "task.assign", AuditEvent.target == task_id
            )
        )
        return [dict(details) for (details,) in rows]


async def test_a_task_submitted_to_an_idle_stream_is_pushed_without_a_claim(
    enroller: Enroller, server: ServerHandle, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = await connected(enroller, server, "eager")
    announced: list[str] = []
    fanout = server._fanout
    original = fanout.task_changed

    def task_changed(task_id: str, ended: Any = None) -> None:
        announced.append(task_id)
        original(task_id, ended)

    monkeypatch.setattr(fanout, "task_changed", task_changed)
    task = await client.submit("echo", b"x")
    assert task.state is TaskState.QUEUED  # Submit answers as before
    assignment = await agent.expect("assignment")
    assert (assignment.task_id, assignment.attempt) == (task.task_id, 1)
    assert await assigns(server, task.task_id) == [
        {"attempt": 1, "session": agent_session(server, "eager"), "eager": True}
    ]
    # Nobody could watch it before its Submit answered: no change is announced.
    assert announced == []
    agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
    assert (await agent.finish(assignment)).status == agent_pb2.ACK_STATUS_RECORDED
    assert (await client.wait(task.task_id, timeout=10)).state is TaskState.SUCCEEDED
    await agent.close()


async def test_without_credit_or_a_matching_stream_the_task_is_queued(
    enroller: Enroller, server: ServerHandle, client: AsyncClient
) -> None:
    agent = await connected(enroller, server, "busy", labels={"zone": "a"})
    first = await client.submit("echo", b"1")
    held = await agent.expect("assignment")
    elsewhere = await client.submit("echo", b"2", selector={"zone": "b"})
    second = await client.submit("echo", b"3")  # no credit left
    assert (await client.get(elsewhere.task_id)).state is TaskState.QUEUED
    assert (await client.get(second.task_id)).state is TaskState.QUEUED
    assert await assigns(server, second.task_id) == []
    await agent.finish(held)
    agent.send(credit=agent_pb2.Credit(credits=1))
    claimed = await agent.expect("assignment")
    assert claimed.task_id == second.task_id
    # Claimed by the stream's pump, not eagerly.
    assert [a.get("eager") for a in await assigns(server, second.task_id)] == [None]
    assert held.task_id == first.task_id
    await agent.close()


async def test_eager_dispatch_can_be_turned_off(tmp_path: Path, backend: dict[str, object]) -> None:
    server = await start_server(server_config(tmp_path / "data", eager_dispatch=False, **backend))
    try:
        async with (
            AsyncAdminClient(client_config(server)) as admin,
            AsyncClient(client_config(server)) as client,
        ):
            agent = await connected(Enroller(server, admin), server, "lazy")
            task = await client.submit("echo", b"x")
            assert (await agent.expect("assignment")).task_id == task.task_id
            assert [a.get("eager") for a in await assigns(server, task.task_id)] == [None]
            await agent.close()
    finally:
        await server.stop(grace=1.0)


class GoneStream:
    """A stream that took a credit and was gone by the time its task was committed."""

    session_id = "s_gone"
    agent_id = "gone"
    pool = "default"
    labels: dict[str, str] = {}
    serial = "00"
    kinds = ["echo"]
    started_at = 0.0
    cert_not_before = 0.0
    wants_work = False
    delivered: list[Claimed] = []

    def take_credit(self) -> bool:
        return True

    def return_credit(self) -> None:
        raise AssertionError("the task was assigned: nothing to return")

    def deliver(self, task: Claimed) -> bool:
        self.delivered.append(task)
        return False

    def wake(self) -> None: ...
    def cancel_attempt(self, task_id: str, attempt: int, reason: str) -> None: ...
    def drain(self, reason: str) -> None: ...
    def close(self, code: grpc.StatusCode, message: str) -> None: ...


async def test_a_task_whose_stream_went_away_is_given_back_to_the_queue(
    server: ServerHandle, client: AsyncClient
) -> None:
    gone = GoneStream()
    hub = server.hub
    hub.register(gone)  # type: ignore[arg-type]
    try:
        task = await client.submit("echo", b"x")
    finally:
        hub.unregister(gone)  # type: ignore[arg-type]
    assert [t.task_id for t in gone.delivered] == [task.task_id]
    after = await client.get(task.task_id)
    assert (after.state, after.attempt, after.agent_id) == (TaskState.QUEUED, 1, "")
    async with server.db.transaction() as session:
        actions = (
            await session.execute(
                select(AuditEvent.action)
                .where(AuditEvent.target == task.task_id)
                .order_by(AuditEvent.id)
            )
        ).scalars()
        assert list(actions) == ["task.submit", "task.assign", "task.requeue"]


def agent_session(server: ServerHandle, agent_id: str) -> str:
    (stream,) = [s for s in server.hub.streams() if s.agent_id == agent_id]
    return stream.session_id
