"""The CLI against a real server: agents list/get show presence, token lists show status,
task get and submit --wait say why a task waits, and submit prints its warning."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from muster import AsyncAdminClient, AsyncClient
from muster.cli import main
from muster.server.app import ServerHandle
from muster.server.storage.models import ApiToken, BootstrapToken
from muster.server.storage.types import utcnow
from tests.agentsim import Enroller, SimAgent

pytestmark = pytest.mark.slow


def flags(server: ServerHandle) -> list[str]:
    config = server.config
    return [
        "--addr",
        server.api_address,
        "--token-file",
        str(config.admin_token_file),
        "--ca-file",
        str(config.ca_dir / "bundle.pem"),
    ]


async def run(
    server: ServerHandle, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """``muster ARGS`` in a thread: the blocking SDK must not stall the server's loop."""
    code = await asyncio.to_thread(main, [*args, *flags(server)])
    out, err = capsys.readouterr()
    return code, out, err


async def test_agents_list_and_get_show_where_and_what(
    server: ServerHandle,
    enroller: Enroller,
    client: AsyncClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent = SimAgent.of(await enroller.enroll("cli-agent"))
    await agent.hello(capabilities=("echo", "sleep"), max_concurrency=2)
    agent.keep_alive()
    await enroller.enroll("cli-offline")
    replica = server.config.resolved_replica_id

    code, out, _ = await run(server, capsys, "agents", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "AGENT_ID",
        "POOL",
        "STATUS",
        "CONNECTED",
        "IN_FLIGHT",
        "KINDS",
        "LAST_SEEN",
        "CERT_EXPIRES",
        "LABELS",
    ]
    online = next(r.split() for r in rows if r.startswith("cli-agent "))
    assert online[:6] == ["cli-agent", "default", "enabled", replica, "0/2", "echo,sleep"]
    offline = next(r.split() for r in rows if r.startswith("cli-offline "))
    assert offline[:7] == ["cli-offline", "default", "enabled", "no", "-", "-", "-"]

    code, out, _ = await run(server, capsys, "agents", "get", "cli-agent")
    assert code == 0
    assert f"connected:    yes, to replica {replica} since " in out
    assert "kinds:        echo,sleep\n" in out
    assert "concurrency:  2\n" in out
    assert "in_flight:    0\n" in out
    assert "cert_expires: 20" in out
    await agent.close()


async def expire(server: ServerHandle, model: Any, token_id: str) -> None:
    """Move a token's expiry into the past (rather than wait for it)."""
    async with server.db.transaction() as session:
        await session.execute(
            update(model)
            .where(model.token_id == token_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


async def test_token_lists_show_active_expired_and_used_up(
    server: ServerHandle,
    admin: AsyncAdminClient,
    enroller: Enroller,
    capsys: pytest.CaptureFixture[str],
) -> None:
    used, secret = await admin.create_bootstrap_token("default")
    await enroller.enroll("uses-it-up", token=secret)
    fresh, _ = await admin.create_bootstrap_token("default", max_uses=5)
    short, _ = await admin.create_bootstrap_token("default")
    gone, _ = await admin.create_bootstrap_token("default")
    await admin.delete_bootstrap_token(gone.token_id)
    await expire(server, BootstrapToken, short.token_id)
    code, out, _ = await run(server, capsys, "token", "list")
    assert code == 0
    status = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]}
    assert status[fresh.token_id] == "active"
    assert status[short.token_id] == "expired"
    assert status[gone.token_id] == "deleted"
    used_row = next(line for line in out.splitlines() if line.startswith(used.token_id))
    assert used_row.endswith("used up")

    short_lived, _ = await admin.create_api_token("short-lived", "submitter", ttl=3600)
    await expire(server, ApiToken, short_lived.token_id)
    code, out, _ = await run(server, capsys, "api-token", "list")
    assert code == 0
    by_name = {line.split()[1]: line.split()[-1] for line in out.splitlines()[1:]}
    assert by_name["admin"] == "active"
    assert by_name["short-lived"] == "expired"


async def test_submit_warns_on_stderr_and_wait_timeout_says_why(
    server: ServerHandle, client: AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run(
        server, capsys, "submit", "echo", "--pool", "empty", "--wait", "--timeout", "1s"
    )
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == (
        "muster: warning: no enabled agent is enrolled in pool empty: the task waits until one is"
    )
    assert lines[1].startswith("muster: error: task t_") and "did not finish within" in lines[1]
    task_id = lines[1].split()[3]
    assert lines[2] == (
        f"muster: task {task_id} is waiting: "
        "no enabled agent is enrolled in pool empty [no_agent_in_pool]"
    )
    code, out, _ = await run(server, capsys, "task", "get", task_id)
    assert code == 0
    waiting = next(line for line in out.splitlines() if line.startswith("waiting:"))
    assert waiting.split(None, 1)[1] == (
        "no enabled agent is enrolled in pool empty [no_agent_in_pool]"
    )
    # Without --wait the id alone goes to stdout; the warning to stderr.
    code, out, err = await run(server, capsys, "submit", "echo", "--pool", "empty")
    assert (code, out.startswith("t_")) == (0, True)
    assert err.startswith("muster: warning: no enabled agent is enrolled in pool empty")
