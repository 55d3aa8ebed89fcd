"""Real ``muster`` processes for tests whose subject is processes: crashes, signals, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from muster import AsyncAdminClient, ClientConfig

MUSTER = [sys.executable, "-m", "muster"]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **extra}


async def spawn(
    *args: str, cwd: Path, log: Path, environ: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start ``muster ARGS...`` with stdout and stderr going to ``log``."""
    out = log.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            *MUSTER,
            *args,
            cwd=cwd,
            env=environ or env(),
            stdout=out,
            stderr=out,
            stdin=asyncio.subprocess.DEVNULL,
        )
    finally:
        out.close()


async def run(
    *args: str, cwd: Path, environ: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, str, str]:
    """Run ``muster ARGS...`` to completion: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *MUSTER,
        *args,
        cwd=cwd,
        env=environ or env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def wait_for_file(path: Path, timeout: float = 30) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{path} did not appear within {timeout}s")


async def stop(
    proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM, timeout: float = 30
) -> int:
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise


def admin_config(data: Path, endpoints: Mapping[str, Any]) -> ClientConfig:
    """The first admin's client settings for the server whose data directory is ``data``
    (``endpoints``: its endpoints.json)."""
    return ClientConfig(
        address=endpoints["api"],
        token=(data / "admin.token").read_text().strip(),
        ca_file=data / "ca" / "bundle.pem",
    )


async def start_agent(
    admin: AsyncAdminClient,
    data: Path,
    endpoints: Mapping[str, Any],
    *args: str,
    name: str,
    cwd: Path,
    environ: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> asyncio.subprocess.Process:
    """A ``muster agent`` named ``name`` enrolled in pool ``default`` of that server with a
    fresh bootstrap token (in its environment, never on its command line), its state in
    ``cwd/agent`` and its log in ``cwd/agent.log``; returns once the server lists it
    connected. ``args`` add options (``--executors``, ...)."""
    _, bootstrap = await admin.create_bootstrap_token("default")
    agent = await spawn(
        "agent",
        "--server", endpoints["api"],
        "--agent-server", endpoints["agent"],
        "--ca-file", str(data / "ca" / "bundle.pem"),
        "--state-dir", str(cwd / "agent"),
        "--name", name,
        *args,
        cwd=cwd,
        log=cwd / "agent.log",
        environ={**(environ or env()), "MUSTER_BOOTSTRAP_TOKEN": bootstrap},
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            while not any(a.connected for a in await admin.list_agents()):
                await asyncio.sleep(0.1)
    except BaseException:
        await stop(agent)
        raise
    return agent
