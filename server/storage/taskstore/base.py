"""The task store's contract: what every backend's store MUST do, and the values it
speaks in.

Every transition is a conditional change of one attempt: it names the attempt (task id
and attempt number) and the state (and holder) it expects, and changes nothing when the
row says otherwise. Two replicas or two coroutines racing for the same attempt therefore
never both win; the loser is told (False, None, or the attempt as it now is).

Two kinds of methods:

* the hot path (``insert``, ``claim``, ``accept``, ``renew_leases``, ``finish``) hands
  its change to the database's group commit (storage/batch.py) and returns once it has
  committed, with the audit records its ``audit`` function makes of the result in the
  same transaction; callers never see the batching;
* the rest run inside a transaction the caller opened (``db.transaction()``), so the
  caller can add its audit records to it: they take that session as first argument.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from muster.server.storage.batch import Audit
from muster.server.storage.models import Task
from muster.server.storage.usage import AttemptCost
from muster.states import State

MAX_RATE_LIMITED = 20
"""Attempts a provider's rate limit may cost a task without counting against max_attempts."""

CLAIM_SCAN = 200
"""How many queued candidates one claim looks at where labels are matched in Python."""

OVERDUE_BATCH = 500
"""Overdue attempts one reaper pass ends per check; the next pass takes the rest."""


def attempt_key(task_id: str, attempt: int) -> str:
    """``task:attempt``: how concurrency leases and budget reservations name an attempt."""
    return f"{task_id}:{attempt}"


@dataclass(frozen=True, slots=True)
class Held:
    """An attempt an agent holds, as reported by a transition that took it away."""

    task_id: str
    attempt: int
    agent_id: str | None
    session_id: str | None
    pool: str
    owner: str
    reserve_micros: int = 0
    """Non-zero when the attempt holds a budget reservation (an AI kind)."""

    @property
    def holder(self) -> str:
        """Names this attempt in concurrency leases and budget reservations."""
        return attempt_key(self.task_id, self.attempt)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A queued attempt a claim handed to one stream: what its Assignment carries."""

    task_id: str
    attempt: int
    kind: str
    payload: bytes
    pool: str
    owner: str
    priority: int
    queued_at: datetime
    start_to_close_timeout: float | None
    deadline: datetime | None
    model: str | None
    reserve_micros: int
    """An AI attempt's worst-case cost, to reserve before it is sent; 0: not budgeted."""
    max_cost_micros: int | None
    output_schema: str | None
    waiting_reason: str
    """Why the task was last held back (to audit a new reason once, not every claim)."""
    signature: bytes | None
    """A signed task's envelope (a serialized TaskSignature), for its Assignment."""
    trace_context: str | None
    """The task's stored trace context (None: not traced), parent of the dispatch span."""
    ceiling_micros: int = 0
    """What was reserved for this attempt (set after the claim): the Assignment's ceiling."""


@dataclass(frozen=True, slots=True)
class Finished:
    """An attempt that ended, as its row says after the change."""

    owner: str
    pool: str
    kind: str
    started_at: datetime | None
    model: str | None
    reserve_micros: int
    row: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Every column of the ended row but ``payload`` (which never changes), as the change
    left it: a watcher holding the payload has the whole task without reading it again.
    Usage an Ending carries is added to the row after this (storage/usage.py)."""


@dataclass(frozen=True, slots=True)
class Current:
    """A task's current attempt, to tell a resent Result from a stale one."""

    attempt: int
    agent_id: str | None
    state: State


@dataclass(frozen=True, slots=True)
class Ending:
    """What a Result sets on the attempt it ends."""

    task_id: str
    attempt: int
    agent_id: str
    state: State
    output: bytes
    error: str
    usage: AttemptCost | None = None
    accepted_at: datetime | None = None
    """When the agent's Accepted for this attempt arrived, if it was never written (its
    Result came within the stream's accept delay): the attempt's start, kept unless an
    earlier one is on the row."""


Ended = tuple[State, Finished] | Current | None
"""What :meth:`TaskStore.finish` answers: (state, Finished) when this Ending ended the
attempt; else the task's current attempt, to say why not; None when there is no such task."""


@dataclass(frozen=True, slots=True)
class Acceptance:
    """An agent's Accepted for an attempt assigned on its stream."""

    task_id: str
    attempt: int
    session_id: str


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One stream asking for up to ``limit`` tasks it can run."""

    pool: str
    labels: dict[str, str]
    kinds: tuple[str, ...]
    agent_id: str
    session_id: str
    limit: int

    @property
    def key(self) -> tuple[object, ...]:
        """Streams with the same key can run the same tasks: one statement serves them."""
        return ("claim", self.pool, tuple(sorted(self.labels.items())), self.kinds)


@dataclass(frozen=True, slots=True)
class HoldBack:
    """A claimed attempt that may not be sent yet, why, and until when."""

    task_id: str
    attempt: int
    retry_at: datetime
    reason: str = ""
    """Shown as the task's waiting reason (empty: a passing limit not worth showing)."""


@dataclass(frozen=True, slots=True)
class Retry:
    """An attempt the server or its agent gave up on without a final Result: requeue it
    as the next attempt, or end the task when its attempts are used up.

    ``agent_id``, ``session_id`` and ``lease_expired_before``, when set, are further
    conditions: the attempt is only taken when it still has that holder, that stream, or
    a lease that ran out before that instant."""

    task_id: str
    attempt: int
    error: str
    backoff: timedelta = timedelta(0)
    exhausted_state: State = State.FAILED
    rate_limited: bool = False
    """The provider refused it for its rate limit: up to :data:`MAX_RATE_LIMITED` such
    attempts do not count against ``max_attempts``."""
    agent_id: str | None = None
    session_id: str | None = None
    lease_expired_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class TimedOut:
    """A task the reaper ended as TIMED_OUT, and why."""

    task_id: str
    attempt: int
    reason: str


Executor = AsyncSession | AsyncConnection
"""Where an in-transaction method runs its statements: the caller's session or connection."""


class TaskStore(ABC):
    """Every read and transition of the ``tasks`` table. One implementation per backend,
    picked once when the database is opened (:func:`open_task_store`)."""

    # The hot path: group-committed, each call returns once its change is durable.

    @abstractmethod
    async def insert(self, values: dict[str, Any], *, audit: Audit[None] | None = None) -> None:
        """Insert one new QUEUED task (no idempotency key, not signed: nothing to look up
        first). A duplicate task id MUST fail this caller only, with IntegrityError."""

    @abstractmethod
    async def claim(
        self,
        request: ClaimRequest,
        *,
        accept_timeout: timedelta,
        now: datetime,
        audit: Audit[list[Claimed]] | None = None,
    ) -> list[Claimed]:
        """Move up to ``request.limit`` QUEUED tasks of its pool and kinds, whose selector
        its labels satisfy and whose backoff has passed, to ASSIGNED on its stream, with
        ``now + accept_timeout`` to be Accepted; returns them highest priority first, then
        longest waiting. A task MUST go to at most one claimer however many race; streams
        claiming at once share the queue (in turn where the backend can)."""

    @abstractmethod
    def accept(
        self, acceptance: Acceptance, *, lease: timedelta, now: datetime
    ) -> asyncio.Future[bool]:
        """Queue the move of an ASSIGNED attempt of this stream to RUNNING (started now,
        leased for ``lease``); the future says whether it moved. Queued before this
        returns: a ``finish`` of the same attempt handed in afterwards is written after."""

    @abstractmethod
    async def renew_leases(
        self,
        session_id: str,
        attempts: Sequence[tuple[str, int]],
        *,
        lease: timedelta,
        now: datetime,
    ) -> int:
        """Extend to ``now + lease`` the leases of the held attempts of this stream among
        ``attempts``; returns how many."""

    @abstractmethod
    async def finish(
        self, ending: Ending, *, now: datetime, audit: Audit[Ended] | None = None
    ) -> Ended:
        """End the attempt, if it is the current one, held (ASSIGNED or RUNNING) by
        ``ending.agent_id``, in ``ending.state`` with its output, error and usage. The same
        Result handed in twice ends the attempt once; the other copy gets the Current."""

    # In the caller's transaction.

    @abstractmethod
    async def end_attempt(
        self, conn: Executor, ending: Ending, *, now: datetime
    ) -> Finished | None:
        """:meth:`finish` in the caller's transaction (usage recorded too); None when the
        attempt is not current or not held by that agent."""

    @abstractmethod
    async def insert_or_find(
        self, session: AsyncSession, values: dict[str, Any]
    ) -> tuple[Task, bool]:
        """Insert a task; when this owner already used its idempotency key, or a signed
        task's id is taken (its envelope was submitted before), return that task and False."""

    @abstractmethod
    async def get(self, session: AsyncSession, task_id: str) -> Task | None:
        """The task as stored now (never a stale copy from the session)."""

    @abstractmethod
    async def read(self, conn: Executor, task_id: str) -> Task | None:
        """The task as stored now, as a detached copy for showing it (Watch, Get): one
        statement, no session identity map, nothing to write back. Equal, field by
        field, to what :meth:`get` returns."""

    @abstractmethod
    async def list_tasks(
        self,
        session: AsyncSession,
        *,
        states: Sequence[State],
        pool: str,
        kind: str,
        owner: str | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Task]:
        """Newest first, filtered by whatever is non-empty; ``before`` is (created_at,
        task_id) of the previous page's last row."""

    @abstractmethod
    async def unclaim(
        self, conn: Executor, items: Sequence[HoldBack], session_id: str, *, now: datetime
    ) -> None:
        """Give back ASSIGNED attempts of this stream that were never sent: QUEUED again,
        same attempt number, not claimable before ``retry_at``, ``reason`` shown."""

    @abstractmethod
    async def fail_claimed(
        self, conn: Executor, claimed: Claimed, session_id: str, error: str, *, now: datetime
    ) -> bool:
        """End a claimed, unsent (still ASSIGNED on this stream) attempt's task as FAILED
        (its own spend cap is used up); whether it did."""

    @abstractmethod
    async def retry_or_fail(self, conn: Executor, retry: Retry, *, now: datetime) -> State | None:
        """End a held attempt without a Result: QUEUED as attempt + 1 (after ``backoff``),
        or ``exhausted_state`` once attempts run out, or CANCELLED when cancellation was
        requested. Returns the new state; None when the attempt was not current and held
        (or a condition of ``retry`` did not hold)."""

    @abstractmethod
    async def adopt(
        self,
        conn: Executor,
        agent_id: str,
        session_id: str,
        attempts: Sequence[tuple[str, int]],
        *,
        lease: timedelta,
        now: datetime,
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Move attempts this agent still holds onto its new stream with a fresh lease.
        Returns (adopted, lost): lost attempts are no longer this agent's current ones."""

    @abstractmethod
    async def hand_over(
        self, conn: Executor, session_id: str, until: datetime, *, now: datetime
    ) -> int:
        """Keep what a drained stream holds for its agent's next stream: the attempts stay
        held with the same number and agent, their leases running to ``until``. Returns
        how many."""

    @abstractmethod
    async def request_cancel(
        self, session: AsyncSession, task_id: str, reason: str, *, now: datetime
    ) -> Task | None:
        """Cancel a QUEUED task at once; mark a held one so its agent is told to stop; leave
        an ended one. Returns the task as it is now (None: no such task)."""

    @abstractmethod
    async def time_out_expired(
        self, conn: Executor, now: datetime, *, limit: int = OVERDUE_BATCH
    ) -> tuple[list[Held], list[TimedOut]]:
        """End as TIMED_OUT tasks past their deadline, or QUEUED past their
        schedule-to-start timeout. Returns the attempts agents held (to be told to stop)
        and every task it ended (for the audit trail)."""

    # Reads.

    @abstractmethod
    async def attempt_of(self, conn: Executor, task_id: str) -> Current | None:
        """The task's current attempt; None when there is no such task."""

    @abstractmethod
    async def signature_of(self, conn: Executor, task_id: str) -> bytes | None:
        """A task's stored envelope (a serialized TaskSignature); None when unsigned."""

    @abstractmethod
    async def kind_and_model(self, conn: Executor, task_id: str) -> tuple[str, str | None] | None:
        """A task's kind and model (to price what its attempt reports); None if no such task."""

    @abstractmethod
    async def held_by_session(self, conn: Executor, session_id: str) -> list[Held]:
        """Every attempt the stream holds."""

    @abstractmethod
    async def held_by_sessions(self, conn: Executor, session_ids: set[str]) -> list[Held]:
        """Every attempt held by any of the given streams."""

    @abstractmethod
    async def held_attempts(
        self, conn: Executor, attempts: Sequence[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        """Which of ``attempts`` an agent still holds (current, ASSIGNED or RUNNING)."""

    @abstractmethod
    async def held_with_reservations(self, conn: Executor) -> list[Claimed]:
        """Every held attempt that reserved budget (to restore an in-process store)."""

    @abstractmethod
    async def expired_leases(self, conn: Executor, now: datetime, limit: int = 500) -> list[Held]:
        """Held attempts whose lease ran out before ``now``."""

    @abstractmethod
    async def overrun_attempts(
        self, conn: Executor, now: datetime, limit: int = OVERDUE_BATCH
    ) -> list[Held]:
        """RUNNING attempts past their start-to-close timeout (from the attempt's start),
        the longest overdue first; the database decides which, so none hides."""

    @abstractmethod
    async def cancel_requested(
        self, conn: Executor, session_ids: set[str]
    ) -> list[tuple[str, int, str, str]]:
        """(task_id, attempt, session_id, reason) of held attempts whose cancellation was
        requested, held by the given streams."""

    @abstractmethod
    async def claimable(
        self, conn: Executor, pools: set[str], *, now: datetime
    ) -> list[tuple[str, str, int]]:
        """(pool, kind, count) of QUEUED tasks in ``pools`` that may be claimed at ``now``."""

    @abstractmethod
    async def queue_stats(self, conn: Executor) -> list[tuple[str, str, int, datetime | None]]:
        """(pool, kind, queued count, oldest queued_at) for the metrics gauges."""
