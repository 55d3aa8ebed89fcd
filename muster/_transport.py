"""Channels and authenticated calls shared by every client class, sync and asyncio.

The bearer token travels as per-call ``authorization`` metadata on a TLS channel whose
only trust anchor is the configured CA bundle (or the system roots when none is set).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from muster._errors_map import translate
from muster._version import __version__
from muster.config import ClientConfig

Req = TypeVar("Req")
Resp = TypeVar("Resp")

Metadata = tuple[tuple[str, str], ...]


USER_AGENT = f"muster-python/{__version__}"


def channel_options(config: ClientConfig) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [("grpc.primary_user_agent", USER_AGENT)]
    if config.server_name is not None:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    return options


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=config.read_ca_bundle())


def auth_metadata(config: ClientConfig) -> Metadata:
    return (("authorization", f"Bearer {config.token}"),)


class SyncTransport:
    """A blocking grpc channel plus the token metadata; errors leave as MusterError."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.metadata = auth_metadata(config)
        self.channel: grpc.Channel = grpc.secure_channel(
            config.address, channel_credentials(config), options=channel_options(config)
        )

    def unary(self, method: Callable[..., Resp], request: Any, extra: Metadata = ()) -> Resp:
        """Call ``method`` with the token (and ``extra`` metadata, such as ``traceparent``)."""
        try:
            return method(request, metadata=self.metadata + extra, timeout=self.config.timeout)
        except grpc.RpcError as err:
            raise translate(err) from err

    def close(self) -> None:
        self.channel.close()


class AsyncTransport:
    """A ``grpc.aio`` channel, opened on first use so it binds to the caller's running loop."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.metadata = auth_metadata(config)
        self._credentials = channel_credentials(config)
        self._channel: grpc.aio.Channel | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.secure_channel(
                self.config.address, self._credentials, options=channel_options(self.config)
            )
        return self._channel

    async def unary(
        self, method: Callable[..., Awaitable[Resp]], request: Any, extra: Metadata = ()
    ) -> Resp:
        """Call ``method`` with the token (and ``extra`` metadata, such as ``traceparent``)."""
        try:
            metadata = self.metadata + extra
            return await method(request, metadata=metadata, timeout=self.config.timeout)
        except grpc.aio.AioRpcError as err:
            raise translate(err) from err

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()
