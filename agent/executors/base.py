"""What an executor is: the small interface a task kind plugs into the daemon through."""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from muster.errors import ConfigError

ProgressFn = Callable[[str, int, int], Awaitable[None]]
"""``(message, percent, output_tokens)``; set by the daemon on each TaskContext."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens an attempt consumed, reported with its Result.

    Never money: the server prices tokens itself. ``reported_cost_micros`` is
    a tool's own figure (claude-code), recorded beside the server's.
    """

    input_tokens: int = 0
    """Uncached input tokens."""
    output_tokens: int = 0
    model: str = ""
    """The model that did the work, as the provider named it."""
    cache_creation_input_tokens: int = 0
    """Input tokens written to the prompt cache (all TTLs)."""
    cache_creation_1h_input_tokens: int = 0
    """Of those, the ones written with the 1-hour TTL."""
    cache_read_input_tokens: int = 0
    reported_cost_micros: int = 0


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """A successful run: the output bytes and, optionally, what it used."""

    output: bytes = b""
    usage: Usage = field(default_factory=Usage)
    answer: bytes | None = None
    """The part a task's ``output_schema`` is checked against (an AI kind's text
    answer inside its JSON envelope); None checks ``output`` itself."""


class ExecutorError(Exception):
    """Raise to fail an attempt with a clean message; ``retryable=False`` stops retries.

    Any other exception also fails the attempt (as retryable), but only its
    message reaches the server; the traceback stays in the local log.
    ``retry_after`` (seconds) and ``rate_limited`` carry a provider's 429/529
    answer to the server, which delays the retry and slows that model down;
    ``usage`` reports what the failed attempt still consumed.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
        rate_limited: bool = False,
        usage: Usage | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.rate_limited = rate_limited
        self.usage = usage


class ExecutorUnavailable(ConfigError):
    """An executor's factory raises this when this agent lacks what it needs (a key, a binary).

    Not named in ``--executors``: the executor is skipped and not advertised.
    Named: the agent refuses to start.
    """


@dataclass(slots=True)
class UsageMeter:
    """What an attempt has used so far; the runner reports it even when the attempt fails."""

    usage: Usage | None = None


ANTHROPIC_KEY_ENV = "ANTHROPIC_API_KEY"
ANTHROPIC_BASE_URL_ENV = "ANTHROPIC_BASE_URL"
OLLAMA_HOST_ENV = "OLLAMA_HOST"
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """The agent configuration executors may read; passed to one-argument factories.

    Secrets are resolved here, on the agent, from its environment or files:
    never from a payload or the server.
    """

    anthropic_base_url: str | None = None
    """Messages API endpoint; None follows the SDK (``$ANTHROPIC_BASE_URL`` or its default)."""
    anthropic_key_file: Path | None = None
    """File holding the Anthropic API key; None reads ``$ANTHROPIC_API_KEY``."""
    claude_bin: str = "claude"
    """The Claude Code executable: a path, or a name looked up on PATH."""
    ollama_url: str | None = None
    """Ollama server; None means ``$OLLAMA_HOST`` or the local default."""
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)
    """The environment the settings read (a copy, so tests can pass their own)."""
    selected: bool = False
    """Set by the registry when ``--executors`` named the executor: a missing optional
    setting then means "use the default" rather than "not wanted here"."""

    def anthropic_api_key(self) -> str | None:
        """The key from the key file, else the environment; None when neither has one."""
        if self.anthropic_key_file is not None:
            try:
                text = self.anthropic_key_file.read_text(encoding="utf-8").strip()
            except OSError as err:
                raise ConfigError(
                    f"cannot read --anthropic-key-file {self.anthropic_key_file}: {err.strerror}"
                ) from err
            if not text:
                raise ConfigError(f"--anthropic-key-file {self.anthropic_key_file} is empty")
            return text
        return self.environ.get(ANTHROPIC_KEY_ENV, "").strip() or None

    def anthropic_endpoint(self) -> str | None:
        return self.anthropic_base_url or self.environ.get(ANTHROPIC_BASE_URL_ENV) or None

    def claude_path(self) -> str | None:
        """The absolute path of the Claude Code binary, or None when it cannot be found."""
        return shutil.which(self.claude_bin, path=self.environ.get("PATH"))

    def ollama_endpoint(self) -> str:
        url = self.ollama_url or self.environ.get(OLLAMA_HOST_ENV) or DEFAULT_OLLAMA_URL
        if "://" not in url:
            url = "http://" + url  # OLLAMA_HOST is often host:port
        return url.rstrip("/")

    @property
    def ollama_configured(self) -> bool:
        return bool(self.ollama_url or self.environ.get(OLLAMA_HOST_ENV))


class ProgressThrottle:
    """Lets a progress report through at most every ``interval`` seconds (first one at once)."""

    def __init__(self, interval: float = 0.25, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    def ready(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True


@dataclass(frozen=True, slots=True)
class TaskContext:
    """One attempt as an executor sees it."""

    task_id: str
    attempt: int
    kind: str
    payload: bytes
    deadline: dt.datetime | None = None
    """When the attempt will be stopped (the earlier of start-to-close and the task deadline)."""
    max_cost_micros: int = 0
    """AI kinds: what the server reserved for this attempt; never spend more (0: none)."""
    output_schema: str = ""
    """The task's output JSON Schema (checked by the runner after a successful run)."""
    max_output_bytes: int = 0
    """The largest output the agent delivers (``--max-output-bytes``); a success with more
    fails for good, its output dropped. Bound your output to it (0: no limit)."""
    on_progress: ProgressFn | None = field(default=None, repr=False, compare=False)
    """Set by the daemon; executors call :meth:`progress` instead."""
    meter: UsageMeter = field(default_factory=UsageMeter, repr=False, compare=False)
    """Executors record usage here as they learn it (see :meth:`record_usage`)."""

    async def progress(self, message: str, percent: int = -1, *, output_tokens: int = 0) -> None:
        """Tell the server how far along we are (0-100, or -1 if unknown); it renews the lease."""
        if self.on_progress is not None:
            await self.on_progress(message, max(-1, min(100, percent)), max(0, output_tokens))

    def record_usage(self, usage: Usage) -> None:
        """Note what the attempt has used so far, so a cancel or timeout still reports it."""
        self.meter.usage = usage

    def time_remaining(self) -> float | None:
        """Seconds until the attempt is stopped, or None without a limit."""
        if self.deadline is None:
            return None
        return max(0.0, (self.deadline - dt.datetime.now(dt.UTC)).total_seconds())


@runtime_checkable
class Executor(Protocol):
    """Runs one kind of task. Cancellation arrives as ``asyncio.CancelledError``."""

    kind: str

    async def run(self, ctx: TaskContext) -> ExecutionResult: ...


def retry_after_seconds(headers: Any, now: dt.datetime | None = None) -> float | None:
    """The provider's requested delay in seconds: ``retry-after-ms``, else ``retry-after``."""
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            value = float(ms) / 1000.0
            return value if math.isfinite(value) and value >= 0 else None
        raw = headers.get("retry-after")
    except (AttributeError, ValueError):
        return None
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        value = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
        return max(0.0, value)
    return value if math.isfinite(value) and value >= 0 else None
