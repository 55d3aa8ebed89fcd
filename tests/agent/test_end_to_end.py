"""The daemon against the real Muster server: enroll with a token, run tasks, drain, revoke."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.agent.config import AgentConfig
from muster.agent.daemon import Agent
from muster.agent.executors import ExecutorRegistry
from muster.errors import PermissionDeniedError
from muster.server.app import ServerHandle
from tests.agent.conftest import GateExecutor


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(10):
            while not agent.connected.is_set():
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield task
    finally:
        agent.shutdown()
        try:
            async with asyncio.timeout(10):
                await task
        except PermissionDeniedError:
            pass


async def enrolled_agent(
    tmp_path: Path,
    server: ServerHandle,
    admin: AsyncAdminClient,
    registry: ExecutorRegistry,
    **overrides: Any,
) -> Agent:
    _, token = await admin.create_bootstrap_token("default", labels={"zone": "a"})
    values: dict[str, Any] = {
        "state_dir": tmp_path / "agent",
        "server": server.api_address,
        "token": token,
        "ca_file": server.config.ca_dir / "bundle.pem",
        "name": "e2e-01",
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "drain_timeout": 5.0,
    }
    values.update(overrides)
    return Agent(AgentConfig(**values), registry=registry)


async def test_enroll_connect_and_run_tasks_on_the_real_server(
    tmp_path: Path,
    server: ServerHandle,
    admin: AsyncAdminClient,
    client: AsyncClient,
    registry: ExecutorRegistry,
) -> None:
    agent = await enrolled_agent(tmp_path, server, admin, registry)
    async with running(agent):
        assert agent.identity.spiffe_id.endswith("/agent/e2e-01")
        echo = await client.submit("echo", b"ping")
        done = await client.wait(echo.task_id, timeout=10)
        assert done.state == TaskState.SUCCEEDED, done.error
        assert done.output == b"ping"
        assert done.agent_id == "e2e-01"

        sleeper = await client.submit("sleep", {"seconds": 30})
        async with asyncio.timeout(10):
            while not agent.runner.running():
                await asyncio.sleep(0.02)
        await client.cancel(sleeper.task_id, "changed my mind")
        cancelled = await client.wait(sleeper.task_id, timeout=10)
        assert cancelled.state == TaskState.CANCELLED

        failing = await client.submit("fail", b"x", max_attempts=1)
        failed = await client.wait(failing.task_id, timeout=10)
        assert failed.state == TaskState.FAILED
        assert "boom: x" in failed.error
        async with asyncio.timeout(5):
            while len(agent.outbox):
                await asyncio.sleep(0.02)


async def test_shutdown_finishes_the_running_task_first(
    tmp_path: Path,
    server: ServerHandle,
    admin: AsyncAdminClient,
    client: AsyncClient,
    registry: ExecutorRegistry,
) -> None:
    agent = await enrolled_agent(tmp_path, server, admin, registry)
    async with running(agent) as run:
        task = await client.submit("sleep", {"seconds": 0.5})
        async with asyncio.timeout(10):
            while not agent.runner.running():
                await asyncio.sleep(0.02)
        agent.shutdown()
        async with asyncio.timeout(10):
            await run
    finished = await client.get(task.task_id)
    assert finished.state == TaskState.SUCCEEDED
    assert json.loads(finished.output)["slept"] >= 0.5
    assert len(agent.outbox) == 0


async def test_a_revoked_agent_is_refused_and_exits_with_the_flag(
    tmp_path: Path,
    server: ServerHandle,
    admin: AsyncAdminClient,
    registry: ExecutorRegistry,
) -> None:
    agent = await enrolled_agent(tmp_path, server, admin, registry, exit_on_revoke=True)
    async with running(agent) as run:
        await admin.revoke_agent("e2e-01", "compromised")
        with pytest.raises(PermissionDeniedError):
            async with asyncio.timeout(10):
                await run


async def test_certificate_rotation_keeps_running_work_on_the_real_server(
    tmp_path: Path,
    server: ServerHandle,
    admin: AsyncAdminClient,
    client: AsyncClient,
    registry: ExecutorRegistry,
    gate: GateExecutor,
) -> None:
    agent = await enrolled_agent(tmp_path, server, admin, registry)
    async with running(agent):
        old_serial = agent.credentials.leaf.serial
        task = await client.submit("gate")
        async with asyncio.timeout(10):
            while not gate.started:
                await asyncio.sleep(0.02)
        agent.on_renew_requested("test")
        async with asyncio.timeout(10):
            while agent.credentials.leaf.serial == old_serial or not agent.connected.is_set():
                await asyncio.sleep(0.02)
        gate.gate.set()
        done = await client.wait(task.task_id, timeout=10)
        assert done.state == TaskState.SUCCEEDED, done.error
        assert done.attempt == 1  # moved to the new stream, not requeued
        certs = (await admin.get_agent("e2e-01")).certificates
        assert format(agent.credentials.leaf.serial, "x") in {c.serial for c in certs}
