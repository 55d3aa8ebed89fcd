"""Time as a dependency: the dispatcher, the reaper and the task store read one :class:`Clock`.

The server runs on :class:`SystemClock`. Tests give ``start_server`` a :class:`ManualClock`
and move it with :meth:`ManualClock.advance`, so every timeout (lease, schedule-to-start,
start-to-close, deadline) is reached exactly and at once, without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Where the server's timeouts read the time and wait for it."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC (what timestamps in the database hold)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: for intervals, not for timestamps."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock."""
        ...


class SystemClock:
    """The real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to; whatever sleeps on it waits for :meth:`advance`.

    It starts at the real time (or ``start``) so timestamps the server takes from it sit
    beside those that other code takes from the real clock (a deadline a client sets).
    """

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime.now(UTC)
        if start.tzinfo is None:
            raise ValueError("ManualClock: start must be timezone-aware")
        self._start = start.astimezone(UTC)
        self._elapsed = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._parked = asyncio.Condition()

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return self._elapsed

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._elapsed + seconds, wake)
        self._sleepers.append(entry)
        async with self._parked:
            self._parked.notify_all()
        try:
            await wake
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def advance(self, by: float | timedelta) -> None:
        """Move the time forward and wake every sleeper whose time has come."""
        seconds = by.total_seconds() if isinstance(by, timedelta) else float(by)
        if seconds < 0:
            raise ValueError("ManualClock: time does not go back")
        self._elapsed += seconds
        due = [entry for entry in self._sleepers if entry[0] <= self._elapsed]
        for entry in due:
            self._sleepers.remove(entry)
            if not entry[1].done():
                entry[1].set_result(None)

    @property
    def sleepers(self) -> int:
        """How many callers are waiting on this clock right now."""
        return len(self._sleepers)

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Return once at least ``count`` callers sleep on this clock (a loop has finished
        its pass and parked): a test's way to know that the effect of a pass is done."""
        async with self._parked:
            await self._parked.wait_for(lambda: len(self._sleepers) >= count)


async def sleep_unless(clock: Clock, stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` on ``clock`` or until ``stopping`` is set; True when it is set."""
    if stopping.is_set():
        return True
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    stopper = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, stopper):
            task.cancel()
        await asyncio.gather(sleeper, stopper, return_exceptions=True)
    return stopping.is_set()
