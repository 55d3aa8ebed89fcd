"""The AI executors against real fakes: a Messages API, a ``claude`` process, an Ollama server.

Everything goes through the real ``anthropic`` SDK, real sockets, real
subprocesses and the daemon's real TaskRunner, so cancel and timeout are
observed where they matter: the fake server sees the stream close, the
process group is gone, the working directory is removed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2

from muster.agent.executors import (
    ExecutorError,
    ExecutorRegistry,
    ExecutorSettings,
    ExecutorUnavailable,
    TaskContext,
    Usage,
)
from muster.agent.executors import claude_code as claude_code_module
from muster.agent.executors.anthropic_messages import AnthropicMessagesExecutor
from muster.agent.executors.base import retry_after_seconds
from muster.agent.executors.claude_code import ClaudeCodeExecutor
from muster.agent.executors.ollama_chat import OllamaChatExecutor
from muster.agent.runner import TaskRunner
from muster.errors import ConfigError
from muster.v1 import agent_pb2
from tests.fakes.anthropic_api import FakeAnthropicAPI, Reply
from tests.fakes.ollama_api import FakeOllama

KEY = "sk-ant-test-0123456789abcdef"
FAKE_CLAUDE = Path(__file__).resolve().parents[1] / "fakes" / "fake_claude.py"


def messages_payload(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Say hello"}],
    }
    body.update(overrides)
    return json.dumps(body).encode()


def ctx(kind: str, payload: bytes, **kw: Any) -> TaskContext:
    return TaskContext(task_id="t1", attempt=1, kind=kind, payload=payload, **kw)


@pytest.fixture
async def api() -> AsyncIterator[FakeAnthropicAPI]:
    async with FakeAnthropicAPI(api_key=KEY) as fake:
        yield fake


@pytest.fixture
async def anthropic_executor(api: FakeAnthropicAPI) -> AsyncIterator[AnthropicMessagesExecutor]:
    settings = ExecutorSettings(anthropic_base_url=api.url, environ={"ANTHROPIC_API_KEY": KEY})
    executor = AnthropicMessagesExecutor(settings)
    yield executor
    await executor.aclose()


class Attempts:
    """A real TaskRunner around one registry, collecting Results and Progress."""

    def __init__(self, *executors: Any) -> None:
        self.results: dict[tuple[str, int], agent_pb2.Result] = {}
        self.progress: list[tuple[str, int, str, int, int]] = []
        self._done = asyncio.Event()
        self.runner = TaskRunner(ExecutorRegistry(executors), 4, self._finished, self._progressed)

    def _finished(self, result: agent_pb2.Result) -> None:
        self.results[(result.task_id, result.attempt)] = result
        self._done.set()

    def _progressed(self, *args: Any) -> None:
        self.progress.append(args)

    def start(self, kind: str, payload: bytes, task_id: str = "t1", **kw: Any) -> None:
        timeout = kw.pop("timeout", None)
        assignment = agent_pb2.Assignment(
            task_id=task_id, attempt=1, kind=kind, payload=payload, **kw
        )
        if timeout is not None:
            assignment.start_to_close_timeout.CopyFrom(
                duration_pb2.Duration(nanos=int(timeout * 1e9))
                if timeout < 1
                else duration_pb2.Duration(seconds=int(timeout))
            )
        assert self.runner.start(assignment)

    async def result(self, task_id: str = "t1", timeout: float = 10) -> agent_pb2.Result:
        async with asyncio.timeout(timeout):
            while (task_id, 1) not in self.results:
                self._done.clear()
                await self._done.wait()
        return self.results[(task_id, 1)]


# anthropic.messages ---------------------------------------------------------------


async def test_a_streamed_call_returns_the_final_message_and_its_usage(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    api.queue(
        Reply(
            text="Hello there, how are you today?",
            chunks=6,
            usage={
                "input_tokens": 21,
                "output_tokens": 9,
                "cache_creation_input_tokens": 300,
                "cache_read_input_tokens": 4000,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 200,
                    "ephemeral_1h_input_tokens": 100,
                },
            },
        )
    )
    seen: list[tuple[str, int, int]] = []

    async def progress(message: str, percent: int, tokens: int) -> None:
        seen.append((message, percent, tokens))

    context = ctx("anthropic.messages", messages_payload(), on_progress=progress)
    result = await anthropic_executor.run(context)
    message = json.loads(result.output)
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [
        {"type": "text", "text": "Hello there, how are you today?", "citations": None}
    ]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"]["output_tokens"] == 9
    assert result.answer == b"Hello there, how are you today?"
    assert result.usage == Usage(
        input_tokens=21,
        output_tokens=9,
        model="claude-sonnet-4-5",
        cache_creation_input_tokens=300,
        cache_creation_1h_input_tokens=100,
        cache_read_input_tokens=4000,
    )
    assert context.meter.usage == result.usage
    # Progress carried output tokens, throttled, ending with the real count.
    assert seen and seen[-1][2] == 9
    assert all(tokens >= 1 for _, _, tokens in seen)
    # The request: the payload as given plus stream, and the key only in a header.
    (request,) = api.requests
    body = request.json
    assert body == {**json.loads(messages_payload()), "stream": True}
    assert request.api_key == KEY
    assert KEY.encode() not in request.body


async def test_progress_is_throttled_to_a_few_per_second(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    api.queue(Reply(text="x" * 40, chunks=40, delay=0.02))
    seen: list[int] = []

    async def progress(message: str, percent: int, tokens: int) -> None:
        seen.append(tokens)

    started = time.monotonic()
    await anthropic_executor.run(
        ctx("anthropic.messages", messages_payload(), on_progress=progress)
    )
    elapsed = time.monotonic() - started
    assert len(seen) <= elapsed / 0.25 + 2
    assert seen == sorted(seen) and len(seen) >= 2


@pytest.mark.parametrize(
    ("reply", "retryable", "rate_limited", "retry_after"),
    [
        (
            Reply.error(
                429,
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
                {"retry-after": "7"},
            ),
            True,
            True,
            7.0,
        ),
        (
            Reply.error(
                429, "rate_limit_error", "slow down", {"retry-after-ms": "1500", "retry-after": "9"}
            ),
            True,
            True,
            1.5,
        ),
        (Reply.error(529, "overloaded_error", "Overloaded", {"retry-after": "3"}), True, True, 3.0),
        (Reply.error(529, "overloaded_error", "Overloaded"), True, True, None),
        (Reply.error(500, "api_error", "Internal server error"), True, False, None),
        (Reply.error(503, "api_error", "unavailable", {"retry-after": "2"}), True, False, 2.0),
        (Reply.error(504, "timeout_error", "timeout"), True, False, None),
        (
            Reply.error(400, "invalid_request_error", "messages: roles must alternate"),
            False,
            False,
            None,
        ),
        (Reply.error(401, "authentication_error", "invalid x-api-key"), False, False, None),
        (Reply.error(403, "permission_error", "no access to this model"), False, False, None),
        (Reply.error(404, "not_found_error", "model: claude-nope"), False, False, None),
        (
            Reply.error(413, "request_too_large", "Request exceeds the maximum size"),
            False,
            False,
            None,
        ),
        (
            Reply.error(
                429,
                "rate_limit_error",
                "You have reached your organization's monthly spend limit.",
                {"retry-after": "60"},
            ),
            False,
            False,
            None,
        ),
        (
            Reply.error(
                429,
                "rate_limit_error",
                "Your credit balance is too low to access the Anthropic API.",
            ),
            False,
            False,
            None,
        ),
        (Reply.error(402, "billing_error", "Payment required"), False, False, None),
        (
            Reply(stream_error_after=2, error_type="overloaded_error", error_message="Overloaded"),
            True,
            True,
            None,
        ),
        (
            Reply(stream_error_after=1, error_type="api_error", error_message="boom"),
            True,
            False,
            None,
        ),
    ],
)
async def test_provider_errors_map_to_retry_decisions(
    api: FakeAnthropicAPI,
    anthropic_executor: AnthropicMessagesExecutor,
    reply: Reply,
    retryable: bool,
    rate_limited: bool,
    retry_after: float | None,
) -> None:
    api.queue(reply)
    context = ctx("anthropic.messages", messages_payload())
    with pytest.raises(ExecutorError) as info:
        await anthropic_executor.run(context)
    err = info.value
    assert (err.retryable, err.rate_limited) == (retryable, rate_limited)
    if retryable:
        assert err.retry_after == retry_after
    assert reply.error_type in str(err)
    assert KEY not in str(err)
    if reply.stream_error_after is not None:
        # The stream had begun: the input tokens were spent and are reported.
        assert err.usage is not None and err.usage.input_tokens > 0


async def test_error_results_carry_retry_after_and_rate_limited_to_the_server(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    api.queue(Reply.error(429, "rate_limit_error", "slow down", {"retry-after": "12"}))
    api.queue(Reply.error(400, "invalid_request_error", "bad"))
    attempts = Attempts(anthropic_executor)
    attempts.start("anthropic.messages", messages_payload(), task_id="a")
    limited = await attempts.result("a")
    assert limited.outcome == agent_pb2.OUTCOME_FAILED
    assert limited.retryable and limited.rate_limited
    assert limited.retry_after.ToTimedelta() == dt.timedelta(seconds=12)
    attempts.start("anthropic.messages", messages_payload(), task_id="b")
    bad = await attempts.result("b")
    assert not bad.retryable and not bad.rate_limited
    assert not bad.HasField("retry_after")


async def test_an_unreachable_endpoint_is_retryable() -> None:
    async with FakeAnthropicAPI() as fake:
        url = fake.url
    executor = AnthropicMessagesExecutor(
        ExecutorSettings(anthropic_base_url=url, environ={"ANTHROPIC_API_KEY": KEY})
    )
    with pytest.raises(ExecutorError) as info:
        await executor.run(ctx("anthropic.messages", messages_payload()))
    assert info.value.retryable and not info.value.rate_limited
    assert "cannot reach" in str(info.value)
    await executor.aclose()


async def test_cancel_aborts_the_streaming_call_within_a_second(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    api.queue(Reply(text="a b c d e f", chunks=6, hang_after=2))
    attempts = Attempts(anthropic_executor)
    attempts.start("anthropic.messages", messages_payload())
    await asyncio.wait_for(api.streaming.wait(), 5)
    cancelled_at = time.monotonic()
    assert attempts.runner.cancel(("t1", 1), "stop it")
    result = await attempts.result()
    await asyncio.wait_for(api.abandoned_event.wait(), 1)
    assert api.abandoned[0] - cancelled_at < 1.0
    assert result.outcome == agent_pb2.OUTCOME_CANCELLED
    # The input was spent before the cancel: it is reported.
    assert result.usage.input_tokens > 0 and result.usage.model == "claude-sonnet-4-5"


async def test_the_start_to_close_timeout_aborts_the_stream_too(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    api.queue(Reply(text="a b c d", chunks=4, hang_after=1))
    attempts = Attempts(anthropic_executor)
    started = time.monotonic()
    attempts.start("anthropic.messages", messages_payload(), timeout=0.5)
    result = await attempts.result()
    await asyncio.wait_for(api.abandoned_event.wait(), 1)
    assert api.abandoned[0] - started < 1.5
    assert result.outcome == agent_pb2.OUTCOME_FAILED
    assert result.retryable and "timed out" in result.error
    assert result.usage.input_tokens > 0


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        messages_payload(max_tokens=0),
        messages_payload(api_key=KEY),
        messages_payload(stream=True),
        messages_payload(messages=[]),
    ],
)
async def test_bad_payloads_fail_for_good_before_any_request(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor, payload: bytes
) -> None:
    with pytest.raises(ExecutorError) as info:
        await anthropic_executor.run(ctx("anthropic.messages", payload))
    assert info.value.retryable is False
    assert str(info.value).startswith("payload")
    assert KEY not in str(info.value)
    assert api.requests == []


async def test_random_payload_bytes_never_reach_the_api(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    rng = random.Random(7)
    for _ in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        with pytest.raises(ExecutorError) as info:
            await anthropic_executor.run(ctx("anthropic.messages", data))
        assert info.value.retryable is False
    assert api.requests == []


async def test_the_key_comes_from_a_key_file_and_never_reaches_a_log(
    api: FakeAnthropicAPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "anthropic.key"
    key_file.write_text(KEY + "\n")
    settings = ExecutorSettings(anthropic_base_url=api.url, anthropic_key_file=key_file, environ={})
    caplog.set_level(logging.DEBUG)
    executor = AnthropicMessagesExecutor(settings)
    assert KEY not in repr(executor) and KEY not in repr(settings)
    api.queue(Reply(), Reply.error(401, "authentication_error", "invalid x-api-key"))
    await executor.run(ctx("anthropic.messages", messages_payload()))
    with pytest.raises(ExecutorError):
        await executor.run(ctx("anthropic.messages", messages_payload()))
    attempts = Attempts(executor)
    api.queue(Reply.error(429, "rate_limit_error", "slow", {"retry-after": "1"}))
    attempts.start("anthropic.messages", messages_payload())
    await attempts.result()
    await executor.aclose()
    assert api.requests[0].api_key == KEY
    assert all(KEY.encode() not in r.body for r in api.requests)
    assert caplog.records, "expected the SDK and the runner to log at DEBUG"
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in repr(record.args)
    assert KEY not in caplog.text


def test_key_sources(tmp_path: Path) -> None:
    with pytest.raises(ExecutorUnavailable, match="ANTHROPIC_API_KEY"):
        AnthropicMessagesExecutor(ExecutorSettings(environ={}))
    with pytest.raises(ExecutorUnavailable):
        AnthropicMessagesExecutor(ExecutorSettings(environ={"ANTHROPIC_API_KEY": "  "}))
    with pytest.raises(ConfigError, match="cannot read --anthropic-key-file"):
        AnthropicMessagesExecutor(ExecutorSettings(anthropic_key_file=tmp_path / "none"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        AnthropicMessagesExecutor(ExecutorSettings(anthropic_key_file=tmp_path / "empty"))
    (tmp_path / "k").write_text("from-file")
    settings = ExecutorSettings(
        anthropic_key_file=tmp_path / "k", environ={"ANTHROPIC_API_KEY": "from-env"}
    )
    assert settings.anthropic_api_key() == "from-file"
    assert ExecutorSettings(environ={"ANTHROPIC_API_KEY": "e"}).anthropic_api_key() == "e"
    env_url = ExecutorSettings(environ={"ANTHROPIC_BASE_URL": "http://env:1"})
    assert env_url.anthropic_endpoint() == "http://env:1"
    flag_url = ExecutorSettings(anthropic_base_url="http://flag:1", environ=env_url.environ)
    assert flag_url.anthropic_endpoint() == "http://flag:1"


def test_retry_after_forms() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert retry_after_seconds({"retry-after": "5"}) == 5.0
    assert retry_after_seconds({"retry-after": "0.5"}) == 0.5
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "Thu, 01 Jan 2026 00:00:30 GMT"}, now) == 30.0
    assert retry_after_seconds({"retry-after": "Wed, 31 Dec 2025 00:00:00 GMT"}, now) == 0.0
    for bad in ({}, {"retry-after": "soon"}, {"retry-after": "-1"}, {"retry-after": "nan"}):
        assert retry_after_seconds(bad, now) is None


async def test_the_output_schema_is_checked_against_the_answer(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    schema = json.dumps(
        {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
    )
    api.queue(Reply(text='{"answer": 42}'), Reply(text='{"answer": "forty-two"}'))
    attempts = Attempts(anthropic_executor)
    attempts.start("anthropic.messages", messages_payload(), task_id="ok", output_schema=schema)
    ok = await attempts.result("ok")
    assert ok.outcome == agent_pb2.OUTCOME_SUCCEEDED
    assert json.loads(ok.output)["content"][0]["text"] == '{"answer": 42}'
    attempts.start("anthropic.messages", messages_payload(), task_id="bad", output_schema=schema)
    bad = await attempts.result("bad")
    assert bad.outcome == agent_pb2.OUTCOME_FAILED and not bad.retryable
    assert bad.error.startswith("output.answer:")
    assert bad.usage.output_tokens > 0  # the tokens were spent all the same


async def test_a_bad_output_schema_fails_for_good_without_calling_the_provider(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    attempts = Attempts(anthropic_executor)
    attempts.start("anthropic.messages", messages_payload(), output_schema='{"type": 5}')
    result = await attempts.result()
    assert result.outcome == agent_pb2.OUTCOME_FAILED and not result.retryable
    assert result.error.startswith("output_schema")
    assert api.requests == []


async def test_the_runner_forwards_progress_tokens_and_full_usage(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    api.queue(Reply(text="one two three", usage={"cache_read_input_tokens": 7}))
    attempts = Attempts(anthropic_executor)
    attempts.start("anthropic.messages", messages_payload(), max_cost_micros=5000)
    result = await attempts.result()
    assert result.outcome == agent_pb2.OUTCOME_SUCCEEDED
    assert result.usage.model == "claude-sonnet-4-5"
    assert result.usage.cache_read_input_tokens == 7
    assert result.usage.output_tokens == 3
    assert result.usage.cost_micros == 0  # money is the server's business
    assert attempts.progress and attempts.progress[-1][:2] == ("t1", 1)
    assert attempts.progress[-1][4] == 3
    # max_tokens was sent as given: the ceiling is never raised.
    assert api.requests[0].json["max_tokens"] == 100


# claude-code ------------------------------------------------------------------------


@pytest.fixture
def claude_bin(tmp_path: Path) -> Path:
    launcher = tmp_path / "bin" / "claude"
    launcher.parent.mkdir()
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_CLAUDE}" "$@"\n')
    launcher.chmod(0o755)
    return launcher


def claude_settings(
    claude_bin: Path, record: Path, mode: str = "success", **env: str
) -> ExecutorSettings:
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "CLAUDE_FAKE_RECORD": str(record),
        "CLAUDE_FAKE_MODE": mode,
        "MUSTER_BOOTSTRAP_TOKEN": "bootstrap-secret",
        **env,
    }
    return ExecutorSettings(claude_bin=str(claude_bin), environ=environ)


def claude_payload(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "prompt": "SECRET PROMPT: refactor the parser",
        "model": "claude-sonnet-4-5",
        "allowed_tools": ["Read", "Bash(git log:*)"],
        "disallowed_tools": ["WebFetch"],
        "max_turns": 4,
        "append_system_prompt": "- be terse",
    }
    body.update(overrides)
    return json.dumps(body).encode()


async def test_claude_code_runs_headless_with_the_prompt_on_stdin(
    claude_bin: Path, tmp_path: Path
) -> None:
    record = tmp_path / "record.json"
    executor = ClaudeCodeExecutor(claude_settings(claude_bin, record))
    result = await executor.run(ctx("claude-code", claude_payload(), max_cost_micros=250_000))
    seen = json.loads(record.read_text())
    assert seen["argv"] == [
        "-p",
        "--output-format=json",
        "--model=claude-sonnet-4-5",
        "--max-turns=4",
        "--max-budget-usd=0.250000",
        "--append-system-prompt=- be terse",
        "--allowedTools",
        "Read",
        "Bash(git log:*)",
        "--disallowedTools",
        "WebFetch",
    ]
    assert seen["stdin"] == "SECRET PROMPT: refactor the parser"
    assert not any("SECRET PROMPT" in arg for arg in seen["argv"])
    # A fresh directory, removed afterwards; a group of its own; no agent secrets.
    assert Path(seen["cwd"]).name.startswith("muster-claude-")
    assert not Path(seen["cwd"]).exists()
    assert seen["pgid"] == seen["pid"]
    assert "MUSTER_BOOTSTRAP_TOKEN" not in seen["env"]
    assert "CLAUDE_FAKE_MODE" in seen["env"]
    doc = json.loads(result.output)
    assert doc["type"] == "result" and doc["result"] == "Done."
    assert result.answer == b"Done."
    assert result.usage == Usage(
        input_tokens=12,
        output_tokens=56,
        model="claude-sonnet-4-5",
        cache_creation_input_tokens=300,
        cache_creation_1h_input_tokens=100,
        cache_read_input_tokens=4000,
        reported_cost_micros=12345,
    )


async def test_claude_code_defaults_and_no_budget_flag_without_a_reservation(
    claude_bin: Path, tmp_path: Path
) -> None:
    record = tmp_path / "record.json"
    executor = ClaudeCodeExecutor(claude_settings(claude_bin, record))
    await executor.run(ctx("claude-code", json.dumps({"prompt": "hi", "model": "m"}).encode()))
    argv = json.loads(record.read_text())["argv"]
    assert argv == ["-p", "--output-format=json", "--model=m", "--max-turns=10"]


async def test_claude_code_key_file_reaches_the_child_only(
    claude_bin: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    record = tmp_path / "record.json"
    settings = claude_settings(claude_bin, record)
    settings = ExecutorSettings(
        claude_bin=settings.claude_bin,
        anthropic_key_file=key_file,
        anthropic_base_url="http://127.0.0.1:9",
        environ=settings.environ,
    )
    await ClaudeCodeExecutor(settings).run(ctx("claude-code", claude_payload()))
    seen = json.loads(record.read_text())
    assert seen["api_key"] == KEY
    assert not any(KEY in arg for arg in seen["argv"])


@pytest.mark.parametrize(
    ("mode", "retryable", "fragment"),
    [
        ("error", True, "error_during_execution"),
        ("budget", False, "error_max_budget_usd"),
        ("nojson", True, "status 2"),
    ],
)
async def test_claude_code_failures(
    claude_bin: Path, tmp_path: Path, mode: str, retryable: bool, fragment: str
) -> None:
    executor = ClaudeCodeExecutor(claude_settings(claude_bin, tmp_path / "r.json", mode))
    with pytest.raises(ExecutorError) as info:
        await executor.run(ctx("claude-code", claude_payload()))
    assert info.value.retryable is retryable
    assert fragment in str(info.value)
    if mode != "nojson":
        assert info.value.usage is not None and info.value.usage.reported_cost_micros == 12345


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_for_record(record: Path) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while not record.exists():
            await asyncio.sleep(0.02)
    return json.loads(record.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("stubborn", [False, True])
async def test_cancel_kills_the_whole_process_group_and_removes_the_directory(
    claude_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stubborn: bool
) -> None:
    monkeypatch.setattr(claude_code_module, "KILL_GRACE", 0.5)
    record = tmp_path / "record.json"
    env = {"CLAUDE_FAKE_STUBBORN": "1"} if stubborn else {}
    attempts = Attempts(ClaudeCodeExecutor(claude_settings(claude_bin, record, "hang", **env)))
    attempts.start("claude-code", claude_payload())
    seen = await _wait_for_record(record)
    assert _alive(seen["pid"]) and _alive(seen["child_pid"])
    started = time.monotonic()
    attempts.runner.cancel(("t1", 1), "no longer needed")
    result = await attempts.result()
    assert time.monotonic() - started < (1.5 if stubborn else 1.0)
    assert result.outcome == agent_pb2.OUTCOME_CANCELLED
    async with asyncio.timeout(5):
        while _alive(seen["child_pid"]):
            await asyncio.sleep(0.02)
    assert not _alive(seen["pid"])
    assert not Path(seen["cwd"]).exists()


async def test_a_timeout_kills_claude_code_too(claude_bin: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    attempts = Attempts(ClaudeCodeExecutor(claude_settings(claude_bin, record, "hang")))
    attempts.start("claude-code", claude_payload(), timeout=1)
    seen = await _wait_for_record(record)
    result = await attempts.result()
    assert result.outcome == agent_pb2.OUTCOME_FAILED and "timed out" in result.error
    async with asyncio.timeout(5):
        while _alive(seen["child_pid"]) or _alive(seen["pid"]):
            await asyncio.sleep(0.02)
    assert not Path(seen["cwd"]).exists()


async def test_claude_code_output_schema_checks_the_result_text(
    claude_bin: Path, tmp_path: Path
) -> None:
    settings = claude_settings(claude_bin, tmp_path / "r.json", CLAUDE_FAKE_RESULT='{"ok": true}')
    attempts = Attempts(ClaudeCodeExecutor(settings))
    schema = '{"type": "object", "required": ["ok"]}'
    attempts.start("claude-code", claude_payload(), output_schema=schema)
    result = await attempts.result()
    assert result.outcome == agent_pb2.OUTCOME_SUCCEEDED
    assert result.usage.reported_cost_micros == 12345


def test_claude_code_needs_its_binary(tmp_path: Path) -> None:
    with pytest.raises(ExecutorUnavailable, match="not found"):
        ClaudeCodeExecutor(ExecutorSettings(claude_bin="claude", environ={"PATH": str(tmp_path)}))
    with pytest.raises(ExecutorUnavailable):
        ClaudeCodeExecutor(ExecutorSettings(claude_bin=str(tmp_path / "missing")))


async def test_claude_code_refuses_bad_payloads_without_starting(
    claude_bin: Path, tmp_path: Path
) -> None:
    record = tmp_path / "r.json"
    executor = ClaudeCodeExecutor(claude_settings(claude_bin, record))
    for payload in (
        claude_payload(allowed_tools=["--dangerously-skip-permissions"]),
        claude_payload(claude_bin="/bin/sh"),
        claude_payload(prompt=""),
        b"\x00",
    ):
        with pytest.raises(ExecutorError) as info:
            await executor.run(ctx("claude-code", payload))
        assert info.value.retryable is False
    assert not record.exists()


# ollama.chat --------------------------------------------------------------------------


def ollama_payload(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "model": "llama3.2",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "Say hi"}],
        "options": {"temperature": 0.1},
    }
    body.update(overrides)
    return json.dumps(body).encode()


async def test_ollama_streams_and_reports_its_counts() -> None:
    async with FakeOllama(reply="Hi there, friend") as ollama:
        executor = OllamaChatExecutor(ExecutorSettings(ollama_url=ollama.url, environ={}))
        attempts = Attempts(executor)
        attempts.start("ollama.chat", ollama_payload())
        result = await attempts.result()
    assert result.outcome == agent_pb2.OUTCOME_SUCCEEDED
    reply = json.loads(result.output)
    assert reply["message"] == {"role": "assistant", "content": "Hi there, friend "}
    assert reply["done"] is True and reply["eval_count"] == 3
    assert result.usage.output_tokens == 3 and result.usage.input_tokens > 0
    assert result.usage.model == "llama3.2"
    (request,) = ollama.requests
    assert request.json["stream"] is True
    assert request.json["options"] == {"temperature": 0.1, "num_predict": 50}
    assert attempts.progress and attempts.progress[0][4] >= 1


async def test_ollama_max_tokens_bounds_the_output() -> None:
    async with FakeOllama(reply="one two three four five") as ollama:
        executor = OllamaChatExecutor(ExecutorSettings(ollama_url=ollama.url, environ={}))
        result = await executor.run(ctx("ollama.chat", ollama_payload(max_tokens=2)))
    assert result.usage.output_tokens == 2
    assert json.loads(result.output)["done_reason"] == "length"


@pytest.mark.parametrize(
    ("status", "retryable", "rate_limited"),
    [
        (404, False, False),
        (400, False, False),
        (500, True, False),
        (503, True, True),
        (429, True, True),
    ],
)
async def test_ollama_errors(status: int, retryable: bool, rate_limited: bool) -> None:
    async with FakeOllama() as ollama:
        ollama.status = status
        executor = OllamaChatExecutor(ExecutorSettings(ollama_url=ollama.url, environ={}))
        with pytest.raises(ExecutorError) as info:
            await executor.run(ctx("ollama.chat", ollama_payload()))
    assert (info.value.retryable, info.value.rate_limited) == (retryable, rate_limited)
    assert f"Ollama error {status}" in str(info.value)


async def test_ollama_unknown_model_and_unreachable_server() -> None:
    async with FakeOllama() as ollama:
        executor = OllamaChatExecutor(ExecutorSettings(ollama_url=ollama.url, environ={}))
        with pytest.raises(ExecutorError) as info:
            await executor.run(ctx("ollama.chat", ollama_payload(model="nope")))
        assert not info.value.retryable and "not found" in str(info.value)
        url = ollama.url
    gone = OllamaChatExecutor(ExecutorSettings(ollama_url=url, environ={}))
    with pytest.raises(ExecutorError) as info:
        await gone.run(ctx("ollama.chat", ollama_payload()))
    assert info.value.retryable and "cannot reach Ollama" in str(info.value)


def test_ollama_url_sources() -> None:
    assert ExecutorSettings(environ={}).ollama_endpoint() == "http://127.0.0.1:11434"
    assert ExecutorSettings(environ={"OLLAMA_HOST": "gpu:11434"}).ollama_endpoint() == (
        "http://gpu:11434"
    )
    flag = ExecutorSettings(ollama_url="https://o.example/", environ={"OLLAMA_HOST": "x:1"})
    assert flag.ollama_endpoint() == "https://o.example"
    with pytest.raises(ExecutorUnavailable, match="Ollama"):
        OllamaChatExecutor(ExecutorSettings(environ={}))
    named = OllamaChatExecutor(ExecutorSettings(environ={}, selected=True))
    assert named.url == "http://127.0.0.1:11434"


# Discovery -----------------------------------------------------------------------------


def test_unconfigured_ai_executors_are_skipped_unless_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    bare = ExecutorSettings(claude_bin=str(tmp_path / "no-claude"), environ={})
    caplog.set_level(logging.INFO, logger="muster.agent.executors.registry")
    registry = ExecutorRegistry.discover(settings=bare)
    assert not {"anthropic.messages", "claude-code", "ollama.chat"} & set(registry.kinds)
    assert {"echo", "sleep"} <= set(registry.kinds)
    skipped = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(skipped) == 3
    with pytest.raises(ConfigError, match=r"anthropic\.messages.*ANTHROPIC_API_KEY"):
        ExecutorRegistry.discover(["anthropic.messages"], settings=bare)
    with pytest.raises(ConfigError, match="claude-code"):
        ExecutorRegistry.discover(["claude-code"], settings=bare)
    assert ExecutorRegistry.discover(["ollama.chat"], settings=bare).kinds == ["ollama.chat"]


def test_configured_ai_executors_are_advertised(claude_bin: Path) -> None:
    settings = ExecutorSettings(
        claude_bin=str(claude_bin),
        environ={"ANTHROPIC_API_KEY": KEY, "OLLAMA_HOST": "127.0.0.1:1"},
    )
    kinds = set(ExecutorRegistry.discover(settings=settings).kinds)
    assert {"anthropic.messages", "claude-code", "ollama.chat", "echo"} <= kinds


def test_factories_without_arguments_still_work() -> None:
    # The built-ins take no settings; they are called as before.
    assert ExecutorRegistry.discover(["echo"], settings=ExecutorSettings(environ={})).kinds == [
        "echo"
    ]


async def test_the_registry_closes_executors_that_hold_connections(
    api: FakeAnthropicAPI, anthropic_executor: AnthropicMessagesExecutor
) -> None:
    registry = ExecutorRegistry([anthropic_executor])
    await anthropic_executor.run(ctx("anthropic.messages", messages_payload()))
    client = anthropic_executor.client
    await registry.aclose()
    assert client.is_closed()
    await anthropic_executor.run(ctx("anthropic.messages", messages_payload()))  # a new client
