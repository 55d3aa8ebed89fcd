"""OpenTelemetry tracing: what the SDK, the server and the agent share.

A task's trace follows it from ``Client.submit`` through the server's Submit, its wait in
the queue, its dispatch, the agent's run (and the AI call inside it) to the server's
recording of the Result. The context travels as W3C Trace Context: ``traceparent``
metadata on Submit, a column of the task's row, ``TraceContext`` in the Assignment and
the Result (docs/tracing.md).

Everything here but :func:`configure` uses only ``opentelemetry-api``: without a
configured tracer provider its tracer is a no-op, so an untraced process pays a few
function calls per task and exports nothing. :func:`configure` installs the
OpenTelemetry SDK's provider in a process (the server, the agent, the CLI), and only
when the standard ``OTEL_*`` variables ask for traces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from muster._version import __version__
from muster.errors import ConfigError
from muster.v1 import common_pb2

log = logging.getLogger(__name__)

TRACER_NAME = "muster"
MAX_TRACESTATE = 512
"""W3C's limit on ``tracestate``; a longer value is dropped, not cut."""

# Attributes. OpenTelemetry semantic conventions where they exist (rpc.*, messaging.*,
# gen_ai.*), muster.* for the rest. Never a payload, an output, a token or a key.
TASK_ID = "muster.task.id"
TASK_KIND = "muster.task.kind"
TASK_ATTEMPT = "muster.task.attempt"
TASK_POOL = "muster.task.pool"
AGENT_ID = "muster.agent.id"
OUTCOME = "muster.task.outcome"

_W3C = TraceContextTextMapPropagator()
_UNSET = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


_tracer = trace.get_tracer(TRACER_NAME, __version__)
"""A proxy: it follows the global provider once one is set."""


def tracer() -> trace.Tracer:
    """Muster's tracer from the global provider (a no-op until one is configured)."""
    return _tracer


def enabled() -> bool:
    """Whether this process has a tracer provider (ours from :func:`configure`, or an
    application's). Without one, Muster makes no span at all and only hands a context it
    was given on (a no-op span still costs tens of microseconds: too much per task)."""
    return not isinstance(trace.get_tracer_provider(), _UNSET)


# W3C Trace Context in its three forms: gRPC metadata, the proto message, the stored text.


def parent_from(traceparent: str, tracestate: str = "") -> Context | None:
    """The context a ``traceparent`` (and ``tracestate``) names; None when there is no
    valid one (a bad value is a hint to ignore, never an error)."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate and len(tracestate) <= MAX_TRACESTATE:
        carrier["tracestate"] = tracestate
    context = _W3C.extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def parent_from_proto(message: common_pb2.TraceContext) -> Context | None:
    return parent_from(message.traceparent, message.tracestate)


def parent_from_metadata(metadata: Any) -> Context | None:
    """The context in gRPC call metadata (``traceparent``/``tracestate``), if any."""
    traceparent = tracestate = ""
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            traceparent = value
        elif key == "tracestate" and isinstance(value, str):
            tracestate = value
    return parent_from(traceparent, tracestate)


def headers(span: trace.Span) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) naming ``span``; empty when it is not valid."""
    if not span.get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def to_proto(span: trace.Span) -> common_pb2.TraceContext | None:
    """``span`` as a TraceContext message; None when it is not valid."""
    carrier = headers(span)
    if not carrier:
        return None
    return common_pb2.TraceContext(
        traceparent=carrier["traceparent"], tracestate=carrier.get("tracestate", "")
    )


def to_stored(span: trace.Span) -> str | None:
    """``span`` as stored with a task: the traceparent, then a space and the tracestate
    if there is one (a traceparent holds no space); None when it is not valid."""
    carrier = headers(span)
    if not carrier:
        return None
    state = carrier.get("tracestate", "")
    return carrier["traceparent"] + (f" {state}" if state else "")


def stored_to_proto(stored: str | None) -> common_pb2.TraceContext | None:
    """What :func:`to_stored` wrote, as a TraceContext message."""
    if not stored:
        return None
    traceparent, _, tracestate = stored.partition(" ")
    return common_pb2.TraceContext(traceparent=traceparent, tracestate=tracestate)


def trace_id_of(stored: str | None) -> str:
    """The trace id (32 hex digits) of a context as stored with a task; "" for none or
    one that does not parse."""
    parent = parent_from_stored(stored)
    if parent is None:
        return ""
    return format(trace.get_current_span(parent).get_span_context().trace_id, "032x")


def parent_from_stored(stored: str | None) -> Context | None:
    if not stored:
        return None
    traceparent, _, tracestate = stored.partition(" ")
    return parent_from(traceparent, tracestate)


def failed(span: trace.Span, err: BaseException) -> None:
    """Mark ``span`` as failed with the error's type (and gRPC status code) only: messages
    may quote payloads."""
    span.set_status(Status(StatusCode.ERROR, type(err).__name__))
    span.set_attribute("error.type", type(err).__name__)
    for cause in (err, err.__cause__, err.__context__):
        code = getattr(cause, "code", None)
        code = code() if callable(code) else code
        value = getattr(code, "value", None)
        if isinstance(value, tuple) and value and isinstance(value[0], int):
            span.set_attribute("rpc.grpc.status_code", value[0])
            return


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, Any],
    context: Context | None = None,
) -> Iterator[trace.Span]:
    """One of Muster's spans, current inside the ``with`` (a child of ``context``, else of
    the current span); an error leaving the block marks it failed (:func:`failed`: the
    error's type and gRPC code, never its message) and goes on."""
    with tracer().start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as err:
            failed(current, err)
            raise


# The SDK's client spans (Client, AsyncClient).


@contextmanager
def client_call(
    method: str, address: str, attributes: Mapping[str, Any] | None = None
) -> Iterator[tuple[tuple[str, str], ...]]:
    """A CLIENT span for one TaskService call; yields the metadata that carries it
    (``traceparent``), empty when nothing is traced."""
    if not enabled():
        # No span of ours; a context the caller is in (propagated to it) still goes on.
        yield tuple(headers(trace.get_current_span()).items())
        return
    with span(
        f"muster.v1.TaskService/{method}",
        kind=SpanKind.CLIENT,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": "muster.v1.TaskService",
            "rpc.method": method,
            "server.address": address,
            **(attributes or {}),
        },
    ) as current:
        yield tuple(headers(current).items())
        current.set_attribute("rpc.grpc.status_code", 0)


# Configuration of a process (server, agent, CLI).

EXPORTERS = ("otlp", "console")


@dataclass(frozen=True)
class Settings:
    """What the ``OTEL_*`` variables ask of Muster's tracing."""

    exporters: tuple[str, ...]
    """Empty: tracing is off (nothing is set up, nothing is exported)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Traces are on only when asked for: ``OTEL_TRACES_EXPORTER`` names exporters
        (``otlp``, ``console``; ``none`` is off), or an OTLP endpoint is set
        (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``, exporter ``otlp``).
        ``OTEL_SDK_DISABLED=true`` turns everything off. Unlike OpenTelemetry's own
        auto-configuration, nothing is exported to a default endpoint."""
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(())
        named = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
        named = [n for n in named if n]
        if named:
            if "none" in named:
                return cls(())
            unknown = [n for n in named if n not in EXPORTERS]
            if unknown:
                raise ConfigError(
                    f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} not supported "
                    f"(use {', '.join(EXPORTERS)} or none)"
                )
            return cls(tuple(dict.fromkeys(named)))
        if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            return cls(("otlp",))
        return cls(())

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)


class Tracing:
    """The tracer provider a process configured; :meth:`shutdown` exports what is left."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    def shutdown(self) -> None:
        """Flush and stop the exporters (blocking: call it from a thread in asyncio code)."""
        self.provider.shutdown()


def build_provider(service_name: str, environ: Mapping[str, str] | None = None) -> Any | None:
    """An OpenTelemetry SDK ``TracerProvider`` as ``OTEL_*`` configure it, batching to
    its exporters; None when they do not ask for traces. The SDK reads the rest of the
    standard variables itself (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*``) from the process
    environment, whatever ``environ`` says."""
    env = os.environ if environ is None else environ
    settings = Settings.from_env(env)
    if not settings.enabled:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning(
            "tracing: OTEL_* ask for traces but opentelemetry-sdk is not installed; "
            "not tracing (pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc)"
        )
        return None
    attributes: dict[str, str] = {"service.version": __version__}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in settings.exporters:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            continue
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
        )
        if protocol.strip().lower() != "grpc":
            raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} not supported (grpc)")
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "tracing: the otlp exporter needs opentelemetry-exporter-otlp-proto-grpc; "
                "not exporting over OTLP"
            )
            continue
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


_configured: list[Tracing | None] = []


def configure(service_name: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Install the tracer provider ``OTEL_*`` ask for as this process's global one, if
    they ask for traces; None otherwise. From a command's entry point: only the first
    call of a process decides (a global provider cannot be replaced)."""
    if _configured:
        return _configured[0]
    provider = build_provider(service_name, environ)
    traces = None if provider is None else Tracing(provider)
    _configured.append(traces)
    if provider is not None:
        trace.set_tracer_provider(provider)
        log.info("tracing: exporting spans as %s", service_name)
    return traces
