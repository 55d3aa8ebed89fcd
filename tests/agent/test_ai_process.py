"""``muster agent`` as a real process running ``anthropic.messages`` tasks through a real server.

The Messages API is the loopback fake; the agent finds it through
``--anthropic-base-url`` and its key in its own environment. The task's payload
travels client -> server -> agent -> SDK -> fake, and the key must appear only
in the request's auth header: not in the payload, not in the agent's log.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.server.app import ServerHandle
from tests.agent.test_process import wait_connected
from tests.e2e import procs
from tests.fakes.anthropic_api import FakeAnthropicAPI, Reply

pytestmark = pytest.mark.slow

KEY = "sk-ant-process-test-5f4dcc3b5aa765d61d8327deb882cf99"

PAYLOAD = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Say hello"}],
}


@asynccontextmanager
async def agent_process(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, api: FakeAnthropicAPI
) -> AsyncIterator[Path]:
    """A ``muster agent`` with the anthropic.messages executor; yields its log file."""
    _, token = await admin.create_bootstrap_token("default")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    environ.update(MUSTER_BOOTSTRAP_TOKEN=token, ANTHROPIC_API_KEY=KEY, PYTHONUNBUFFERED="1")
    log_path = tmp_path / "agent.log"
    command = [
        sys.executable, "-m", "muster", "agent",
        "--server", server.api_address,
        "--ca-file", str(server.config.ca_dir / "bundle.pem"),
        "--state-dir", str(tmp_path / "state"),
        "--name", "ai-01",
        "--executors", "anthropic.messages,echo",
        "--anthropic-base-url", api.url,
        "--log-level", "debug",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, env=environ, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
        )
    try:
        await wait_connected(admin, "ai-01")
        yield log_path
    finally:
        await procs.stop(process, timeout=15)


async def test_an_agent_process_runs_a_messages_task_end_to_end(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    async with FakeAnthropicAPI(api_key=KEY) as api:
        api.queue(
            Reply(
                text="Hello from the fake model",
                chunks=4,
                usage={"input_tokens": 11, "output_tokens": 5, "cache_read_input_tokens": 3},
            )
        )
        async with agent_process(tmp_path, server, admin, api) as log_path:
            task = await client.submit("anthropic.messages", PAYLOAD, max_cost_usd=1.0)
            done = await client.wait(task.task_id, timeout=30)
            assert done.state == TaskState.SUCCEEDED, done.error
            message = json.loads(done.output)
            assert message["content"][0]["text"] == "Hello from the fake model"
            assert message["stop_reason"] == "end_turn"
            assert message["usage"]["input_tokens"] == 11
            assert done.usage is not None
            assert (done.usage.input_tokens, done.usage.output_tokens) == (11, 5)
        log = log_path.read_text()
    (request,) = api.requests
    assert request.api_key == KEY
    assert KEY.encode() not in request.body
    assert json.loads(request.body)["max_tokens"] == 64
    assert "anthropic.messages" in log
    assert KEY not in log


async def test_cancel_through_the_server_closes_the_agents_stream_within_a_second(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    async with FakeAnthropicAPI(api_key=KEY) as api:
        api.queue(Reply(text="a b c d e f g h", chunks=8, hang_after=2))
        async with agent_process(tmp_path, server, admin, api):
            task = await client.submit("anthropic.messages", PAYLOAD, max_cost_usd=1.0)
            await asyncio.wait_for(api.streaming.wait(), 30)
            cancelled_at = time.monotonic()
            await client.cancel(task.task_id, "changed my mind")
            await asyncio.wait_for(api.abandoned_event.wait(), 5)
            assert api.abandoned[0] - cancelled_at < 1.0
            done = await client.wait(task.task_id, timeout=15)
            assert done.state == TaskState.CANCELLED


async def test_a_429_storm_slows_dispatch_instead_of_failing_tasks(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    """Six rate-limit answers in a row, each asking for a second: tasks allowed a single
    attempt still all succeed, because a provider's 429 costs no attempt and holds the
    model back in the pool for the retry-after instead of sending more into the refusal."""
    storm = [
        Reply.error(429, "rate_limit_error", "slow down", {"retry-after": "1"}) for _ in range(6)
    ]
    async with FakeAnthropicAPI(api_key=KEY) as api:
        api.queue(*storm)
        async with agent_process(tmp_path, server, admin, api):
            started = time.monotonic()
            tasks = [
                await client.submit("anthropic.messages", PAYLOAD, max_attempts=1) for _ in range(3)
            ]
            done = [await client.wait(t.task_id, timeout=60) for t in tasks]
            elapsed = time.monotonic() - started
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 3, [t.error for t in done]
    assert sum(t.attempt for t in done) == 3 + 6  # every 429 was an attempt, none counted
    assert len(api.requests) == 9
    # Each 429 held the model back for its second: the storm was spread over time rather
    # than answered by six immediate retries.
    assert elapsed >= 2.0
