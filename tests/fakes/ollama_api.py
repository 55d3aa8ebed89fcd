"""A fake Ollama server: ``POST /api/chat`` streaming NDJSON, on loopback, on asyncio streams.

Like the real one it sends one ``{"message": {"content": ...}, "done": false}``
object per chunk, then a final ``done: true`` object with
``prompt_eval_count`` and ``eval_count``; an unknown model is a 404 with
``{"error": ...}``. Requests are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from tests.fakes._http import Recorded, read_request, send_json


class FakeOllama:
    """``async with FakeOllama() as ollama: ollama.url``"""

    def __init__(self, models: tuple[str, ...] = ("llama3.2",), reply: str = "Hi there!") -> None:
        self.models = models
        self.reply = reply
        self.requests: list[Recorded] = []
        self.status: int | None = None
        """When set, the next /api/chat answers this status with an error body."""
        self.delay = 0.0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> FakeOllama:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while (req := await read_request(reader)) is not None:
                self.requests.append(req)
                if not await self._answer(req, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, req: Recorded, writer: asyncio.StreamWriter) -> bool:
        if req.path != "/api/chat" or req.method != "POST":
            await send_json(writer, 404, {"error": "not found"})
            return True
        if self.status is not None:
            status, self.status = self.status, None
            await send_json(writer, status, {"error": f"fake status {status}"})
            return True
        body: dict[str, Any] = req.json
        model = body.get("model")
        if model not in self.models:
            await send_json(writer, 404, {"error": f'model "{model}" not found, try pulling it'})
            return True
        limit = int(body.get("options", {}).get("num_predict", 128))
        words = [w + " " for w in self.reply.split()][:limit]
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n"
        )
        for word in words:
            chunk = {
                "model": model,
                "created_at": "2026-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": word},
                "done": False,
            }
            writer.write(json.dumps(chunk).encode() + b"\n")
            await writer.drain()
            if self.delay:
                await asyncio.sleep(self.delay)
        final = {
            "model": model,
            "created_at": "2026-01-01T00:00:01Z",
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop" if len(words) < limit else "length",
            "total_duration": 1_000_000,
            "prompt_eval_count": max(1, len(json.dumps(body["messages"])) // 4),
            "eval_count": len(words),
        }
        writer.write(json.dumps(final).encode() + b"\n")
        await writer.drain()
        return False
