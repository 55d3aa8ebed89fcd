"""Tracing's pieces without processes: when OTEL_* turn it on, W3C context in its three
forms, and the pass-through an untraced server or agent gives a traced task (the spans
of real processes are checked in tests/e2e/test_tracing.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from muster import tracing
from muster.agent import tracing as agent_tracing
from muster.errors import ConfigError
from muster.server import tracing as server_tracing
from muster.server.storage.taskstore import Claimed
from muster.v1 import agent_pb2, common_pb2

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, ()),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "otlp, console,otlp"}, ("otlp", "console")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ()),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, ()),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
    ],
)
def test_tracing_is_on_only_when_otel_variables_ask_for_it(
    environ: dict[str, str], exporters: tuple[str, ...]
) -> None:
    settings = tracing.Settings.from_env(environ)
    assert settings.exporters == exporters
    assert settings.enabled == bool(exporters)


def test_without_otel_variables_no_provider_is_built() -> None:
    assert tracing.build_provider("muster-test", {}) is None


def test_an_unknown_exporter_or_protocol_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="zipkin"):
        tracing.Settings.from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="http/protobuf"):
        tracing.build_provider(
            "muster-test",
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        )


def test_the_provider_names_the_service_unless_otel_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    provider = tracing.build_provider("muster-test")
    try:
        assert provider.resource.attributes["service.name"] == "muster-test"
    finally:
        provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ctl-eu-1")
    named = tracing.build_provider("muster-test")
    try:
        assert named.resource.attributes["service.name"] == "ctl-eu-1"
    finally:
        named.shutdown()


def test_context_survives_storage_and_the_proto_with_its_tracestate() -> None:
    tracer = TracerProvider().get_tracer("test")
    parent = tracing.parent_from(TRACEPARENT, "vendor=abc,other=1")
    assert parent is not None
    span = tracer.start_span("submit", context=parent)
    stored = tracing.to_stored(span)
    assert stored is not None and " vendor=abc,other=1" in stored
    message = tracing.stored_to_proto(stored)
    assert message is not None and message.tracestate == "vendor=abc,other=1"
    back = tracing.parent_from_proto(message)
    assert back is not None
    again = tracer.start_span("child", context=back)
    assert again.parent is not None
    assert again.parent.span_id == span.get_span_context().span_id
    assert again.get_span_context().trace_id == int(TRACEPARENT.split("-")[1], 16)


def test_a_stored_context_names_its_trace_id() -> None:
    assert tracing.trace_id_of(f"{TRACEPARENT} vendor=abc") == TRACEPARENT.split("-")[1]
    assert tracing.trace_id_of(TRACEPARENT) == TRACEPARENT.split("-")[1]
    for nothing in (None, "", "not a traceparent", "00-" + "0" * 32 + "-" + "1" * 16 + "-01"):
        assert tracing.trace_id_of(nothing) == ""


@pytest.mark.parametrize(
    ("traceparent", "tracestate"),
    [
        ("", ""),
        ("garbage", ""),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", ""),  # zero trace id
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", ""),  # zero span id
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", ""),
    ],
)
def test_a_context_that_does_not_parse_is_ignored(traceparent: str, tracestate: str) -> None:
    assert tracing.parent_from(traceparent, tracestate) is None
    assert tracing.parent_from_metadata((("traceparent", traceparent),)) is None


def test_an_oversized_tracestate_is_dropped_and_the_traceparent_kept() -> None:
    parent = tracing.parent_from(TRACEPARENT, "k=" + "v" * 600)
    assert parent is not None
    span = NonRecordingSpan(
        TracerProvider().get_tracer("t").start_span("x", context=parent).get_span_context()
    )
    assert "tracestate" not in tracing.headers(span)


def _assignment(traceparent: str | None) -> agent_pb2.Assignment:
    assignment = agent_pb2.Assignment(task_id="t_1", attempt=2, kind="echo")
    if traceparent is not None:
        assignment.trace_context.CopyFrom(common_pb2.TraceContext(traceparent=traceparent))
    return assignment


def test_an_untraced_agent_passes_the_assignments_context_to_the_result() -> None:
    """No provider in this process: the run span is a no-op carrying its parent, so the
    server's Result span still joins the trace."""
    result = agent_pb2.Result(task_id="t_1", attempt=2, outcome=agent_pb2.OUTCOME_SUCCEEDED)
    with agent_tracing.executing(_assignment(TRACEPARENT)) as span:
        agent_tracing.finished(span, result)
    assert result.trace_context.traceparent == TRACEPARENT


def test_an_assignment_without_context_gives_a_result_without_one() -> None:
    for assignment in (_assignment(None), _assignment("not a traceparent")):
        result = agent_pb2.Result(task_id="t_1", attempt=2, outcome=agent_pb2.OUTCOME_SUCCEEDED)
        with agent_tracing.executing(assignment) as span:
            agent_tracing.finished(span, result)
        assert not result.HasField("trace_context")


def _claimed(trace_context: str | None) -> Claimed:
    return Claimed(
        task_id="t_1",
        attempt=1,
        kind="echo",
        payload=b"{}",
        pool="default",
        owner="acme",
        priority=0,
        queued_at=datetime.now(UTC),
        start_to_close_timeout=None,
        deadline=None,
        model=None,
        reserve_micros=0,
        max_cost_micros=None,
        output_schema=None,
        waiting_reason="",
        signature=None,
        trace_context=trace_context,
    )


def test_an_untraced_server_hands_the_stored_context_on_in_the_assignment() -> None:
    stored = f"{TRACEPARENT} vendor=abc"
    carried = server_tracing.dispatched(_claimed(stored), "agent-1")
    assert carried == common_pb2.TraceContext(traceparent=TRACEPARENT, tracestate="vendor=abc")
    assert server_tracing.dispatched(_claimed(None), "agent-1") is None
    assert server_tracing.dispatched(_claimed("garbage"), "agent-1") is None


def test_span_context_helpers_refuse_invalid_spans() -> None:
    invalid = NonRecordingSpan(SpanContext(0, 0, False, TraceFlags(0), TraceState()))
    assert tracing.headers(invalid) == {}
    assert tracing.to_proto(invalid) is None
    assert tracing.to_stored(invalid) is None
