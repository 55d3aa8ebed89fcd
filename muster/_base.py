"""What every SDK client shares: its config, its transport, its stub, and its lifecycle.

The four clients (Client, AsyncClient, AdminClient, AsyncAdminClient) differ only in
their service's calls; everything around them lives here once.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc
import grpc.aio

from muster._transport import AsyncTransport, SyncTransport
from muster.config import ClientConfig

StubT = TypeVar("StubT")


class SyncClientBase(Generic[StubT]):
    """A blocking client on one channel; ``with`` closes it."""

    _new_stub: Callable[[grpc.Channel], Any]

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config if config is not None else ClientConfig.from_env()
        self._transport = SyncTransport(self.config)
        self._stub: StubT = type(self)._new_stub(self._transport.channel)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(address={self.config.address!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        self._transport.close()


class AsyncClientBase(Generic[StubT]):
    """An asyncio client; its channel opens on first use, so it may be built outside
    the event loop. ``async with`` closes it."""

    _new_stub: Callable[[grpc.aio.Channel], Any]

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config if config is not None else ClientConfig.from_env()
        self._transport = AsyncTransport(self.config)
        self._stub_channel: grpc.aio.Channel | None = None
        self._stub_cache: StubT | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(address={self.config.address!r})"

    @property
    def _stub(self) -> StubT:
        channel = self._transport.channel
        if self._stub_cache is None or self._stub_channel is not channel:
            self._stub_cache = type(self)._new_stub(channel)
            self._stub_channel = channel
        return self._stub_cache

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        await self._transport.close()
