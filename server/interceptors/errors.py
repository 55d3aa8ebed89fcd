"""Turns what a handler raises into the status the caller sees.

A :class:`~server.services.errors.ServiceError` becomes its own code and message. Any
other exception is a bug: the traceback goes to the log with a request id, and the
caller gets INTERNAL with that id, never the exception text.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from server.interceptors._wrap import RpcType, _call, _stream
from server.services.errors import ServiceError

log = logging.getLogger(__name__)


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
        deserialize, serialize = handler.request_deserializer, handler.response_serializer
        if rpc_type is RpcType.UNARY:
            return grpc.unary_unary_rpc_method_handler(
                _guarded(method, handler.unary_unary, streaming=False), deserialize, serialize
            )
        if rpc_type is RpcType.SERVER_STREAM:
            return grpc.unary_stream_rpc_method_handler(
                _guarded(method, handler.unary_stream, streaming=True), deserialize, serialize
            )
        if rpc_type is RpcType.CLIENT_STREAM:
            return grpc.stream_unary_rpc_method_handler(
                _guarded(method, handler.stream_unary, streaming=False), deserialize, serialize
            )
        return grpc.stream_stream_rpc_method_handler(
            _guarded(method, handler.stream_stream, streaming=True), deserialize, serialize
        )


def _guarded(
    method: str, behavior: Callable[..., Any] | None, *, streaming: bool
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    assert behavior is not None

    async def run(argument: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if streaming:
                await _stream(behavior, argument, context)  # type: ignore[arg-type]
                return None
            return await _call(behavior, argument, context)
        except ServiceError as err:
            await context.abort(err.code, err.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            incident = secrets.token_hex(6)
            log.exception("unexpected error in %s (incident %s)", method, incident)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")

    return run
