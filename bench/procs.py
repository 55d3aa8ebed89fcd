"""Child processes in their own process groups, so stopping one stops everything it started,
and whatever is still running when the harness exits is killed."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PYTHON = sys.executable
_live: dict[int, asyncio.subprocess.Process] = {}


def _kill_all() -> None:
    """Last resort at interpreter exit: SIGKILL every group still alive."""
    for pid in list(_live):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    _live.clear()


atexit.register(_kill_all)


def child_env(**extra: str) -> dict[str, str]:
    """The harness environment minus ``MUSTER_*`` (it would leak into servers), plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **extra}


async def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    pipe_stdio: bool = False,
    cwd: Path | None = None,
) -> asyncio.subprocess.Process:
    """Start ``argv`` in a new session (its own process group); stderr goes to ``log_path``.

    With ``pipe_stdio`` stdin and stdout are pipes (the fleet's control channel), else
    stdout goes to the log too.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = log_path.open("ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env if env is not None else child_env(),
            cwd=cwd,
            stdin=asyncio.subprocess.PIPE if pipe_stdio else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipe_stdio else out,
            stderr=out,
            start_new_session=True,
            limit=1 << 24,
        )
    finally:
        out.close()
    _live[proc.pid] = proc
    return proc


async def stop(
    proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM, timeout: float = 20.0
) -> int | None:
    """Signal the process group, wait up to ``timeout``, then SIGKILL the group."""
    try:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning(
                    "pid %d ignored signal %d for %.0fs; killing it", proc.pid, sig, timeout
                )
        # Whatever the leader left behind in its group (celery's pool) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()
    finally:
        _live.pop(proc.pid, None)
    return proc.returncode


async def stop_all() -> None:
    await asyncio.gather(*(stop(p, timeout=10.0) for p in list(_live.values())))


async def run(
    argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120
) -> str:
    """Run to completion and return stdout; a non-zero exit raises with stderr's tail."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env if env is not None else child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    _live[proc.pid] = proc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            await stop(proc)
        _live.pop(proc.pid, None)
    if proc.returncode != 0:
        tail = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(argv[:4])} exited {proc.returncode}: {tail}")
    return out.decode()


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant (a server with worker processes
    counts whole); a process that exits in between is skipped."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
        except (OSError, IndexError, ValueError):
            continue
        todo.extend(children.get(current, []))
    return total


def log_tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
