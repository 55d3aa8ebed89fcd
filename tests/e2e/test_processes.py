"""Behaviour that is about processes: real ``muster agent`` and ``muster dev`` processes,
killed and signalled for real."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
from pathlib import Path

from muster import AsyncAdminClient, AsyncClient, Task, TaskState
from muster.server.app import ServerHandle
from tests.e2e import procs


async def start_agent(
    server: ServerHandle,
    admin: AsyncAdminClient,
    tmp_path: Path,
    name: str,
    *,
    concurrency: int = 1,
) -> asyncio.subprocess.Process:
    _, token = await admin.create_bootstrap_token("default")
    return await procs.spawn(
        "agent",
        "--server", server.api_address,
        "--ca-file", str(server.config.ca_dir / "bundle.pem"),
        "--state-dir", str(tmp_path / name),
        "--name", name,
        "--concurrency", str(concurrency),
        cwd=tmp_path,
        log=tmp_path / f"{name}.log",
        environ=procs.env(MUSTER_BOOTSTRAP_TOKEN=token),
    )  # fmt: skip


async def until_connected(admin: AsyncAdminClient, *names: str, timeout: float = 30) -> None:
    async def connected() -> set[str]:
        return {a.agent_id for a in await admin.list_agents() if a.connected}

    async with asyncio.timeout(timeout):
        while not set(names) <= await connected():
            await asyncio.sleep(0.1)


async def until_running(client: AsyncClient, task_id: str, timeout: float = 30) -> Task:
    async with asyncio.timeout(timeout):
        while (task := await client.get(task_id)).state is not TaskState.RUNNING:
            await asyncio.sleep(0.05)
    return task


async def test_a_task_on_an_agent_killed_mid_task_finishes_on_another_exactly_once(
    server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient, tmp_path: Path
) -> None:
    agents = {
        name: await start_agent(server, admin, tmp_path, name) for name in ("crash-a", "crash-b")
    }
    try:
        await until_connected(admin, *agents)
        task = await client.submit("sleep", {"seconds": 2})
        victim = (await until_running(client, task.task_id)).agent_id
        agents[victim].send_signal(signal.SIGKILL)
        await agents[victim].wait()

        done = await client.wait(task.task_id, timeout=30)
        survivor = next(name for name in agents if name != victim)
        assert (done.state, done.attempt, done.agent_id) == (TaskState.SUCCEEDED, 2, survivor)
        await server.flush_audit()
        finishes = [
            json.loads(e.details)
            for e in await admin.query_audit(action="task.finish", limit=100)
            if e.target == task.task_id
        ]
        assert finishes == [{"attempt": 2, "state": "SUCCEEDED"}]
    finally:
        for proc in agents.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_sigterm_drains_the_agent_finishes_in_flight_work_and_takes_no_more(
    server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient, tmp_path: Path
) -> None:
    agent = await start_agent(server, admin, tmp_path, "drainer", concurrency=2)
    try:
        await until_connected(admin, "drainer")
        running = await client.submit("sleep", {"seconds": 1.5})
        await until_running(client, running.task_id)
        agent.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        later = await client.submit("echo", b"after the drain began")
        assert await asyncio.wait_for(agent.wait(), 20) == 0
        finished = await client.get(running.task_id)
        assert (finished.state, finished.attempt, finished.agent_id) == (
            TaskState.SUCCEEDED,
            1,
            "drainer",
        )
        assert (await client.get(later.task_id)).state is TaskState.QUEUED
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()


async def test_the_readme_flow_with_the_real_cli(tmp_path: Path) -> None:
    """`make run` runs `muster dev`; then `muster submit ... --wait` from the same directory."""
    ports = {
        "MUSTER_API_ADDR": "127.0.0.1:0",
        "MUSTER_AGENT_ADDR": "127.0.0.1:0",
        "MUSTER_METRICS_ADDR": "127.0.0.1:0",
    }
    dev = await procs.spawn(
        "dev", cwd=tmp_path, log=tmp_path / "dev.log", environ=procs.env(**ports)
    )
    try:
        endpoints = await procs.wait_for_file(tmp_path / ".muster" / "endpoints.json")
        code, out, err = await procs.run(
            "submit", "echo", "--payload", '{"hello": "muster"}', "--wait", "--timeout", "30",
            cwd=tmp_path,
            environ=procs.env(MUSTER_ADDR=endpoints["api"]),
        )  # fmt: skip
        assert (code, out) == (0, '{"hello": "muster"}\n'), err
        code, out, _ = await procs.run(
            "agents", "list", cwd=tmp_path, environ=procs.env(MUSTER_ADDR=endpoints["api"])
        )
        assert code == 0 and "dev-agent" in out
    finally:
        code = await procs.stop(dev, sig=signal.SIGINT, timeout=40)
    assert code == 0, (tmp_path / "dev.log").read_text()
    assert not (tmp_path / ".muster" / "endpoints.json").exists()


async def test_the_first_admin_token_is_shown_on_a_terminal_and_never_in_a_log(
    tmp_path: Path,
) -> None:
    """Standard error that is a file (a log) gets where the token is, not the token; a
    terminal gets the token itself, once."""
    for name, terminal in (("logged", False), ("terminal", True)):
        data = tmp_path / name
        environ = procs.env(
            MUSTER_API_ADDR="127.0.0.1:0",
            MUSTER_AGENT_ADDR="127.0.0.1:0",
            MUSTER_METRICS_ADDR="",
        )
        primary, secondary = pty.openpty() if terminal else (-1, -1)
        log = (tmp_path / f"{name}.log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *procs.MUSTER,
                "server",
                "--data-dir",
                str(data),
                cwd=tmp_path,
                env=environ,
                stdout=log,
                stderr=secondary if terminal else log,
                stdin=asyncio.subprocess.DEVNULL,
            )
            await procs.wait_for_file(data / "endpoints.json")
            token = (data / "admin.token").read_text().strip()
            shown = b""
            if terminal:
                os.close(secondary)
                await asyncio.sleep(0.5)
                shown = os.read(primary, 65536)
            await procs.stop(proc)
        finally:
            log.close()
            if terminal:
                os.close(primary)
        logged = (tmp_path / f"{name}.log").read_bytes()
        if terminal:
            assert token.encode() in shown
        else:
            assert token.encode() not in logged
            assert b"it is not shown here" in logged
