"""Planned restarts hand running work over instead of repeating it, with real processes.

Two replicas on one Postgres and one Redis, four agents (two know both replicas, two
know only one), long tasks running: SIGTERM one replica, start it again on the same
ports. And ``muster dev`` stopped with Ctrl-C and started again. Every task finishes
exactly once, on attempt 1; no agent is sent a Cancel; no Result is stale.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from muster import AsyncClient, ClientConfig
from muster.server.storage.models import AuditEvent, Task
from tests.conftest import BACKEND
from tests.e2e import procs
from tests.e2e.cluster import Cluster, replica_cluster, start_agents, stop_agents

pytestmark = pytest.mark.timeout(120)

SLEEP_SECONDS = 4
CONCURRENCY = 3


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with replica_cluster(tmp_path) as cluster:
        yield cluster


ORDERS = (("a", "b"), ("b", "a"), ("a",), ("b",))
"""agent-0 knows a then b, agent-1 b then a; agent-2 knows only a, agent-3 only b."""


@dataclass(frozen=True)
class Row:
    state: str
    attempt: int
    agent_id: str | None


Rows = dict[str, Row]


async def tasks_by_id(url: str, ids: list[str]) -> Rows:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(Task.task_id, Task.state, Task.attempt, Task.agent_id).where(
                    Task.task_id.in_(ids)
                )
            )
            return {r.task_id: Row(r.state, r.attempt, r.agent_id) for r in rows}
    finally:
        await engine.dispose()


async def until(
    url: str, ids: list[str], done: Callable[[Rows], bool], timeout: float = 60
) -> Rows:
    """Poll the task rows until ``done(rows)`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            rows = await tasks_by_id(url, ids)
            if len(rows) == len(ids) and done(rows):
                return rows
            await asyncio.sleep(0.3)


async def audit_actions(url: str, ids: list[str], *, expected_finishes: int) -> Counter[str]:
    """(action) counts over the tasks' audit rows, once every finish row is written (the
    batch writer stores them a moment after the state changes)."""
    engine = create_async_engine(url)
    try:
        async with asyncio.timeout(30):
            while True:
                async with engine.connect() as conn:
                    rows = await conn.execute(
                        select(AuditEvent.action, AuditEvent.target).where(
                            AuditEvent.target.in_(ids)
                        )
                    )
                    pairs = list(rows)
                actions = Counter(action for action, _ in pairs)
                if actions["task.finish"] >= expected_finishes:
                    per_task = Counter(t for action, t in pairs if action == "task.finish")
                    assert set(per_task.values()) == {1}, per_task
                    return actions
                await asyncio.sleep(0.3)
    finally:
        await engine.dispose()


def agent_log_findings(logs: list[Path]) -> dict[str, int]:
    """What the agents saw that a handover must not cause: Cancels, stale Results."""
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    return {
        "cancelled": text.count(" cancelled: ") + text.count(": cancel for "),
        "stale": text.count("ACK_STATUS_STALE"),
        "abandoned": text.count(" abandoned"),
    }


def all_running(count: int) -> Callable[[Rows], bool]:
    return lambda rows: sum(1 for t in rows.values() if t.state == "RUNNING") >= count


def all_succeeded(rows: Rows) -> bool:
    return all(t.state == "SUCCEEDED" for t in rows.values())


@pytest.mark.skipif(BACKEND != "postgres", reason="runs in the Postgres pass (make test)")
async def test_sigterm_restart_of_a_replica_hands_running_work_over(cluster: Cluster) -> None:
    url = cluster.url
    a, b = cluster.replicas
    agents = await start_agents(cluster, ORDERS, enroll_through="b", concurrency=CONCURRENCY)
    slots = CONCURRENCY * len(agents)
    try:
        async with AsyncClient(b.client_config()) as client:
            ids = [
                (await client.submit("sleep", {"seconds": SLEEP_SECONDS})).task_id
                for _ in range(slots + 4)  # every slot busy, and a few queued behind them
            ]
        running = await until(url, ids, all_running(slots))
        on_a_only = [task_id for task_id, t in running.items() if t.agent_id == "agent-2"]
        assert on_a_only, "agent-2 (knows only replica a) runs nothing; the test proves little"

        # A planned restart of replica a: SIGTERM, then the same ports again.
        assert await procs.stop(a.process, signal.SIGTERM) == 0
        # Meanwhile agent-0 moved to b with its work; agent-2, which knows only a, keeps
        # running its attempts and holds their Results in its outbox. Nothing is requeued.
        elsewhere = [t for t, row in running.items() if row.state == "RUNNING"]
        elsewhere = [t for t in elsewhere if t not in on_a_only]
        await until(url, elsewhere, all_succeeded)
        still = await tasks_by_id(url, on_a_only)
        assert {(t.state, t.attempt) for t in still.values()} == {("RUNNING", 1)}
        await cluster.start("a", same_ports=True)

        done = await until(url, ids, all_succeeded)
        attempts = Counter(t.attempt for t in done.values())
        assert attempts == {1: len(ids)}, attempts
        actions = await audit_actions(url, ids, expected_finishes=len(ids))
        assert actions["task.requeue"] == 0, actions
        assert actions["task.assign"] == len(ids), actions
        assert actions["task.finish"] == len(ids), actions
    finally:
        await stop_agents(agents)
    findings = agent_log_findings([agent.log for agent in agents])
    assert findings == {"cancelled": 0, "stale": 0, "abandoned": 0}, findings
    print(
        f"\nhandover (2 replicas, 4 agents): {len(ids)} tasks, 1 restart (SIGTERM replica a), "
        f"attempts used {dict(attempts)}, {len(on_a_only)} ran on agent-2 through the outage, "
        f"requeues {actions['task.requeue']}, finishes {actions['task.finish']}, "
        f"cancels {findings['cancelled']}, stale results {findings['stale']}"
    )


async def test_ctrl_c_restart_of_muster_dev_repeats_nothing(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    environ = procs.env(
        MUSTER_API_ADDR="127.0.0.1:0",
        MUSTER_AGENT_ADDR="127.0.0.1:0",
        MUSTER_METRICS_ADDR="",
        MUSTER_HEARTBEAT_INTERVAL="1s",
        MUSTER_LEASE_DURATION="5s",
        MUSTER_POLL_INTERVAL="0.5s",
    )
    log = tmp_path / "dev.log"

    async def start_dev() -> tuple[asyncio.subprocess.Process, ClientConfig]:
        (data / "endpoints.json").unlink(missing_ok=True)
        proc = await procs.spawn(
            "dev", "--data-dir", str(data), cwd=tmp_path, log=log, environ=environ
        )
        endpoints = await procs.wait_for_file(data / "endpoints.json")
        return proc, procs.admin_config(data, endpoints)

    dev, config = await start_dev()
    url = f"sqlite+aiosqlite:///{data / 'muster.db'}"
    restarts = 0
    try:
        async with AsyncClient(config) as client:
            ids = [
                (await client.submit("sleep", {"seconds": SLEEP_SECONDS})).task_id
                for _ in range(10)
            ]
        # The dev agent runs 4 at once. Ctrl-C twice while 4 run (the two
        # restarts): each time those 4 finish before the process exits and the rest wait,
        # queued on their first attempt, for the next start.
        for queued_after in (6, 2):
            await until(url, ids, all_running(4))
            assert await procs.stop(dev, signal.SIGINT, timeout=60) == 0  # Ctrl-C
            states = Counter(t.state for t in (await tasks_by_id(url, ids)).values())
            assert states == {"SUCCEEDED": len(ids) - queued_after, "QUEUED": queued_after}
            dev, config = await start_dev()
            restarts += 1
        done = await until(url, ids, all_succeeded)
    finally:
        if dev.returncode is None:
            await procs.stop(dev, signal.SIGINT, timeout=60)
    attempts = Counter(t.attempt for t in done.values())
    assert attempts == {1: len(ids)}, attempts
    actions = await audit_actions(url, ids, expected_finishes=len(ids))
    assert actions["task.requeue"] == 0, actions
    assert actions["task.finish"] == len(ids), actions
    findings = agent_log_findings([log])
    assert findings == {"cancelled": 0, "stale": 0, "abandoned": 0}, findings
    print(
        f"\nmuster dev: {len(ids)} tasks, {restarts} restarts (Ctrl-C with 4 running), "
        f"attempts used {dict(attempts)}, requeues {actions['task.requeue']}, "
        f"cancels {findings['cancelled']}, stale results {findings['stale']}"
    )
