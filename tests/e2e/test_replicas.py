"""Two real server replicas on one Postgres and one Redis, four real agent processes split
across them: 2,000 tasks each finish exactly once, and still do when a replica is SIGKILLed
mid-run and its agents fail over to the survivor."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from muster import AsyncAdminClient, AsyncClient, ClientConfig, TaskState
from muster.server.storage.models import AuditEvent, Task
from tests.conftest import BACKEND, FANOUT_SECRET, REDIS_URL
from tests.e2e import procs
from tests.pg import fresh_database

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(BACKEND != "postgres", reason="runs in the Postgres pass (make test)"),
]

TASKS = 2000


@dataclass
class Replica:
    name: str
    data_dir: Path
    process: asyncio.subprocess.Process
    api: str
    agent: str

    def client_config(self) -> ClientConfig:
        return ClientConfig(
            address=self.api,
            token=(self.data_dir / "admin.token").read_text().strip(),
            ca_file=self.data_dir / "ca" / "bundle.pem",
        )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[str, list[Replica]]]:
    prefix = f"muster-test-{secrets.token_hex(6)}"
    async with fresh_database() as url:
        code, _, err = await procs.run(
            "ca", "init", "--data-dir", str(tmp_path / "a"), cwd=tmp_path
        )
        assert code == 0, err
        shutil.copytree(tmp_path / "a" / "ca", tmp_path / "b" / "ca")
        replicas = []
        for name in ("a", "b"):
            environ = procs.env(
                MUSTER_DATABASE_URL=url,
                MUSTER_REDIS_URL=REDIS_URL,
                MUSTER_FANOUT_SECRET=FANOUT_SECRET,
                MUSTER_REDIS_PREFIX=prefix,
                MUSTER_REPLICA_ID=name,
                MUSTER_API_ADDR="127.0.0.1:0",
                MUSTER_AGENT_ADDR="127.0.0.1:0",
                MUSTER_METRICS_ADDR="",
                MUSTER_HEARTBEAT_INTERVAL="1s",
                MUSTER_LEASE_DURATION="5s",
                MUSTER_POLL_INTERVAL="0.5s",
                MUSTER_SHUTDOWN_GRACE="2s",
            )
            data = tmp_path / name
            proc = await procs.spawn(
                "server",
                "--data-dir",
                str(data),
                cwd=tmp_path,
                log=tmp_path / f"{name}.log",
                environ=environ,
            )
            endpoints = await procs.wait_for_file(data / "endpoints.json")
            replicas.append(Replica(name, data, proc, endpoints["api"], endpoints["agent"]))
        try:
            yield url, replicas
        finally:
            for replica in replicas:
                if replica.process.returncode is None:
                    await procs.stop(replica.process, timeout=20)


async def start_agents(tmp_path: Path, replicas: list[Replica]) -> list[asyncio.subprocess.Process]:
    """Four agents: two prefer replica a, two prefer b; each fails over to the other."""
    a, b = replicas
    agents = []
    async with AsyncAdminClient(a.client_config()) as admin:
        _, token = await admin.create_bootstrap_token("default", max_uses=4)
    for i, order in enumerate(((a, b), (b, a), (a, b), (b, a))):
        targets = ",".join(r.agent for r in order)
        args = [
            "agent",
            "--server", a.api,
            "--ca-file", str(a.data_dir / "ca" / "bundle.pem"),
            "--state-dir", str(tmp_path / f"agent-{i}"),
            "--name", f"agent-{i}",
            "--agent-server", f"ipv4:{targets}",
            "--tls-server-name", "localhost",
            "--concurrency", "8",
        ]  # fmt: skip
        agents.append(
            await procs.spawn(
                *args,
                cwd=tmp_path,
                log=tmp_path / f"agent-{i}.log",
                environ=procs.env(MUSTER_BOOTSTRAP_TOKEN=token),
            )
        )
    return agents


async def connected_per_replica(replicas: list[Replica]) -> list[int]:
    """How many agents each replica holds a live stream of, as the cluster-wide presence
    says (asked of a replica that is up)."""
    live = next(r for r in replicas if r.process.returncode is None)
    async with AsyncAdminClient(live.client_config()) as admin:
        agents = await admin.list_agents()
    return [sum(1 for a in agents if a.connected and a.replica == r.name) for r in replicas]


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
    cluster: tuple[str, list[Replica]], tmp_path: Path
) -> None:
    url, replicas = cluster
    agents = await start_agents(tmp_path, replicas)
    try:
        async with asyncio.timeout(60):
            while sum(counts := await connected_per_replica(replicas)) < 4:
                await asyncio.sleep(0.3)
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
            while (await connected_per_replica(replicas))[1] < 4:
                await asyncio.sleep(0.3)
    finally:
        for agent in agents:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
