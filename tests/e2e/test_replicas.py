"""Two real server replicas on one Postgres and one Redis, four real agent processes split
across them: 1,000 tasks each finish exactly once, and still do when a replica is SIGKILLed
mid-run and its agents fail over to the survivor."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from muster import AsyncClient, TaskState
from muster.server.storage.models import AuditEvent, Task
from tests.conftest import BACKEND
from tests.e2e.cluster import (
    Cluster,
    Replica,
    connected_per_replica,
    replica_cluster,
    start_agents,
    stop_agents,
    until_connected,
)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(BACKEND != "postgres", reason="runs in the Postgres pass (make test)"),
]

TASKS = 1000
"""Per batch. About 100 tasks/s go through the cluster on the 2-core CI machine: the first
batch keeps both replicas claiming against each other for ~10 s, and the SIGKILL, a second
into the second batch, leaves ~9 s of it to finish through the survivor."""


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with replica_cluster(tmp_path) as cluster:
        yield cluster


async def submit_all(
    replicas: list[Replica], count: int, kind: str, payload: bytes | Mapping[str, Any]
) -> list[str]:
    """Submit through both replicas at once, a few calls in flight at a time."""
    ids: list[str] = []
    clients = [AsyncClient(r.client_config()) for r in replicas]
    try:
        semaphore = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with semaphore:
                ids.append((await clients[i % len(clients)].submit(kind, payload)).task_id)

        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for client in clients:
            await client.close()
    return ids


async def until_all_done(url: str, ids: list[str], timeout: float) -> dict[str, int]:
    engine = create_async_engine(url)
    try:
        async with asyncio.timeout(timeout):
            while True:
                async with engine.connect() as conn:
                    rows = await conn.execute(
                        select(Task.state, func.count())
                        .where(Task.task_id.in_(ids))
                        .group_by(Task.state)
                    )
                    states = {state: n for state, n in rows}
                if states.get("SUCCEEDED", 0) == len(ids):
                    return states
                await asyncio.sleep(0.5)
    finally:
        await engine.dispose()


async def rows_per_task(url: str, ids: list[str], action: str) -> dict[str, int]:
    """How many ``action`` audit rows each of ``ids`` has (tasks with none left out)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(AuditEvent.target, func.count())
                .where(AuditEvent.action == action, AuditEvent.target.in_(ids))
                .group_by(AuditEvent.target)
            )
            return {target: n for target, n in rows}
    finally:
        await engine.dispose()


async def test_two_replicas_finish_every_task_exactly_once_even_when_one_is_killed(
    cluster: Cluster,
) -> None:
    url, replicas = cluster.url, cluster.replicas
    agents = await start_agents(cluster)
    try:
        counts = await until_connected(cluster, 4)
        assert counts == [2, 2], counts  # split across both replicas

        loop = asyncio.get_running_loop()
        started = loop.time()
        first = await submit_all(replicas, TASKS, "echo", b"x")
        await until_all_done(url, first, timeout=120)
        print(f"{TASKS} tasks on 2 replicas: {TASKS / (loop.time() - started):.0f} tasks/s")
        # Audit rows commit with the transition they record: as soon as a task is
        # terminal its submit and finish rows are there, once each.
        once = dict.fromkeys(first, 1)
        assert await rows_per_task(url, first, "task.submit") == once
        assert await rows_per_task(url, first, "task.finish") == once

        # Again, and kill replica a with SIGKILL while the work is running.
        second_batch = asyncio.create_task(
            submit_all(replicas[1:], TASKS, "sleep", {"seconds": 0.02})
        )
        await asyncio.sleep(1.0)
        replicas[0].process.send_signal(signal.SIGKILL)
        await replicas[0].process.wait()
        second = await second_batch
        await until_all_done(url, second, timeout=150)
        async with AsyncClient(replicas[1].client_config()) as client:
            sample = [await client.get(task_id) for task_id in second[:50]]
        assert {t.state for t in sample} == {TaskState.SUCCEEDED}
        # SIGKILLing replica a loses none of its audit rows, and no task finishes twice.
        once = dict.fromkeys(second, 1)
        assert await rows_per_task(url, second, "task.submit") == once
        assert await rows_per_task(url, second, "task.finish") == once
        async with asyncio.timeout(30):
            while (await connected_per_replica(cluster))[1] < 4:
                await asyncio.sleep(0.3)
    finally:
        await stop_agents(agents, signal.SIGKILL)
