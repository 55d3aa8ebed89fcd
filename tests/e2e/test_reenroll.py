"""Recovering and rotating real ``muster agent`` processes against the real server, driven
through the real ``muster`` CLI: removal and re-enrollment as the same id, and an
operator's forced rotation that keeps the agent's running work."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from muster import AsyncAdminClient, AsyncClient, ClientConfig, TaskState
from muster.server.app import ServerHandle
from tests.e2e import procs
from tests.e2e.test_processes import until_connected, until_running


def cli_env(server: ServerHandle) -> dict[str, str]:
    return procs.env(
        MUSTER_ADDR=server.api_address,
        MUSTER_TOKEN_FILE=str(server.config.admin_token_file),
        MUSTER_CA_FILE=str(server.config.ca_dir / "bundle.pem"),
    )


async def cli(server: ServerHandle, tmp_path: Path, *args: str) -> str:
    code, out, err = await procs.run(*args, cwd=tmp_path, environ=cli_env(server))
    assert code == 0, err
    return out


async def spawn_agent(
    server: ServerHandle, tmp_path: Path, name: str, token: str
) -> asyncio.subprocess.Process:
    return await procs.spawn(
        "agent",
        "--server", server.api_address,
        "--ca-file", str(server.config.ca_dir / "bundle.pem"),
        "--state-dir", str(tmp_path / name),
        "--name", name,
        cwd=tmp_path,
        log=tmp_path / f"{name}.log",
        environ=procs.env(MUSTER_BOOTSTRAP_TOKEN=token),
    )  # fmt: skip


async def until_logged(log: Path, text: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while text not in log.read_text(errors="replace"):
            await asyncio.sleep(0.1)


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_a_removed_agent_is_reenrolled_as_itself_with_a_token_from_the_cli(
    server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient, tmp_path: Path
) -> None:
    name = "phoenix"
    first_token = (await cli(server, tmp_path, "token", "create", "--pool", "default")).strip()
    agent = await spawn_agent(server, tmp_path, name, first_token)
    state = tmp_path / name
    log = tmp_path / f"{name}.log"
    try:
        await until_connected(admin, name)
        old_key = (state / "agent.key").read_bytes()
        old_chain = (state / "agent.pem").read_bytes()

        await cli(server, tmp_path, "agents", "remove", name, "--reason", "host rebuilt")
        # Refused, the agent tries the token it has (spent at enrollment) once, fails,
        # and keeps its credentials as they were.
        await until_logged(log, "re-enrollment failed")
        assert (state / "agent.key").read_bytes() == old_key
        assert (state / "agent.pem").read_bytes() == old_chain
        assert not (await admin.get_agent(name)).connected
        # Enabling it would not let it connect: the CLI says so, and what to do instead.
        code, _, err = await procs.run(
            "agents", "enable", name, cwd=tmp_path, environ=cli_env(server)
        )
        assert code != 0 and f"muster token create --reenroll {name}" in err, err
        assert await procs.stop(agent) == 0

        token = (await cli(server, tmp_path, "token", "create", "--reenroll", name)).strip()
        agent = await spawn_agent(server, tmp_path, name, token)
        await until_connected(admin, name)
        record = await admin.get_agent(name)
        assert (record.removed, record.enabled) == (False, True)
        live = [c for c in record.certificates if not c.revoked]
        assert [c.reason for c in live] == ["reenroll"]
        assert (state / "agent.key").read_bytes() != old_key
        assert not (state / "agent.key.reenroll").exists()
        assert not list(state.glob("*.next"))
        identity = json.loads((state / "identity.json").read_text())
        assert identity["agent_id"] == name

        done = await client.wait((await client.submit("echo", b"back")).task_id, timeout=30)
        assert (done.state, done.agent_id, done.output) == (TaskState.SUCCEEDED, name, b"back")
        await server.flush_audit()
        (reenrolled,) = await admin.query_audit(action="agent.reenroll")
        assert reenrolled.target == name and json.loads(reenrolled.details)["was_removed"]
        for secret in (first_token, token):
            assert secret not in log.read_text(errors="replace")
    finally:
        await stop(agent)


async def test_an_operator_rotation_keeps_the_running_work(
    server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient, tmp_path: Path
) -> None:
    name = "rotator"
    token = (await cli(server, tmp_path, "token", "create", "--pool", "default")).strip()
    agent = await spawn_agent(server, tmp_path, name, token)
    try:
        await until_connected(admin, name)
        task = await client.submit("sleep", {"seconds": 4})
        await until_running(client, task.task_id)

        await cli(server, tmp_path, "agents", "rotate", name, "--reason", "drill")

        async def renewed() -> bool:
            certs = (await admin.get_agent(name)).certificates
            return any(c.reason == "renew" for c in certs)

        async with asyncio.timeout(20):
            while not await renewed():
                await asyncio.sleep(0.1)
        done = await client.wait(task.task_id, timeout=30)
        assert (done.state, done.attempt, done.agent_id) == (TaskState.SUCCEEDED, 1, name)

        await cli(server, tmp_path, "agents", "rotate", "--all")
        async with asyncio.timeout(20):
            while sum(c.reason == "renew" for c in (await admin.get_agent(name)).certificates) < 2:
                await asyncio.sleep(0.1)
        await until_connected(admin, name)
        later = await client.wait((await client.submit("echo", b"x")).task_id, timeout=30)
        assert later.state is TaskState.SUCCEEDED
        # One renewal per request: a renewed stream is not asked again.
        certs = (await admin.get_agent(name)).certificates
        assert sum(c.reason == "renew" for c in certs) == 2
        await server.flush_audit()
        requeues = [e for e in await admin.query_audit(limit=1000) if e.action == "task.requeue"]
        assert requeues == []
    finally:
        await stop(agent)


async def test_an_expired_agent_is_reenrolled_at_start_as_itself(
    server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient, tmp_path: Path
) -> None:
    """The agent's certificate expired while it was stopped (here: replaced by one the
    server's CA issued two minutes ago for one minute): started with a re-enrollment
    token, it comes back as itself before it ever connects."""
    name = "sleeper"
    token = (await cli(server, tmp_path, "token", "create", "--pool", "default")).strip()
    agent = await spawn_agent(server, tmp_path, name, token)
    state = tmp_path / name
    try:
        await until_connected(admin, name)
        assert await procs.stop(agent) == 0
        key = serialization.load_pem_private_key((state / "agent.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        expired = server.ca.issue_agent_certificate(
            key.public_key(),
            name,
            lifetime=timedelta(minutes=1),
            now=datetime.now(UTC) - timedelta(minutes=2),  # the CA is minutes old
        )
        (state / "agent.pem").write_bytes(expired.chain_pem)
        kept = state / "outbox" / "left-alone"
        kept.write_bytes(b"")  # re-enrolling replaces credentials, nothing else

        token = (await cli(server, tmp_path, "token", "create", "--reenroll", name)).strip()
        agent = await spawn_agent(server, tmp_path, name, token)
        await until_connected(admin, name)
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "expired at" in log and "re-enrolling as sleeper" in log
        assert kept.exists()
        live = [c for c in (await admin.get_agent(name)).certificates if not c.revoked]
        assert [c.reason for c in live] == ["reenroll"]
        done = await client.wait((await client.submit("echo", b"awake")).task_id, timeout=30)
        assert (done.state, done.agent_id) == (TaskState.SUCCEEDED, name)
    finally:
        await stop(agent)


async def test_muster_dev_brings_back_its_agent_after_it_was_removed(tmp_path: Path) -> None:
    """`muster dev` gives its agent a re-enrollment token when the certificate it holds
    no longer works (removed, revoked, expired while dev was not running)."""
    data = tmp_path / "dev"
    environ = procs.env(
        MUSTER_API_ADDR="127.0.0.1:0", MUSTER_AGENT_ADDR="127.0.0.1:0", MUSTER_METRICS_ADDR=""
    )

    async def start_dev() -> tuple[asyncio.subprocess.Process, ClientConfig]:
        (data / "endpoints.json").unlink(missing_ok=True)
        proc = await procs.spawn(
            "dev", "--data-dir", str(data), cwd=tmp_path, log=tmp_path / "dev.log",
            environ=environ,
        )  # fmt: skip
        endpoints = await procs.wait_for_file(data / "endpoints.json")
        return proc, procs.admin_config(data, endpoints)

    dev, config = await start_dev()
    try:
        async with AsyncAdminClient(config) as admin:
            await until_connected(admin, "dev-agent")
            await admin.remove_agent("dev-agent")
        assert await procs.stop(dev, signal.SIGINT, timeout=60) == 0
        dev, config = await start_dev()
        async with AsyncAdminClient(config) as admin, AsyncClient(config) as client:
            await until_connected(admin, "dev-agent")
            agent = await admin.get_agent("dev-agent")
            assert (agent.removed, [c.reason for c in agent.certificates if not c.revoked]) == (
                False,
                ["reenroll"],
            )
            done = await client.wait((await client.submit("echo", b"hi")).task_id, timeout=30)
            assert (done.state, done.agent_id) == (TaskState.SUCCEEDED, "dev-agent")
            # A plain restart needs no token: none is made.
            tokens = len(await admin.list_bootstrap_tokens())
        assert await procs.stop(dev, signal.SIGINT, timeout=60) == 0
        dev, config = await start_dev()
        async with AsyncAdminClient(config) as admin:
            await until_connected(admin, "dev-agent")
            assert len(await admin.list_bootstrap_tokens()) == tokens
    finally:
        if dev.returncode is None:
            await procs.stop(dev, signal.SIGINT, timeout=60)
