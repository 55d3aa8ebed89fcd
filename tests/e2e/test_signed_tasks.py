"""Signed tasks with real processes (issue 11, item 6): a ``muster server`` process on
Postgres, ``muster agent`` processes configured locally with a trust file, keys made and
tasks signed with the real CLI.

One agent requires signatures for ``echo`` (labels mode=strict), one requires none
(mode=lax); a task's selector picks its agent. A signed task runs; the same kind of
signed task whose payload was changed in the database after Submit is refused
(SIGNATURE_MISMATCH); an unsigned task is refused by the strict agent
(SIGNATURE_MISSING) and runs on the lax one; a task signed by a key the strict agent
does not trust is refused (SIGNER_UNTRUSTED). Each refusal fails the task for good, is
audited as ``task.refused`` and counted in ``muster_task_refusals_total``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from muster import AsyncAdminClient, AsyncClient, Task, TaskSigner, TaskState
from tests.e2e import procs
from tests.e2e.cluster import (
    AgentProcess,
    Cluster,
    Replica,
    replica_cluster,
    start_agents,
    stop_agents,
    until_connected,
)

ORDER = b'{"order": "pay 10 to bob"}'
FORGED = b'{"order": "pay 10000 to mallory"}'


def metrics_text(replica: Replica) -> str:
    with urllib.request.urlopen(f"http://{replica.metrics}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


async def set_payload(url: str, task_id: str, payload: bytes) -> None:
    """What a stolen database or a compromised replica can do: rewrite the row."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(
                text(
                    "UPDATE tasks SET payload = :payload WHERE task_id = :id AND state = 'QUEUED'"
                ),
                {"payload": payload, "id": task_id},
            )
            assert result.rowcount == 1
    finally:
        await engine.dispose()


async def generate_key(tmp: Path, name: str) -> str:
    code, out, err = await procs.run("key", "generate", "--out", str(tmp / name), cwd=tmp)
    assert code == 0, err
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("key id:"))


async def test_signed_tasks_run_and_altered_unsigned_or_untrusted_ones_are_refused(
    tmp_path: Path,
) -> None:
    alice = await generate_key(tmp_path, "alice.key")
    mallory = await generate_key(tmp_path, "mallory.key")
    async with replica_cluster(tmp_path, names=("a",), metrics=True) as cluster:
        replica = cluster.replica("a")
        cli_env = procs.env(
            MUSTER_ADDR=replica.api,
            MUSTER_TOKEN_FILE=str(replica.data_dir / "admin.token"),
            MUSTER_CA_FILE=str(replica.ca_file),
        )

        async def cli(*args: str) -> tuple[int, str, str]:
            return await procs.run(*args, cwd=tmp_path, environ=cli_env)

        # Signed and queued while no agent can take it; then its payload is rewritten.
        code, out, err = await cli(
            "submit", "echo", "--payload", ORDER.decode(), "--selector", "mode=strict",
            "--sign-key", str(tmp_path / "alice.key"),
        )  # fmt: skip
        assert code == 0, err
        tampered = out.strip()
        await set_payload(cluster.url, tampered, FORGED)

        agents = await start_strict_and_lax_agents(cluster, tmp_path)
        try:
            await until_connected(cluster, 2)
            async with (
                AsyncClient(replica.client_config()) as client,
                AsyncAdminClient(replica.client_config()) as admin,
            ):
                await check_every_case(cli, client, admin, tampered, alice, tmp_path)
            metrics = await asyncio.to_thread(metrics_text, replica)
        finally:
            await stop_agents(agents)
        strict_log = (tmp_path / "strict.log").read_text()

    for reason in ("signature_mismatch", "signature_missing", "signer_untrusted"):
        assert f'muster_task_refusals_total{{reason="{reason}"}} 1.0' in metrics, reason
    assert 'muster_task_refusals_total{reason="signature_invalid"} 0.0' in metrics
    # The strict agent logged each refusal, and never the payload it refused.
    assert strict_log.count(" refused, ") == 3
    assert "SIGNATURE_MISMATCH" in strict_log
    assert "pay 10000" not in strict_log
    assert mallory in strict_log  # the untrusted key id is named


async def start_strict_and_lax_agents(cluster: Cluster, tmp: Path) -> list[AgentProcess]:
    strict = await start_agents(
        cluster,
        [("a",)],
        names=["strict"],
        concurrency=2,
        args=[
            "--label", "mode=strict",
            "--trusted-submitters", str(tmp / "alice.key.pub"),
            "--require-signed", "echo",
        ],
    )  # fmt: skip
    lax = await start_agents(cluster, [("a",)], names=["lax"], args=["--label", "mode=lax"])
    return [*strict, *lax]


Cli = Callable[..., Awaitable[tuple[int, str, str]]]


async def check_every_case(
    cli: Cli, client: AsyncClient, admin: AsyncAdminClient, tampered: str, alice: str, tmp: Path
) -> None:
    # The altered task: refused, failed for good on its first attempt.
    done = await client.wait(tampered, timeout=60)
    assert (done.state, done.attempt, done.agent_id, done.signed_by) == (
        TaskState.FAILED,
        1,
        "strict",
        alice,
    ), done.error
    assert done.error == (
        "refused by the agent: the task differs from what was signed: the payload"
    )

    # Signed with the CLI: runs on the agent that requires signatures.
    code, out, err = await cli(
        "submit", "echo", "--payload", ORDER.decode(), "--selector", "mode=strict",
        "--sign-key", str(tmp / "alice.key"), "--wait", "--timeout", "60", "--json",
    )  # fmt: skip
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["state"], shown["output"], shown["agent_id"]) == (
        "SUCCEEDED",
        ORDER.decode(),
        "strict",
    )
    assert shown["signed_by"] == alice
    code, out, err = await cli("task", "get", shown["task_id"])
    assert code == 0 and f"signed by {alice}" in out, err

    # Unsigned: refused where signatures are required, run where they are not.
    missing = await client.submit("echo", ORDER, selector={"mode": "strict"})
    plain = await client.submit("echo", ORDER, selector={"mode": "lax"})
    # Signed, but by a key the strict agent does not trust.
    stranger = await client.submit(
        "echo", ORDER, selector={"mode": "strict"}, signer=TaskSigner.load(tmp / "mallory.key")
    )
    ended: dict[str, Task] = {
        t.task_id: await client.wait(t.task_id, timeout=60) for t in (missing, plain, stranger)
    }
    assert ended[plain.task_id].state is TaskState.SUCCEEDED
    assert ended[plain.task_id].agent_id == "lax"
    for task in (missing, stranger):
        assert (ended[task.task_id].state, ended[task.task_id].attempt) == (TaskState.FAILED, 1)

    refused = await audited_refusals(admin, 3)
    assert refused == {
        tampered: ("SIGNATURE_MISMATCH", alice),
        missing.task_id: ("SIGNATURE_MISSING", ""),
        stranger.task_id: ("SIGNER_UNTRUSTED", stranger.signed_by),
    }


async def audited_refusals(admin: AsyncAdminClient, count: int) -> dict[str, tuple[str, str]]:
    """task id: (reason, key id) of the ``task.refused`` rows, once ``count`` are written
    (the server's audit writer commits in batches)."""
    async with asyncio.timeout(30):
        while True:
            events = await admin.query_audit(action="task.refused", limit=100)
            if len(events) >= count:
                break
            await asyncio.sleep(0.2)
    rows = {}
    for event in events:
        details = event.details_json()
        assert details["agent"] == "strict" and details["attempt"] == 1
        assert details["task"] == event.target and event.actor == "agent:strict"
        rows[event.target] = (details["reason"], details["key_id"])
    return rows
