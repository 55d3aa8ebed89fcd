"""Turns what a handler raises into the status the caller sees.

A :class:`~server.services.errors.ServiceError` becomes its own code and message. Any
other exception is a bug: the traceback goes to the log with a request id, and the
caller gets INTERNAL with that id, never the exception text.

A request that is not a valid protobuf message (or holds a NUL in a string) gets
INVALID_ARGUMENT with a short message. grpc-python decodes a request with the
handler's ``request_deserializer`` before any interceptor's behaviour runs (for
streams: as the handler reads), and a decode error there would become UNKNOWN or
INTERNAL with the Python exception in the details. So this interceptor replaces the
deserializer with one that returns a :class:`~server.interceptors.decode.Refused`
marker instead of raising (see :mod:`muster.server.interceptors.decode`), and its behaviour
refuses the call when it meets the marker: before the handler runs for a unary
request, and when the handler reads it for a request stream. The interceptor sees
every handler of its server, grpc's own health and reflection services included.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from muster.server.interceptors._wrap import RpcType, _call, _stream
from muster.server.interceptors.decode import Refused, safe_deserializer
from muster.server.services.errors import ServiceError

__all__ = ["ErrorsInterceptor", "UndecodableRequest"]

log = logging.getLogger(__name__)


class UndecodableRequest(Exception):
    """Raised to the handler when it reads a refused message from a request stream."""


class ErrorsInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        rpc_type = RpcType.of(handler.request_streaming, handler.response_streaming)
        deserialize = safe_deserializer(handler.request_deserializer)
        serialize = handler.response_serializer
        if rpc_type is RpcType.UNARY:
            return grpc.unary_unary_rpc_method_handler(
                _guarded(method, handler.unary_unary, rpc_type), deserialize, serialize
            )
        if rpc_type is RpcType.SERVER_STREAM:
            return grpc.unary_stream_rpc_method_handler(
                _guarded(method, handler.unary_stream, rpc_type), deserialize, serialize
            )
        if rpc_type is RpcType.CLIENT_STREAM:
            return grpc.stream_unary_rpc_method_handler(
                _guarded(method, handler.stream_unary, rpc_type), deserialize, serialize
            )
        return grpc.stream_stream_rpc_method_handler(
            _guarded(method, handler.stream_stream, rpc_type), deserialize, serialize
        )


class _Checked:
    """Request stream and context in one: raises :class:`UndecodableRequest` (and
    remembers why) when the handler reads a refused message, by iterating the requests
    or through ``context.read()``."""

    __slots__ = ("_context", "_iterator", "_requests", "refused")

    def __init__(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._requests = requests
        self._iterator: AsyncIterator[Any] | None = None
        self._context = context
        self.refused: Refused | None = None

    def check(self, message: Any) -> Any:
        if isinstance(message, Refused):
            self.refused = message
            raise UndecodableRequest(message.detail)
        return message

    def __aiter__(self) -> _Checked:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = aiter(self._requests)  # lazily, as _wrap._ObservedRequests
        return self.check(await anext(self._iterator))


class _CheckedContext:
    """The real context, with ``read()`` checked for the marker."""

    __slots__ = ("_checked", "_context")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], checked: _Checked) -> None:
        self._context = context
        self._checked = checked

    async def read(self) -> Any:
        message = await self._context.read()
        if message is grpc.aio.EOF:
            return message
        return self._checked.check(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _guarded(
    method: str, behavior: Callable[..., Any] | None, rpc_type: RpcType
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    assert behavior is not None
    streaming = rpc_type in (RpcType.SERVER_STREAM, RpcType.BIDI_STREAM)
    request_streaming = rpc_type in (RpcType.CLIENT_STREAM, RpcType.BIDI_STREAM)
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    async def run(argument: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        checked: _Checked | None = None
        if request_streaming:
            checked = _Checked(argument, context)
            argument, context = checked, _CheckedContext(context, checked)  # type: ignore[assignment]
        elif isinstance(argument, Refused):
            await context.abort(invalid, argument.detail)
        try:
            if streaming:
                await _stream(behavior, argument, context)  # type: ignore[arg-type]
                result = None
            else:
                result = await _call(behavior, argument, context)
        except ServiceError as err:
            if checked is not None and checked.refused is not None:
                await context.abort(invalid, checked.refused.detail)
            await context.abort(err.code, err.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            if checked is not None and checked.refused is not None:
                # However the handler let the error out, the caller's bytes were the cause.
                await context.abort(invalid, checked.refused.detail)
            code = context.code()
            if code is not None and code is not grpc.StatusCode.OK:
                # The handler chose the status before it raised, as a generated servicer
                # base does for a method it does not implement (grpc's health List):
                # that status stands, as it would without this interceptor.
                await context.abort(code, context.details() or code.name)
            incident = secrets.token_hex(6)
            log.exception("unexpected error in %s (incident %s)", method, incident)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
        if checked is not None and checked.refused is not None:
            # The handler swallowed the error and returned: the call still failed.
            await context.abort(invalid, checked.refused.detail)
        return result

    return run
