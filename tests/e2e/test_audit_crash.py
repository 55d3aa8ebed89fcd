"""Audit that survives a crash: two real replicas on Postgres and Redis, four real agents,
replica a SIGKILLed while tasks are being submitted, claimed and finished through it.
Afterwards every task that reached a terminal state has every audit row of its life
(submit, an assign per attempt, a requeue per lost attempt, one finish), every stream that
was given work has its connect row, and ``muster audit verify`` passes, also after the
killed replica came back and appended to its chain again."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from muster import AsyncClient, MusterError
from muster.server.storage.models import AuditEvent, Task
from tests.conftest import BACKEND
from tests.e2e import procs
from tests.e2e.cluster import (
    Cluster,
    Replica,
    replica_cluster,
    start_agents,
    stop_agents,
    until_connected,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(BACKEND != "postgres", reason="runs in the Postgres pass (make test)"),
]

TASKS = 1500
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with replica_cluster(tmp_path) as cluster:
        yield cluster


async def submit_until_killed(
    replicas: list[Replica], count: int, killed: asyncio.Event, acked: list[str]
) -> int:
    """Submit ``count`` sleep tasks through both replicas, 16 calls in flight, adding the
    acknowledged ids to ``acked``; a call that fails once replica a is gone is not retried.
    Returns how many failed so."""
    failed = 0
    clients = [AsyncClient(r.client_config()) for r in replicas]
    try:
        semaphore = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            nonlocal failed
            async with semaphore:
                try:
                    task = await clients[i % 2].submit("sleep", {"seconds": 0.02})
                except (MusterError, grpc.RpcError):
                    if not killed.is_set() or i % 2:
                        raise
                    failed += 1
                    return
                acked.append(task.task_id)

        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for client in clients:
            await client.close()
    return failed


async def until_all_terminal(url: str, timeout: float) -> dict[str, int]:
    """Wait until no task in the database is still queued or held: its states, counted."""
    engine = create_async_engine(url)
    try:
        async with asyncio.timeout(timeout):
            while True:
                async with engine.connect() as conn:
                    rows = await conn.execute(select(Task.state, func.count()).group_by(Task.state))
                    states = {state: n for state, n in rows}
                if set(states) <= set(TERMINAL):
                    return states
                await asyncio.sleep(0.5)
    finally:
        await engine.dispose()


@dataclass
class Trail:
    """What the audit trail says about every task and stream."""

    tasks: dict[str, tuple[str, int]]
    """task id: (state, current attempt)"""
    by_task: dict[str, dict[str, list[int]]]
    """task id: action: the attempts named by its rows (0 for task.submit)"""
    connected: set[str]
    disconnected: set[str]
    assigned_on: set[str]
    """Sessions named by task.assign rows."""
    chains: Counter[str]


async def read_trail(url: str) -> Trail:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            tasks = {row.task_id: (row.state, row.attempt) for row in await conn.execute(
                select(Task.task_id, Task.state, Task.attempt)
            )}  # fmt: skip
            rows = await conn.execute(
                select(AuditEvent.action, AuditEvent.target, AuditEvent.details, AuditEvent.chain)
            )
            by_task: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
            trail = Trail(tasks, by_task, set(), set(), set(), Counter())
            for action, target, details, chain in rows:
                trail.chains[chain] += 1
                if action.startswith("task."):
                    trail.by_task[target][action].append(int(details.get("attempt", 0)))
                    if action == "task.assign":
                        trail.assigned_on.add(details["session"])
                elif action == "stream.connect":
                    trail.connected.add(target)
                elif action == "stream.disconnect":
                    trail.disconnected.add(target)
            return trail
    finally:
        await engine.dispose()


def missing_rows(trail: Trail) -> dict[str, str]:
    """task id: what is wrong with its audit rows, for every terminal task whose life is
    not fully in the trail."""
    wrong: dict[str, str] = {}
    for task_id, (state, attempt) in trail.tasks.items():
        if state not in TERMINAL:
            continue
        rows = trail.by_task.get(task_id, {})
        expected = {
            "task.submit": [0],
            "task.assign": list(range(1, attempt + 1)),
            "task.requeue": list(range(1, attempt)),
            "task.finish": [attempt],
        }
        found = {action: sorted(rows.get(action, [])) for action in expected}
        if found != expected or set(rows) - set(expected):
            wrong[task_id] = f"{state} attempt {attempt}: {dict(rows)}"
    return wrong


async def verified(cluster: Cluster) -> None:
    """``muster audit verify``, a process of its own, passes on both chains."""
    code, out, err = await procs.run(
        "audit", "verify", "--database-url", cluster.url, cwd=cluster.tmp
    )
    assert code == 0, out + err
    assert out.startswith("OK: ") and out.rstrip().endswith("in 2 chains"), out


async def test_a_sigkilled_replica_loses_no_audit_row_and_its_chain_verifies(
    cluster: Cluster,
) -> None:
    a = cluster.replicas[0]
    agents = await start_agents(cluster)
    try:
        await until_connected(cluster, 4)

        killed = asyncio.Event()
        acked: list[str] = []
        submitting = asyncio.create_task(
            submit_until_killed(cluster.replicas, TASKS, killed, acked)
        )
        async with asyncio.timeout(60):  # submissions, claims and results flowing through a
            while len(acked) < TASKS // 3:
                await asyncio.sleep(0.05)
        killed.set()
        a.process.send_signal(signal.SIGKILL)
        await a.process.wait()
        failed = await submitting
        states = await until_all_terminal(cluster.url, timeout=150)
        trail = await read_trail(cluster.url)
        retried = sum(1 for _, attempt in trail.tasks.values() if attempt > 1)
        print(
            f"{len(acked)} submissions acknowledged, {failed} cut off by the kill; "
            f"{len(trail.tasks)} tasks stored, ended {states}, {retried} on a later attempt; "
            f"audit rows per chain {dict(trail.chains)}"
        )
        assert trail.chains["a"] > 0 and trail.chains["b"] > 0  # a did work before it died
        assert set(acked) <= set(trail.tasks)  # every acknowledged submission was stored
        assert states == {"SUCCEEDED": len(trail.tasks)}
        assert missing_rows(trail) == {}
        # A stream is audited as connected before it is given any work.
        assert trail.assigned_on <= trail.connected
        assert trail.disconnected <= trail.connected
        await verified(cluster)

        # The killed replica comes back and appends to its chain after the torn end.
        a = await cluster.start("a")
        before = trail.chains["a"]
        async with AsyncClient(a.client_config()) as client:
            more = [(await client.submit("echo", b"x")).task_id for _ in range(20)]
            for task_id in more:
                assert (await client.wait(task_id, timeout=60)).state.name == "SUCCEEDED"
        trail = await read_trail(cluster.url)
        assert trail.chains["a"] >= before + len(more)
        assert missing_rows(trail) == {}

        await verified(cluster)
    finally:
        await stop_agents(agents, signal.SIGKILL)
