"""``claude-code``: Claude Code headless (``claude -p --output-format json``), a process each.

Each attempt runs in a fresh temporary working directory (removed afterwards)
and in its own process group, so a cancel or timeout kills the tool and
everything it started (SIGTERM, then SIGKILL). The prompt goes in on stdin,
not argv (which other users can read); the binary is agent configuration,
never the payload; the money ceiling is the server's reservation
(``--max-budget-usd``). The child gets a trimmed environment: the agent's own
secrets (bootstrap token, ...) are not handed to a tool that can run commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Mapping
from typing import Any

from muster.agent import tracing
from muster.agent.executors.base import (
    ExecutionResult,
    ExecutorError,
    ExecutorSettings,
    ExecutorUnavailable,
    TaskContext,
    Usage,
)
from muster.ai import CLAUDE_CODE_DEFAULT_MAX_TURNS, PayloadError, parse_ai_payload

log = logging.getLogger(__name__)

KILL_GRACE = 3.0
"""Seconds between SIGTERM and SIGKILL when an attempt is stopped."""
MAX_ERROR_TEXT = 500

# What the child may see of the agent's environment.
_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "TZ",
        "TMPDIR",
        "TERM",
        "XDG_CONFIG_HOME",
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "NODE_EXTRA_CA_CERTS",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)
_ENV_PREFIXES = ("LC_", "ANTHROPIC_", "CLAUDE_", "CLAUDECODE", "DISABLE_", "AWS_", "GOOGLE_")
# Results that a second attempt would only repeat.
_FINAL_SUBTYPES = frozenset({"error_max_turns", "error_max_budget_usd"})


class ClaudeCodeExecutor:
    """Runs one Claude Code session per attempt; output is its JSON result object."""

    kind = "claude-code"

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        settings = settings if settings is not None else ExecutorSettings()
        binary = settings.claude_path()
        if binary is None:
            raise ExecutorUnavailable(
                f"Claude Code executable {settings.claude_bin!r} not found "
                "(install it or pass --claude-bin)"
            )
        self.binary = binary
        self._env = _child_env(settings)

    def __repr__(self) -> str:
        return f"ClaudeCodeExecutor(binary={self.binary!r})"

    def argv(self, doc: Mapping[str, Any], max_cost_micros: int) -> list[str]:
        """The command line: options only (values in ``--name=value`` form), never the prompt."""
        argv = [
            self.binary,
            "-p",
            "--output-format=json",
            f"--model={doc['model']}",
            f"--max-turns={doc.get('max_turns', CLAUDE_CODE_DEFAULT_MAX_TURNS)}",
        ]
        if max_cost_micros > 0:
            argv.append(f"--max-budget-usd={max_cost_micros / 1_000_000:.6f}")
        if doc.get("append_system_prompt"):
            argv.append(f"--append-system-prompt={doc['append_system_prompt']}")
        # Tool names were checked never to start with '-', so each stays a value.
        for flag, key in (
            ("--allowedTools", "allowed_tools"),
            ("--disallowedTools", "disallowed_tools"),
        ):
            tools = doc.get(key) or []
            if tools:
                argv.append(flag)
                argv.extend(tools)
        return argv

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        try:
            parse_ai_payload(self.kind, ctx.payload)
        except PayloadError as err:
            raise ExecutorError(str(err), retryable=False) from err
        doc: dict[str, Any] = json.loads(ctx.payload)
        argv = self.argv(doc, ctx.max_cost_micros)
        workdir = tempfile.mkdtemp(prefix="muster-claude-")
        # The whole Claude Code run is the AI call (it talks to the provider itself).
        with tracing.ai_call("anthropic", "invoke_agent", doc["model"]) as call:
            try:
                stdout, stderr, code = await self._run(argv, doc["prompt"], workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            result = _result(stdout, stderr, code, doc["model"], ctx)
            call.used(result.usage)
        return result

    async def _run(self, argv: list[str], prompt: str, workdir: str) -> tuple[bytes, bytes, int]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workdir,
                env=self._env,
                start_new_session=True,
            )
        except OSError as err:
            raise ExecutorError(f"cannot start {self.binary}: {err.strerror}") from err
        log.debug("claude-code pid %d in %s", proc.pid, workdir)
        try:
            stdout, stderr = await proc.communicate(prompt.encode("utf-8"))
        except BaseException:
            await _stop_group(proc)
            raise
        # Whatever the session left running in its group goes with it.
        _signal_group(proc.pid, signal.SIGKILL)
        assert proc.returncode is not None
        return stdout, stderr, proc.returncode


def _result(
    stdout: bytes, stderr: bytes, code: int, model: str, ctx: TaskContext
) -> ExecutionResult:
    raw, doc = _result_doc(stdout)
    if doc is None:
        tail = _short(stderr.decode("utf-8", "replace")[-MAX_ERROR_TEXT:])
        raise ExecutorError(
            f"claude exited with status {code} without a JSON result"
            + (f": {tail}" if tail else ""),
            retryable=True,
        )
    usage = _usage(doc, model)
    ctx.record_usage(usage)
    subtype = doc.get("subtype") if isinstance(doc.get("subtype"), str) else ""
    if doc.get("is_error") is True or (subtype and subtype != "success") or code != 0:
        text = doc.get("result") if isinstance(doc.get("result"), str) else ""
        raise ExecutorError(
            f"claude-code failed ({subtype or f'exit {code}'})"
            + (f": {_short(text)}" if text else ""),
            retryable=subtype not in _FINAL_SUBTYPES,
            usage=usage,
        )
    answer = doc.get("result")
    return ExecutionResult(
        output=raw,
        usage=usage,
        answer=answer.encode("utf-8") if isinstance(answer, str) else None,
    )


def _result_doc(stdout: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """The result object: the whole output, else its last line that is a JSON object."""
    candidates = [stdout.strip(), *reversed(stdout.strip().splitlines())]
    for raw in candidates:
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("type", "result") == "result":
            return raw.strip(), doc
    return b"", None


def _usage(doc: Mapping[str, Any], model: str) -> Usage:
    u = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
    assert isinstance(u, dict)
    creation = u.get("cache_creation") if isinstance(u.get("cache_creation"), dict) else {}
    assert isinstance(creation, dict)
    cost = doc.get("total_cost_usd")
    reported = 0
    if isinstance(cost, int | float) and not isinstance(cost, bool) and cost >= 0:
        reported = round(cost * 1_000_000)
    return Usage(
        input_tokens=_count(u.get("input_tokens")),
        output_tokens=_count(u.get("output_tokens")),
        model=model,
        cache_creation_input_tokens=_count(u.get("cache_creation_input_tokens")),
        cache_creation_1h_input_tokens=_count(creation.get("ephemeral_1h_input_tokens")),
        cache_read_input_tokens=_count(u.get("cache_read_input_tokens")),
        reported_cost_micros=reported,
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _child_env(settings: ExecutorSettings) -> dict[str, str]:
    env = {
        name: value
        for name, value in settings.environ.items()
        if name in _ENV_NAMES or name.startswith(_ENV_PREFIXES)
    }
    if settings.anthropic_key_file is not None:
        key = settings.anthropic_api_key()
        if key is not None:
            env["ANTHROPIC_API_KEY"] = key
    if settings.anthropic_base_url:
        env["ANTHROPIC_BASE_URL"] = settings.anthropic_base_url
    return env


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the whole group, SIGKILL it after a grace period; survives a second cancel."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), KILL_GRACE)
    finally:
        _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(proc.wait())


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."
