"""A fake Anthropic Messages API: a real HTTP/1.1 server on loopback, on asyncio streams.

It speaks the documented wire format (JSON errors ``{"type": "error", "error":
{...}}``, SSE events ``message_start`` / ``content_block_start`` /
``content_block_delta``... / ``content_block_stop`` / ``message_delta`` with
usage / ``message_stop``), so tests drive it through the real ``anthropic``
SDK. Tests queue :class:`Reply` objects; with none queued it answers a short
success. Every request is recorded, and a stream the client abandons is noted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.fakes._http import Recorded, read_request, send_json

_ids = itertools.count(1)


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    text: str = "Hello from the fake API."
    chunks: int = 3
    """Text deltas the answer is split into."""
    delay: float = 0.0
    """Seconds between streamed events."""
    hang_after: int | None = None
    """Stream this many deltas, then wait for the client to go away (cancel tests)."""
    error_type: str = ""
    error_message: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    stream_error_after: int | None = None
    """Send an SSE ``error`` event after this many deltas (status stays 200)."""
    usage: Mapping[str, Any] = field(default_factory=dict)
    """Overrides for the usage object (input_tokens, cache_creation, ...)."""
    stop_reason: str = "end_turn"

    @classmethod
    def error(
        cls, status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None
    ) -> Reply:
        return cls(
            status=status,
            error_type=error_type,
            error_message=message,
            headers=dict(headers or {}),
        )


class FakeAnthropicAPI:
    """``async with FakeAnthropicAPI(api_key="k") as api: api.url``"""

    def __init__(self, api_key: str | None = None, model: str = "claude-sonnet-4-5") -> None:
        self.api_key = api_key
        self.model = model
        self.requests: list[Recorded] = []
        self.replies: deque[Reply] = deque()
        self.abandoned: list[float] = []
        """monotonic times at which a client closed a stream before its end."""
        self.abandoned_event = asyncio.Event()
        self.streaming = asyncio.Event()
        """Set when a stream has started (its first delta is out)."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def __aenter__(self) -> FakeAnthropicAPI:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # Closing the transports ends every handler's read with EOF (cancelling
        # handler tasks would make asyncio log their CancelledError).
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    # HTTP -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                keep_open = await self._answer(request, reader, writer)
                if not keep_open:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self, req: Recorded, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if req.method != "POST" or req.path.split("?")[0] != "/v1/messages":
            await send_json(writer, 404, _error("not_found_error", "Not found"))
            return True
        if self.api_key is not None and req.api_key != self.api_key:
            await send_json(writer, 401, _error("authentication_error", "invalid x-api-key"))
            return True
        if "anthropic-version" not in req.headers:
            await send_json(writer, 400, _error("invalid_request_error", "anthropic-version"))
            return True
        reply = self.replies.popleft() if self.replies else Reply()
        if reply.status != 200:
            await send_json(
                writer, reply.status, _error(reply.error_type, reply.error_message), reply.headers
            )
            return True
        try:
            body = req.json
        except ValueError:
            await send_json(writer, 400, _error("invalid_request_error", "body is not JSON"))
            return True
        message = self._message(body, reply)
        if not body.get("stream"):
            message["content"] = [{"type": "text", "text": reply.text}]
            message["stop_reason"] = reply.stop_reason
            await send_json(writer, 200, message, reply.headers)
            return True
        await self._stream(message, reply, reader, writer)
        return False

    def _message(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        input_tokens = max(1, len(json.dumps(body.get("messages", []))) // 4)
        output_tokens = min(max(1, len(reply.text.split())), body.get("max_tokens") or 1)
        usage: dict[str, Any] = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "service_tier": "standard",
        }
        usage.update(reply.usage)
        return {
            "id": f"msg_fake{next(_ids):06d}",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": body.get("model", self.model),
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }

    async def _stream(
        self,
        message: dict[str, Any],
        reply: Reply,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        head += "cache-control: no-cache\r\nconnection: close\r\n"
        head += f"request-id: req_fake{next(_ids):06d}\r\n"
        for name, value in reply.headers.items():
            head += f"{name}: {value}\r\n"
        writer.write((head + "\r\n").encode())
        usage = message["usage"]
        start = dict(message, usage=dict(usage, output_tokens=1))
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": start}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ("ping", {"type": "ping"}),
        ]
        for event, data in events:
            await _send_event(writer, event, data)
        pieces = _split(reply.text, reply.chunks)
        for i, piece in enumerate(pieces):
            if reply.stream_error_after is not None and i == reply.stream_error_after:
                await _send_event(writer, "error", _error(reply.error_type, reply.error_message))
                return
            if reply.hang_after is not None and i == reply.hang_after:
                await self._wait_for_client_to_leave(reader)
                return
            delta = {"type": "text_delta", "text": piece}
            data = {"type": "content_block_delta", "index": 0, "delta": delta}
            await _send_event(writer, "content_block_delta", data)
            self.streaming.set()
            if reply.delay:
                await asyncio.sleep(reply.delay)
        await _send_event(writer, "content_block_stop", {"type": "content_block_stop", "index": 0})
        delta_usage = {"output_tokens": usage["output_tokens"]}
        await _send_event(
            writer,
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
                "usage": delta_usage,
            },
        )
        await _send_event(writer, "message_stop", {"type": "message_stop"})

    async def _wait_for_client_to_leave(self, reader: asyncio.StreamReader) -> None:
        self.streaming.set()
        with contextlib.suppress(ConnectionError):
            while await reader.read(1024):
                pass
        self.abandoned.append(time.monotonic())
        self.abandoned_event.set()


def _error(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


async def _send_event(writer: asyncio.StreamWriter, event: str, data: dict[str, Any]) -> None:
    writer.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
    await writer.drain()


def _split(text: str, parts: int) -> list[str]:
    parts = max(1, parts)
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
