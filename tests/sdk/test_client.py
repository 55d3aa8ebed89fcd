"""Client and AsyncClient against scripted servicers over real TLS on loopback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from muster import (
    AsyncClient,
    Client,
    ClientConfig,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    Task,
    TaskState,
    UnavailableError,
    WaitTimeoutError,
)
from muster._wait import MAX_UNAVAILABLE
from muster.v1 import common_pb2, task_pb2
from tests.testca import TestCA

from .fakes import END_STREAM, TOKEN, Failure, State, Step, seed

S = common_pb2.TaskState


@pytest.fixture(autouse=True)
def quick_rewatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reopen ended Watch streams at once instead of after half a second."""
    monkeypatch.setattr("muster._wait.REWATCH_DELAY", 0.01)


def test_bearer_token_is_sent_on_every_call(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        task = client.submit("echo")
        client.get(task.task_id)
        client.list()
    assert len(fake.metadata) == 3
    assert all(md["authorization"] == f"Bearer {TOKEN}" for md in fake.metadata)
    assert all(md["user-agent"].startswith("muster-python/") for md in fake.metadata)


async def test_async_bearer_token_is_sent(config: ClientConfig, fake: State) -> None:
    async with AsyncClient(config) as client:
        await client.submit("echo")
    assert fake.metadata[0]["authorization"] == f"Bearer {TOKEN}"


def test_submit_encodes_payload_and_options(config: ClientConfig, fake: State) -> None:
    deadline = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    with Client(config) as client:
        task = client.submit(
            "render",
            {"frames": [1, 2], "name": "é"},
            pool="gpu",
            selector={"zone": "a"},
            priority=5,
            max_attempts=4,
            idempotency_key="k-1",
            schedule_to_start_timeout=timedelta(minutes=2),
            start_to_close_timeout=90,
            deadline=deadline,
        )
        client.submit("raw", b"\x00\xff")
        client.submit("text", "héllo")
        capped = client.submit(
            "anthropic.messages", "{}", max_cost_usd=0.25, output_schema={"type": "object"}
        )
        client.submit("claude-code", "{}", output_schema='{"type": "string"}')
    sent: task_pb2.SubmitRequest = fake.requests[0]
    assert sent.payload == '{"frames":[1,2],"name":"é"}'.encode()
    assert (sent.pool, dict(sent.selector), sent.priority) == ("gpu", {"zone": "a"}, 5)
    assert (sent.max_attempts, sent.idempotency_key) == (4, "k-1")
    assert sent.schedule_to_start_timeout.ToTimedelta() == timedelta(minutes=2)
    assert sent.start_to_close_timeout.ToTimedelta() == timedelta(seconds=90)
    assert sent.deadline.ToDatetime(tzinfo=UTC) == deadline
    assert fake.requests[1].payload == b"\x00\xff"
    assert fake.requests[2].payload == "héllo".encode()
    assert (fake.requests[3].max_cost_usd, fake.requests[3].output_schema) == (
        0.25,
        '{"type":"object"}',
    )
    assert fake.requests[4].output_schema == '{"type": "string"}'
    assert (capped.max_cost_micros, capped.max_cost_usd) == (250_000, 0.25)
    assert capped.output_schema == '{"type":"object"}'
    assert (task.max_cost_micros, task.max_cost_usd, task.output_schema) == (0, None, "")
    assert task.state is TaskState.QUEUED
    assert task.payload_json() == {"frames": [1, 2], "name": "é"}
    assert task.selector == {"zone": "a"}
    assert task.created_at is not None and task.created_at.tzinfo is not None
    assert task.finished_at is None


def test_defaults_leave_server_defaults_unset(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        client.submit("echo")
    sent: task_pb2.SubmitRequest = fake.requests[0]
    assert sent.pool == "default"
    assert sent.max_attempts == 0
    assert (sent.max_cost_usd, sent.output_schema) == (0.0, "")
    assert not sent.HasField("schedule_to_start_timeout")
    assert not sent.HasField("deadline")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "x", "max_attempts": 0}, "^max_attempts: "),
        ({"kind": "x", "deadline": datetime(2030, 1, 1)}, "^deadline: .*timezone-aware"),
        ({"kind": "x", "start_to_close_timeout": -1}, "^start_to_close_timeout: .*positive"),
        ({"kind": "x", "payload": {"bad": object()}}, "^payload: .*JSON"),
        ({"kind": "x", "max_cost_usd": 0}, "^max_cost_usd: must be at least 0.000001"),
        ({"kind": "x", "max_cost_usd": -2.5}, "^max_cost_usd: must be at least"),
        ({"kind": "x", "max_cost_usd": float("inf")}, "^max_cost_usd: must be a finite"),
        ({"kind": "x", "output_schema": {"bad": object()}}, "^output_schema: .*JSON"),
    ],
)
def test_invalid_submit_fails_before_sending(
    config: ClientConfig, fake: State, kwargs: dict[str, object], message: str
) -> None:
    with Client(config) as client, pytest.raises(InvalidArgumentError, match=message):
        client.submit(**kwargs)  # type: ignore[arg-type]
    assert fake.requests == []


def test_get_and_not_found(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        task = client.submit("echo", "x")
        assert client.get(task.task_id) == task
        with pytest.raises(NotFoundError, match="task missing not found") as info:
            client.get("missing")
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert info.value.__cause__.code() is grpc.StatusCode.NOT_FOUND


def test_list_follows_page_tokens_up_to_the_limit(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        ids = [client.submit("echo", str(i)).task_id for i in range(7)]
        fake.requests.clear()
        assert [t.task_id for t in client.list(limit=5)] == ids[::-1][:5]
        assert [r.page_size for r in fake.requests] == [5]
        fake.requests.clear()
        everything = client.list(limit=None)
    assert [t.task_id for t in everything] == ids[::-1]
    assert [r.page_size for r in fake.requests] == [500]


def test_list_pages_when_the_server_returns_short_pages(config: ClientConfig, fake: State) -> None:
    ids = seed(fake, 1200)
    with Client(config) as client:
        tasks = client.list(limit=1100)
    assert [t.task_id for t in tasks] == ids[::-1][:1100]
    assert [(r.page_size, r.page_token) for r in fake.requests] == [
        (500, ""),
        (500, "500"),
        (100, "1000"),
    ]


def test_list_filters(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        client.submit("echo", pool="a")
        other = client.submit("sleep", pool="b")
        client.cancel(other.task_id)
        fake.requests.clear()
        found = client.list(states=[TaskState.CANCELLED, "failed"], pool="b", kind="sleep")
    assert [t.task_id for t in found] == [other.task_id]
    sent: task_pb2.ListTasksRequest = fake.requests[0]
    assert list(sent.states) == [S.TASK_STATE_CANCELLED, S.TASK_STATE_FAILED]
    assert (sent.pool, sent.kind) == ("b", "sleep")


def test_list_rejects_unknown_states_and_bad_limits(config: ClientConfig) -> None:
    with Client(config) as client:
        with pytest.raises(InvalidArgumentError, match=r"^states: unknown task state"):
            client.list(states=["sleeping"])
        with pytest.raises(InvalidArgumentError, match=r"^limit: "):
            client.list(limit=0)


def test_cancel(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        task = client.submit("sleep")
        cancelled = client.cancel(task.task_id, reason="not needed")
    assert cancelled.state is TaskState.CANCELLED
    assert cancelled.error == "not needed"
    assert cancelled.is_terminal


def test_watch_yields_each_change_until_terminal(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        task = client.submit("echo", '{"msg":"hi"}')
        states = [t.state for t in client.watch(task.task_id)]
        final = client.get(task.task_id)
    assert states == [TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED]
    assert final.output_json() == {"msg": "hi"}
    assert final.agent_id == "agent-1"


def test_wait_returns_the_terminal_task_whatever_its_outcome(
    config: ClientConfig, fake: State
) -> None:
    with Client(config) as client:
        task = client.submit("build")
        fake.scripts[task.task_id] = [
            Step(S.TASK_STATE_RUNNING),
            Step(S.TASK_STATE_FAILED, error="exit 3"),
        ]
        final = client.wait(task.task_id, timeout=5)
    assert final.state is TaskState.FAILED
    assert final.error == "exit 3"


def test_wait_reopens_a_watch_that_ended_early(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        task = client.submit("build")
        fake.scripts[task.task_id] = [
            Step(S.TASK_STATE_RUNNING),
            END_STREAM,
            Step(S.TASK_STATE_SUCCEEDED, output=b"done"),
        ]
        final = client.wait(task.task_id, timeout=5)
    assert final.output_text == "done"
    assert fake.watch_calls == 2


def test_wait_rides_out_a_few_unavailable_streams(config: ClientConfig, fake: State) -> None:
    unavailable = Failure(grpc.StatusCode.UNAVAILABLE, "draining")
    with Client(config) as client:
        task = client.submit("echo", "ok")
        fake.watch_failures = [unavailable] * MAX_UNAVAILABLE
        assert client.wait(task.task_id, timeout=5).output_text == "ok"
        assert fake.watch_calls == MAX_UNAVAILABLE + 1

        again = client.submit("echo", "never")
        fake.watch_failures = [unavailable] * (MAX_UNAVAILABLE + 1)
        with pytest.raises(UnavailableError, match="draining") as info:
            client.wait(again.task_id, timeout=5)
    assert info.value.__cause__.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]


async def test_async_wait_rides_out_unavailable(config: ClientConfig, fake: State) -> None:
    unavailable = Failure(grpc.StatusCode.UNAVAILABLE, "draining")
    async with AsyncClient(config) as client:
        task = await client.submit("echo", "ok")
        fake.watch_failures = [unavailable] * 2
        assert (await client.wait(task.task_id)).output_text == "ok"
        fake.watch_failures = [Failure(grpc.StatusCode.PERMISSION_DENIED, "revoked")]
        with pytest.raises(PermissionDeniedError):
            await client.wait(task.task_id)
    assert fake.watch_calls == 4


def test_wait_times_out_with_the_last_state(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        task = client.submit("build")
        fake.scripts[task.task_id] = [Step(S.TASK_STATE_RUNNING)]
        with pytest.raises(WaitTimeoutError) as info:
            client.wait(task.task_id, timeout=0.3)
    err = info.value
    assert isinstance(err, TimeoutError)
    assert err.task is not None and err.task.state is TaskState.RUNNING
    assert task.task_id in str(err)
    assert isinstance(err.__cause__, grpc.RpcError)
    assert err.__cause__.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_watch_of_a_missing_task_raises_not_found(config: ClientConfig) -> None:
    with Client(config) as client, pytest.raises(NotFoundError):
        list(client.watch("nope"))


async def test_async_submit_get_list_cancel(config: ClientConfig, fake: State) -> None:
    async with AsyncClient(config) as client:
        first = await client.submit("echo", {"a": 1}, pool="p")
        second = await client.submit("sleep", "x")
        assert (await client.get(first.task_id)).payload == b'{"a":1}'
        listed = await client.list(limit=None)
        assert [t.task_id for t in listed] == [second.task_id, first.task_id]
        cancelled = await client.cancel(second.task_id, reason="stop")
        assert cancelled.state is TaskState.CANCELLED
        with pytest.raises(NotFoundError):
            await client.get("missing")


async def test_async_list_pages(config: ClientConfig, fake: State) -> None:
    seed(fake, 600)
    async with AsyncClient(config) as client:
        tasks = await client.list(limit=550)
    assert len(tasks) == 550
    assert [(r.page_size, r.page_token) for r in fake.requests] == [(500, ""), (50, "500")]


async def test_async_watch_and_wait(config: ClientConfig, fake: State) -> None:
    async with AsyncClient(config) as client:
        task = await client.submit("echo", "payload")
        seen = [t.state async for t in client.watch(task.task_id)]
        assert seen == [TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED]
        again = await client.submit("build")
        fake.scripts[again.task_id] = [
            END_STREAM,
            Step(S.TASK_STATE_TIMED_OUT, error="deadline passed"),
        ]
        final = await client.wait(again.task_id, timeout=5)
    assert final.state is TaskState.TIMED_OUT
    assert fake.watch_calls == 3


async def test_async_wait_timeout(config: ClientConfig, fake: State) -> None:
    async with AsyncClient(config) as client:
        task = await client.submit("build")
        with pytest.raises(WaitTimeoutError) as info:
            await client.wait(task.task_id, timeout=0.3)
    assert info.value.task is not None
    assert info.value.task.state is TaskState.QUEUED


async def test_async_watch_can_be_abandoned(config: ClientConfig, fake: State) -> None:
    async with AsyncClient(config) as client:
        task = await client.submit("build")  # no script: the stream would stay open
        watcher = client.watch(task.task_id)
        first = await anext(watcher)
        await watcher.aclose()
    assert first.state is TaskState.QUEUED


def test_a_foreign_ca_is_unavailable(address: str, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pem"
    foreign.write_bytes(TestCA.new("other.test").bundle_pem)
    config = ClientConfig(address=address, token=TOKEN, ca_file=foreign, timeout=2)
    with Client(config) as client, pytest.raises(UnavailableError) as info:
        client.get("t-0001")
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert info.value.__cause__.code() is grpc.StatusCode.UNAVAILABLE


def test_the_server_name_override_is_what_tls_verifies(
    address: str, ca_file: Path, fake: State
) -> None:
    good = ClientConfig(address=address, token=TOKEN, ca_file=ca_file, server_name="localhost")
    with Client(good) as client:
        client.submit("echo")
    bad = ClientConfig(
        address=address, token=TOKEN, ca_file=ca_file, server_name="elsewhere.test", timeout=2
    )
    with Client(bad) as client, pytest.raises(UnavailableError):
        client.submit("echo")


def test_task_output_helpers() -> None:
    task = Task(task_id="t", kind="k", state=TaskState.SUCCEEDED, output=b'{"x": [1]}')
    assert task.output_text == '{"x": [1]}'
    assert task.output_json() == {"x": [1]}
    assert task.succeeded and task.is_terminal
    broken = Task(task_id="t", kind="k", state=TaskState.FAILED, output=b"\xff")
    assert broken.output_text == "\ufffd"
    with pytest.raises(ValueError):
        Task(task_id="t", kind="k", state=TaskState.RUNNING, output=b"nope").output_json()


def test_datetime_fields_are_aware(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        task = client.submit("echo")
        final = client.wait(task.task_id, timeout=5)
    assert final.started_at is not None
    assert final.started_at.utcoffset() == timedelta(0)
    assert final.updated_at is not None and final.updated_at >= final.started_at


def test_sync_watch_can_be_abandoned(config: ClientConfig, fake: State) -> None:
    with Client(config) as client:
        task = client.submit("build")  # no script: the stream would stay open
        watcher = client.watch(task.task_id)
        assert next(watcher).state is TaskState.QUEUED
        watcher.close()
        assert client.get(task.task_id).state is TaskState.QUEUED
