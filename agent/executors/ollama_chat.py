"""``ollama.chat``: one streamed ``/api/chat`` call to the Ollama server the agent is set up with.

Ollama streams NDJSON: one object per token-ish chunk, then a final object
with ``done: true`` and the counts (``prompt_eval_count``, ``eval_count``).
``max_tokens`` becomes ``options.num_predict``, so the output is bounded.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx2 as httpx

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
MAX_LINE_BYTES = 1_000_000


class OllamaChatExecutor:
    """Chats with a model on the configured Ollama server; output mirrors a non-streamed reply."""

    kind = "ollama.chat"

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        settings = settings if settings is not None else ExecutorSettings()
        if not settings.ollama_configured and not settings.selected:
            raise ExecutorUnavailable("no Ollama server configured (--ollama-url or OLLAMA_HOST)")
        self.url = settings.ollama_endpoint()

    def __repr__(self) -> str:
        return f"OllamaChatExecutor(url={self.url!r})"

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        try:
            request = parse_ai_payload(self.kind, ctx.payload)
        except PayloadError as err:
            raise ExecutorError(str(err), retryable=False) from err
        doc: dict[str, Any] = json.loads(ctx.payload)
        body: dict[str, Any] = {
            "model": doc["model"],
            "messages": doc["messages"],
            "stream": True,
            "options": {**doc.get("options", {}), "num_predict": request.max_tokens},
        }
        if "format" in doc:
            body["format"] = doc["format"]
        with tracing.ai_call(
            "ollama", "chat", request.model, max_tokens=request.max_tokens
        ) as call:
            result = await self._call(ctx, request, body)
            call.used(result.usage)
            return result

    async def _call(
        self, ctx: TaskContext, request: AiRequest, body: dict[str, Any]
    ) -> ExecutionResult:
        parts: list[str] = []
        final: dict[str, Any] | None = None
        chunks = 0
        throttle = ProgressThrottle()
        timeout = httpx.Timeout(30.0, read=None)
        try:
            async with (
                httpx.AsyncClient(base_url=self.url, timeout=timeout) as client,
                client.stream("POST", "/api/chat", json=body) as response,
            ):
                if response.status_code != 200:
                    await response.aread()
                    raise _status_error(response)
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    if len(line) > MAX_LINE_BYTES:
                        raise ExecutorError("Ollama sent an oversized line", retryable=True)
                    chunk = _parse_line(line)
                    if "error" in chunk:
                        raise ExecutorError(
                            f"Ollama error: {_short(str(chunk['error']))}",
                            retryable=True,
                            usage=ctx.meter.usage,
                        )
                    message = chunk.get("message")
                    if isinstance(message, dict) and isinstance(message.get("content"), str):
                        parts.append(message["content"])
                    if chunk.get("done") is True:
                        final = chunk
                        break
                    chunks += 1
                    ctx.record_usage(Usage(output_tokens=chunks, model=request.model))
                    if throttle.ready():
                        await ctx.progress(
                            f"streaming: {chunks} output tokens",
                            min(99, chunks * 100 // request.max_tokens),
                            output_tokens=chunks,
                        )
        except httpx.TransportError as err:
            raise ExecutorError(
                f"cannot reach Ollama at {self.url}: {_short(str(err)) or type(err).__name__}",
                retryable=True,
                usage=ctx.meter.usage,
            ) from err
        if final is None:
            raise ExecutorError(
                "Ollama ended the stream without a final message",
                retryable=True,
                usage=ctx.meter.usage,
            )
        usage = Usage(
            input_tokens=_count(final.get("prompt_eval_count")),
            output_tokens=_count(final.get("eval_count")) or chunks,
            model=str(final.get("model") or request.model),
        )
        ctx.record_usage(usage)
        text = "".join(parts)
        final_message = final.get("message") if isinstance(final.get("message"), dict) else {}
        assert isinstance(final_message, dict)
        reply = dict(final, message={**final_message, "role": "assistant", "content": text})
        return ExecutionResult(
            output=json.dumps(reply, ensure_ascii=False).encode("utf-8"),
            usage=usage,
            answer=text.encode("utf-8"),
        )


def _parse_line(line: str) -> dict[str, Any]:
    try:
        chunk = json.loads(line)
    except ValueError as err:
        raise ExecutorError("Ollama sent a line that is not JSON", retryable=True) from err
    if not isinstance(chunk, dict):
        raise ExecutorError("Ollama sent a line that is not a JSON object", retryable=True)
    return chunk


def _status_error(response: httpx.Response) -> ExecutorError:
    status = response.status_code
    text = ""
    try:
        doc = response.json()
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            text = doc["error"]
    except ValueError:
        text = response.text
    summary = f"Ollama error {status}" + (f": {_short(text)}" if text else "")
    retry_after = retry_after_seconds(response.headers)
    if status in (429, 503):
        return ExecutorError(summary, retryable=True, retry_after=retry_after, rate_limited=True)
    if status >= 500 or status == 408:
        return ExecutorError(summary, retryable=True, retry_after=retry_after)
    return ExecutorError(summary, retryable=False)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."
