"""``muster dev``: one local agent enrolled to the server running in this process.

The agent is a real ``muster agent`` child process (the same daemon users run), enrolled
once with a single-use bootstrap token passed through its environment, never argv.

A restart must cost nothing: the agent cannot outlive this process, so Ctrl-C first
drains it (no new work; its running tasks finish and their results are recorded) while
the server still serves it, then stops the server. Queued tasks wait, still on their
first attempt, for the next start. A second Ctrl-C stops the agent at once; the tasks it
was running are then retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from muster import AsyncAdminClient, ClientConfig
from muster.errors import NotFoundError
from muster.server.app import ServerHandle

log = logging.getLogger(__name__)

AGENT_NAME = "dev-agent"
AGENT_STOP_TIMEOUT = 30.0
"""After a second Ctrl-C (or an error), how long the agent gets to exit before SIGKILL."""
AGENT_DRAIN_TIMEOUT = 3600.0
"""How long a Ctrl-C lets the agent's running tasks finish (its ``--drain-timeout``)."""


async def _dev_agent_token(admin: AsyncAdminClient, state_dir: Path) -> str:
    """A bootstrap token for the dev agent if it needs one: to enroll the first time; to
    re-enroll as itself when its certificate expired while `muster dev` was not running
    or was revoked (a token made for it, used only then); to enroll anew when the
    database no longer knows it. None needed: empty."""
    ttl = timedelta(minutes=10)
    chain = state_dir / "agent.pem"
    if (state_dir / "identity.json").exists() and chain.exists():
        leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
        serial = format(leaf.serial_number, "x")
        try:
            known = await admin.get_agent(AGENT_NAME)
        except NotFoundError:
            known = None
        if known is not None:
            live = [c for c in known.certificates if c.serial == serial and not c.revoked]
            if live and leaf.not_valid_after_utc > datetime.now(UTC):
                return ""
            _, secret = await admin.create_bootstrap_token("", ttl=ttl, reenroll=AGENT_NAME)
            return secret
    _, secret = await admin.create_bootstrap_token("default", ttl=ttl, name_pattern=AGENT_NAME)
    return secret


async def run_dev_agent(handle: ServerHandle, stop: asyncio.Event) -> None:
    config = handle.config
    state_dir = config.data_dir / "dev-agent"
    bundle = config.ca_dir / "bundle.pem"
    env = dict(os.environ)
    client_config = ClientConfig(
        address=handle.api_address,
        token=config.admin_token_file.read_text().strip(),
        ca_file=bundle,
    )
    async with AsyncAdminClient(client_config) as admin:
        secret = await _dev_agent_token(admin, state_dir)
    if secret:
        env["MUSTER_BOOTSTRAP_TOKEN"] = secret
    command = [
        sys.executable, "-m", "muster", "agent",
        "--server", handle.api_address,
        "--ca-file", str(bundle),
        "--state-dir", str(state_dir),
        "--name", AGENT_NAME,
        "--pool", "default",
        # This start's agent listener, which a restart on port 0 moves.
        "--agent-server", handle.agent_endpoint,
        "--drain-timeout", str(AGENT_DRAIN_TIMEOUT),
    ]  # fmt: skip
    # Its own session: Ctrl-C reaches only us, and we drain the agent with SIGTERM.
    agent = await asyncio.create_subprocess_exec(*command, env=env, start_new_session=True)
    _banner(handle)
    waiter = asyncio.create_task(agent.wait())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            log.error(
                "the dev agent exited with status %s; the server keeps running", agent.returncode
            )
            await stop.wait()
        if agent.returncode is None:
            await _drain_agent(agent, waiter, stop)
    finally:
        stopper.cancel()
        if agent.returncode is None:
            agent.terminate()
            try:
                await asyncio.wait_for(waiter, AGENT_STOP_TIMEOUT)
            except TimeoutError:
                agent.kill()
                await agent.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter


async def _drain_agent(
    agent: asyncio.subprocess.Process, waiter: asyncio.Task[int], stop: asyncio.Event
) -> None:
    """Ctrl-C: let the agent finish its running tasks (the server keeps serving it), so a
    restart repeats nothing and costs no attempt; a second Ctrl-C stops it at once."""
    print(
        "Stopping: the local agent finishes its running tasks first "
        "(Ctrl-C again to stop now; they are then retried).",
        file=sys.stderr,
        flush=True,
    )
    agent.terminate()  # the daemon drains on SIGTERM
    stop.clear()
    again = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, again}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        again.cancel()
    if not waiter.done():
        # The caller's second SIGTERM stops the daemon at once.
        log.warning("stopping the local agent now; the tasks it was running will be retried")


def _banner(handle: ServerHandle) -> None:
    c = handle.config
    metrics = f"http://{handle.metrics_address}/metrics" if handle.metrics_address else "off"
    console = "off"
    if handle.console_url is not None:
        # The dev CA is not one the browser knows: it warns once, or import the bundle.
        console = (
            f"{handle.console_url}  (sign in with the admin token; the browser does not know "
            f"the dev CA {c.ca_dir / 'bundle.pem'})"
        )
    print(
        "\nMuster is running (dev mode). Ctrl-C stops it.\n"
        f"  api      {handle.api_address}  "
        f"(CA bundle {c.ca_dir / 'bundle.pem'}, token {c.admin_token_file})\n"
        f"  agents   {handle.agent_endpoint}  (local agent {AGENT_NAME!r}, pool 'default')\n"
        f"  metrics  {metrics}\n"
        f"  console  {console}\n"
        "In another terminal, from this directory:\n"
        '  .venv/bin/muster submit echo --payload \'{"hello": "muster"}\' --wait\n',
        file=sys.stderr,
        flush=True,
    )
