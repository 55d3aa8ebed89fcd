"""``muster dev``: one local agent enrolled to the server running in this process.

The agent is a real ``muster agent`` child process (the same daemon users run), enrolled
once with a single-use bootstrap token passed through its environment, never argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from datetime import timedelta

from muster import AsyncAdminClient, ClientConfig
from muster.server.app import ServerHandle

log = logging.getLogger(__name__)

AGENT_NAME = "dev-agent"
AGENT_STOP_TIMEOUT = 30.0


async def run_dev_agent(handle: ServerHandle, stop: asyncio.Event) -> None:
    config = handle.config
    state_dir = config.data_dir / "dev-agent"
    bundle = config.ca_dir / "bundle.pem"
    env = dict(os.environ)
    if not (state_dir / "identity.json").exists():
        client_config = ClientConfig(
            address=handle.api_address,
            token=config.admin_token_file.read_text().strip(),
            ca_file=bundle,
        )
        async with AsyncAdminClient(client_config) as admin:
            _, secret = await admin.create_bootstrap_token(
                "default", ttl=timedelta(minutes=10), name_pattern=AGENT_NAME
            )
        env["MUSTER_BOOTSTRAP_TOKEN"] = secret
    command = [
        sys.executable, "-m", "muster", "agent",
        "--server", handle.api_address,
        "--ca-file", str(bundle),
        "--state-dir", str(state_dir),
        "--name", AGENT_NAME,
        "--pool", "default",
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


def _banner(handle: ServerHandle) -> None:
    c = handle.config
    metrics = f"http://{handle.metrics_address}/metrics" if handle.metrics_address else "off"
    print(
        "\nMuster is running (dev mode). Ctrl-C stops it.\n"
        f"  api      {handle.api_address}  "
        f"(CA bundle {c.ca_dir / 'bundle.pem'}, token {c.admin_token_file})\n"
        f"  agents   {handle.agent_endpoint}  (local agent {AGENT_NAME!r}, pool 'default')\n"
        f"  metrics  {metrics}\n"
        "In another terminal, from this directory:\n"
        '  .venv/bin/muster submit echo --payload \'{"hello": "muster"}\' --wait\n',
        file=sys.stderr,
        flush=True,
    )
