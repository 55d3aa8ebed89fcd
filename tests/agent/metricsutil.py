"""Helpers for the agent metrics tests: scrape a real /metrics over HTTP, cut a TCP path."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]


async def http_get(url: str, *, accept: str = "") -> tuple[int, str, bytes]:
    """GET ``url`` (``http://host:port/path``) over a fresh connection: status, content
    type and body; plain asyncio, so the test sees exactly what a scraper gets."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    try:
        head = f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\n"
        if accept:
            head += f"Accept: {accept}\r\n"
        writer.write((head + "\r\n").encode("latin-1"))
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    header, _, body = raw.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return status, fields.get("Content-Type", ""), body


@dataclass(frozen=True)
class Scrape:
    """One /metrics exposition, parsed."""

    text: str
    samples: dict[tuple[str, Labels], float]

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name{labels}``; 0 when absent (a counter never incremented)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def total(self, name: str) -> float:
        """The sum of every sample of ``name`` whatever its labels."""
        return sum(v for (n, _), v in self.samples.items() if n == name)

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for (n, labels), _ in self.samples.items() if n == name]


async def scrape(url: str) -> Scrape:
    status, content_type, body = await http_get(url)
    assert status == 200, body
    assert content_type.startswith("text/plain"), content_type
    text = body.decode()
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not math.isnan(sample.value):
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(text, samples)


class Relay:
    """A TCP relay a test can cut once, as a network fault would: open connections are
    reset, new ones go through again (the agent's reconnection)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def cut(self) -> None:
        """Reset every connection open now."""
        for transport in list(self._transports):
            transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        ends = {writer.transport, up_writer.transport}
        self._transports |= ends
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._transports -= ends
            self._tasks.discard(task)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        sink.transport.abort()
