"""Task states: the one list both sides share.

The server stores a state by name (``tasks.state``, SQL parameters); the wire carries
its number (``muster.v1.TaskState``, ``TASK_STATE_<name>``); the SDK shows it as
:class:`muster.TaskState`. All three are derived from :class:`State`.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """A task's lifecycle state, as stored; ``number`` is its ``muster.v1.TaskState``."""

    QUEUED = "QUEUED"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def number(self) -> int:
        """The ``muster.v1.TaskState`` value (``TASK_STATE_<name>``)."""
        return _NUMBERS[self]

    @property
    def is_terminal(self) -> bool:
        """True once the task can no longer change state."""
        return self in TERMINAL

    @property
    def is_held(self) -> bool:
        """True while an agent holds the attempt (it occupies one of the agent's slots)."""
        return self in HELD


_NUMBERS = {state: number for number, state in enumerate(State, start=1)}

HELD: tuple[State, ...] = (State.ASSIGNED, State.RUNNING)
"""States in which an agent holds the current attempt."""
TERMINAL: frozenset[State] = frozenset(
    {State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT}
)
"""States a task never leaves."""
