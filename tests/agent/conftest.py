"""Fixtures for the daemon's tests: a TestCA, a seeded state dir, a scripted peer on mTLS."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from muster.agent.config import AgentConfig
from muster.agent.daemon import Agent
from muster.agent.executors import ExecutionResult, ExecutorRegistry, TaskContext
from muster.agent.executors.builtin import EchoExecutor, SleepExecutor
from muster.agent.state import Identity, StateDir
from muster.files import PRIVATE_FILE_MODE, write_atomic
from tests.agent.peer import ScriptedAgentService, serve
from tests.testca import TestCA

AGENT_ID = "agent-1"
LABELS = {"zone": "a", "gpu": "no"}


class FailExecutor:
    """Raises, as a buggy executor would."""

    kind = "fail"

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        raise RuntimeError("boom: " + ctx.payload.decode())


class GateExecutor:
    """Runs until the test opens the gate, so a test controls when work finishes."""

    kind = "gate"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started: list[str] = []

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        self.started.append(ctx.task_id)
        await ctx.progress("waiting at the gate", 10)
        await self.gate.wait()
        return ExecutionResult(output=b"through " + ctx.task_id.encode())


def seed_state(
    state_dir: Path,
    ca: TestCA,
    endpoint: str,
    *,
    agent_id: str = AGENT_ID,
    lifetime: dt.timedelta = dt.timedelta(hours=1),
) -> StateDir:
    """A state dir as enrollment leaves it, with a certificate from ``ca``."""
    creds = ca.mint_agent(agent_id, lifetime=lifetime)
    state = StateDir(state_dir)
    state.ensure()
    write_atomic(state.key_path, creds.private_key_pem, mode=PRIVATE_FILE_MODE)
    identity = Identity(
        agent_id=agent_id,
        spiffe_id=str(creds.spiffe_id),
        agent_endpoint=endpoint,
        pool="default",
        labels=dict(LABELS),
        not_after=creds.certificate.not_valid_after_utc.isoformat(),
    )
    state.save_enrollment(creds.chain_pem, ca.bundle_pem, identity)
    return state


@pytest.fixture
def ca() -> TestCA:
    return TestCA.new("example.org")


@pytest.fixture
def gate() -> GateExecutor:
    return GateExecutor()


@pytest.fixture
def registry(gate: GateExecutor) -> ExecutorRegistry:
    return ExecutorRegistry([EchoExecutor(), SleepExecutor(), FailExecutor(), gate])


@pytest.fixture
async def peer(ca: TestCA) -> AsyncIterator[tuple[ScriptedAgentService, str]]:
    service = ScriptedAgentService(ca)
    async with serve(service) as port:
        yield service, f"127.0.0.1:{port}"


@pytest.fixture
def service(peer: tuple[ScriptedAgentService, str]) -> ScriptedAgentService:
    return peer[0]


@pytest.fixture
def endpoint(peer: tuple[ScriptedAgentService, str]) -> str:
    return peer[1]


@pytest.fixture
def state(tmp_path: Path, ca: TestCA, endpoint: str) -> StateDir:
    return seed_state(tmp_path / "state", ca, endpoint)


AgentFactory = Callable[..., Any]


@pytest.fixture
def run_agent(state: StateDir, registry: ExecutorRegistry) -> Callable[..., Any]:
    """``async with run_agent(**config) as agent``: a running daemon, shut down on exit."""

    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[Agent]:
        values: dict[str, Any] = {
            "state_dir": state.path,
            "concurrency": 2,
            "drain_timeout": 1.0,
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
            "welcome_timeout": 3.0,
            "rpc_timeout": 5.0,
        }
        values.update(overrides)
        agent = Agent(AgentConfig(**values), registry=registry)
        task = asyncio.create_task(agent.run())
        try:
            yield agent
        finally:
            agent.shutdown()
            try:
                async with asyncio.timeout(10):
                    await task
            finally:
                task.cancel()

    return factory
