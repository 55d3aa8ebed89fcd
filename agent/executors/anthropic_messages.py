"""``anthropic.messages``: one Messages API call, streamed through the official SDK.

The payload is the request body (validated by :mod:`muster.ai` here as on the
server); the key comes only from this agent's environment or key file. SDK
retries are off: the control plane retries, after the provider's
``retry-after``. Cancelling the attempt (cancel, timeout) closes the HTTP
stream at once, because asyncio cancellation unwinds the SDK's ``async with``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anthropic

from muster.agent import tracing
from muster.agent.executors.base import (
    ExecutionResult,
    ExecutorError,
    ExecutorSettings,
    ExecutorUnavailable,
    ProgressThrottle,
    TaskContext,
    Usage,
    retry_after_seconds,
)
from muster.ai import AiRequest, PayloadError, parse_ai_payload

log = logging.getLogger(__name__)

MAX_ERROR_TEXT = 500

# A 429 or 402 with these words is the organisation's spend limit or an empty
# credit balance: retrying cannot help until a person acts.
_SPEND_WORDS = (
    "spend limit",
    "spending limit",
    "credit balance",
    "usage limits",
    "billing",
    "purchase credits",
)
_NOT_RETRYABLE_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "billing_error",
    }
)


class AnthropicMessagesExecutor:
    """Calls the Messages API with the agent's own key; output is the final Message as JSON."""

    kind = "anthropic.messages"

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        settings = settings if settings is not None else ExecutorSettings()
        key = settings.anthropic_api_key()
        if key is None:
            raise ExecutorUnavailable(
                "no Anthropic API key: set ANTHROPIC_API_KEY or --anthropic-key-file"
            )
        self._key = key
        self._base_url = settings.anthropic_endpoint()
        self._client: anthropic.AsyncAnthropic | None = None

    def __repr__(self) -> str:  # never the key
        return f"AnthropicMessagesExecutor(base_url={self._base_url!r})"

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        """One client (and connection pool) per executor, made in the running loop."""
        if self._client is None:
            self._client = anthropic.AsyncAnthropic(
                api_key=self._key, base_url=self._base_url, max_retries=0
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        try:
            request = parse_ai_payload(self.kind, ctx.payload)
        except PayloadError as err:
            raise ExecutorError(str(err), retryable=False) from err
        # Sent exactly as validated: max_tokens is never raised, so the server's
        # reservation (computed from it) bounds what this call can cost.
        body: dict[str, Any] = json.loads(ctx.payload)
        with tracing.ai_call(
            "anthropic", "chat", request.model, max_tokens=request.max_tokens
        ) as call:
            result = await self._call(ctx, request, body)
            call.used(result.usage)
            return result

    async def _call(
        self, ctx: TaskContext, request: AiRequest, body: dict[str, Any]
    ) -> ExecutionResult:
        throttle = ProgressThrottle()
        deltas = 0
        try:
            async with self.client.messages.stream(**body) as stream:
                async for event in stream:
                    if event.type == "content_block_delta":
                        deltas += 1
                    if event.type in ("message_start", "message_delta", "content_block_delta"):
                        usage = _usage(stream.current_message_snapshot)
                        ctx.record_usage(usage)
                        if throttle.ready() or event.type == "message_delta":
                            # Each delta carries at least one token: a lower bound
                            # until message_delta brings the real count.
                            tokens = max(usage.output_tokens, deltas)
                            await ctx.progress(
                                f"streaming: {tokens} output tokens",
                                min(99, tokens * 100 // request.max_tokens),
                                output_tokens=tokens,
                            )
                message = await stream.get_final_message()
        except anthropic.APIStatusError as err:
            raise _status_error(err, ctx) from err
        except anthropic.APIConnectionError as err:
            raise ExecutorError(
                f"cannot reach the Anthropic API: {_short(str(err))}",
                retryable=True,
                usage=ctx.meter.usage,
            ) from err
        usage = _usage(message)
        ctx.record_usage(usage)
        text = "".join(block.text for block in message.content if block.type == "text")
        output = message.model_dump_json()
        return ExecutionResult(output=output.encode(), usage=usage, answer=text.encode())


def _usage(message: Any) -> Usage:
    u = message.usage
    cache_creation = getattr(u, "cache_creation", None)
    one_hour = getattr(cache_creation, "ephemeral_1h_input_tokens", None) or 0
    return Usage(
        input_tokens=u.input_tokens or 0,
        output_tokens=u.output_tokens or 0,
        model=message.model or "",
        cache_creation_input_tokens=u.cache_creation_input_tokens or 0,
        cache_creation_1h_input_tokens=one_hour,
        cache_read_input_tokens=u.cache_read_input_tokens or 0,
    )


def _status_error(err: anthropic.APIStatusError, ctx: TaskContext) -> ExecutorError:
    """Map a provider refusal to what the control plane should do next."""
    status = err.status_code
    kind, text = _error_body(err.body)
    retry_after = retry_after_seconds(err.response.headers)
    # An SSE `error` event arrives inside a 200 response: name it as such.
    where = "stream error" if status == 200 else f"error {status}"
    summary = f"Anthropic API {where}" + (f" {kind}" if kind else "")
    if text:
        summary += f": {_short(text)}"
    usage = ctx.meter.usage
    spend = any(word in text.lower() for word in _SPEND_WORDS)
    if kind == "billing_error" or ((status == 429 or kind == "rate_limit_error") and spend):
        return ExecutorError(
            summary + " (the organisation's spend limit or credit: not retried)",
            retryable=False,
            usage=usage,
        )
    if status == 429 or kind == "rate_limit_error":
        return ExecutorError(
            summary, retryable=True, retry_after=retry_after, rate_limited=True, usage=usage
        )
    if status == 529 or kind == "overloaded_error":
        return ExecutorError(
            summary, retryable=True, retry_after=retry_after, rate_limited=True, usage=usage
        )
    if status >= 500 or kind in ("api_error", "timeout_error") or status in (408, 409):
        return ExecutorError(summary, retryable=True, retry_after=retry_after, usage=usage)
    if kind in _NOT_RETRYABLE_TYPES or 400 <= status < 500:
        return ExecutorError(summary, retryable=False, usage=usage)
    # An error event inside a 200 stream with a type we do not know: try again.
    return ExecutorError(summary, retryable=True, retry_after=retry_after, usage=usage)


def _error_body(body: object) -> tuple[str, str]:
    """(error.type, error.message) from an error body, or empty strings."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", ""
    kind = error.get("type")
    text = error.get("message")
    return (kind if isinstance(kind, str) else ""), (text if isinstance(text, str) else "")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."
