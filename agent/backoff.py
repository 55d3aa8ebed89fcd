"""Reconnect pacing: capped exponential backoff with full jitter, so a fleet does not stampede."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays of ``uniform(0, min(maximum, initial * 2**n))`` for the n-th retry in a row.

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads
    agents that lost the same replica at the same moment across the whole window.
    """

    def __init__(
        self,
        initial: float = 0.2,
        maximum: float = 30.0,
        *,
        multiplier: float = 2.0,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if initial <= 0 or maximum < initial or multiplier < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and multiplier >= 1")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self._rand = rand
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays were handed out since the last reset."""
        return self._attempt

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # Cap the exponent so a very long outage cannot overflow the float.
        exponent = min(self._attempt, 64)
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def next_delay(self) -> float:
        """The next delay in seconds, growing the window for the one after."""
        delay = self._rand(0.0, self.ceiling())
        self._attempt += 1
        return delay

    def max_delay(self) -> float:
        """A jittered delay at the cap, for failures that no quick retry will fix."""
        return self._rand(self.maximum / 2, self.maximum)

    def reset(self) -> None:
        """Start again from ``initial``: call after a connection proved healthy."""
        self._attempt = 0
