"""gRPC server metrics with go-grpc-prometheus's names, labels and buckets.

Why those names: operators already have dashboards and alerts written against
``grpc_server_handled_total`` and friends; Muster's servers slot into them unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram

from muster.server.interceptors._wrap import CallObserver, RpcInfo, RpcType, wrap_handler

__all__ = ["DEFAULT_BUCKETS", "GrpcServerMetrics", "MetricsInterceptor"]

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""go-grpc-prometheus's default (``prometheus.DefBuckets``); ``+Inf`` is implied."""

_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# grpc-go's spelling of each code (codes.Code.String()), for dashboards that match on it.
_GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}


class GrpcServerMetrics:
    """The five go-grpc-prometheus server metrics, registered once in ``registry``.

    Create one per registry and share it between the interceptors of every server
    (api and agent listeners) in the process: a registry refuses duplicate names.
    ``grpc_code`` holds the grpc-python code name (``OK``, ``UNAUTHENTICATED``); pass
    ``go_code_names=True`` for grpc-go's spelling (``OK``, ``Unauthenticated``).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        buckets: Iterable[float] = DEFAULT_BUCKETS,
        go_code_names: bool = False,
    ) -> None:
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            _LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            _LABELS,
            registry=registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            _LABELS,
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been "
            "application-level handled by the server.",
            _LABELS,
            buckets=tuple(buckets),
            registry=registry,
        )
        self._go_code_names = go_code_names

    def code_label(self, code: grpc.StatusCode) -> str:
        """The ``grpc_code`` label value of ``code``."""
        return _GO_CODE_NAMES[code] if self._go_code_names else code.name

    def initialize(self, *services: ServiceDescriptor) -> None:
        """Create zero-valued series for every method of ``services``, as go's
        ``InitializeMetrics`` does, so rates exist before the first call."""
        for service in services:
            for method in service.methods:
                rpc_type = RpcType.of(method.client_streaming, method.server_streaming)
                labels = (rpc_type.value, service.full_name, method.name)
                self.started.labels(*labels)
                self.msg_received.labels(*labels)
                self.msg_sent.labels(*labels)
                self.handling_seconds.labels(*labels)
                for code in grpc.StatusCode:
                    self.handled.labels(*labels, self.code_label(code))


class _MetricsObserver(CallObserver):
    """Counts one call; created when the call starts (hence ``started`` here)."""

    __slots__ = ("_labels", "_metrics", "_received", "_sent", "_start")

    def __init__(self, metrics: GrpcServerMetrics, info: RpcInfo) -> None:
        self._metrics = metrics
        self._labels = (info.rpc_type.value, info.service, info.name)
        self._received = metrics.msg_received.labels(*self._labels)
        self._sent = metrics.msg_sent.labels(*self._labels)
        metrics.started.labels(*self._labels).inc()
        self._start = time.perf_counter()

    def request(self, message: Any) -> None:
        self._received.inc()

    def response(self, message: Any) -> None:
        self._sent.inc()

    def finish(self, code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - self._start
        metrics = self._metrics
        metrics.handled.labels(*self._labels, metrics.code_label(code)).inc()
        metrics.handling_seconds.labels(*self._labels).observe(elapsed)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Records every call of a grpc.aio server in :class:`GrpcServerMetrics`.

    Put it first in the server's interceptor list so it also counts the calls that
    later interceptors refuse (UNAUTHENTICATED, RESOURCE_EXHAUSTED). Unknown methods
    (UNIMPLEMENTED by grpc itself) are not counted, as in go-grpc-prometheus.
    """

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        metrics = self._metrics
        return wrap_handler(
            handler, handler_call_details.method, lambda info: _MetricsObserver(metrics, info)
        )
