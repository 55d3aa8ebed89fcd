"""One owner for every long-lived background task of a server.

A background task nobody awaits fails silently: an unexpected error in fan-out used to
end it while health still said SERVING. Every loop a server runs (the audit writer,
fan-out's publisher and subscriber, the reaper, the server certificate's renewal) is
started or watched here by name, and so is every on-demand writer
(:class:`~muster.server.drain.Drain`: group commit, the in-flight releaser, the
suspicion reports) through its error hook. A task that raises, is cancelled by anyone
else, or returns while it must run is a *crash*: the supervisor logs it with its name
and tells its listeners once; the server (server/app.py) then turns health NOT_SERVING
for every service and shuts down as on SIGTERM, and ``muster server`` exits non-zero.

After :meth:`Supervisor.stop` the ends are expected (shutdown stops the loops itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from muster.server.drain import Drain, OnError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Crash:
    """Which supervised task ended, and how."""

    name: str
    error: BaseException | None
    """What it raised (a CancelledError when cancelled); None when it returned."""

    @property
    def reason(self) -> str:
        if self.error is None:
            return "returned while it must run"
        if isinstance(self.error, asyncio.CancelledError):
            return "was cancelled"
        return f"raised {type(self.error).__name__}: {self.error}"


Listener = Callable[[Crash], None]


class Supervisor:
    """Watches a server's background tasks by name; the first crash is reported once."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        """The long-lived tasks, by name (tests cancel them to see what a crash does)."""
        self.drains: dict[str, Drain[Any]] = {}
        """The on-demand writers, by name; their crashes arrive through :meth:`hook`."""
        self.crash: Crash | None = None
        """The first crash, once there was one."""
        self._listeners: list[Listener] = []
        self._stopping = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as the task ``name``, watched: it must not end before :meth:`stop`."""
        return self.watch(name, asyncio.create_task(coro, name=name))

    def watch(self, name: str, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Watch a long-lived task that someone else started (and stops)."""
        if name in self.tasks:
            raise ValueError(f"a background task named {name!r} is already supervised")
        self.tasks[name] = task
        task.add_done_callback(lambda done: self._ended(name, done))
        return task

    def hook(self, name: str, drain: Drain[Any] | None = None) -> OnError:
        """The error hook of an on-demand writer ``name`` (``drain``, listed by name when
        given): its crash is a crash of the server."""
        if drain is not None:
            self.drains[name] = drain

        def crashed(err: BaseException) -> None:
            self.report(Crash(name, err))

        return crashed

    def adopt(self, name: str, drain: Drain[Any]) -> None:
        """Supervise ``drain`` as ``name``: its crash is a crash of the server."""
        drain.on_error = self.hook(name, drain)

    def on_crash(self, listener: Listener) -> None:
        """Call ``listener`` at the first crash (at once if there was one already)."""
        self._listeners.append(listener)
        if self.crash is not None:
            listener(self.crash)

    def stop(self) -> None:
        """From now on, tasks end because the server stops them: no crash."""
        self._stopping = True

    def report(self, crash: Crash) -> None:
        """Log ``crash``; the first one before :meth:`stop` goes to the listeners."""
        if self._stopping:
            log.debug("background task %s ended while stopping (%s)", crash.name, crash.reason)
            return
        error = crash.error
        exc_info = (
            error if error is not None and not isinstance(error, asyncio.CancelledError) else None
        )
        log.error(
            "background task %s crashed (%s): shutting the server down",
            crash.name,
            crash.reason,
            exc_info=exc_info,
        )
        if self.crash is not None:
            return
        self.crash = crash
        for listener in self._listeners:
            try:
                listener(crash)
            except Exception:
                log.exception("a crash listener failed")

    def _ended(self, name: str, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            error: BaseException | None = asyncio.CancelledError()
        else:
            error = task.exception()
        self.report(Crash(name, error))
