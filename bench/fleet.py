"""Simulated agents in separate processes, so the load generator does not starve the server
and one Python process never holds more streams than it can serve.

Harness side: :class:`Fleet` spawns ``python -m bench.fleet``, sends it a JSON config and
commands on stdin (``go``, ``mark``, ``dump PATH``, ``stop``) and reads a JSON status line
from its stdout every 50 ms. Times are ``time.monotonic()``, one clock for every process
on the machine, so the harness can compare them with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.simagent import Creds, RawAgent, SimAgent, Stats

STATUS_INTERVAL = 0.05
MAX_PER_PROCESS = 2500


@dataclass
class FleetStatus:
    connected: int = 0
    welcomes: int = 0
    fresh: int = 0
    last_welcome: float = 0.0
    acked: int = 0
    last_ack: float = 0.0
    ended: dict[str, int] = field(default_factory=dict)


class Fleet:
    """One worker process running agents ``indexes`` of a credentials file."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.status = FleetStatus()
        self._reader = asyncio.create_task(self._read())
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    @classmethod
    async def start(
        cls,
        creds_file: Path,
        assignments: list[tuple[int, str]],
        *,
        log_path: Path,
        mode: str = "muster",
        max_concurrency: int = 4,
        record: bool = False,
        wait_go: bool = False,
        ramp: float = 0.0,
    ) -> Fleet:
        """``assignments``: (credential index, endpoint) per agent; with ``ramp``, the agents
        start at that many per second instead of all at once."""
        proc = await procs.spawn(
            [procs.PYTHON, "-m", "bench.fleet"], log_path=log_path, pipe_stdio=True
        )
        fleet = cls(proc)
        fleet._send(
            {
                "creds_file": str(creds_file),
                "agents": assignments,
                "mode": mode,
                "max_concurrency": max_concurrency,
                "record": record,
                "wait_go": wait_go,
                "ramp": ramp,
            }
        )
        return fleet

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            data = json.loads(line)
            if "status" in data:
                self.status = FleetStatus(**data["status"])
            else:
                self._replies.put_nowait(data)

    def go(self) -> None:
        self._send({"cmd": "go"})

    def mark(self) -> None:
        self._send({"cmd": "mark"})

    async def dump(self, path: Path, timeout: float = 30) -> dict[str, float]:
        self._send({"cmd": "dump", "path": str(path)})
        await asyncio.wait_for(self._replies.get(), timeout)
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._send({"cmd": "stop"})
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            await asyncio.wait_for(self.proc.wait(), 15)
        await procs.stop(self.proc, timeout=5)
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader

    def alive(self) -> bool:
        return self.proc.returncode is None


def combined(fleets: list[Fleet]) -> FleetStatus:
    total = FleetStatus()
    for f in fleets:
        s = f.status
        total.connected += s.connected
        total.welcomes += s.welcomes
        total.fresh += s.fresh
        total.last_welcome = max(total.last_welcome, s.last_welcome)
        total.acked += s.acked
        total.last_ack = max(total.last_ack, s.last_ack)
        for k, v in s.ended.items():
            total.ended[k] = total.ended.get(k, 0) + v
    return total


async def wait_until(fleets: list[Fleet], predicate: Any, timeout: float, what: str) -> FleetStatus:
    """Poll the fleets' combined status until ``predicate(status)``; raise on timeout or death."""
    deadline = time.monotonic() + timeout
    while True:
        status = combined(fleets)
        if predicate(status):
            return status
        if any(not f.alive() for f in fleets):
            raise RuntimeError(f"a fleet process died while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}: {status}")
        await asyncio.sleep(0.02)


async def start_fleets(
    creds_file: Path,
    assignments: list[tuple[int, str]],
    *,
    log_dir: Path,
    name: str,
    per_process: int = MAX_PER_PROCESS,
    **kw: Any,
) -> list[Fleet]:
    chunks = [assignments[i : i + per_process] for i in range(0, len(assignments), per_process)]
    return [
        await Fleet.start(creds_file, chunk, log_path=log_dir / f"{name}-{n}.log", **kw)
        for n, chunk in enumerate(chunks)
    ]


def write_creds(path: Path, creds: list[Creds]) -> None:
    path.write_text(json.dumps([c.to_json() for c in creds]))


# Worker side ---------------------------------------------------------------------------


async def _worker() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = json.loads(await reader.readline())
    all_creds = json.loads(Path(config["creds_file"]).read_text())
    stats = Stats()
    if config["record"]:
        stats.assigned = {}
    agents: list[SimAgent | RawAgent] = []
    for index, endpoint in config["agents"]:
        creds = Creds(**all_creds[index])
        if config["mode"] == "raw":
            agents.append(RawAgent(index, creds, endpoint, stats))
        else:
            agents.append(
                SimAgent(index, creds, endpoint, stats, max_concurrency=config["max_concurrency"])
            )
    status_task = asyncio.create_task(_report(stats))
    tasks: list[asyncio.Task[None]] = []
    if not config["wait_go"]:
        tasks = _launch(agents, config["ramp"])
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "go" and not tasks:
            tasks = _launch(agents, config["ramp"])
        elif cmd["cmd"] == "mark":
            stats.mark()
        elif cmd["cmd"] == "dump":
            Path(cmd["path"]).write_text(json.dumps(stats.assigned or {}))
            _emit({"dumped": cmd["path"]})
        elif cmd["cmd"] == "stop":
            break
    for a in agents:
        a.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    status_task.cancel()


def _launch(agents: list[SimAgent | RawAgent], ramp: float) -> list[asyncio.Task[None]]:
    """Run every agent, the n-th after ``n / ramp`` seconds when ``ramp`` is set."""

    async def started_after(delay: float, agent: SimAgent | RawAgent) -> None:
        await asyncio.sleep(delay)
        await agent.run()

    return [
        asyncio.create_task(started_after(n / ramp if ramp > 0 else 0.0, a))
        for n, a in enumerate(agents)
    ]


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def _report(stats: Stats) -> None:
    while True:
        _emit(
            {
                "status": {
                    "connected": stats.connected,
                    "welcomes": stats.welcomes,
                    "fresh": len(stats.fresh),
                    "last_welcome": stats.last_welcome,
                    "acked": stats.acked,
                    "last_ack": stats.last_ack,
                    "ended": stats.ended,
                }
            }
        )
        await asyncio.sleep(STATUS_INTERVAL)


def main() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_worker())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
