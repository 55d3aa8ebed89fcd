"""Reconnect pacing: capped exponential backoff with full jitter, so a fleet does not stampede."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

STEADY_FOR = 15.0
"""Seconds after a replica let us go (a Drain, or a stream that had stayed up) during which
failed attempts are retried at a steady pace: a restarting replica is back within seconds."""
STEADY_WINDOW = 1.0
"""Retries in that period come after ``uniform(0, STEADY_WINDOW)`` seconds (at most the cap)."""


class Backoff:
    """Delays of ``uniform(0, min(maximum, initial * 2**n))`` for the n-th retry in a row.

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads
    agents that lost the same replica at the same moment across the whole window.

    After :meth:`reset` with ``steady=True`` the delays stay within a fixed jittered
    window for ``steady_for`` seconds and only then start to grow. Growing from the first
    failure would leave a fleet waiting several seconds after a replica that restarts in
    three is back; a server that stays down still sees the window grow to the cap.
    """

    def __init__(
        self,
        initial: float = 0.2,
        maximum: float = 30.0,
        *,
        multiplier: float = 2.0,
        steady_for: float = STEADY_FOR,
        steady_window: float = STEADY_WINDOW,
        rand: Callable[[float, float], float] = random.uniform,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if initial <= 0 or maximum < initial or multiplier < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and multiplier >= 1")
        if steady_for < 0 or steady_window <= 0:
            raise ValueError("backoff needs steady_for >= 0 and steady_window > 0")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.steady_for = steady_for
        self.steady_window = min(steady_window, maximum)
        self._rand = rand
        self._clock = clock
        self._attempt = 0
        self._steady_until = 0.0

    @property
    def attempt(self) -> int:
        """How many growing delays were handed out since the last reset."""
        return self._attempt

    @property
    def steady(self) -> bool:
        """Whether the next delay comes from the steady window rather than the growing one."""
        return self._clock() < self._steady_until

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        if self.steady:
            return self.steady_window
        # Cap the exponent so a very long outage cannot overflow the float.
        exponent = min(self._attempt, 64)
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def next_delay(self) -> float:
        """The next delay in seconds; outside the steady period, grow the window for the next."""
        if self.steady:
            return self._rand(0.0, self.steady_window)
        delay = self._rand(0.0, self.ceiling())
        self._attempt += 1
        return delay

    def max_delay(self) -> float:
        """A jittered delay at the cap, for failures that no quick retry will fix."""
        return self._rand(self.maximum / 2, self.maximum)

    def reset(self, *, steady: bool = False) -> None:
        """Start again from ``initial``: call after a connection proved healthy.

        ``steady``: the server let us go (it drained us, or a healthy stream broke), so
        it or another replica should take us back soon: retry at a steady pace for a while.
        """
        self._attempt = 0
        self._steady_until = self._clock() + self.steady_for if steady else 0.0
