"""Issue 10: what a stream remembers per attempt is forgotten when the attempt ends, so an
agent connected for days does not grow the server's memory with every task it runs."""

from __future__ import annotations

import asyncio

import pytest

from muster import AsyncClient, TaskState
from muster.server.app import ServerHandle
from muster.server.dispatch.session import AgentSession
from muster.v1 import agent_pb2
from tests.agentsim import Enroller, SimAgent


def _session(server: ServerHandle, agent_id: str) -> AgentSession:
    [stream] = [s for s in server.hub.streams() if s.agent_id == agent_id]
    assert isinstance(stream, AgentSession)
    return stream


async def _no_cancel(agent: SimAgent) -> None:
    with pytest.raises(TimeoutError):
        await agent.expect("cancel", timeout=0.5)


async def test_an_accepted_written_after_its_result_sends_no_cancel_and_leaves_nothing(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    """Accepted is not waited for, so under load its batch can commit after the Result's:
    the attempt is over, not stolen. It used to get a Cancel, remembered for the stream's
    life (about 1 % of echo tasks at 30/s, ~180 bytes each)."""
    agent = SimAgent.of(await enroller.enroll("late-accept"))
    await agent.hello(max_concurrency=1, capabilities=("echo",))
    for i in range(5):
        task = await client.submit("echo", {"n": i})
        a = await agent.expect("assignment")
        ack = await agent.finish(a, output=a.payload)  # the Result is written first...
        assert ack.status == agent_pb2.ACK_STATUS_RECORDED
        agent.send(accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=a.attempt))  # ...then
        agent.send(credit=agent_pb2.Credit(credits=1))
        assert (await client.wait(task.task_id, timeout=10)).state is TaskState.SUCCEEDED
    await _no_cancel(agent)
    session = _session(server, "late-accept")
    assert session._cancels_sent == set()
    assert session._held == set()
    await agent.close()


async def test_a_cancelled_attempt_is_forgotten_once_its_result_arrives(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("forget-cancel"))
    await agent.hello(max_concurrency=1, capabilities=("sleep",))
    for _ in range(3):
        task = await client.submit("sleep", b'{"seconds": 60}')
        a = await agent.expect("assignment")
        agent.send(accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=1))
        await client.cancel(task.task_id)
        cancel = await agent.expect("cancel")
        assert (cancel.task_id, cancel.attempt) == (task.task_id, 1)
        await agent.finish(a, outcome=agent_pb2.OUTCOME_CANCELLED)
        agent.send(credit=agent_pb2.Credit(credits=1))
        assert (await client.wait(task.task_id, timeout=5)).state is TaskState.CANCELLED
    session = _session(server, "forget-cancel")
    async with asyncio.timeout(5):  # the stream handles the Result a moment after it is stored
        while session._cancels_sent:
            await asyncio.sleep(0.02)
    await agent.close()
