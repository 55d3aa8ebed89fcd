"""Two replicas sharing one Postgres and one Redis, in one event loop: what reaches a
stream must reach it whichever replica the stream is on."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from muster import AsyncAdminClient, AsyncClient
from muster.server.app import ServerHandle, start_server
from muster.server.ca import CertificateAuthority
from muster.v1 import agent_pb2
from tests.agentsim import Enroller, SimAgent
from tests.conftest import BACKEND, REDIS_URL, client_config, server_config
from tests.pg import fresh_database

pytestmark = pytest.mark.skipif(
    BACKEND != "postgres", reason="runs in the Postgres pass (make test)"
)


async def start_pair(
    tmp_path: Path, database_url: str, *, redis: bool, poll: float
) -> tuple[ServerHandle, ServerHandle]:
    """Replicas a and b: one database, one CA, one Redis prefix (or none)."""
    prefix = f"muster-test-{secrets.token_hex(6)}"
    CertificateAuthority.init(tmp_path / "a" / "ca", "muster.local")
    shutil.copytree(tmp_path / "a" / "ca", tmp_path / "b" / "ca")
    handles = []
    for name in ("a", "b"):
        config = server_config(
            tmp_path / name,
            database_url=database_url,
            redis_url=REDIS_URL if redis else "",
            redis_prefix=prefix,
            replica_id=name,
            poll_interval=timedelta(seconds=poll),
        )
        handles.append(await start_server(config))
    return handles[0], handles[1]


@pytest.fixture(params=["pubsub", "polling"])
async def pair(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[ServerHandle, ServerHandle]]:
    """With pub/sub, announcements cross at once; without, the database poll carries them."""
    redis = request.param == "pubsub"
    async with fresh_database() as url:
        a, b = await start_pair(tmp_path, url, redis=redis, poll=5.0 if redis else 0.3)
        try:
            yield a, b
        finally:
            await asyncio.gather(a.stop(grace=1.0), b.stop(grace=1.0))


async def agent_on(
    replica: ServerHandle, enroller: Enroller, name: str, concurrency: int = 1
) -> SimAgent:
    enrolled = await enroller.enroll(name)
    agent = SimAgent(replica.agent_endpoint, enrolled.credentials())
    await agent.hello(max_concurrency=concurrency)
    return agent


async def test_work_submitted_on_one_replica_reaches_an_agent_on_the_other_and_so_does_cancel(
    pair: tuple[ServerHandle, ServerHandle],
) -> None:
    a, b = pair
    async with AsyncAdminClient(client_config(a)) as admin, AsyncClient(client_config(a)) as client:
        agent = await agent_on(b, Enroller(a, admin), "far-away")
        task = await client.submit("sleep", {"seconds": 60})
        # Replica b polls only every 5 s with pub/sub on: a prompt assignment came by pub/sub.
        assignment = await agent.expect("assignment", timeout=2.0)
        assert assignment.task_id == task.task_id
        agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
        await asyncio.sleep(0.2)
        await client.cancel(task.task_id)
        cancel = await agent.expect("cancel", timeout=2.0)
        assert (cancel.task_id, cancel.attempt) == (task.task_id, 1)
        await agent.finish(assignment, outcome=agent_pb2.OUTCOME_CANCELLED)
        assert (await client.wait(task.task_id, timeout=5)).state.name == "CANCELLED"
        await agent.close()


async def test_revoking_on_one_replica_closes_the_stream_on_the_other_within_a_second(
    pair: tuple[ServerHandle, ServerHandle],
) -> None:
    a, b = pair
    async with AsyncAdminClient(client_config(a)) as admin:
        enroller = Enroller(a, admin)
        enrolled = await enroller.enroll("revoked-far-away")
        agent = SimAgent(b.agent_endpoint, enrolled.credentials())
        await agent.hello()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await admin.revoke_agent("revoked-far-away")
        assert await asyncio.wait_for(agent.status(), 3) == grpc.StatusCode.PERMISSION_DENIED
        assert loop.time() - started < 1.5
        await agent.close()


async def test_replicas_never_hand_one_attempt_to_two_agents(
    pair: tuple[ServerHandle, ServerHandle],
) -> None:
    a, b = pair
    async with AsyncAdminClient(client_config(a)) as admin, AsyncClient(client_config(b)) as client:
        enroller = Enroller(a, admin)
        agents = [
            await agent_on(r, enroller, f"racer-{i}", concurrency=20)
            for i, r in enumerate((a, b, a, b))
        ]
        for agent in agents:
            agent.keep_alive()
        seen: list[tuple[str, int]] = []

        async def work(agent: SimAgent) -> None:
            while True:
                a = await agent.expect("assignment", timeout=60)
                seen.append((a.task_id, a.attempt))
                agent.send(accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=a.attempt))
                agent.send(
                    result=agent_pb2.Result(
                        task_id=a.task_id, attempt=a.attempt, outcome=agent_pb2.OUTCOME_SUCCEEDED
                    )
                )

        workers = [asyncio.create_task(work(agent)) for agent in agents]
        ids = [(await client.submit("echo", str(i))).task_id for i in range(60)]
        async with asyncio.timeout(20):
            while len(seen) < len(ids):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # time for any second assignment to show up
        for worker in workers:
            worker.cancel()
        # Every task went to exactly one agent, on its first attempt: no double claims.
        assert sorted(seen) == sorted((task_id, 1) for task_id in ids)
        for agent in agents:
            await agent.close()
