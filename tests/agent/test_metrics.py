"""The agent's own /metrics (``muster agent --metrics-addr``), scraped over real HTTP.

First against the scripted peer, where every outcome and the reconnection are exact;
then ``muster agent`` as a real process against the real server, with a network cut in
the middle; then that no secret of the agent reaches the exposition.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

import muster.agent as agent_pkg
from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.agent.config import AgentConfig
from muster.agent.daemon import Agent
from muster.agent.executors import (
    ExecutionResult,
    ExecutorError,
    ExecutorRegistry,
    TaskContext,
    Usage,
)
from muster.agent.executors.builtin import EchoExecutor, SleepExecutor
from muster.agent.keys import leaf_info
from muster.agent.state import StateDir
from muster.errors import ConfigError
from muster.server.app import ServerHandle
from muster.v1 import agent_pb2
from tests.agent.conftest import AGENT_ID, FailExecutor, GateExecutor
from tests.agent.metricsutil import Relay, Scrape, http_get, scrape
from tests.agent.peer import PeerStream, ScriptedAgentService
from tests.agent.test_process import wait_connected
from tests.e2e import procs
from tests.fakes.anthropic_api import FakeAnthropicAPI, Reply

KEY = "sk-ant-metrics-test-0d9c3a51f2b64e7c8a1b5d6e7f809a1b"
PASSPHRASE = b"metrics-test-passphrase-6f1e2d3c4b5a"
STARTUP = 60.0
"""Seconds a ``muster agent`` process may take to come up on a busy machine."""


class TokensExecutor:
    """Reports AI usage like a provider call would; ``{"fail": true}`` fails after spending."""

    kind = "tokens"

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        usage = Usage(
            input_tokens=7,
            output_tokens=3,
            cache_read_input_tokens=2,
            model="test-model",
            reported_cost_micros=1500,
        )
        ctx.record_usage(usage)
        if json.loads(ctx.payload).get("fail"):
            raise ExecutorError("the model refused", retryable=False)
        return ExecutionResult(output=b"{}", usage=usage)


@pytest.fixture
def registry(gate: GateExecutor) -> ExecutorRegistry:
    return ExecutorRegistry(
        [EchoExecutor(), SleepExecutor(), FailExecutor(), gate, TokensExecutor()]
    )


def assignment(task_id: str, kind: str, payload: bytes = b"") -> agent_pb2.Assignment:
    return agent_pb2.Assignment(task_id=task_id, attempt=1, kind=kind, payload=payload)


async def until(probe: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``probe`` (sync or async) until it returns something truthy; return that."""
    async with asyncio.timeout(timeout):
        while True:
            value = probe()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.02)


async def run_one(stream: PeerStream, a: agent_pb2.Assignment) -> agent_pb2.Result:
    await stream.send(assignment=a)
    result: agent_pb2.Result = await stream.expect("result", skip=("heartbeat", "accepted"))
    await stream.expect("credit", skip=("heartbeat",))
    return result


async def test_every_outcome_the_outbox_a_reconnect_and_the_certificate_are_counted(
    run_agent: Any, service: ScriptedAgentService, state: StateDir, gate: GateExecutor
) -> None:
    async with run_agent(metrics_addr="127.0.0.1:0") as agent:
        stream = await service.next_stream()
        await until(agent.connected.is_set)
        endpoint = agent.metrics_server
        assert endpoint is not None and endpoint.port > 0
        url = endpoint.url

        first = await scrape(url)
        assert first.value("muster_agent_connected") == 1
        assert first.value("muster_agent_streams_total") == 1
        assert first.total("muster_agent_reconnects_total") == 0
        assert first.value("muster_agent_concurrency") == 2
        assert first.value("muster_agent_outbox_results") == 0
        assert first.value(
            "muster_agent_info", agent_id=AGENT_ID, pool="default", version=agent_pkg.__version__
        )

        succeeded = await run_one(stream, assignment("t1", "echo", b"hi"))
        assert succeeded.outcome == agent_pb2.OUTCOME_SUCCEEDED
        await run_one(stream, assignment("t2", "fail", b"disk full"))
        timed = assignment("t3", "sleep", b'{"seconds": 30}')
        timed.start_to_close_timeout.FromMilliseconds(100)
        assert "timed out" in (await run_one(stream, timed)).error
        await stream.send(assignment=assignment("t4", "gate"))
        await stream.expect("progress", skip=("heartbeat", "accepted"))
        running = await scrape(url)
        assert running.value("muster_agent_tasks_running") == 1
        await stream.send(cancel=agent_pb2.Cancel(task_id="t4", attempt=1, reason="stop"))
        assert (
            await stream.expect("result", skip=("heartbeat",))
        ).outcome == agent_pb2.OUTCOME_CANCELLED
        await stream.expect("credit", skip=("heartbeat",))
        await run_one(stream, assignment("t5", "tokens", b"{}"))
        await run_one(stream, assignment("t6", "tokens", b'{"fail": true}'))

        done = await scrape(url)
        tasks = {
            (labels["kind"], labels["outcome"]): done.value("muster_agent_tasks_total", **labels)
            for labels in done.labels_of("muster_agent_tasks_total")
        }
        assert tasks == {
            ("echo", "succeeded"): 1,
            ("fail", "failed"): 1,
            ("sleep", "timed_out"): 1,
            ("gate", "cancelled"): 1,
            ("tokens", "succeeded"): 1,
            ("tokens", "failed"): 1,
        }
        for kind in ("echo", "fail", "sleep", "gate", "tokens"):
            runs = 2 if kind == "tokens" else 1
            count = done.value("muster_agent_executor_duration_seconds_count", kind=kind)
            assert count == runs, kind
        # The 100 ms timeout (counted from just before the executor was called).
        assert 0.08 < done.value("muster_agent_executor_duration_seconds_sum", kind="sleep") < 5
        assert (
            done.value("muster_agent_executor_duration_seconds_bucket", kind="sleep", le="0.05")
            == 0
        )
        assert (
            done.value("muster_agent_executor_duration_seconds_bucket", kind="sleep", le="+Inf")
            == 1
        )
        # Both attempts spent tokens, the failed one too.
        tokens = {"kind": "tokens", "model": "test-model"}
        assert done.value("muster_agent_llm_tokens_total", **tokens, type="input") == 14
        assert done.value("muster_agent_llm_tokens_total", **tokens, type="output") == 6
        assert done.value("muster_agent_llm_tokens_total", **tokens, type="cache_read") == 4
        assert not done.has("muster_agent_llm_tokens_total", **tokens, type="cache_creation")
        assert done.value("muster_agent_llm_reported_cost_usd_total", **tokens) == 0.003
        assert {labels["kind"] for labels in done.labels_of("muster_agent_llm_tokens_total")} == {
            "tokens"
        }
        # Nothing acknowledged yet: six results wait in the outbox.
        assert done.value("muster_agent_outbox_results") == 6
        assert done.value("muster_agent_tasks_running") == 0

        stream.end(grpc.StatusCode.UNAVAILABLE)  # the replica goes away before it Acks
        second = await service.next_stream()
        priced = {"t5": 2_500, "t6": 1_000}  # what this server's price table says
        for _ in range(6):
            resent = await second.expect("result", skip=("heartbeat", "credit"))
            await second.ack(resent.task_id, cost_micros=priced.get(resent.task_id, 0))
        await until(lambda: len(agent.outbox) == 0)

        after = await scrape(url)
        assert after.value("muster_agent_llm_cost_usd_total", **tokens) == pytest.approx(0.0035)
        assert after.labels_of("muster_agent_llm_cost_usd_total") == [tokens]
        assert after.value("muster_agent_streams_total") == 2
        reasons = {
            labels["reason"]: after.value("muster_agent_reconnects_total", **labels)
            for labels in after.labels_of("muster_agent_reconnects_total")
        }
        assert reasons == {"unavailable": 1}
        assert after.value("muster_agent_connected") == 1
        assert after.value("muster_agent_outbox_results") == 0

        not_after = state.load_credentials().leaf.not_after.timestamp()
        assert after.value("muster_agent_certificate_expiry_timestamp_seconds") == not_after
        left = after.value("muster_agent_certificate_expiry_seconds")
        assert 3500 < left <= 3600  # the seeded certificate lives an hour

    # Stopped: the endpoint is gone with the daemon.
    with pytest.raises(OSError):
        await http_get(url)


async def test_a_renewal_is_counted_and_the_expiry_follows_the_new_certificate(
    run_agent: Any, service: ScriptedAgentService, state: StateDir
) -> None:
    service.renew_lifetime = dt.timedelta(hours=2)
    async with run_agent(metrics_addr="127.0.0.1:0") as agent:
        first = await service.next_stream()
        url = agent.metrics_server.url
        before = await scrape(url)
        await first.send(renew=agent_pb2.Renew(reason="rotate now"))
        await service.next_stream()
        async with asyncio.timeout(5):
            await first.client_closed.wait()
        after = await scrape(url)
    old = before.value("muster_agent_certificate_expiry_timestamp_seconds")
    new = after.value("muster_agent_certificate_expiry_timestamp_seconds")
    assert new == state.load_credentials().leaf.not_after.timestamp()
    assert 3000 < new - old <= 3600  # two hours from now instead of one from the seeding
    assert after.value("muster_agent_certificate_renewals_total", outcome="renewed") == 1
    assert after.value("muster_agent_certificate_renewals_total", outcome="failed") == 0
    # A rotation opens the new stream before closing the old: not a reconnection.
    assert after.value("muster_agent_streams_total") == 2
    assert after.total("muster_agent_reconnects_total") == 0


async def test_two_daemons_in_one_process_keep_their_own_registries(
    tmp_path: Path, run_agent: Any, service: ScriptedAgentService
) -> None:
    other = Agent(AgentConfig(state_dir=tmp_path / "other"))
    async with run_agent(metrics_addr="127.0.0.1:0") as agent:
        stream = await service.next_stream()
        await run_one(stream, assignment("t1", "echo"))
        assert agent.metrics.registry is not other.metrics.registry
        ours = await scrape(agent.metrics_server.url)
        assert ours.value("muster_agent_tasks_total", kind="echo", outcome="succeeded") == 1
    assert (
        other.metrics.registry.get_sample_value(
            "muster_agent_tasks_total", {"kind": "echo", "outcome": "succeeded"}
        )
        is None
    )


def test_no_endpoint_unless_asked_and_a_bad_address_is_a_config_error(tmp_path: Path) -> None:
    assert AgentConfig(state_dir=tmp_path).metrics_addr is None
    for bad in ("9464", "host:", ":9464", "host:99999", "host:port"):
        with pytest.raises(ConfigError, match="--metrics-addr"):
            AgentConfig(state_dir=tmp_path, metrics_addr=bad)
    assert AgentConfig(state_dir=tmp_path, metrics_addr="[::1]:0").metrics_addr == "[::1]:0"


async def test_an_address_in_use_stops_the_start_with_one_clear_error(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent(metrics_addr="127.0.0.1:0") as agent:
        await service.next_stream()
        taken = agent.metrics_server.port
        clash = Agent(
            AgentConfig(state_dir=agent.config.state_dir, metrics_addr=f"127.0.0.1:{taken}")
        )
        with pytest.raises(
            ConfigError, match=f"--metrics-addr: cannot listen on 127.0.0.1:{taken}"
        ):
            await clash.run()


# --- the real process against the real server ----------------------------------------


@dataclass(frozen=True)
class AgentProcess:
    url: str
    """Its /metrics, as its log names it."""
    log_path: Path
    token: str
    """The bootstrap token it enrolled with."""


@asynccontextmanager
async def agent_process(
    tmp_path: Path,
    server: ServerHandle,
    admin: AsyncAdminClient,
    api: FakeAnthropicAPI,
    name: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> AsyncIterator[AgentProcess]:
    """``muster agent`` with echo, sleep and anthropic.messages, and its /metrics on a free
    port; its log must not show the token or the API key."""
    _, token = await admin.create_bootstrap_token("default")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    environ.update(
        MUSTER_BOOTSTRAP_TOKEN=token, ANTHROPIC_API_KEY=KEY, PYTHONUNBUFFERED="1", **(env or {})
    )
    log_path = tmp_path / "agent.log"
    command = [
        sys.executable, "-m", "muster", "agent",
        "--server", server.api_address,
        "--ca-file", str(server.config.ca_dir / "bundle.pem"),
        "--state-dir", str(tmp_path / "state"),
        "--name", name,
        "--executors", "echo,sleep,anthropic.messages",
        "--anthropic-base-url", api.url,
        *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, env=environ, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
        )
    try:
        # Generous: a busy machine (the suite in parallel) takes seconds to import the SDKs.
        found = await until(
            lambda: re.search(r"serving metrics on (http://\S+/metrics)", log_path.read_text()),
            timeout=STARTUP,
        )
        async with asyncio.timeout(STARTUP):
            while not await _connected(found.group(1)):
                await asyncio.sleep(0.05)
        await wait_connected(admin, name)
        yield AgentProcess(found.group(1), log_path, token)
    finally:
        await procs.stop(process, timeout=15)
        log_text = log_path.read_text()
        assert token not in log_text
        assert KEY not in log_text


async def _connected(url: str) -> bool:
    return (await scrape(url)).value("muster_agent_connected") == 1


AI_PAYLOAD = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Say hello"}],
}


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_real_agent_process_counts_what_it_ran_through_a_network_cut(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    relay = Relay(("127.0.0.1", server.agent_port))
    relay_port = await relay.start()
    try:
        async with FakeAnthropicAPI(api_key=KEY) as api:
            api.queue(
                Reply(
                    text="Hello",
                    chunks=2,
                    usage={"input_tokens": 11, "output_tokens": 5, "cache_read_input_tokens": 3},
                )
            )
            async with agent_process(
                tmp_path, server, admin, api, "metrics-01",
                "--agent-server", f"127.0.0.1:{relay_port}",
                "--metrics-addr", "127.0.0.1:0",
            ) as agent:  # fmt: skip
                url = agent.url
                echo = await client.submit("echo", b"ping")
                bad = await client.submit("sleep", {"seconds": "soon"})
                ai = await client.submit("anthropic.messages", AI_PAYLOAD, max_cost_usd=1.0)
                for task, state in ((echo, TaskState.SUCCEEDED), (bad, TaskState.FAILED)):
                    done = await client.wait(task.task_id, timeout=30)
                    assert done.state == state, done.error
                priced = await client.wait(ai.task_id, timeout=30)
                assert priced.state == TaskState.SUCCEEDED
                assert priced.usage is not None and priced.usage.cost_micros > 0

                connections = relay.connections
                relay.cut()  # the network drops the agent's stream
                await until(lambda: relay.connections > connections)
                await until(lambda: _connected_again(url))
                again = await client.submit("echo", b"after the cut")
                assert (await client.wait(again.task_id, timeout=30)).state == TaskState.SUCCEEDED
                seen = await until(lambda: _acked(url))
    finally:
        await relay.close()

    tasks = {
        (labels["kind"], labels["outcome"]): seen.value("muster_agent_tasks_total", **labels)
        for labels in seen.labels_of("muster_agent_tasks_total")
    }
    assert tasks == {
        ("echo", "succeeded"): 2,
        ("sleep", "failed"): 1,
        ("anthropic.messages", "succeeded"): 1,
    }
    for kind, runs in (("echo", 2), ("sleep", 1), ("anthropic.messages", 1)):
        assert seen.value("muster_agent_executor_duration_seconds_count", kind=kind) == runs
    ai_labels = {"kind": "anthropic.messages", "model": "claude-sonnet-4-5"}
    assert seen.value("muster_agent_llm_tokens_total", **ai_labels, type="input") == 11
    assert seen.value("muster_agent_llm_tokens_total", **ai_labels, type="output") == 5
    assert seen.value("muster_agent_llm_tokens_total", **ai_labels, type="cache_read") == 3
    # The cost is the server's, from the Ack: exactly what the task's usage says it cost.
    assert seen.value("muster_agent_llm_cost_usd_total", **ai_labels) == pytest.approx(
        priced.usage.cost_micros / 1_000_000
    )
    assert seen.labels_of("muster_agent_llm_cost_usd_total") == [ai_labels]
    assert seen.value("muster_agent_streams_total") == 2
    reasons = {
        labels["reason"]: seen.value("muster_agent_reconnects_total", **labels)
        for labels in seen.labels_of("muster_agent_reconnects_total")
    }
    assert reasons == {"unavailable": 1}
    assert seen.value("muster_agent_connected") == 1
    assert seen.value("muster_agent_outbox_results") == 0
    leaf = leaf_info((tmp_path / "state" / "agent.pem").read_bytes())
    assert seen.value("muster_agent_certificate_expiry_timestamp_seconds") == (
        leaf.not_after.timestamp()
    )
    assert seen.value(
        "muster_agent_info", agent_id="metrics-01", pool="default", version=agent_pkg.__version__
    )


async def _connected_again(url: str) -> Scrape | None:
    seen = await scrape(url)
    if seen.value("muster_agent_streams_total") == 2 and seen.value("muster_agent_connected"):
        return seen
    return None


async def _acked(url: str) -> Scrape | None:
    seen = await scrape(url)
    done = seen.value("muster_agent_tasks_total", kind="echo", outcome="succeeded") == 2
    return seen if done and seen.value("muster_agent_outbox_results") == 0 else None


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_no_secret_of_the_agent_reaches_its_metrics(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_bytes(PASSPHRASE + b"\n")
    async with FakeAnthropicAPI(api_key=KEY) as api:
        api.queue(Reply(text="Hi", usage={"input_tokens": 4, "output_tokens": 2}))
        async with agent_process(
            tmp_path, server, admin, api, "metrics-02",
            "--key-passphrase-file", str(passphrase_file),
            env={"MUSTER_AGENT_METRICS_ADDR": "127.0.0.1:0"},  # the variable, not the flag
        ) as agent:  # fmt: skip
            task = await client.submit("anthropic.messages", AI_PAYLOAD, max_cost_usd=1.0)
            assert (await client.wait(task.task_id, timeout=30)).state == TaskState.SUCCEEDED
            key_pem = (tmp_path / "state" / "agent.key").read_bytes()
            bodies = [
                await http_get(agent.url),
                await http_get(agent.url, accept="application/openmetrics-text; version=1.0.0"),
                await http_get(agent.url.removesuffix("/metrics") + "/healthz"),
            ]
            shown = await scrape(agent.url)
    # It did enroll with the token, encrypt its key and call the API with the key.
    assert shown.value("muster_agent_llm_tokens_total", kind="anthropic.messages",
                       model="claude-sonnet-4-5", type="input") == 4  # fmt: skip
    assert b"ENCRYPTED PRIVATE KEY" in key_pem
    assert api.requests[0].api_key == KEY
    token_secret = agent.token.rpartition(".")[2]
    assert len(token_secret) >= 32
    secrets = [KEY, agent.token, token_secret, PASSPHRASE.decode()]
    secrets += key_pem.decode().strip().splitlines()[1:-1]  # any line of the key file
    for status, _, body in bodies:
        assert status == 200
        text = body.decode()
        for secret in secrets:
            assert secret not in text


def test_the_shared_endpoint_module_does_not_need_prometheus_until_it_serves() -> None:
    """The SDK distribution ships muster/metrics_http.py without prometheus-client."""
    probe = (
        "import sys, muster.metrics_http; "
        "assert 'prometheus_client' not in sys.modules, 'imported at module level'"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
