"""The agent's output limit (``--max-output-bytes``) and the flags of its metrics and limit.

An output larger than the server takes is refused on the agent: sent, it would fail the
task at the server anyway, and one beyond the server's gRPC message limit would break the
stream on every resend of the outbox.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from muster.agent.cli import config_from_args, register
from muster.agent.config import DEFAULT_MAX_OUTPUT_BYTES
from muster.agent.executors import ExecutionResult, ExecutorRegistry, TaskContext, Usage
from muster.errors import ConfigError
from muster.v1 import agent_pb2
from tests.agent.peer import ScriptedAgentService


class SizedExecutor:
    """Returns as many bytes as the payload asks for, and says what it was allowed."""

    kind = "sized"

    def __init__(self) -> None:
        self.limits: list[int] = []

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        self.limits.append(ctx.max_output_bytes)
        usage = Usage(input_tokens=5, output_tokens=7, model="m")
        return ExecutionResult(output=b"x" * int(ctx.payload), usage=usage)


@pytest.fixture
def sized() -> SizedExecutor:
    return SizedExecutor()


@pytest.fixture
def registry(sized: SizedExecutor) -> ExecutorRegistry:
    return ExecutorRegistry([sized])


async def test_an_output_over_the_limit_fails_for_good_and_keeps_its_usage(
    run_agent: Any, service: ScriptedAgentService, sized: SizedExecutor
) -> None:
    async with run_agent(max_output_bytes=4096) as agent:
        stream = await service.next_stream()
        for task_id, size in (("fits", 4096), ("big", 4097)):
            assignment = agent_pb2.Assignment(
                task_id=task_id, attempt=1, kind="sized", payload=str(size).encode()
            )
            await stream.send(assignment=assignment)
        fits = await stream.expect("result", skip=("heartbeat", "accepted", "credit"))
        big = await stream.expect("result", skip=("heartbeat", "accepted", "credit"))
        if fits.task_id != "fits":
            fits, big = big, fits
    assert fits.outcome == agent_pb2.OUTCOME_SUCCEEDED
    assert len(fits.output) == 4096
    assert big.outcome == agent_pb2.OUTCOME_FAILED
    assert not big.retryable
    assert big.output == b""
    assert big.error == "output of 4097 bytes exceeds this agent's 4096-byte limit"
    assert (big.usage.input_tokens, big.usage.output_tokens) == (5, 7)
    assert sized.limits == [4096, 4096]  # the executor could have bounded itself
    assert (
        agent.metrics.registry.get_sample_value(
            "muster_agent_tasks_total", {"kind": "sized", "outcome": "failed"}
        )
        == 1
    )


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="muster")
    register(parser.add_subparsers())
    return parser.parse_args(["agent", *argv])


def test_limit_and_metrics_address_come_from_flags_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MUSTER_AGENT_MAX_OUTPUT_BYTES", raising=False)
    monkeypatch.delenv("MUSTER_AGENT_METRICS_ADDR", raising=False)
    plain = config_from_args(parse("--state-dir", str(tmp_path)))
    assert plain.max_output_bytes == DEFAULT_MAX_OUTPUT_BYTES == 1 << 20
    assert plain.metrics_addr is None

    monkeypatch.setenv("MUSTER_AGENT_MAX_OUTPUT_BYTES", "2048")
    monkeypatch.setenv("MUSTER_AGENT_METRICS_ADDR", "127.0.0.1:9465")
    from_env = config_from_args(parse("--state-dir", str(tmp_path)))
    assert (from_env.max_output_bytes, from_env.metrics_addr) == (2048, "127.0.0.1:9465")

    flags = config_from_args(
        parse("--max-output-bytes", "8192", "--metrics-addr", "0.0.0.0:0", "--state-dir", "s")
    )
    assert (flags.max_output_bytes, flags.metrics_addr) == (8192, "0.0.0.0:0")
    # An empty flag turns the environment's endpoint off, as MUSTER_METRICS_ADDR="" does.
    assert config_from_args(parse("--metrics-addr", "", "--state-dir", "s")).metrics_addr is None


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--max-output-bytes", "100"], {}, "--max-output-bytes"),
        (["--max-output-bytes", str(2 << 30)], {}, "--max-output-bytes"),
        ([], {"MUSTER_AGENT_MAX_OUTPUT_BYTES": "1MB"}, "MUSTER_AGENT_MAX_OUTPUT_BYTES"),
        (["--metrics-addr", "9464"], {}, "--metrics-addr"),
        ([], {"MUSTER_AGENT_METRICS_ADDR": "nohost"}, "--metrics-addr"),
    ],
)
def test_bad_limits_and_addresses_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], environ: dict[str, str], message: str
) -> None:
    for name in ("MUSTER_AGENT_MAX_OUTPUT_BYTES", "MUSTER_AGENT_METRICS_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        config_from_args(parse(*argv, "--state-dir", "s"))
