"""Batched stream messages (agent.proto: AgentBatch, ServerBatch) and the bounded outbox.

An agent written from agent.proto as it was before batches (compiled here from a frozen
copy, tests/server/legacy/) sends one message per event and never receives a batch, while
a batching agent runs tasks beside it on the same server. A batch's items are processed in
order, exactly as if sent one by one; a bad item refuses the whole batch with
INVALID_ARGUMENT; an agent that stops reading its stream is closed with
RESOURCE_EXHAUSTED and its attempt is requeued.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_tools import protoc

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.agent.config import AgentConfig
from muster.agent.daemon import Agent
from muster.agent.executors import ExecutorRegistry
from muster.agent.executors.builtin import EchoExecutor
from muster.server.app import ServerHandle
from muster.server.dispatch import session as session_module
from muster.v1 import agent_pb2, common_pb2
from tests.agentsim import Enrolled, Enroller, SimAgent

pytestmark = pytest.mark.slow

LEGACY_DIR = Path(__file__).parent / "legacy"
CONNECT = "/muster.v1.AgentService/Connect"
ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def legacy() -> ModuleType:
    """agent_before_batches_pb2: the messages an old agent was compiled with."""
    out = Path(tempfile.mkdtemp(prefix="legacy-proto-"))
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{LEGACY_DIR}",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={out}",
            str(LEGACY_DIR / "agent_before_batches.proto"),
        ]
    )
    assert code == 0, "the frozen agent.proto no longer compiles"
    spec = importlib.util.spec_from_file_location(
        "agent_before_batches_pb2", out / "agent_before_batches_pb2.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OldAgent:
    """A no-op agent from the pre-batch agent.proto: one message per event, in and out.

    Every message it receives must parse into one of the bodies it knows; a batch (an
    unknown field to it) would leave the oneof empty and is recorded in ``unknown``."""

    def __init__(self, enrolled: Enrolled, max_concurrency: int = 2) -> None:
        self.pb = legacy()
        self.channel = grpc.aio.secure_channel(enrolled.endpoint, enrolled.credentials())
        self.call: Any = self.channel.stream_stream(
            CONNECT,
            request_serializer=self.pb.AgentMessage.SerializeToString,
            response_deserializer=self.pb.ServerMessage.FromString,
        )()
        self.max_concurrency = max_concurrency
        self.received: list[str] = []
        self.unknown = 0
        self.done: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._beats: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()  # grpc.aio takes one write at a time

    async def write(self, message: Any) -> None:
        async with self._writing:
            await self.call.write(message)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.write(self.pb.AgentMessage(heartbeat=self.pb.Heartbeat()))

    async def start(self) -> None:
        pb = self.pb
        await self.call.write(
            pb.AgentMessage(
                hello=pb.Hello(
                    agent_version="old", capabilities=["echo"], max_concurrency=self.max_concurrency
                )
            )
        )
        first = await self.call.read()
        assert first.WhichOneof("body") == "welcome"
        self._task = asyncio.create_task(self._run())
        self._beats = asyncio.create_task(self._heartbeats())

    async def _run(self) -> None:
        pb = self.pb
        while (message := await self.call.read()) is not grpc.aio.EOF:
            body = message.WhichOneof("body")
            self.received.append(str(body))
            if body is None:
                self.unknown += 1
            elif body == "assignment":
                a = message.assignment
                await self.write(
                    pb.AgentMessage(accepted=pb.Accepted(task_id=a.task_id, attempt=a.attempt))
                )
                await self.write(
                    pb.AgentMessage(
                        result=pb.Result(
                            task_id=a.task_id,
                            attempt=a.attempt,
                            outcome=pb.OUTCOME_SUCCEEDED,
                            output=a.payload,
                        )
                    )
                )
                await self.write(pb.AgentMessage(credit=pb.Credit(credits=1)))
            elif body == "ack":
                self.done.append(message.ack.task_id)

    async def close(self) -> None:
        for task in (self._task, self._beats):
            if task is not None:
                task.cancel()
        self.call.cancel()
        await self.channel.close()


class BatchingAgent:
    """A no-op agent that asks for ServerBatch and answers each run of Assignments with
    one AgentBatch (Accepted, Result, Credit per attempt)."""

    def __init__(self, enrolled: Enrolled, max_concurrency: int = 8) -> None:
        self.agent = SimAgent.of(enrolled)
        self.max_concurrency = max_concurrency
        self.batches_received = 0
        self.done: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> agent_pb2.Welcome:
        welcome = await hello(self.agent, max_concurrency=self.max_concurrency, batches=True)
        self._task = asyncio.create_task(self._run())
        self.agent.keep_alive()
        return welcome

    async def _run(self) -> None:
        while True:
            message = await self.agent.receive(timeout=60)
            items = [message]
            if message.WhichOneof("body") == "batch":
                self.batches_received += 1
                items = list(message.batch.messages)
            out: list[agent_pb2.AgentMessage] = []
            for item in items:
                if item.WhichOneof("body") == "assignment":
                    a = item.assignment
                    out += answer(a)
                elif item.WhichOneof("body") == "ack":
                    self.done.append(item.ack.task_id)
            if out:
                self.agent.send(batch=agent_pb2.AgentBatch(messages=out))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.agent.close()


def answer(a: agent_pb2.Assignment) -> list[agent_pb2.AgentMessage]:
    return [
        agent_pb2.AgentMessage(accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=a.attempt)),
        agent_pb2.AgentMessage(
            result=agent_pb2.Result(
                task_id=a.task_id,
                attempt=a.attempt,
                outcome=agent_pb2.OUTCOME_SUCCEEDED,
                output=a.payload,
            )
        ),
        agent_pb2.AgentMessage(credit=agent_pb2.Credit(credits=1)),
    ]


async def hello(
    agent: SimAgent, *, max_concurrency: int = 1, batches: bool = True
) -> agent_pb2.Welcome:
    agent.send(
        hello=agent_pb2.Hello(
            agent_version="test",
            capabilities=["echo"],
            max_concurrency=max_concurrency,
            batches=batches,
        )
    )
    message = await agent.receive()
    assert message.WhichOneof("body") == "welcome", message
    return message.welcome


async def flat(agent: SimAgent, count: int, timeout: float = 10.0) -> list[agent_pb2.ServerMessage]:
    """The next ``count`` server messages, batches unpacked."""
    out: list[agent_pb2.ServerMessage] = []
    while len(out) < count:
        message = await agent.receive(timeout)
        if message.WhichOneof("body") == "batch":
            out += message.batch.messages
        else:
            out.append(message)
    return out


async def assigned(agent: SimAgent, count: int) -> list[agent_pb2.Assignment]:
    messages = await flat(agent, count)
    assert [m.WhichOneof("body") for m in messages] == ["assignment"] * count, messages
    return [m.assignment for m in messages]


def result(a: agent_pb2.Assignment, **kw: Any) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        result=agent_pb2.Result(
            task_id=a.task_id, attempt=a.attempt, outcome=agent_pb2.OUTCOME_SUCCEEDED, **kw
        )
    )


def excess_credit(server: ServerHandle) -> float:
    value = server.registry.get_sample_value(
        "muster_suspicious_events_total", {"kind": "excess_credit"}
    )
    return value or 0.0


async def test_an_old_one_message_agent_works_beside_a_batching_agent(
    enroller: Enroller, client: AsyncClient
) -> None:
    old = OldAgent(await enroller.enroll("old"), max_concurrency=2)
    await old.start()
    first = [(await client.submit("echo", {"n": i})).task_id for i in range(6)]
    async with asyncio.timeout(20):
        while len(old.done) < 6:
            await asyncio.sleep(0.02)
    # Queued before the batching agent connects: its first claim takes 8 at once, and
    # the 8 Assignments leave in one ServerBatch.
    rest = await asyncio.gather(*(client.submit("echo", {"n": i}) for i in range(6, 120)))
    new = BatchingAgent(await enroller.enroll("new"), max_concurrency=8)
    welcome = await new.start()
    assert welcome.batches  # the server reads AgentBatch
    tasks = first + [task.task_id for task in rest]
    for task_id in tasks:
        done = await client.wait(task_id, timeout=30)
        assert done.state is TaskState.SUCCEEDED, done
    assert {done.output_json()["n"] for done in [await client.get(t) for t in tasks]} == set(
        range(120)
    )
    assert set(old.done) | set(new.done) == set(tasks)
    assert new.done and len(old.done) >= 6
    # The old agent only ever got messages its .proto knows, one event each.
    assert old.unknown == 0 and "None" not in old.received
    assert set(old.received) <= {"assignment", "ack", "cancel", "drain", "renew", "trust_bundle"}
    # The batching agent was sent batches (several Assignments or Acks in one message).
    assert new.batches_received > 0
    await old.close()
    await new.close()


async def test_batch_items_are_processed_in_order(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("order"))
    await hello(agent, max_concurrency=1)
    ids = [(await client.submit("echo", {"n": i})).task_id for i in range(3)]
    (a1,) = await assigned(agent, 1)
    before = excess_credit(server)
    # Result then Credit: the Credit sees the slot the Result freed, and the next task comes.
    agent.send(
        batch=agent_pb2.AgentBatch(
            messages=[result(a1), agent_pb2.AgentMessage(credit=agent_pb2.Credit(credits=1))]
        )
    )
    ack, next_assignment = await flat(agent, 2)
    assert ack.ack.task_id == a1.task_id and ack.ack.status == agent_pb2.ACK_STATUS_RECORDED
    a2 = next_assignment.assignment
    assert excess_credit(server) == before
    # Credit then Result: the Credit came while the slot was still taken (capped, flagged).
    agent.send(
        batch=agent_pb2.AgentBatch(
            messages=[agent_pb2.AgentMessage(credit=agent_pb2.Credit(credits=1)), result(a2)]
        )
    )
    (ack2,) = await flat(agent, 1)
    assert ack2.ack.task_id == a2.task_id
    assert excess_credit(server) == before + 1
    with pytest.raises(TimeoutError):  # no credit left: the third task is not pushed
        await agent.receive(timeout=0.5)
    # Several Results in one batch are Acked in their order.
    agent.send(credit=agent_pb2.Credit(credits=1))
    (a3,) = await assigned(agent, 1)
    agent.send(batch=agent_pb2.AgentBatch(messages=[result(a3), result(a1), result(a2)]))
    acks = [m.ack for m in await flat(agent, 3)]
    assert [(a.task_id, a.status) for a in acks] == [
        (a3.task_id, agent_pb2.ACK_STATUS_RECORDED),
        (a1.task_id, agent_pb2.ACK_STATUS_DUPLICATE),
        (a2.task_id, agent_pb2.ACK_STATUS_DUPLICATE),
    ]
    assert sorted([a1.task_id, a2.task_id, a3.task_id]) == sorted(ids)
    # The same Result twice in one batch: recorded once, then a duplicate, as if alone.
    fourth = await client.submit("echo", b"4")
    agent.send(credit=agent_pb2.Credit(credits=1))
    (a4,) = await assigned(agent, 1)
    assert a4.task_id == fourth.task_id
    agent.send(batch=agent_pb2.AgentBatch(messages=[result(a4), result(a4, output=b"again")]))
    assert [m.ack.status for m in await flat(agent, 2)] == [
        agent_pb2.ACK_STATUS_RECORDED,
        agent_pb2.ACK_STATUS_DUPLICATE,
    ]
    assert (await client.get(a4.task_id)).output == b""
    await agent.close()


async def test_a_batch_may_mix_every_kind_of_agent_message(
    enroller: Enroller, client: AsyncClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("mixed"))
    await hello(agent, max_concurrency=2)
    ids = [(await client.submit("echo", {"n": i})).task_id for i in range(3)]
    a1, a2 = await assigned(agent, 2)
    ref = common_pb2.AttemptRef(task_id=a1.task_id, attempt=a1.attempt)
    agent.send(
        batch=agent_pb2.AgentBatch(
            messages=[
                agent_pb2.AgentMessage(accepted=agent_pb2.Accepted(task_id=a1.task_id, attempt=1)),
                agent_pb2.AgentMessage(accepted=agent_pb2.Accepted(task_id=a2.task_id, attempt=1)),
                agent_pb2.AgentMessage(
                    progress=agent_pb2.Progress(
                        task_id=a1.task_id, attempt=1, message="half", percent=50
                    )
                ),
                agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(in_flight=[ref])),
                result(a1, output=a1.payload),
                agent_pb2.AgentMessage(credit=agent_pb2.Credit(credits=1)),
            ]
        )
    )
    ack, third = await flat(agent, 2)
    assert ack.ack.task_id == a1.task_id
    assert (await client.get(a2.task_id)).state is TaskState.RUNNING
    agent.send(
        batch=agent_pb2.AgentBatch(
            messages=[
                result(a2, output=a2.payload),
                agent_pb2.AgentMessage(
                    accepted=agent_pb2.Accepted(task_id=third.assignment.task_id, attempt=1)
                ),
                result(third.assignment, output=third.assignment.payload),
                agent_pb2.AgentMessage(draining=agent_pb2.Draining(reason="done")),
            ]
        )
    )
    await flat(agent, 2)
    for task_id in ids:
        assert (await client.wait(task_id, timeout=10)).state is TaskState.SUCCEEDED
    await agent.close()


BAD_BATCHES = {
    "empty batch": ([], "AgentBatch must hold 1 to 1000 messages, not 0"),
    "too long": ([agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat())] * 1001, "not 1001"),
    "negative credit": (
        [agent_pb2.AgentMessage(credit=agent_pb2.Credit(credits=-1))],
        "AgentBatch item 1: Credit.credits must not be negative",
    ),
    "result without outcome": (
        [agent_pb2.AgentMessage(result=agent_pb2.Result(task_id="t", attempt=1))],
        "AgentBatch item 1: Result.outcome must be",
    ),
    "hello": (
        [agent_pb2.AgentMessage(hello=agent_pb2.Hello())],
        "AgentBatch item 1: Hello may only be the first message",
    ),
    "empty item": ([agent_pb2.AgentMessage()], "AgentBatch item 1: empty or unknown"),
    "nested": (
        [agent_pb2.AgentMessage(batch=agent_pb2.AgentBatch())],
        "AgentBatch item 1: batches do not nest",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
async def test_a_bad_item_refuses_the_whole_batch(
    case: str, enroller: Enroller, client: AsyncClient
) -> None:
    bad, expected = BAD_BATCHES[case]
    agent = SimAgent.of(await enroller.enroll(f"bad-{case.replace(' ', '-')}"))
    await hello(agent, max_concurrency=1)
    task = await client.submit("echo", b"x")
    (a,) = await assigned(agent, 1)
    # The valid Result in front of the bad item is not recorded either: nothing of a
    # refused batch is processed.
    items = bad if case in ("empty batch", "too long") else [result(a), *bad]
    agent.send(batch=agent_pb2.AgentBatch(messages=items))
    assert await asyncio.wait_for(agent.status(), 10) == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (await agent.call.details())
    requeued = await client.get(task.task_id)
    assert requeued.state is TaskState.QUEUED and requeued.attempt == 2, requeued
    await agent.close()


@pytest.fixture
def small_outbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """An outbox of max_concurrency + 4 messages, so a test fills it quickly."""
    monkeypatch.setattr(session_module, "OUTBOX_SLACK", 4)
    yield 4


async def test_an_agent_that_stops_reading_is_closed_and_its_attempt_requeued(
    small_outbox: int, enroller: Enroller, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("deaf")
    # A small receive window, so the server's writes block soon once the agent stops reading.
    channel = grpc.aio.secure_channel(
        enrolled.endpoint,
        enrolled.credentials(),
        options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)],
    )
    call: Any = channel.stream_stream(
        CONNECT,
        request_serializer=agent_pb2.AgentMessage.SerializeToString,
        response_deserializer=agent_pb2.ServerMessage.FromString,
    )()
    await call.write(
        agent_pb2.AgentMessage(
            hello=agent_pb2.Hello(agent_version="deaf", capabilities=["echo"], max_concurrency=2)
        )
    )
    assert (await call.read()).WhichOneof("body") == "welcome"
    # From here on the agent never reads. It learns its tasks from the submitter: it keeps
    # the first one running, and finishes each later one as soon as it is assigned and
    # grants the slot back, so the server keeps writing Assignments (16 KiB payloads) and
    # Acks that nobody reads.
    payload = b"x" * (16 * 1024)
    long = (await client.submit("echo", payload)).task_id

    async def cut() -> bool:
        """The stream was cut: the attempt it kept running was requeued as attempt 2. (A
        client that does not read cannot see the status, which waits behind the data.)"""
        task = await client.get(long)
        return task.attempt == 2

    submitted = []
    async with asyncio.timeout(60):
        while (await client.get(long)).state is TaskState.QUEUED:
            await asyncio.sleep(0.01)
        while not await cut():
            submitted.append(task_id := (await client.submit("echo", payload)).task_id)
            while (task := await client.get(task_id)).state is TaskState.QUEUED:
                if await cut():
                    break
                await asyncio.sleep(0.01)
            else:
                await call.write(
                    agent_pb2.AgentMessage(
                        result=agent_pb2.Result(
                            task_id=task_id,
                            attempt=task.attempt,
                            outcome=agent_pb2.OUTCOME_SUCCEEDED,
                        )
                    )
                )
                await call.write(agent_pb2.AgentMessage(credit=agent_pb2.Credit(credits=1)))
    # The bound (max_concurrency 2 + 4 messages waiting) cut it within a few rounds.
    assert len(submitted) < 50
    # Reading at last, the agent finds what was written, then the status.
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await call.read() is not grpc.aio.EOF:
            pass
    assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "not reading its stream" in await call.details()
    # What it held when it was cut went back to the queue as attempt + 1.
    task = await client.get(long)
    assert (task.state, task.attempt) == (TaskState.QUEUED, 2)
    # The others were recorded, requeued, or (the last) never assigned.
    ends = {(TaskState.SUCCEEDED, 1), (TaskState.QUEUED, 2), (TaskState.QUEUED, 1)}
    for task_id in submitted:
        task = await client.get(task_id)
        assert (task.state, task.attempt) in ends
    await channel.close()


async def test_the_agent_daemon_batches_with_the_real_server(
    tmp_path: Path,
    server: ServerHandle,
    admin: AsyncAdminClient,
    client: AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``muster agent`` asks for ServerBatch, sends AgentBatches once Welcome allows, and
    its tasks finish as before."""
    batches = 0
    run_of = session_module._result_run

    def counted(*args: Any) -> list[agent_pb2.Result]:
        nonlocal batches
        batches += 1  # only called for an AgentBatch
        return run_of(*args)

    monkeypatch.setattr(session_module, "_result_run", counted)
    _, token = await admin.create_bootstrap_token("default")
    config = AgentConfig(
        state_dir=tmp_path / "agent",
        server=server.api_address,
        token=token,
        ca_file=server.config.ca_dir / "bundle.pem",
        name="daemon",
        concurrency=8,
        backoff_initial=0.05,
        backoff_max=0.5,
    )
    agent = Agent(config, registry=ExecutorRegistry([EchoExecutor()]))
    running = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(10):
            await agent.connected.wait()
        assert agent.build_hello().batches
        tasks = await asyncio.gather(*(client.submit("echo", {"n": i}) for i in range(80)))
        for task in tasks:
            done = await client.wait(task.task_id, timeout=30)
            assert done.state is TaskState.SUCCEEDED, done.error
            assert done.output_json() == json.loads(task.payload)
        assert batches > 0
    finally:
        agent.shutdown()
        async with asyncio.timeout(10):
            await running
