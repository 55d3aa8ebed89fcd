"""The /metrics and /healthz HTTP endpoint, on asyncio, plus the routes others give it.

Shared by both daemons: the server serves its registry (and the CA's documents) here, and
the agent its own (``muster agent --metrics-addr``). It needs ``prometheus-client``, which
the server and agent distributions bring and the SDK alone does not; it is imported only
when a scrape is answered, so importing this module costs the SDK nothing.

Why not ``prometheus_client.start_http_server``: it runs a thread per server, and
Muster runs one event loop. A scrape needs only a tiny subset of HTTP/1.1: one GET per
connection, answered and closed. Other parts of the server publish documents here too
(the CA's CRLs and trust bundle) through ``routes``, so this module knows none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["Handler", "MetricsServer", "Reply", "start_metrics_server"]

_log = logging.getLogger(__name__)

_ALLOWED_METHODS = ("GET", "HEAD")
_BUILT_IN = ("/metrics", "/healthz")


@dataclass(frozen=True, slots=True)
class Reply:
    """A 200 answer of a route."""

    content_type: str
    body: bytes


Handler = Callable[[str], Awaitable[Reply | None]]
"""A route's answer to GET (and HEAD). It gets what follows a prefix route's path ("" for
an exact route) and returns None for "not found" (404); an exception is a 500."""


class _BadRequest(Exception):
    """The request cannot be answered; carries the status to send."""

    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


class MetricsServer:
    """A running endpoint; ``close()`` it (or use ``async with``) to stop listening."""

    def __init__(
        self,
        registry: Collector,
        *,
        read_timeout: float,
        max_request_bytes: int,
        routes: Mapping[str, Handler],
    ) -> None:
        for path in routes:
            if not path.startswith("/") or path.rstrip("/") in _BUILT_IN:
                raise ValueError(f"route {path!r}: must start with / and not replace {_BUILT_IN}")
        self._registry = registry
        self._routes = dict(routes)
        self._read_timeout = read_timeout
        self._max_request_bytes = max_request_bytes
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=self._max_request_bytes
        )

    @property
    def host(self) -> str:
        """The address the socket is bound to."""
        return str(self._sockname()[0])

    @property
    def port(self) -> int:
        """The real port, also when 0 was asked for."""
        return int(self._sockname()[1])

    @property
    def url(self) -> str:
        """``http://host:port/metrics``, for logs and tests."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def _sockname(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the metrics server is not listening")
        name: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return name

    async def serve_forever(self) -> None:
        """Block until the server is closed (the listening already started)."""
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening and drop the connections still open."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._answer(reader, writer)
        except (ConnectionError, TimeoutError) as err:
            _log.debug("metrics connection dropped: %s", err)
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self._read_timeout)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            method, path, headers = await self._read_request(reader)
            head_only = method == "HEAD"
            status, content_type, body = await self._route(path, headers)
        except _BadRequest as bad:
            if bad.status is HTTPStatus.NO_CONTENT:
                return  # the client closed without asking anything
            status, content_type, body = bad.status, "text/plain; charset=utf-8", b""
            body = f"{bad.status.phrase}\n".encode()
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if status is HTTPStatus.METHOD_NOT_ALLOWED:
            lines.append(f"Allow: {', '.join(_ALLOWED_METHODS)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(body)
        await asyncio.wait_for(writer.drain(), self._read_timeout)

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout)
        except asyncio.LimitOverrunError:
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None
        except asyncio.IncompleteReadError as err:
            if not err.partial.strip():
                raise _BadRequest(HTTPStatus.NO_CONTENT) from None
            raise _BadRequest(HTTPStatus.BAD_REQUEST) from None
        except TimeoutError:
            raise _BadRequest(HTTPStatus.REQUEST_TIMEOUT) from None

        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
            raise _BadRequest(HTTPStatus.BAD_REQUEST)
        method, target, _version = parts
        headers: dict[str, str] = {}
        for line in header_lines:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(HTTPStatus.BAD_REQUEST)
            headers[name.lower()] = value.strip()
        if method not in _ALLOWED_METHODS:
            raise _BadRequest(HTTPStatus.METHOD_NOT_ALLOWED)
        return method, target.partition("?")[0], headers

    async def _route(self, path: str, headers: dict[str, str]) -> tuple[HTTPStatus, str, bytes]:
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder  # see the module doc

            encoder, content_type = choose_encoder(headers.get("accept", ""))
            try:
                body = encoder(self._registry)
            except Exception:
                _log.exception("rendering /metrics failed")
                raise _BadRequest(HTTPStatus.INTERNAL_SERVER_ERROR) from None
            return HTTPStatus.OK, content_type, body
        if path == "/healthz":
            return HTTPStatus.OK, "text/plain; charset=utf-8", b"ok\n"
        handler, rest = self._handler(path)
        try:
            reply = await handler(rest)
        except Exception:
            _log.exception("answering %r failed", path[:200])
            raise _BadRequest(HTTPStatus.INTERNAL_SERVER_ERROR) from None
        if reply is None:
            raise _BadRequest(HTTPStatus.NOT_FOUND)
        return HTTPStatus.OK, reply.content_type, reply.body

    def _handler(self, path: str) -> tuple[Handler, str]:
        """The route of ``path``: an exact one, or a prefix route (its path ends with /)
        with one more, non-empty segment."""
        prefix, _, rest = path.rpartition("/")
        if rest:
            exact = self._routes.get(path)
            if exact is not None:
                return exact, ""
            under = self._routes.get(prefix + "/")
            if under is not None:
                return under, rest
        raise _BadRequest(HTTPStatus.NOT_FOUND)


async def start_metrics_server(
    registry: Collector,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    read_timeout: float = 5.0,
    max_request_bytes: int = 8192,
    routes: Mapping[str, Handler] | None = None,
) -> MetricsServer:
    """Listen on ``host:port`` (0: any free port, see ``.port``) and serve ``registry``
    at /metrics, and each of ``routes`` (path: :data:`Handler`) at its path.

    ``read_timeout`` bounds how long a client may take to send its request (and to
    read the answer); a request head longer than ``max_request_bytes`` gets 431.
    """
    server = MetricsServer(
        registry,
        read_timeout=read_timeout,
        max_request_bytes=max_request_bytes,
        routes=routes or {},
    )
    await server._start(host, port)
    _log.info("serving metrics on %s", server.url)
    return server
