"""SDK value types and the duration parser: pure logic, no server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from muster import AttemptUsage, Role, TaskState, Usage
from muster._convert import task_from_proto
from muster.durations import parse_duration, parse_time
from muster.errors import MusterError
from muster.v1 import admin_pb2, common_pb2


def test_task_state_mirrors_the_proto_without_unspecified() -> None:
    wire = {
        name.removeprefix("TASK_STATE_"): number
        for name, number in common_pb2.TaskState.items()
        if number != common_pb2.TASK_STATE_UNSPECIFIED
    }
    assert {s.name: s.value for s in TaskState} == wire


def test_role_mirrors_the_proto() -> None:
    wire = {
        name.removeprefix("ROLE_"): number
        for name, number in admin_pb2.Role.items()
        if number != admin_pb2.ROLE_UNSPECIFIED
    }
    assert {r.name: r.value for r in Role} == wire


def test_terminal_states() -> None:
    terminal = {s for s in TaskState if s.is_terminal}
    assert terminal == {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.CANCELLED,
        TaskState.TIMED_OUT,
    }


@pytest.mark.parametrize("text", ["running", "RUNNING", "TASK_STATE_RUNNING", " Running "])
def test_task_state_parse(text: str) -> None:
    assert TaskState.parse(text) is TaskState.RUNNING


def test_task_state_parse_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="one of: queued"):
        TaskState.parse("sleeping")


def test_an_unknown_wire_state_is_a_clear_error() -> None:
    with pytest.raises(MusterError, match="upgrade"):
        task_from_proto(common_pb2.Task(task_id="t", state=common_pb2.TASK_STATE_UNSPECIFIED))


def test_task_from_proto_times_and_usage() -> None:
    msg = common_pb2.Task(task_id="t", kind="k", state=common_pb2.TASK_STATE_SUCCEEDED)
    msg.created_at.FromDatetime(datetime(2026, 1, 1, 12, tzinfo=UTC))
    msg.start_to_close_timeout.FromTimedelta(timedelta(seconds=30))
    msg.usage.input_tokens = 10
    task = task_from_proto(msg)
    assert task.created_at == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert task.start_to_close_timeout == timedelta(seconds=30)
    assert task.schedule_to_start_timeout is None
    assert task.started_at is None
    assert task.usage is not None and task.usage.input_tokens == 10


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("1h", 3600),
        ("7d", 7 * 86400),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("250ms", 0.25),
        ("2w", 14 * 86400),
        ("45", 45),
        (" 10M ", 600),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "m", "10x", "1h 30m", "h1", "-5m", "inf", "nan", "10m5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_time() -> None:
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    assert parse_time("-1h", now=now) == datetime(2026, 6, 1, 11, tzinfo=UTC)
    assert parse_time("+30m", now=now) == datetime(2026, 6, 1, 12, 30, tzinfo=UTC)
    assert parse_time("2026-01-02T03:04:05Z") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    offset = parse_time("2026-01-02T03:04:05+02:00")
    assert offset.utcoffset() == timezone(timedelta(hours=2)).utcoffset(None)
    assert parse_time("2026-01-02T03:04:05").tzinfo is not None
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_task_from_proto_ai_fields() -> None:
    msg = common_pb2.Task(
        task_id="t",
        kind="anthropic.messages",
        state=common_pb2.TASK_STATE_QUEUED,
        waiting_reason="waiting for budget tenant:acme: 0.12 of 10.00 USD left, 0.40 needed",
        submitted_by="ci",
        max_cost_micros=2_000_000,
        output_schema='{"type":"object"}',
        usage=common_pb2.Usage(
            input_tokens=100,
            output_tokens=50,
            cost_micros=1_050,
            model="claude-sonnet-4-5",
            cache_creation_input_tokens=20,
            cache_read_input_tokens=30,
            reported_cost_micros=1_100,
            cache_creation_1h_input_tokens=5,
        ),
        attempt_usage=[
            common_pb2.AttemptUsage(
                attempt=1, agent_id="a1", usage=common_pb2.Usage(input_tokens=1, model="m")
            ),
            common_pb2.AttemptUsage(attempt=2, agent_id="a2"),
        ],
    )
    task = task_from_proto(msg)
    assert task.waiting_reason.startswith("waiting for budget tenant:acme")
    assert (task.submitted_by, task.max_cost_micros, task.max_cost_usd) == ("ci", 2_000_000, 2.0)
    assert task.output_schema == '{"type":"object"}'
    assert task.usage == Usage(
        input_tokens=100,
        output_tokens=50,
        cost_micros=1_050,
        model="claude-sonnet-4-5",
        cache_creation_input_tokens=20,
        cache_read_input_tokens=30,
        cache_creation_1h_input_tokens=5,
        reported_cost_micros=1_100,
    )
    assert (task.usage.cost_usd, task.usage.reported_cost_usd) == (0.00105, 0.0011)
    assert task.usage.total_tokens == 200
    assert task.attempt_usage == (
        AttemptUsage(1, "a1", Usage(input_tokens=1, model="m")),
        AttemptUsage(2, "a2", Usage()),
    )
