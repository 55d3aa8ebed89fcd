"""Client.submit_many and ``muster submit-many`` against a real server over real TLS: one
outcome per item in order, items the SDK or the server refuse failing alone, chunks of
the per-call maximum, and the CLI as a real process reading a file and stdin."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from muster import (
    AsyncClient,
    Client,
    InvalidArgumentError,
    QuotaExceededError,
    SubmitOutcome,
    TaskSpec,
    TaskState,
)
from muster import _requests as requests
from muster._submit_lines import LineError, parse_line, read_lines
from muster.server.app import ServerHandle
from muster.v1 import task_pb2
from tests.conftest import client_config

pytestmark = pytest.mark.slow


def submit_many_calls(server: ServerHandle) -> float:
    """SubmitMany calls the server has answered (its own gRPC metrics)."""
    value = server.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "unary",
            "grpc_service": "muster.v1.TaskService",
            "grpc_method": "SubmitMany",
            "grpc_code": "OK",
        },
    )
    return value or 0.0


async def test_outcomes_come_back_in_order_and_a_refused_item_fails_alone(
    server: ServerHandle, client: AsyncClient
) -> None:
    outcomes = await client.submit_many(
        [
            TaskSpec("echo", {"n": 0}, priority=3),
            TaskSpec("echo", b"x", max_attempts=0),  # refused by the SDK, never sent
            TaskSpec("echo", "two", idempotency_key="same"),
            TaskSpec("echo", b"x", priority=5000),  # refused by the server
            TaskSpec("echo", "four", idempotency_key="same"),
            TaskSpec("echo", None, schedule_to_start_timeout=timedelta(minutes=5)),
        ]
    )
    assert [o.ok for o in outcomes] == [True, False, True, False, True, True]
    assert isinstance(outcomes[1].error, InvalidArgumentError)
    assert str(outcomes[1].error) == "max_attempts: must be at least 1"
    assert isinstance(outcomes[3].error, InvalidArgumentError)
    assert str(outcomes[3].error).startswith("priority: must be between")
    assert outcomes[1].task is None and outcomes[3].task is None
    tasks = [o.task for o in outcomes if o.task is not None]
    assert tasks[0].payload_json() == {"n": 0} and tasks[0].priority == 3
    assert tasks[1].payload_text == "two"
    # The later item with the same key got the earlier item's task.
    assert tasks[2].task_id == tasks[1].task_id and tasks[2].payload_text == "two"
    assert tasks[3].schedule_to_start_timeout == timedelta(minutes=5)
    assert all(t.submit_warning for t in tasks)  # no agent is enrolled
    assert (await client.get(tasks[0].task_id)).state is TaskState.QUEUED
    assert submit_many_calls(server) == 1


async def test_items_go_in_chunks_of_the_per_call_maximum(
    server: ServerHandle, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(requests, "MAX_SUBMIT_MANY", 3)
    outcomes = await client.submit_many([TaskSpec("echo", str(n)) for n in range(7)])
    assert [o.task.payload_text for o in outcomes if o.task] == [str(n) for n in range(7)]
    assert submit_many_calls(server) == 3
    # And by size: each item alone once two do not fit.
    monkeypatch.setattr(requests, "MAX_SUBMIT_MANY_BYTES", 1500)
    outcomes = await client.submit_many([TaskSpec("echo", b"y" * 1000) for _ in range(2)])
    assert all(o.ok for o in outcomes)
    assert submit_many_calls(server) == 5


async def test_the_blocking_client_submits_many_too(server: ServerHandle) -> None:
    def run() -> list[SubmitOutcome]:
        with Client(client_config(server)) as client:
            return client.submit_many([TaskSpec("echo", "a"), TaskSpec("", "no kind")])

    outcomes = await asyncio.to_thread(run)
    assert outcomes[0].task is not None and outcomes[0].task.payload_text == "a"
    assert isinstance(outcomes[1].error, InvalidArgumentError)
    assert str(outcomes[1].error).startswith("kind: required")


def test_an_item_refused_by_a_rate_limit_keeps_its_retry_delay() -> None:
    result = task_pb2.SubmitManyResult(
        error=task_pb2.ItemError(code=8, message="submissions exceeded for principal:x")
    )
    result.error.retry_after.FromTimedelta(timedelta(seconds=2.5))
    error = requests.submit_outcome(result).error
    assert isinstance(error, QuotaExceededError)
    assert (str(error), error.retry_after) == ("submissions exceeded for principal:x", 2.5)


def test_items_must_be_task_specs() -> None:
    with pytest.raises(TypeError, match="TaskSpec items, not dict"):
        requests.SubmitMany([{"kind": "echo"}])  # type: ignore[list-item]


def test_json_lines_take_the_keys_of_muster_submit() -> None:
    spec = parse_line(
        json.dumps(
            {
                "kind": "echo",
                "payload": {"a": 1},
                "pool": "gpu",
                "labels": ["zone=a", "os=linux"],
                "priority": -2,
                "max-attempts": 4,
                "idempotency_key": "k1",
                "schedule_to_start_timeout": "2m",
                "start_to_close_timeout": 30,
                "max_cost_usd": 0.5,
                "output_schema": {"type": "object"},
            }
        )
    )
    assert spec == TaskSpec(
        "echo",
        b'{"a":1}',
        pool="gpu",
        selector={"zone": "a", "os": "linux"},
        priority=-2,
        max_attempts=4,
        idempotency_key="k1",
        schedule_to_start_timeout=120.0,
        start_to_close_timeout=30.0,
        max_cost_usd=0.5,
        output_schema='{"type":"object"}',
    )
    assert parse_line('{"kind": "echo", "payload": "as is"}').payload == b"as is"
    for line, message in [
        ("{not json", "not JSON"),
        ("[1]", "expected a JSON object"),
        ('{"payload": 1}', "kind: required"),
        ('{"kind": "echo", "colour": 1}', "unknown key 'colour'"),
        ('{"kind": "echo", "labels": {}, "selector": {}}', "'selector' given twice"),
        ('{"kind": "echo", "priority": "high"}', "priority: expected a whole number"),
        ('{"kind": "echo", "max_attempts": 0}', "max_attempts: must be at least 1"),
        ('{"kind": "echo", "start_to_close_timeout": -1}', "start_to_close_timeout: must be"),
        ('{"kind": "echo", "deadline": "soon"}', "deadline: invalid time"),
        ('{"kind": "echo", "selector": ["nokey"]}', "selector: expected"),
    ]:
        with pytest.raises(LineError, match=message):
            parse_line(line)
    lines = list(read_lines([b'{"kind": "echo"}\n', b"   \n", b"\xff\n", b"{}\n"]))
    assert [(line.number, line.spec is not None) for line in lines] == [
        (1, True),
        (3, False),
        (4, False),
    ]
    assert str(lines[1].error) == "not UTF-8 text"


async def run_cli(
    server: ServerHandle, *args: str, stdin: bytes = b""
) -> tuple[int, list[str], str]:
    """``muster submit-many`` as a real process: exit code, stdout lines, stderr."""
    config = server.config
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "muster",
        "submit-many",
        *args,
        "--addr",
        server.api_address,
        "--token-file",
        str(config.admin_token_file),
        "--ca-file",
        str(config.ca_dir / "bundle.pem"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines(), err.decode()


async def test_the_cli_reads_a_file_and_reports_each_line(
    server: ServerHandle, client: AsyncClient, tmp_path: Path
) -> None:
    source = tmp_path / "tasks.jsonl"
    source.write_text(
        '{"kind": "echo", "payload": {"n": 1}, "idempotency_key": "cli-1"}\n'
        "\n"
        "{oops\n"
        '{"kind": "echo", "priority": 5000}\n'
        '{"kind": "echo", "payload": "plain", "max-attempts": 2}\n'
    )
    code, out, err = await run_cli(server, str(source))
    assert code == 1
    assert len(out) == 4
    assert out[1].startswith("error: line 3: not JSON")
    assert out[2].startswith("error: line 4: priority: must be between")
    first, last = await client.get(out[0]), await client.get(out[3])
    assert (first.payload_json(), first.idempotency_key) == ({"n": 1}, "cli-1")
    assert (last.payload_text, last.max_attempts) == ("plain", 2)
    assert "muster: warning: line 1:" in err
    assert err.rstrip().endswith("muster: 2 of 4 tasks were not submitted")
    # The same file again: the keyed line finds its task.
    _, again, _ = await run_cli(server, str(source))
    assert again[0] == out[0] and again[3] != out[3]


async def test_the_cli_reads_stdin_and_prints_json_lines(
    server: ServerHandle, client: AsyncClient
) -> None:
    lines = b"".join(
        json.dumps({"kind": "echo", "payload": f"s{n}", "labels": {"n": str(n)}}).encode() + b"\n"
        for n in range(3)
    )
    code, out, err = await run_cli(server, "--json", stdin=lines)
    assert code == 0, err
    reports = [json.loads(line) for line in out]
    assert [r["line"] for r in reports] == [1, 2, 3]
    for n, report in enumerate(reports):
        task = await client.get(report["task"]["task_id"])
        assert (task.payload_text, dict(task.selector)) == (f"s{n}", {"n": str(n)})
    code, out, _ = await run_cli(
        server, "-", "--json", stdin=b'{"kind": "echo", "priority": 5000}\n{"kind": ""}\n'
    )
    assert code == 1
    assert [json.loads(line)["error"]["type"] for line in out] == [
        "InvalidArgumentError",
        "LineError",
    ]
    code, _, err = await run_cli(server, "/nonexistent/tasks.jsonl")
    assert code == 1 and "cannot read '/nonexistent/tasks.jsonl'" in err


@pytest.mark.parametrize("submit", [Client.submit, AsyncClient.submit])
def test_a_task_spec_takes_exactly_the_arguments_of_submit(submit: object) -> None:
    """So the two cannot drift apart: same names, same order, same defaults."""
    parameters = list(inspect.signature(submit).parameters.values())[1:]  # type: ignore[arg-type]
    fields = dataclasses.fields(TaskSpec)
    assert [f.name for f in fields] == [p.name for p in parameters]
    for f, p in zip(fields, parameters, strict=True):
        expected = dataclasses.MISSING if p.default is inspect.Parameter.empty else p.default
        assert f.default == expected, f.name
