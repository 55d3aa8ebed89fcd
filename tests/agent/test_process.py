"""``muster agent`` as a real process: enrolls from the environment, drains on SIGTERM, exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.server.app import ServerHandle

pytestmark = pytest.mark.slow


async def wait_connected(admin: AsyncAdminClient, agent_id: str) -> None:
    async with asyncio.timeout(15):
        while True:
            agents = {a.agent_id: a for a in await admin.list_agents()}
            if agent_id in agents and agents[agent_id].connected:
                return
            await asyncio.sleep(0.05)


async def test_the_agent_command_enrolls_runs_and_drains_on_sigterm(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    _, token = await admin.create_bootstrap_token("default")
    env = {**os.environ, "MUSTER_BOOTSTRAP_TOKEN": token}
    command = [
        sys.executable, "-m", "muster", "agent",
        "--server", server.api_address,
        "--ca-file", str(server.config.ca_dir / "bundle.pem"),
        "--state-dir", str(tmp_path / "state"),
        "--name", "proc-01",
        "--executors", "echo,sleep",
        "--log-level", "debug",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_connected(admin, "proc-01")
        task = await client.submit("sleep", {"seconds": 0.5})
        async with asyncio.timeout(10):
            while (await client.get(task.task_id)).state != TaskState.RUNNING:
                await asyncio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = stderr.decode()
    assert process.returncode == 0, log
    assert (await client.get(task.task_id)).state == TaskState.SUCCEEDED
    assert token not in log
    assert "draining" in log
    assert stdout == b""
    state = tmp_path / "state"
    assert (state / "agent.key").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700


async def test_a_second_signal_stops_at_once(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    _, token = await admin.create_bootstrap_token("default")
    command = [
        sys.executable, "-m", "muster", "agent",
        "--server", server.api_address,
        "--ca-file", str(server.config.ca_dir / "bundle.pem"),
        "--state-dir", str(tmp_path / "state"),
        "--name", "proc-02",
        "--token", token,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_connected(admin, "proc-02")
        await client.submit("sleep", {"seconds": 60})
        async with asyncio.timeout(10):
            while not [t for t in await client.list() if t.state == TaskState.RUNNING]:
                await asyncio.sleep(0.02)
        process.send_signal(signal.SIGINT)
        await asyncio.sleep(0.3)
        assert process.returncode is None  # draining: the sleep is still running
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(5):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 128 + signal.SIGINT, stderr.decode()
    assert token not in stderr.decode()


async def test_a_missing_enrollment_is_one_clear_error(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "muster", "agent", "--state-dir", str(tmp_path / "s"),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    assert process.returncode == 1
    lines = stderr.decode().strip().splitlines()
    assert lines[-1].startswith("muster: error: ")
    assert "--server" in lines[-1] and "token" in lines[-1]
