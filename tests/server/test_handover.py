"""Graceful handover: a stream the replica drains (shutdown, maximum age) gives its
attempts to the agent's next stream with the same attempt numbers, instead of requeueing
them; results finished in between are recorded once; nothing claimed after Drain is sent."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.agent.config import AgentConfig
from muster.agent.daemon import Agent
from muster.agent.executors import ExecutorRegistry
from muster.server.app import ServerHandle, start_server
from muster.server.dispatch.session import AgentSession
from muster.server.storage.models import AuditEvent, Task
from muster.server.storage.types import utcnow
from muster.states import State
from muster.v1 import agent_pb2
from tests.agent.conftest import GateExecutor
from tests.agentsim import Enrolled, Enroller, SimAgent
from tests.conftest import client_config, server_config

pytestmark = pytest.mark.slow

SLEEP = b'{"seconds": 60}'


async def running(
    enrolled: Enrolled, client: AsyncClient, count: int
) -> tuple[SimAgent, list[agent_pb2.Assignment]]:
    """An agent stream running ``count`` accepted attempts, with no credit left (so the
    server claims nothing more for it by itself)."""
    agent = SimAgent.of(enrolled)
    await agent.hello(max_concurrency=count)
    for _ in range(count):
        await client.submit("sleep", SLEEP)
    assignments = [await agent.expect("assignment") for _ in range(count)]
    for a in assignments:
        agent.send(accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=a.attempt))
    for a in assignments:
        await until_state(client, a.task_id, TaskState.RUNNING)
    return agent, assignments


async def until_state(client: AsyncClient, task_id: str, state: TaskState) -> None:
    for _ in range(200):
        if (await client.get(task_id)).state is state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{task_id} never reached {state}")


def stream_of(server: ServerHandle, agent_id: str) -> AgentSession:
    (stream,) = [s for s in server.hub.streams() if s.agent_id == agent_id]
    assert isinstance(stream, AgentSession)
    return stream


async def drained_and_closed(server: ServerHandle, agent: SimAgent, agent_id: str) -> None:
    """The replica drains the stream (as at its maximum age); the agent half-closes it."""
    stream_of(server, agent_id).drain("maximum stream age reached; reconnect")
    assert (await agent.expect("drain")).reason
    await agent.close()
    for _ in range(200):
        if not server.hub.is_connected(agent_id):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the drained stream did not end")


async def rows(server: ServerHandle, ids: list[str]) -> dict[str, Task]:
    async with server.db.transaction() as session:
        found = await session.execute(select(Task).where(Task.task_id.in_(ids)))
        return {t.task_id: t for t in found.scalars()}


async def audit_count(server: ServerHandle, action: str, ids: list[str]) -> int:
    await server.flush_audit()
    async with server.db.transaction() as session:
        count = await session.scalar(
            select(func.count()).where(AuditEvent.action == action, AuditEvent.target.in_(ids))
        )
    return int(count or 0)


async def test_a_drained_stream_hands_running_attempts_to_the_next_one_same_numbers(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("hand-1")
    agent, assignments = await running(enrolled, client, 2)
    ids = [a.task_id for a in assignments]
    await drained_and_closed(server, agent, "hand-1")

    # Not requeued: still the agent's, on attempt 1, leased for the handover grace.
    held = await rows(server, ids)
    grace_floor = utcnow() + server.config.lease_duration
    for task in held.values():
        assert (task.state, task.attempt, task.agent_id) == ("RUNNING", 1, "hand-1")
        assert task.lease_expires_at is not None and task.lease_expires_at > grace_floor

    again = SimAgent.of(enrolled)
    await again.hello(max_concurrency=3, in_flight=tuple((t, 1) for t in ids))
    with pytest.raises(TimeoutError):  # no Cancel: the running work stays running
        await again.receive(timeout=0.6)
    for a in assignments:
        ack = await again.finish(a, output=b"done")
        assert ack.status == agent_pb2.ACK_STATUS_RECORDED
    for task_id in ids:
        done = await client.get(task_id)
        assert (done.state, done.attempt) == (TaskState.SUCCEEDED, 1)
    assert await audit_count(server, "task.requeue", ids) == 0
    assert await audit_count(server, "task.assign", ids) == 2
    assert await audit_count(server, "task.finish", ids) == 2
    await again.close()


async def test_results_finished_between_streams_are_recorded_once(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("hand-2")
    agent, (assignment,) = await running(enrolled, client, 1)
    await drained_and_closed(server, agent, "hand-2")
    # The attempt finished while the agent was away: its Result waits in the outbox, so
    # the next Hello does not list it, and the resend after Welcome is recorded.
    again = SimAgent.of(enrolled)
    await again.hello(max_concurrency=1)
    assert (await again.finish(assignment, output=b"1")).status == agent_pb2.ACK_STATUS_RECORDED
    resent = await again.finish(assignment, output=b"2")
    assert resent.status == agent_pb2.ACK_STATUS_DUPLICATE
    done = await client.get(assignment.task_id)
    assert (done.state, done.attempt, done.output) == (TaskState.SUCCEEDED, 1, b"1")
    assert await audit_count(server, "task.finish", [assignment.task_id]) == 1
    await again.close()


async def test_an_attempt_the_agent_abandoned_while_away_is_freed_by_its_report(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("hand-6")
    agent, (assignment,) = await running(enrolled, client, 1)
    await drained_and_closed(server, agent, "hand-6")
    # The agent stopped before the attempt finished; on its next start it reports that
    # (a retryable failure from its outbox) instead of leaving the handover grace to run.
    again = SimAgent.of(enrolled)
    await again.hello(max_concurrency=1)
    ack = await again.finish(
        assignment, outcome=agent_pb2.OUTCOME_FAILED, error="stopped", retryable=True
    )
    assert ack.status == agent_pb2.ACK_STATUS_RECORDED
    retry = await client.get(assignment.task_id)
    assert retry.attempt == 2  # requeued at once (then claimable after its backoff)
    assert retry.state in (TaskState.QUEUED, TaskState.ASSIGNED)
    await again.close()


async def test_a_stream_that_ends_without_a_drain_still_requeues(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("hand-3")
    agent, (assignment,) = await running(enrolled, client, 1)
    await agent.close()  # a crash or a cut, not a planned end
    await until_state(client, assignment.task_id, TaskState.QUEUED)
    assert (await client.get(assignment.task_id)).attempt == 2


async def test_what_was_claimed_for_a_drained_stream_but_never_sent_goes_back_unchanged(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("hand-4")
    agent, (sent,) = await running(enrolled, client, 1)
    stream = stream_of(server, "hand-4")
    # A claim that lands for the stream but is never written to it (as when Drain goes
    # out while the claim runs).
    late = await client.submit("sleep", SLEEP)
    unsent = await stream.dispatcher.claim(
        agent_id="hand-4",
        session_id=stream.session_id,
        pool="default",
        labels={},
        kinds=["sleep"],
        limit=1,
    )
    assert [c.task_id for c in unsent] == [late.task_id]
    await drained_and_closed(server, agent, "hand-4")
    got = await rows(server, [sent.task_id, late.task_id])
    assert (got[sent.task_id].state, got[sent.task_id].attempt) == ("RUNNING", 1)
    assert (got[late.task_id].state, got[late.task_id].attempt) == ("QUEUED", 1)
    assert got[late.task_id].agent_id is None


async def test_a_claim_given_back_keeps_its_attempt_number(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("hand-5")
    agent, (first,) = await running(enrolled, client, 1)
    stream = stream_of(server, "hand-5")
    task = await client.submit("sleep", SLEEP)
    claimed = await stream.dispatcher.claim(
        agent_id="hand-5",
        session_id=stream.session_id,
        pool="default",
        labels={},
        kinds=["sleep"],
        limit=1,
    )
    await stream.dispatcher.give_back(claimed, stream.session_id)
    (row,) = (await rows(server, [task.task_id])).values()
    assert (row.state, row.attempt, row.session_id) == (State.QUEUED, 1, None)
    # Claimable again, still as attempt 1.
    await agent.finish(first)
    agent.send(credit=agent_pb2.Credit(credits=1))
    again = await agent.expect("assignment")
    assert (again.task_id, again.attempt) == (task.task_id, 1)
    await agent.close()


def test_the_handover_grace_is_at_least_a_lease() -> None:
    from muster.errors import ConfigError
    from muster.server.config import ServerConfig

    with pytest.raises(ConfigError, match="handover_grace"):
        ServerConfig(lease_duration=timedelta(seconds=30), handover_grace=timedelta(seconds=5))


async def test_the_daemon_keeps_running_work_across_maximum_age_drains(
    tmp_path: Path, backend: dict[str, object]
) -> None:
    """The real daemon against the real server: each stream is drained at its maximum
    age (about a second here) while one attempt runs; the attempt runs once, to the end,
    and is recorded as attempt 1."""
    config = server_config(tmp_path / "data", max_stream_age=timedelta(seconds=1), **backend)
    server = await start_server(config)
    gate = GateExecutor()
    try:
        async with (
            AsyncAdminClient(client_config(server)) as admin,
            AsyncClient(client_config(server)) as client,
        ):
            _, token = await admin.create_bootstrap_token("default")
            agent = Agent(
                AgentConfig(
                    state_dir=tmp_path / "agent",
                    server=server.api_address,
                    token=token,
                    ca_file=config.ca_dir / "bundle.pem",
                    name="aged",
                    backoff_initial=0.05,
                    backoff_max=0.5,
                ),
                registry=ExecutorRegistry([gate]),
            )
            async with agent:
                task = await client.submit("gate", b"")
                async with asyncio.timeout(20):
                    while gate.started != [task.task_id]:
                        await asyncio.sleep(0.05)
                    # Two handovers while the attempt runs.
                    while len(handed := await handovers(server, "aged")) < 2:
                        await asyncio.sleep(0.1)
                gate.gate.set()
                done = await client.wait(task.task_id, timeout=20)
            assert (done.state, done.attempt) == (TaskState.SUCCEEDED, 1), done.error
            assert gate.started == [task.task_id]  # never stopped, never started again
            assert await audit_count(server, "task.requeue", [task.task_id]) == 0
            assert all(n == 1 for n in handed), handed
    finally:
        await server.stop(grace=1.0)


async def handovers(server: ServerHandle, agent_id: str) -> list[int]:
    """How many attempts each ended stream of ``agent_id`` handed over."""
    await server.flush_audit()
    async with server.db.transaction() as session:
        found = await session.execute(
            select(AuditEvent.details).where(
                AuditEvent.action == "stream.disconnect",
                AuditEvent.actor.endswith(f"/agent/{agent_id}"),
            )
        )
        return [int(d.get("handed_over", 0)) for d in found.scalars()]
