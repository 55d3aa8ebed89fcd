"""This replica's live agent streams and task watchers, and how to reach them.

The hub is the one place that knows which stream holds which agent. Everything that
must reach a stream — new work, a cancellation, a revocation, a drain — goes through it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any, Protocol, runtime_checkable

import grpc

from muster.server.storage.taskstore import Claimed

EAGER_SCAN = 32
"""Streams an eager submit looks at before leaving its task to the queue: bounded, so a
pool of thousands of busy agents costs a submit nothing more."""


@dataclass(frozen=True, slots=True)
class NewStream:
    """A welcomed agent stream, as announced to every replica (see ``stream_started``)."""

    agent_id: str
    session_id: str
    serial: str
    not_before: float
    """Its certificate's notBefore (POSIX seconds): another serial, not older, is a renewal."""
    peer: str
    started_at: float
    """When it was welcomed (POSIX seconds, the welcoming replica's clock)."""

    def newer_than(self, stream: Stream) -> bool:
        """Whether this stream came after ``stream`` (ties broken by session id, so two
        replicas announcing at once agree on which one stays)."""
        return (self.started_at, self.session_id) > (stream.started_at, stream.session_id)


WriteNow = Callable[[], Awaitable[None]]


class Watcher:
    """One watcher of a task: ``changed`` is set at each change; ``ended`` holds the row
    (every column but the payload, which never changes) the change that ended the task
    left, when it was made on this replica: the watcher then has the task without
    reading it (a change announced by another replica, or any other, is read)."""

    __slots__ = ("changed", "ended")

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.ended: Mapping[str, Any] | None = None


class Stream(Protocol):
    """What the hub needs of one agent stream (implemented by dispatch.session.AgentSession)."""

    session_id: str
    agent_id: str
    pool: str
    labels: dict[str, str]
    serial: str
    kinds: list[str]
    started_at: float
    cert_not_before: float

    @property
    def wants_work(self) -> bool:
        """Has credit, is not draining, and is not already about to look for work."""
        ...

    def wake(self) -> None: ...
    def take_credit(self) -> bool:
        """Hold one credit for an eager submit; False if the stream cannot take one."""
        ...

    def return_credit(self) -> None: ...
    def deliver(self, task: Claimed) -> bool:
        """Send a task an eager submit assigned here; False if the stream went away."""
        ...

    def cancel_attempt(self, task_id: str, attempt: int, reason: str) -> None: ...
    def drain(self, reason: str) -> None: ...
    def close(self, code: grpc.StatusCode, message: str) -> None: ...
    def replaced_by(self, new: NewStream, *, handover: bool) -> None: ...
    def outlived(self, new: NewStream) -> None:
        """``new`` was announced, but this stream is newer: announce this one again."""
        ...


@runtime_checkable
class Renewable(Protocol):
    """A stream that can be told to rotate its certificate (AgentSession)."""

    agent_id: str

    def request_renewal(self, reason: str, issued_before: float | None = None) -> bool:
        """Send Renew if its certificate was issued before ``issued_before`` (POSIX
        seconds; None: whatever its age); True if sent."""
        ...


@runtime_checkable
class TrustFollower(Protocol):
    """A stream that follows the CA's trust bundle and issuing root (AgentSession)."""

    def follow_trust(self) -> None:
        """Send a trust bundle newer than the stream has, and Renew if its certificate
        chains to a root that no longer issues."""
        ...


class Hub:
    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._by_pool: dict[str, dict[str, None]] = defaultdict(dict)
        """Session ids per pool, in the order they are next woken (a dict: an ordered set,
        so a stream leaves in O(1) however many share its pool)."""
        self._claimable: dict[str, set[str]] = {}
        """Kinds per pool the last poll found claimable work for (see ``may_find_work``)."""
        self._announced: dict[str, int] = {}
        self._waiting_accepts: dict[str, tuple[int, datetime, WriteNow]] = {}
        """Per task: the attempt and arrival time of an Accepted not yet written, and
        what writes it at once."""
        """Wake-ups per pool with streams here (see ``announced``)."""
        self._watchers: dict[str, set[Watcher]] = defaultdict(set)
        self._idle = asyncio.Event()
        self._idle.set()
        self.closing = False
        """Set when the replica drains: new streams would only be cut again, so they are refused."""

    # Streams

    def register(self, stream: Stream) -> None:
        self._streams[stream.session_id] = stream
        self._by_pool[stream.pool][stream.session_id] = None
        self._idle.clear()

    def unregister(self, stream: Stream) -> None:
        self._streams.pop(stream.session_id, None)
        members = self._by_pool.get(stream.pool)
        if members is not None:
            members.pop(stream.session_id, None)
            if not members:
                del self._by_pool[stream.pool]
                self._announced.pop(stream.pool, None)
        if not self._streams:
            self._idle.set()

    def streams(self) -> list[Stream]:
        return list(self._streams.values())

    def is_connected(self, agent_id: str) -> bool:
        return any(s.agent_id == agent_id for s in self._streams.values())

    def connected_by_pool(self) -> dict[str, int]:
        return {pool: len(ids) for pool, ids in self._by_pool.items()}

    def wake_pool(self, pool: str) -> None:
        """New or requeued work in ``pool``: wake one stream of it that wants work.

        One, not all: every stream woken costs a claim query, and all but one would
        find nothing. Streams are taken in turn so work spreads; a stream that is
        already awake will look anyway. Should the woken one lose a race, polling
        finds the task.
        """
        members = self._by_pool.get(pool)
        if not members:
            return
        self._announced[pool] = self._announced.get(pool, 0) + 1
        for _ in range(len(members)):
            session_id = next(iter(members))
            del members[session_id]
            members[session_id] = None  # to the back: the next wake-up goes to another
            stream = self._streams[session_id]
            if stream.wants_work:
                stream.wake()
                return

    def announced(self, pool: str) -> int:
        """How many times new or requeued work in ``pool`` was announced (``wake_pool``,
        from this replica or another): a stream that found the queue empty need not look
        again until this changes, or a poll finds work (see ``may_find_work``)."""
        return self._announced.get(pool, 0)

    def take_for(self, pool: str, kind: str, selector: dict[str, str]) -> Stream | None:
        """Eager dispatch: a stream of ``pool`` that runs ``kind``, whose labels satisfy
        ``selector`` and that is idle with credit, holding one of its credits for the
        task (see ``Stream.take_credit``); None when none of the first
        :data:`EAGER_SCAN` in turn can. Taken in turn, as ``wake_pool`` does."""
        members = self._by_pool.get(pool)
        if not members:
            return None
        for session_id in list(islice(members, EAGER_SCAN)):
            stream = self._streams[session_id]
            if (
                kind in stream.kinds
                and all(stream.labels.get(k) == v for k, v in selector.items())
                and stream.take_credit()
            ):
                del members[session_id]
                members[session_id] = None  # to the back: the next one goes to another
                return stream
        return None

    def found_claimable(self, claimable: dict[str, set[str]]) -> None:
        """What the last poll found: kinds with claimable work, per pool."""
        self._claimable = claimable

    def may_find_work(self, pool: str, kinds: list[str]) -> bool:
        """Whether a stream looking by itself could find anything: only if the last poll
        saw claimable work of its pool and kinds (it may have woken other streams, whose
        labels the tasks' selectors did not match)."""
        found = self._claimable.get(pool, set())
        return any(kind in found for kind in kinds)

    def pools_wanting_work(self) -> set[str]:
        """Pools with at least one stream that has credit and is idle."""
        return {
            pool
            for pool, members in self._by_pool.items()
            if any(self._streams[s].wants_work for s in members)
        }

    def wake_for(self, pool: str, kind: str, count: int) -> None:
        """Wake up to ``count`` idle streams of ``pool`` that can run ``kind``."""
        members = self._by_pool.get(pool, {})
        for session_id in list(members):
            if count <= 0:
                return
            stream = self._streams[session_id]
            if stream.wants_work and kind in stream.kinds:
                stream.wake()
                count -= 1

    def cancel_attempt(
        self, session_id: str | None, task_id: str, attempt: int, reason: str
    ) -> None:
        """Tell the stream holding an attempt to stop it (no-op if that stream is not here)."""
        stream = self._streams.get(session_id or "")
        if stream is not None:
            stream.cancel_attempt(task_id, attempt, reason)

    def close_agent(
        self,
        agent_id: str,
        code: grpc.StatusCode,
        message: str,
        serials: frozenset[str] | None = None,
    ) -> int:
        """Close an agent's streams (only those using ``serials``, if given); returns how many."""
        closing = [
            s
            for s in self._streams.values()
            if s.agent_id == agent_id and (serials is None or s.serial in serials)
        ]
        for stream in closing:
            stream.close(code, message)
        return len(closing)

    def rotate_agents(self, agent_id: str | None, reason: str, issued_before: float) -> int:
        """Tell this replica's streams of ``agent_id`` (None: of every agent) whose
        certificates were issued before ``issued_before`` to renew; returns how many."""
        told = 0
        for stream in list(self._streams.values()):
            if agent_id is not None and stream.agent_id != agent_id:
                continue
            if isinstance(stream, Renewable) and stream.request_renewal(reason, issued_before):
                told += 1
        return told

    def trust_changed(self) -> int:
        """The CA changed (a rotation): every stream here follows it; returns how many."""
        followers = [s for s in self._streams.values() if isinstance(s, TrustFollower)]
        for stream in followers:
            stream.follow_trust()
        return len(followers)

    def stream_started(self, new: NewStream) -> None:
        """One live stream per agent: ``new`` replaces this replica's older streams of its
        agent. One whose certificate is older than ``new``'s (a renewal's make-before-break
        handover) stops taking work and is closed after ``renewal_overlap``; any other is
        closed at once. A stream here that is newer than ``new`` (the announcements
        crossed, or the replicas' clocks disagree) stays and announces itself again, so
        ``new`` is replaced wherever it is: whatever the clocks, one stream is left."""
        for stream in list(self._streams.values()):
            if stream.agent_id != new.agent_id or stream.session_id == new.session_id:
                continue
            if new.newer_than(stream):
                handover = stream.serial != new.serial and new.not_before >= stream.cert_not_before
                stream.replaced_by(new, handover=handover)
            else:
                stream.outlived(new)

    async def wait_idle(self, within: float) -> bool:
        """Wait until no stream is open, for at most ``within`` seconds; True if none is."""
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return True

    def drain_all(self, reason: str) -> None:
        """Drain every stream, and refuse new ones from now on (the server is stopping)."""
        self.closing = True
        for stream in list(self._streams.values()):
            stream.drain(reason)

    # Task watchers

    def accept_waiting(self, task_id: str, attempt: int, at: datetime, write_now: WriteNow) -> None:
        """A stream holds back the write of this attempt's Accepted (session.ACCEPT_DELAY);
        ``write_now`` writes it at once."""
        self._waiting_accepts[task_id] = (attempt, at, write_now)

    def accept_taken(self, task_id: str, attempt: int) -> None:
        """That Accepted was written, folded into its Result, or given up."""
        waiting = self._waiting_accepts.get(task_id)
        if waiting is not None and waiting[0] == attempt:
            del self._waiting_accepts[task_id]

    def waiting_accept(self, task_id: str, attempt: int) -> datetime | None:
        """When the Accepted of this attempt arrived, if its write is being held back:
        a read of the task shows it RUNNING since then, as written it would be."""
        waiting = self._waiting_accepts.get(task_id)
        return waiting[1] if waiting is not None and waiting[0] == attempt else None

    async def write_waiting_accepts(self) -> None:
        """Write every Accepted held back now (before the reaper looks at the tasks)."""
        if self._waiting_accepts:
            await asyncio.gather(*(w[2]() for w in list(self._waiting_accepts.values())))

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[Watcher]:
        """Told whenever ``task_id`` changes, for as long as the block runs."""
        watcher = Watcher()
        self._watchers[task_id].add(watcher)
        try:
            yield watcher
        finally:
            watchers = self._watchers.get(task_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[task_id]

    def task_changed(self, task_id: str, ended: Mapping[str, Any] | None = None) -> None:
        """``task_id`` changed; ``ended``: the row (all but its payload) of the change that
        ended it, when this replica made it (see ``Watcher.ended``)."""
        for watcher in self._watchers.get(task_id, ()):
            if ended is not None:
                watcher.ended = ended
            watcher.changed.set()
