"""The executor registry (entry points) and the built-in echo and sleep executors."""

from __future__ import annotations

import asyncio
import json

import pytest

from muster.agent.executors import (
    ExecutionResult,
    Executor,
    ExecutorError,
    ExecutorRegistry,
    TaskContext,
)
from muster.agent.executors.builtin import EchoExecutor, SleepExecutor
from muster.agent.runner import TaskRunner
from muster.errors import ConfigError
from muster.v1 import agent_pb2


def ctx(kind: str, payload: bytes) -> TaskContext:
    return TaskContext(task_id="t1", attempt=1, kind=kind, payload=payload)


def test_discovery_finds_the_builtins_through_entry_points() -> None:
    registry = ExecutorRegistry.discover()
    assert {"echo", "sleep"} <= set(registry.kinds)
    assert isinstance(registry.get("echo"), EchoExecutor)
    assert isinstance(registry.get("sleep"), SleepExecutor)


def test_discovery_can_pick_a_subset() -> None:
    assert ExecutorRegistry.discover(["sleep"]).kinds == ["sleep"]
    assert ExecutorRegistry.discover(["echo", "echo"]).kinds == ["echo"]


def test_an_unknown_executor_name_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown executor\(s\): nope .*echo"):
        ExecutorRegistry.discover(["echo", "nope"])


def test_two_executors_cannot_claim_one_kind() -> None:
    with pytest.raises(ConfigError, match="echo"):
        ExecutorRegistry([EchoExecutor(), EchoExecutor()])


def test_something_without_run_is_not_an_executor() -> None:
    class NoRun:
        kind = "x"

    with pytest.raises(ConfigError):
        ExecutorRegistry([NoRun()])  # type: ignore[list-item]
    assert isinstance(EchoExecutor(), Executor)


async def test_echo_returns_the_payload() -> None:
    assert await EchoExecutor().run(ctx("echo", b"\x00hi")) == ExecutionResult(output=b"\x00hi")


async def test_sleep_sleeps_and_reports_it() -> None:
    result = await SleepExecutor().run(ctx("sleep", b'{"seconds": 0.05}'))
    assert 0.04 <= json.loads(result.output)["slept"] < 1


async def test_sleep_honours_cancellation() -> None:
    task = asyncio.create_task(SleepExecutor().run(ctx("sleep", b'{"seconds": 60}')))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loop.time() - started < 0.5


@pytest.mark.parametrize(
    "payload",
    [
        b"nope",
        b'{"seconds": "5"}',
        b'{"seconds": -1}',
        b'{"seconds": true}',
        b"[1]",
        b'{"seconds": 1e9}',
    ],
)
async def test_sleep_rejects_bad_payloads_for_good(payload: bytes) -> None:
    with pytest.raises(ExecutorError) as info:
        await SleepExecutor().run(ctx("sleep", payload))
    assert info.value.retryable is False


async def test_progress_is_clamped_and_forwarded() -> None:
    seen: list[tuple[str, int, int]] = []

    async def sink(message: str, percent: int, output_tokens: int) -> None:
        seen.append((message, percent, output_tokens))

    context = TaskContext(task_id="t", attempt=1, kind="k", payload=b"", on_progress=sink)
    await context.progress("half", 50)
    await context.progress("over", 250)
    await context.progress("unknown")
    await context.progress("tokens", output_tokens=42)
    await context.progress("negative tokens", output_tokens=-3)
    assert seen == [
        ("half", 50, 0),
        ("over", 100, 0),
        ("unknown", -1, 0),
        ("tokens", -1, 42),
        ("negative tokens", -1, 0),
    ]
    assert context.time_remaining() is None


async def test_the_runner_logs_an_executors_error_with_terminal_controls_made_visible(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Provider and model text is untrusted: a log line never carries it raw."""

    class Hostile:
        kind = "hostile"

        async def run(self, ctx: TaskContext) -> ExecutionResult:
            raise ExecutorError("bad \x1b]0;pwned\x07 \x1b[2J \u202egnp.exe\nforged line")

    results: list[agent_pb2.Result] = []
    runner = TaskRunner(ExecutorRegistry([Hostile()]), 1, results.append)
    runner.start(agent_pb2.Assignment(task_id="t1", attempt=1, kind="hostile"))
    while runner.running():
        await asyncio.sleep(0.01)
    assert results[0].error.startswith("bad \x1b]0;")  # the Result keeps the bytes as they were
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "failed: bad" in logged
    for raw in ("\x1b", "\x07", "\u202e", "\nforged line"):
        assert raw not in logged
