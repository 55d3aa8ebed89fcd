"""Wrap a grpc.aio method handler so an interceptor can see the context, the messages
and the outcome of each call.

Why: ``grpc.aio.ServerInterceptor.intercept_service`` only sees the method name and the
metadata. Anything that needs the peer certificate (``context.auth_context()``), the
request messages or the final status code has to replace the ``RpcMethodHandler``
returned by ``continuation(handler_call_details)`` with one whose behaviour runs extra
code around the real one. This module does that once, for all four call types.

The shape, from an interceptor::

    class MyInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            handler = await continuation(details)
            return wrap_handler(handler, details.method, lambda info: MyObserver(info))

Every call then creates one :class:`CallObserver` (the factory runs when the call
starts) and the wrapped behaviour calls, in this order:

1. ``await observer.start(context)``: before the real behaviour. Abort here
   (``await context.abort(...)``) to refuse the call: the real behaviour never runs.
   A ``contextvars.ContextVar`` set here is visible to the handler (same task).
2. ``observer.request(message)``: once per request message the handler receives
   (after ``start``; for unary requests just before the handler runs; for streams as
   the handler pulls them, through the iterator or ``context.read()``; EOF excluded).
3. ``observer.response(message)``: once per response message, after it was sent
   (for unary responses: when the handler returned without raising).
4. ``observer.finish(code)``: exactly once, with the status code the client gets
   (see :func:`outcome_code`), whether the call returned, aborted, raised or was
   cancelled. It must not raise.

Exceptions, aborts and cancellation propagate unchanged. Wrapped behaviours are
coroutine functions in every case (async generators are driven with
``context.write``), so wrappers stack: the first interceptor in the server's list is
the outermost, i.e. it sees what the inner ones do (a metrics interceptor placed first
counts an auth interceptor's UNAUTHENTICATED).

Sync behaviours (only the UNIMPLEMENTED stubs of a generated ``*Servicer`` base class
in Muster) are called inline on the event loop instead of in grpc's thread pool.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

__all__ = [
    "CallObserver",
    "ObserverFactory",
    "RpcInfo",
    "RpcType",
    "guard_handler",
    "outcome_code",
    "wrap_handler",
]


class RpcType(enum.Enum):
    """The four gRPC call types, valued with go-grpc-prometheus's ``grpc_type`` names."""

    UNARY = "unary"
    CLIENT_STREAM = "client_stream"
    SERVER_STREAM = "server_stream"
    BIDI_STREAM = "bidi_stream"

    @classmethod
    def of(cls, request_streaming: bool, response_streaming: bool) -> RpcType:
        """The call type of a method, from its streaming flags."""
        if request_streaming:
            return cls.BIDI_STREAM if response_streaming else cls.CLIENT_STREAM
        return cls.SERVER_STREAM if response_streaming else cls.UNARY


@dataclass(frozen=True, slots=True)
class RpcInfo:
    """What is known about a method before any call: its names and its call type."""

    method: str
    """The full method path, e.g. ``/muster.v1.TaskService/Submit``."""
    service: str
    """The full service name, e.g. ``muster.v1.TaskService``."""
    name: str
    """The method's short name, e.g. ``Submit``."""
    rpc_type: RpcType

    @classmethod
    def of(cls, method: str, rpc_type: RpcType) -> RpcInfo:
        """Split ``/package.Service/Method``; a malformed path keeps what it has."""
        service, _, name = method.lstrip("/").rpartition("/")
        return cls(method=method, service=service, name=name, rpc_type=rpc_type)


class CallObserver:
    """Per-call hooks around a wrapped handler; every method is a no-op by default.

    Subclass and override what you need; one instance serves exactly one call.
    """

    __slots__ = ()

    async def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Runs before the real behaviour; may abort the call."""

    def request(self, message: Any) -> None:
        """A request message reached the handler."""

    def response(self, message: Any) -> None:
        """A response message was sent (or returned, for unary responses)."""

    def finish(self, code: grpc.StatusCode) -> None:
        """The call ended with ``code``; runs once, must not raise."""


ObserverFactory = Callable[[RpcInfo], CallObserver]
"""Makes the observer of one call; it runs when the call starts."""


def outcome_code(
    context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
) -> grpc.StatusCode:
    """The status code the client receives, given how the behaviour ended.

    Mirrors grpc.aio: an abort leaves its code in ``context.code()``; a code set with
    ``set_code`` survives a later exception; any other exception is UNKNOWN; a
    cancelled handler is DEADLINE_EXCEEDED once the deadline has passed, else CANCELLED.
    """
    code: grpc.StatusCode | None = context.code()
    if error is None:
        return code if code is not None else grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    if code is None or code is grpc.StatusCode.OK:
        return grpc.StatusCode.UNKNOWN
    return code


class _ObservedContext:
    """Passes everything to the real context, telling the observer about read/write.

    Handlers that stream with ``context.read()``/``context.write()`` instead of
    iterators still get their messages counted.
    """

    __slots__ = ("_context", "_observer")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], observer: CallObserver):
        self._context = context
        self._observer = observer

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._observer.request(message)
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._observer.response(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _ObservedRequests:
    """The request iterator, telling the observer about each message.

    A plain iterator object rather than an async generator, so that it behaves
    exactly like the one it wraps (e.g. when an ``anext`` is cancelled by a timeout).
    """

    __slots__ = ("_iterator", "_observer", "_requests")

    def __init__(self, requests: AsyncIterator[Any], observer: CallObserver) -> None:
        self._requests = requests
        self._iterator: AsyncIterator[Any] | None = None
        self._observer = observer

    def __aiter__(self) -> _ObservedRequests:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            # Lazily: grpc's receiver starts a coroutine when iterated, which would be
            # left un-awaited if the handler never reads (or the call is refused first).
            self._iterator = aiter(self._requests)
        message = await anext(self._iterator)
        self._observer.request(message)
        return message


async def _call(behavior: Callable[..., Any], argument: Any, context: Any) -> Any:
    """Call a unary-response behaviour, sync or async, and return its response."""
    result = behavior(argument, context)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _stream(behavior: Callable[..., Any], argument: Any, context: _ObservedContext) -> None:
    """Run a streaming-response behaviour of any style, sending through ``context``."""
    result = behavior(argument, context)
    if inspect.isawaitable(result):
        # Reader/writer style: the handler wrote its responses with context.write.
        await result
    elif hasattr(result, "__aiter__"):
        try:
            async for message in result:
                await context.write(message)
        finally:
            # Close an async generator now (its finally blocks run in this call),
            # not whenever the garbage collector gets to it.
            if (aclose := getattr(result, "aclose", None)) is not None:
                await aclose()
    elif result is not None:
        for message in result:
            await context.write(message)


Behavior = Callable[[Any, Any], Awaitable[Any]]


def _behavior(function: Callable[..., Any] | None, method: str) -> Callable[..., Any]:
    """The handler's behaviour for its call type; grpc guarantees it is set."""
    if function is None:
        raise TypeError(f"method handler of {method} has no behaviour for its call type")
    return function


def _observe(
    info: RpcInfo,
    new_observer: ObserverFactory,
    run: Callable[[Any, Any, CallObserver], Awaitable[Any]],
) -> Behavior:
    """Build the behaviour that brackets ``run`` with the observer's start and finish."""

    async def behavior(argument: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        observer = new_observer(info)
        error: BaseException | None = None
        try:
            await observer.start(context)
            return await run(argument, context, observer)
        except BaseException as exc:
            error = exc
            raise
        finally:
            observer.finish(outcome_code(context, error))

    return behavior


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any] | None,
    method: str,
    new_observer: ObserverFactory,
) -> grpc.RpcMethodHandler[Any, Any] | None:
    """Return a handler equal to ``handler`` but observed by ``new_observer(info)`` per call.

    ``method`` is ``handler_call_details.method``. ``None`` (an unknown method, which
    grpc answers UNIMPLEMENTED) is returned as is. The serializers are kept.
    """
    if handler is None:
        return None
    info = RpcInfo.of(method, RpcType.of(handler.request_streaming, handler.response_streaming))
    deserialize = handler.request_deserializer
    serialize = handler.response_serializer

    if info.rpc_type is RpcType.UNARY:
        inner_uu = _behavior(handler.unary_unary, method)

        async def run_uu(request: Any, context: Any, observer: CallObserver) -> Any:
            observer.request(request)
            response = await _call(inner_uu, request, context)
            observer.response(response)
            return response

        return grpc.unary_unary_rpc_method_handler(
            _observe(info, new_observer, run_uu), deserialize, serialize
        )

    if info.rpc_type is RpcType.SERVER_STREAM:
        inner_us = _behavior(handler.unary_stream, method)

        async def run_us(request: Any, context: Any, observer: CallObserver) -> None:
            observer.request(request)
            await _stream(inner_us, request, _ObservedContext(context, observer))

        return grpc.unary_stream_rpc_method_handler(
            _observe(info, new_observer, run_us), deserialize, serialize
        )

    if info.rpc_type is RpcType.CLIENT_STREAM:
        inner_su = _behavior(handler.stream_unary, method)

        async def run_su(requests: Any, context: Any, observer: CallObserver) -> Any:
            observed = _ObservedContext(context, observer)
            response = await _call(inner_su, _ObservedRequests(requests, observer), observed)
            observer.response(response)
            return response

        return grpc.stream_unary_rpc_method_handler(
            _observe(info, new_observer, run_su), deserialize, serialize
        )

    inner_ss = _behavior(handler.stream_stream, method)

    async def run_ss(requests: Any, context: Any, observer: CallObserver) -> None:
        observed = _ObservedContext(context, observer)
        await _stream(inner_ss, _ObservedRequests(requests, observer), observed)

    return grpc.stream_stream_rpc_method_handler(
        _observe(info, new_observer, run_ss), deserialize, serialize
    )


Check = Callable[[RpcInfo, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
"""An access check: returns to let the call through, or aborts the context."""


class _Guard(CallObserver):
    __slots__ = ("_check", "_info")

    def __init__(self, info: RpcInfo, check: Check) -> None:
        self._info = info
        self._check = check

    async def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._check(self._info, context)


def guard_handler(
    handler: grpc.RpcMethodHandler[Any, Any] | None, method: str, check: Check
) -> grpc.RpcMethodHandler[Any, Any] | None:
    """Run ``await check(info, context)`` before every call of ``handler``.

    The shortcut for auth-style interceptors: ``check`` aborts (e.g. UNAUTHENTICATED)
    to refuse the call, or sets a ``ContextVar`` the handler reads.
    """
    return wrap_handler(handler, method, lambda info: _Guard(info, check))
