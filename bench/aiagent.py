"""Simulated agents that run AI tasks against the fake Anthropic Messages API, for the ``ai``
scenario: the real protocol over real mTLS, many agents per process.

Like :class:`bench.simagent.SimAgent`, each agent enrolls through the real service and keeps
one ``AgentService.Connect`` stream. An Assignment is accepted at once, its payload (the
Messages request body, unchanged) is POSTed to the fake Messages API (``tests/fakes``,
running in the same process on loopback, answering at once), and the answer goes back as
the Result's output with the usage the fake reported, then one Credit. Plain ``noop``
tasks make the same call but report no usage, so the agent's work is the same for both
and only the control plane's path differs.

The process speaks :class:`bench.fleet.Fleet`'s control protocol (a JSON config line,
then ``stop``; a JSON status line every 50 ms), so the harness drives it with ``Fleet``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench import procs
from bench.fleet import Fleet
from bench.simagent import CHANNEL_OPTIONS, REFUSED, STABLE_STREAM, WELCOME_TIMEOUT, Creds, Stats
from muster.agent.backoff import Backoff
from muster.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.fakes.anthropic_api import FakeAnthropicAPI, Reply

AI_KIND = "anthropic.messages"
PLAIN_KIND = "noop"
API_KEY = "sk-ant-bench-not-a-real-key"
STATUS_INTERVAL = 0.05


class MessagesClient:
    """Just enough HTTP/1.1 to POST to the fake Messages API on keep-alive connections."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.calls = 0

    async def create(self, body: bytes) -> dict[str, Any]:
        """The Message the API answers for request ``body``; raises on any failure."""
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self._host, self._port)
        head = (
            f"POST /v1/messages HTTP/1.1\r\nhost: {self._host}:{self._port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"x-api-key: {API_KEY}\r\nanthropic-version: 2023-06-01\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            status = int((await reader.readline()).split(b" ", 2)[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            data = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        self._idle.append((reader, writer))
        self.calls += 1
        if status != 200:
            raise RuntimeError(f"Messages API answered {status}: {data[:200]!r}")
        message: dict[str, Any] = json.loads(data)
        return message


def usage_of(message: dict[str, Any]) -> common_pb2.Usage:
    u = message.get("usage") or {}
    return common_pb2.Usage(
        model=str(message.get("model", "")),
        input_tokens=int(u.get("input_tokens") or 0),
        output_tokens=int(u.get("output_tokens") or 0),
        cache_creation_input_tokens=int(u.get("cache_creation_input_tokens") or 0),
        cache_read_input_tokens=int(u.get("cache_read_input_tokens") or 0),
    )


class AiAgent:
    """One simulated AI agent; ``await run()`` until ``stop()`` or the server refuses it."""

    def __init__(
        self,
        index: int,
        creds: Creds,
        endpoint: str,
        stats: Stats,
        api: MessagesClient,
        *,
        max_concurrency: int = 4,
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        self.stats = stats
        self.api = api
        self.max_concurrency = max_concurrency
        self._credentials = creds.channel_credentials()
        self._backoff = Backoff(0.2, 30.0)
        self._stopping = False
        self._call: Any = None

    def stop(self) -> None:
        self._stopping = True
        if self._call is not None:
            self._call.cancel()

    async def run(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            outcome = await self._session()
            if self._stopping or outcome in REFUSED:
                return
            if outcome == "drained" or time.monotonic() - started >= STABLE_STREAM:
                self._backoff.reset(steady=True)
            await asyncio.sleep(self._backoff.next_delay())

    async def _answer(
        self, a: agent_pb2.Assignment, out: asyncio.Queue[agent_pb2.AgentMessage | None]
    ) -> None:
        try:
            message = await self.api.create(a.payload)
        except Exception as err:  # an answer the harness will see as a failed task
            result = agent_pb2.Result(
                task_id=a.task_id,
                attempt=a.attempt,
                outcome=agent_pb2.OUTCOME_FAILED,
                error=f"Messages API call failed: {err}"[:500],
                retryable=True,
            )
        else:
            result = agent_pb2.Result(
                task_id=a.task_id,
                attempt=a.attempt,
                outcome=agent_pb2.OUTCOME_SUCCEEDED,
                output=json.dumps(message).encode(),
            )
            if a.kind == AI_KIND:
                result.usage.CopyFrom(usage_of(message))
        out.put_nowait(agent_pb2.AgentMessage(result=result))
        out.put_nowait(agent_pb2.AgentMessage(credit=agent_pb2.Credit(credits=1)))

    async def _session(self) -> grpc.StatusCode | str:
        stats = self.stats
        channel = grpc.aio.secure_channel(self.endpoint, self._credentials, options=CHANNEL_OPTIONS)
        out: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        helpers: set[asyncio.Task[None]] = set()
        connected = False
        drained = False
        try:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
            self._call = call
            hello = agent_pb2.Hello(
                agent_version="bench-ai",
                capabilities=[AI_KIND, PLAIN_KIND],
                max_concurrency=self.max_concurrency,
            )
            try:
                async with asyncio.timeout(WELCOME_TIMEOUT):
                    await call.write(agent_pb2.AgentMessage(hello=hello))
                    first = await call.read()
            except TimeoutError:
                call.cancel()
                stats.end("no-welcome-in-time")
                return "timeout"
            if not isinstance(first, agent_pb2.ServerMessage) or not first.HasField("welcome"):
                stats.end("no-welcome")
                return "closed"
            connected = True
            stats.connected += 1
            stats.welcomes += 1
            stats.fresh.add(self.index)
            stats.last_welcome = max(stats.last_welcome, time.monotonic())
            interval = first.welcome.heartbeat_interval.ToTimedelta().total_seconds() or 10.0
            helpers.add(asyncio.create_task(_writer(call, out)))
            helpers.add(asyncio.create_task(_heartbeats(out, interval)))
            while True:
                message = await call.read()
                if not isinstance(message, agent_pb2.ServerMessage):
                    break
                body = message.WhichOneof("body")
                if body == "assignment":
                    a = message.assignment
                    accepted = agent_pb2.Accepted(task_id=a.task_id, attempt=a.attempt)
                    out.put_nowait(agent_pb2.AgentMessage(accepted=accepted))
                    job = asyncio.create_task(self._answer(a, out))
                    helpers.add(job)
                    job.add_done_callback(helpers.discard)
                elif body == "ack":
                    stats.acked += 1
                    stats.last_ack = time.monotonic()
                elif body == "drain":
                    drained = True
                    out.put_nowait(None)
            stats.end("OK")
            return "drained" if drained else "closed"
        except grpc.aio.AioRpcError as err:
            stats.end(err.code().name)
            return err.code()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            return "closed"
        finally:
            self._call = None
            if connected:
                stats.connected -= 1
            for helper in list(helpers):
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await channel.close()


async def _writer(call: Any, out: asyncio.Queue[agent_pb2.AgentMessage | None]) -> None:
    """The only coroutine that writes (a grpc.aio call takes one write at a time); None
    half-closes the stream."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        while True:
            message = await out.get()
            if message is None:
                await call.done_writing()
                return
            await call.write(message)


async def _heartbeats(out: asyncio.Queue[agent_pb2.AgentMessage | None], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        out.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))


class _Always(deque[Reply]):
    """A reply queue that never runs out: the fake answers every call the same way."""

    def popleft(self) -> Reply:
        return self[0]


# Harness side --------------------------------------------------------------------------


async def start_ai_fleet(
    creds_file: Path,
    assignments: list[tuple[int, str]],
    *,
    log_path: Path,
    max_concurrency: int = 4,
    output_tokens: int | None = None,
) -> Fleet:
    """A ``python -m bench.aiagent`` process running agents ``assignments`` (credential
    index, endpoint), with its own fake Messages API; ``output_tokens`` makes every answer
    report that many output tokens (else the fake's count of its short reply)."""
    proc = await procs.spawn(
        [procs.PYTHON, "-m", "bench.aiagent"], log_path=log_path, pipe_stdio=True
    )
    config = {
        "creds_file": str(creds_file),
        "agents": assignments,
        "max_concurrency": max_concurrency,
        "output_tokens": output_tokens,
    }
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(config) + "\n").encode())
    return Fleet(proc)


# Worker side ---------------------------------------------------------------------------


async def _worker() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = json.loads(await reader.readline())
    all_creds = json.loads(Path(config["creds_file"]).read_text())
    stats = Stats()
    async with FakeAnthropicAPI(api_key=API_KEY) as fake:
        if config["output_tokens"] is not None:
            fake.replies = _Always([Reply(usage={"output_tokens": config["output_tokens"]})])
        host, port = fake.url.removeprefix("http://").rsplit(":", 1)
        api = MessagesClient(host, int(port))
        agents = [
            AiAgent(
                index,
                Creds(**all_creds[index]),
                endpoint,
                stats,
                api,
                max_concurrency=config["max_concurrency"],
            )
            for index, endpoint in config["agents"]
        ]
        reporter = asyncio.create_task(_report(stats))
        tasks = [asyncio.create_task(agent.run()) for agent in agents]
        while line := await reader.readline():
            if json.loads(line).get("cmd") == "stop":
                break
        for agent in agents:
            agent.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        reporter.cancel()


async def _report(stats: Stats) -> None:
    while True:
        status = {
            "connected": stats.connected,
            "welcomes": stats.welcomes,
            "fresh": len(stats.fresh),
            "last_welcome": stats.last_welcome,
            "acked": stats.acked,
            "last_ack": stats.last_ack,
            "ended": stats.ended,
        }
        sys.stdout.write(json.dumps({"status": status}) + "\n")
        sys.stdout.flush()
        await asyncio.sleep(STATUS_INTERVAL)


def main() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_worker())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
