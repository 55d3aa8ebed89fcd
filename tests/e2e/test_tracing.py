"""A task's trace across real processes: ``muster submit`` (the CLI), ``muster server`` and
``muster agent`` export their spans over OTLP/gRPC to a real receiver in this test (a
``grpc.aio`` server implementing the collector's ``TraceService/Export``, bound to port
0). Each task's spans must form one trace with the right parent links: the CLI's Submit
span, the server's Submit, the queue wait and the dispatch under it, the agent's run
under the dispatch (the AI call inside it for ``anthropic.messages``) and the server's
recording of the Result under the run. The span tree is written to ``trace-tree.txt``
in the test's tmp directory (and to ``$MUSTER_TEST_ARTIFACTS`` when set) and printed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from muster import AsyncAdminClient, AsyncClient
from tests.conftest import FANOUT_SECRET
from tests.e2e import procs
from tests.fakes.anthropic_api import FakeAnthropicAPI

pytestmark = pytest.mark.timeout(120)

log = logging.getLogger(__name__)

KEY = "sk-ant-tracing-" + secrets.token_hex(16)
"""The agent's dummy Anthropic key: it must appear on no span."""
SECRET_WORDS = "payload words no span may carry " + secrets.token_hex(8)
MODEL = "claude-haiku-4-5"
KINDS = {
    0: "SPAN_KIND_UNSPECIFIED",
    1: "INTERNAL",
    2: "SERVER",
    3: "CLIENT",
    4: "PRODUCER",
    5: "CONSUMER",
}


@dataclass
class Span:
    name: str
    service: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    end: int
    attributes: dict[str, Any]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._changed = asyncio.Condition()

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(
                        Span(
                            name=s.name,
                            service=str(resource.get("service.name", "")),
                            kind=KINDS.get(s.kind, str(s.kind)),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            start=s.start_time_unix_nano,
                            end=s.end_time_unix_nano,
                            attributes=_attributes(s.attributes),
                        )
                    )
        async with self._changed:
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def until(self, done: Callable[[list[Span]], bool], timeout: float = 30) -> None:
        """Wait until the spans received satisfy ``done``."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: done(self.spans))


def _attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        which = kv.value.WhichOneof("value")
        value = getattr(kv.value, which) if which else None
        if which == "array_value":
            value = [getattr(v, v.WhichOneof("value")) for v in value.values]
        out[kv.key] = value
    return out


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server()
    collector = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield collector, port
    finally:
        await server.stop(None)


def otel_env(port: int) -> dict[str, str]:
    """What an operator sets to trace to a collector on ``port``."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s rather than 5 s
    }


def backend_env(backend: dict[str, object]) -> dict[str, str]:
    """The ``backend`` fixture's server settings as a process's environment."""
    env = {f"MUSTER_{key.upper()}": str(value) for key, value in backend.items()}
    if "redis_url" in backend:
        env["MUSTER_FANOUT_SECRET"] = FANOUT_SECRET
    return env


def render(spans: list[Span]) -> str:
    """Each trace as an indented tree, children in start order, with durations."""
    by_parent: dict[str, list[Span]] = {}
    ids = {s.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.start):
        by_parent.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    lines: list[str] = []

    def show(span: Span, depth: int) -> None:
        task = span.attributes.get("muster.task.id", "")
        attempt = span.attributes.get("muster.task.attempt")
        what = f" task={task}" + (f"#{attempt}" if attempt else "") if task else ""
        ms = (span.end - span.start) / 1e6
        lines.append(f"{'  ' * depth}{span.name} [{span.service}, {span.kind}] {ms:.1f} ms{what}")
        for child in by_parent.get(span.span_id, []):
            show(child, depth + 1)

    for root in by_parent.get("", []):
        lines.append(f"trace {root.trace_id}")
        show(root, 1)
    return "\n".join(lines) + "\n"


def one(spans: list[Span], name: str, task_id: str | None = None) -> Span:
    found = [
        s
        for s in spans
        if s.name == name and (task_id is None or s.attributes.get("muster.task.id") == task_id)
    ]
    assert len(found) == 1, (name, task_id, [s.name for s in spans])
    return found[0]


def assert_child(child: Span, parent: Span) -> None:
    assert (child.trace_id, child.parent_id) == (parent.trace_id, parent.span_id), (
        f"{child.name} [{child.service}] is not a child of {parent.name} [{parent.service}]"
    )


def check_task_tree(spans: list[Span], task_id: str, submit: Span, kind: str) -> None:
    """The spans of one task under the server's ``submit`` span."""
    wait = one(spans, "queue wait", task_id)
    dispatch = one(spans, "dispatch", task_id)
    run = one(spans, f"execute {kind}", task_id)
    result = one(spans, "record result", task_id)
    for span in (wait, dispatch):
        assert span.service == "muster-server"
        assert_child(span, submit)
    assert wait.end <= dispatch.end
    assert (run.service, run.kind) == ("muster-agent", "CONSUMER")
    assert_child(run, dispatch)
    assert run.attributes["muster.task.outcome"] == "SUCCEEDED"
    assert (result.service, result.kind) == ("muster-server", "CONSUMER")
    assert_child(result, run)
    assert result.attributes["muster.ack.status"] == "RECORDED"


def cli_env(traced: dict[str, str], data: Path, api: str) -> dict[str, str]:
    """The environment of a traced ``muster`` client command, as the first admin."""
    return {
        **traced,
        "MUSTER_ADDR": api,
        "MUSTER_TOKEN_FILE": str(data / "admin.token"),
        "MUSTER_CA_FILE": str(data / "ca" / "bundle.pem"),
    }


async def test_a_task_is_one_trace_from_the_cli_through_server_and_agent(
    backend: dict[str, object], receiver: tuple[Receiver, int], tmp_path: Path
) -> None:
    collector, port = receiver
    traced = procs.env(**otel_env(port))
    data = tmp_path / "server"
    server_env = {
        **traced,
        **backend_env(backend),
        "MUSTER_API_ADDR": "127.0.0.1:0",
        "MUSTER_AGENT_ADDR": "127.0.0.1:0",
        "MUSTER_METRICS_ADDR": "",
        "MUSTER_POLL_INTERVAL": "0.5s",
    }
    server = await procs.spawn(
        "server", "--data-dir", str(data), cwd=tmp_path, log=tmp_path / "server.log",
        environ=server_env,
    )  # fmt: skip
    agent: asyncio.subprocess.Process | None = None
    try:
        async with FakeAnthropicAPI(api_key=KEY, model=MODEL) as api:
            endpoints = await procs.wait_for_file(data / "endpoints.json")
            async with AsyncAdminClient(procs.admin_config(data, endpoints)) as admin:
                agent = await procs.start_agent(
                    admin, data, endpoints,
                    "--executors", "echo,anthropic.messages",
                    "--anthropic-base-url", api.url,
                    name="tracer",
                    cwd=tmp_path,
                    environ={**traced, "ANTHROPIC_API_KEY": KEY},
                )  # fmt: skip
            cli = cli_env(traced, data, endpoints["api"])
            echo_id = await submit(cli, tmp_path, "echo", {"words": SECRET_WORDS})
            ai_payload = {
                "model": MODEL,
                "max_tokens": 200,
                "messages": [{"role": "user", "content": SECRET_WORDS}],
            }
            ai_id = await submit(cli, tmp_path, "anthropic.messages", ai_payload)
            many_ids = await submit_many(cli, tmp_path, 2)
            ids = [echo_id, ai_id, *many_ids]

            def all_recorded(spans: list[Span]) -> bool:
                recorded = {
                    s.attributes.get("muster.task.id") for s in spans if s.name == "record result"
                }
                return recorded >= set(ids)

            await collector.until(all_recorded)
            async with AsyncClient(procs.admin_config(data, endpoints)) as client:
                shown = {task_id: (await client.get(task_id)).trace_id for task_id in ids}
    finally:
        if agent is not None:
            assert await procs.stop(agent) == 0, (tmp_path / "agent.log").read_text()
        assert await procs.stop(server) == 0, (tmp_path / "server.log").read_text()

    spans = list(collector.spans)
    tree = render(spans)
    (tmp_path / "trace-tree.txt").write_text(tree)
    if artifacts := os.environ.get("MUSTER_TEST_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        (Path(artifacts) / "trace-tree.txt").write_text(tree)
    log.info("span tree (%s):\n%s", tmp_path / "trace-tree.txt", tree)
    print(f"\nspan tree ({tmp_path / 'trace-tree.txt'}):\n{tree}")

    # Each task names its trace: the id a tracing backend finds its spans by.
    for task_id in ids:
        assert shown[task_id] == one(spans, "queue wait", task_id).trace_id

    # muster submit: the CLI's CLIENT span is the root; the server's Submit its child.
    for task_id, kind in ((echo_id, "echo"), (ai_id, "anthropic.messages")):
        submit_span = one(spans, "muster.v1.TaskService/Submit", task_id)
        assert (submit_span.service, submit_span.kind) == ("muster-server", "SERVER")
        cli_spans = [
            s
            for s in spans
            if s.span_id == submit_span.parent_id and s.trace_id == submit_span.trace_id
        ]
        assert len(cli_spans) == 1, "the server's Submit span has no parent from the CLI"
        cli_span = cli_spans[0]
        assert (cli_span.service, cli_span.kind, cli_span.parent_id) == (
            "muster-cli",
            "CLIENT",
            "",
        )
        assert cli_span.attributes["rpc.method"] == "Submit"
        check_task_tree(spans, task_id, submit_span, kind)
        trace = {s.trace_id for s in spans if s.attributes.get("muster.task.id") == task_id}
        assert trace == {cli_span.trace_id}
    # The AI call is inside the agent's run of the AI task, with counts but no content.
    chat = one(spans, f"chat {MODEL}")
    assert (chat.service, chat.kind) == ("muster-agent", "CLIENT")
    assert_child(chat, one(spans, "execute anthropic.messages", ai_id))
    assert chat.attributes["gen_ai.request.model"] == MODEL
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0

    # muster submit-many: both tasks hang off the one SubmitMany call's span.
    (many,) = [
        s
        for s in spans
        if s.name == "muster.v1.TaskService/SubmitMany" and s.service == "muster-server"
    ]
    assert many.attributes["muster.submit_many.items"] == 2
    cli_many = next(s for s in spans if s.span_id == many.parent_id)
    assert (cli_many.service, cli_many.kind) == ("muster-cli", "CLIENT")
    for task_id in many_ids:
        check_task_tree(spans, task_id, many, "echo")

    # Nothing secret or task-borne leaves the processes on a span.
    shown = json.dumps([s.attributes for s in spans], default=str)
    assert KEY not in shown
    assert SECRET_WORDS not in shown
    assert "Bearer" not in shown


async def submit(cli: dict[str, str], tmp: Path, kind: str, payload: object) -> str:
    code, out, err = await procs.run(
        "submit", kind, "--payload", json.dumps(payload), "--wait", "--json", "--timeout", "30",
        cwd=tmp, environ=cli,
    )  # fmt: skip
    assert code == 0, err
    task = json.loads(out)
    assert task["state"] == "SUCCEEDED", task
    return str(task["task_id"])


async def submit_many(cli: dict[str, str], tmp: Path, count: int) -> list[str]:
    lines = "".join(
        json.dumps({"kind": "echo", "payload": {"n": n, "words": SECRET_WORDS}}) + "\n"
        for n in range(count)
    )
    source = tmp / "many.jsonl"
    source.write_text(lines)
    code, out, err = await procs.run("submit-many", str(source), cwd=tmp, environ=cli)
    assert code == 0, err
    return out.split()
