"""One agent's Connect stream: Hello/Welcome, credit-based push, and reconciliation.

A stream is a reader (agent messages) and, only while they have something to do, a
pump (claims work while the agent has credit and the stream was woken) and a writer
(the only one that writes to the stream, while the outbox has messages): an idle stream
costs its reader, a future and four timers. The reader ending, or a close, ends the
stream; whatever attempts it still holds go back to the queue.

Batches (agent.proto, AgentBatch and ServerBatch): the reader takes an AgentBatch from
any agent and handles its items one by one as if each had come alone; the writer puts
what waits in the outbox into one ServerBatch, for an agent whose Hello said it reads
them. The outbox is bounded: an agent that stops reading ends with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from muster import batching
from muster.server import tracing
from muster.server.audit import AuditRecord
from muster.server.ca.authority import DEFAULT_BACKDATE, CertificateAuthority
from muster.server.dispatch.dispatcher import UNREACHABLE, Dispatcher
from muster.server.dispatch.hub import NewStream
from muster.server.dispatch.suspicion import RATE_WINDOW, RateWatch
from muster.server.drain import Drain, DrainClosed, DrainFull
from muster.server.services import convert
from muster.server.services.validation import KIND
from muster.server.storage import taskstore as task_store
from muster.server.storage.types import utcnow
from muster.states import State
from muster.v1 import agent_pb2

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 1000
IDLE_RECHECK = 30.0
"""Seconds an idle stream waits for a wake-up before looking for work by itself, if the
replica's last poll saw work it might run (its wake-ups went to streams that did not
match a selector)."""
DATABASE_ERRORS = UNREACHABLE
"""What a lost or refused database connection, or a pool with none free, raises through
SQLAlchemy and asyncpg (whose own errors escape unwrapped when a new connection is
refused: a stream ending then still releases what it can and records its end)."""
ACCEPT_DELAY = 0.02
"""Seconds an Accepted for an attempt this stream holds waits before it is written: a
Result that comes meanwhile ends the attempt in one write with the Accepted's time as
its start (a short task costs one UPDATE, one commit and one change for its watchers,
not two). Meanwhile this replica's Get and Watch show the task RUNNING as if it were
written; a longer task is written RUNNING this much later, and its watchers told then."""
FLUSH_TIMEOUT = 1.0
"""How long a closing stream waits for its outbox to be written."""
Context: TypeAlias = grpc.aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.ServerMessage]
MAX_CAPABILITIES = 100
ROOT_ROTATED = "CA root rotated: renew under the issuing root"
"""The Renew reason for a certificate under a root that no longer issues."""
OUTCOMES = frozenset(
    {agent_pb2.OUTCOME_SUCCEEDED, agent_pb2.OUTCOME_FAILED, agent_pb2.OUTCOME_CANCELLED}
)
MAX_AGENT_BATCH = 1000
"""Items an AgentBatch may hold (agent.proto)."""
OUTBOX_SLACK = 1024
"""The outbox holds at most max_concurrency + this many messages waiting to be written:
Assignments never exceed the credit, so only an agent that stops reading (its Acks and
Cancels pile up) reaches it."""


class StreamClosed(Exception):
    """Ends a stream with a status the agent sees."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AgentSession:
    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        agent_id: str,
        spiffe_id: str,
        serial: str,
        pool: str,
        labels: dict[str, str],
        not_before: datetime,
        not_after: datetime,
        peer: str,
    ) -> None:
        self.dispatcher = dispatcher
        self.config = dispatcher.config
        self.session_id = "s_" + secrets.token_hex(8)
        self.agent_id = agent_id
        self.spiffe_id = spiffe_id
        self.serial = serial
        self.pool = pool
        self.labels = labels
        self.not_before = not_before
        self.not_after = not_after
        self.cert_not_before = not_before.timestamp()
        self.peer = peer
        self.started_at = 0.0
        """When it was welcomed (POSIX seconds): of two streams of an agent, the later stays."""
        self.welcomed = False
        self.renew_after: datetime | None = None
        """The renew time Welcome gave; a stream still on this certificate well after it
        is sent Renew (``check_renewal``)."""
        self.rotation_requested_at: datetime | None = None
        self.trust: CertificateAuthority | None = None
        """The replica's CA: the trust bundle this stream is given, and the root that issues."""
        self.issuer_key_id: bytes | None = None
        """The Authority Key Identifier of this stream's certificate (which intermediate
        issued it): on a root that no longer issues, the agent is asked to renew."""
        self._bundle_version = 0
        """The trust bundle version this stream was last given."""
        self.cert_issued_at: float | None = None
        """When its certificate was issued (POSIX seconds), as recorded; see ``issued_at``."""
        """An operator's rotation request for this agent (from its record at connect): a
        certificate issued before it is sent Renew at once."""
        self._replaced: tuple[NewStream, bool] | None = None
        """The stream that replaced this one, and whether as a renewal's handover."""
        self._rate: RateWatch | None = None
        self._outlived: set[str] = set()
        """Older streams of this agent whose announcement this one answered (``outlived``)."""
        self.kinds: list[str] = []
        self.credit = 0
        self.draining = False
        self._handing_over = False
        """This replica drained the stream: at its end, what it holds stays the agent's."""
        self._context: Context | None = None
        self.batches = False
        """The agent reads ServerBatch (its Hello said so)."""
        self._outbox: Drain[agent_pb2.ServerMessage] | None = None
        """Messages waiting for the one writer; made (bounded) once Hello is checked."""
        self._pump_task: asyncio.Task[None] | None = None
        self._woken = False
        """A wake-up the pump has not acted on yet."""
        self._claiming = False
        """A claim is under way: tasks may be assigned to this stream that it never saw."""
        self._found_nothing_at: int | None = None
        """The pool's wake-up count (``Hub.announced``) when this stream's last claim,
        which found nothing, began; None while its claims find work. Credit coming back
        then wakes the pump only if work was announced since or a poll saw some: an
        agent finishing a task does not cost a claim that finds the queue empty."""
        self._eager = 0
        """Credits taken by submits dispatching eagerly to this stream, not yet delivered."""
        self._accepting: set[asyncio.Future[bool]] = set()
        """Accepted messages not yet written (the reader does not wait for each)."""
        self._accepts: dict[tuple[str, int], tuple[asyncio.TimerHandle, datetime]] = {}
        """Accepted messages waiting out ACCEPT_DELAY: their timers and arrival times."""
        self._cancels_sent: set[tuple[str, int]] = set()
        self._held: set[tuple[str, int]] = set()
        """Attempts pushed to (or reported by) the agent and not yet ended by a Result."""
        self.max_concurrency = 0
        self._closed: asyncio.Future[StreamClosed] = asyncio.get_running_loop().create_future()
        self._last_heard = asyncio.get_running_loop().time()

    # Called through the hub (from other coroutines)

    @property
    def wants_work(self) -> bool:
        return self.credit > 0 and not self.draining and not self._woken

    def wake(self) -> None:
        """Look for work: start the pump, or make the running one look once more."""
        self._woken = True
        if self._closed.done() or self.credit <= 0 or self.draining:
            return
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.create_task(self._pump(), name=f"pump-{self.session_id}")
            self._pump_task.add_done_callback(self._worker_done)

    def _may_find_work(self) -> bool:
        """Whether a claim now could find anything (see ``_found_nothing_at``)."""
        hub = self.dispatcher.hub
        return (
            self._found_nothing_at is None
            or hub.announced(self.pool) != self._found_nothing_at
            or hub.may_find_work(self.pool, self.kinds)
        )

    @property
    def idle_with_credit(self) -> bool:
        """Open, not draining, with credit, and its pump has looked for work (it has run
        at least once) and is not looking now."""
        return (
            self.credit > 0
            and self._pump_task is not None
            and not (self.draining or self._woken or self._claiming or self._closed.done())
        )

    def take_credit(self) -> bool:
        """Eager dispatch: hold one credit for a task being submitted now, to be assigned
        to this stream in the submit's own transaction; False unless idle with credit."""
        if not self.idle_with_credit:
            return False
        self.credit -= 1
        self._eager += 1
        return True

    def return_credit(self) -> None:
        """The eager submit that took a credit did not assign its task here after all."""
        self._eager -= 1
        self.credit += 1

    def deliver(self, task: task_store.Claimed) -> bool:
        """Send a task assigned to this stream by an eager submit (its credit taken with
        ``take_credit``); False when the stream closed or began draining meanwhile: the
        caller gives the attempt back."""
        self._eager -= 1
        if self.draining or self._closed.done():
            return False
        if self._rate is not None:
            self._rate.assigned(1)
        self._held.add((task.task_id, task.attempt))
        self._send(agent_pb2.ServerMessage(assignment=self._assignment(task)))
        return True

    def cancel_attempt(self, task_id: str, attempt: int, reason: str) -> None:
        if (task_id, attempt) in self._cancels_sent:
            return  # announced by fan-out and found again by polling: tell the agent once
        self._cancels_sent.add((task_id, attempt))
        self._send(
            agent_pb2.ServerMessage(
                cancel=agent_pb2.Cancel(task_id=task_id, attempt=attempt, reason=reason)
            )
        )

    def drain(self, reason: str) -> None:
        """The replica is stopping or the stream reached its maximum age: the agent takes
        its running work to its next stream (a handover), so nothing it holds is requeued."""
        self._handing_over = True
        if self.draining:
            return  # told already, or the agent said it is leaving
        self.draining = True
        self._send(agent_pb2.ServerMessage(drain=agent_pb2.Drain(reason=reason)))

    def close(self, code: grpc.StatusCode, message: str) -> None:
        if not self._closed.done():
            self._closed.set_result(StreamClosed(code, message))

    @property
    def issued_at(self) -> float:
        """When its certificate was issued (POSIX seconds): as recorded, or (certificates
        from before migration 0004) its notBefore undone of the CA's backdate."""
        if self.cert_issued_at is not None:
            return self.cert_issued_at
        return self.cert_not_before + DEFAULT_BACKDATE.total_seconds()

    def request_renewal(self, reason: str, issued_before: float | None = None) -> bool:
        """Send Renew (rotate your certificate now) unless the certificate was issued at
        or after ``issued_before``, or the stream is ending or already replaced by its
        renewal; True if sent. The agent renews make-before-break, keeping its work."""
        if self._closed.done() or self._replaced is not None or self._context is None:
            return False
        if issued_before is not None and self.issued_at >= issued_before:
            return False
        log.info(
            "asking agent %s to renew (session %s): %s", self.agent_id, self.session_id, reason
        )
        self._send(agent_pb2.ServerMessage(renew=agent_pb2.Renew(reason=reason)))
        return True

    def follow_trust(self) -> None:
        """The CA may have changed: give the agent a newer trust bundle than it has, and
        ask it to renew if its certificate chains to a root that no longer issues."""
        trust = self.trust
        if trust is None or self._context is None or self._closed.done():
            return
        if trust.bundle_version > self._bundle_version:
            self._bundle_version = trust.bundle_version
            self._send(agent_pb2.ServerMessage(trust_bundle=self._trust_bundle(trust)))
        if not trust.chains_to_issuing_root(self.issuer_key_id):
            self.request_renewal(ROOT_ROTATED)

    def _trust_bundle(self, trust: CertificateAuthority) -> agent_pb2.TrustBundle:
        return agent_pb2.TrustBundle(roots_pem=trust.bundle_pem, version=trust.bundle_version)

    def check_renewal(self, now: datetime) -> bool:
        """Send Renew if the stream is still on its certificate ``renewal_grace`` after
        the renew time Welcome gave (the agent missed it); True if sent."""
        if self.renew_after is None or now < self.renew_after + self.renewal_grace:
            return False
        return self.request_renewal("the certificate's renew time has passed; renew now")

    @property
    def renewal_grace(self) -> timedelta:
        """How late a renewal may be before the server asks for it: a twelfth of the
        lifetime (2 h of 24 h), so renew_after (at most 2/3) plus grace stays well
        before expiry."""
        return (self.not_after - self.not_before) / 12

    def outlived(self, new: NewStream) -> None:
        if self._closed.done() or self._replaced is not None or new.session_id in self._outlived:
            return
        self._outlived.add(new.session_id)  # once per older stream: no announcement storms
        self.dispatcher.fanout.stream_started(self._as_new())

    def _as_new(self) -> NewStream:
        return NewStream(
            agent_id=self.agent_id,
            session_id=self.session_id,
            serial=self.serial,
            not_before=self.cert_not_before,
            peer=self.peer,
            started_at=self.started_at,
        )

    def replaced_by(self, new: NewStream, *, handover: bool) -> None:
        """A newer stream of this agent was welcomed (here or on another replica)."""
        if self._replaced is not None or self._closed.done():
            return
        self._replaced = (new, handover)
        metrics = self.dispatcher.metrics
        metrics.streams_replaced.labels(reason="renewal" if handover else "reconnect").inc()
        if new.peer != self.peer:
            self.dispatcher.suspicion.flag(
                "two_addresses",
                self.agent_id,
                actor=self.spiffe_id,
                peer=new.peer,
                details={
                    "old_peer": self.peer,
                    "new_peer": new.peer,
                    "old_session": self.session_id,
                    "new_session": new.session_id,
                    # Recent: the old stream was alive (a copy beside the agent); long ago:
                    # more likely the agent itself, back from a cut on a new address.
                    "old_last_heard_s": round(
                        asyncio.get_running_loop().time() - self._last_heard, 1
                    ),
                },
            )
        if not handover:
            self.close(
                grpc.StatusCode.ABORTED,
                f"replaced by a newer stream of agent {self.agent_id} (session "
                f"{new.session_id}): one live stream per agent",
            )
            return
        # Make-before-break: the agent moves to the renewed certificate's stream and closes
        # this one itself; until then this one takes no new work, and is cut after the overlap.
        self.draining = True
        overlap = self.config.renewal_overlap.total_seconds()
        asyncio.get_running_loop().call_later(
            overlap,
            self.close,
            grpc.StatusCode.ABORTED,
            "replaced by the stream of this agent's renewed certificate",
        )

    def _write_accept(self, key: tuple[str, int], at: datetime) -> asyncio.Future[bool]:
        """Hand an Accepted (that arrived ``at``) to the group commit; reads stop showing
        it as waiting once the write is over."""
        moved = self.dispatcher.accept(*key, self.session_id, at=at)
        moved.add_done_callback(lambda _: self.dispatcher.hub.accept_taken(*key))
        moved.add_done_callback(partial(self._accepted, *key))
        self._accepting.add(moved)
        moved.add_done_callback(self._accepting.discard)
        return moved

    def _defer_accept(self, key: tuple[str, int]) -> None:
        """Hold an Accepted for ACCEPT_DELAY (see there); until it is written, this
        replica's reads of the task show it RUNNING (``Hub.waiting_accept``)."""
        at = self.dispatcher.clock.now()
        timer = asyncio.get_running_loop().call_later(ACCEPT_DELAY, self._accept_delayed, key)
        self._accepts[key] = (timer, at)
        self.dispatcher.hub.accept_waiting(*key, at, partial(self._write_accept_now, key))

    async def _write_accept_now(self, key: tuple[str, int]) -> None:
        """Write the Accepted for ``key`` at once if it still waits; return once written."""
        if (at := self._take_accept(key)) is not None:
            await asyncio.wait([self._write_accept(key, at)])

    def _take_accept(self, key: tuple[str, int]) -> datetime | None:
        """The arrival time of the Accepted for ``key`` if it waits, no longer waiting
        here (reads still show it until its write, or its Result's, is over)."""
        pending = self._accepts.pop(key, None)
        if pending is None:
            return None
        timer, at = pending
        timer.cancel()
        return at

    def _accept_delayed(self, key: tuple[str, int]) -> None:
        """ACCEPT_DELAY passed with no Result: write the Accepted now."""
        if self._closed.done():
            return  # the stream's end writes it (_write_waiting_accepts)
        if (at := self._take_accept(key)) is not None:
            self._write_accept(key, at)

    async def _fold_accept(self, result: agent_pb2.Result) -> datetime | None:
        """The arrival time of ``result``'s Accepted when it is still waiting and the
        Result's end can carry it (``Dispatcher.ends_in_one_write``); else None, once a
        waiting Accepted is written (the other ends of an attempt expect it RUNNING)."""
        key = (result.task_id, result.attempt)
        at = self._take_accept(key)
        if at is None or self.dispatcher.ends_in_one_write(result):
            return at
        await asyncio.wait([self._write_accept(key, at)])
        return None

    async def _write_waiting_accepts(self) -> None:
        """The stream ends: write the Accepted messages still waiting, before its attempts
        are released or handed over (which see them RUNNING, as the agent said)."""
        writes = []
        for key in list(self._accepts):
            if (at := self._take_accept(key)) is not None:
                writes.append(self._write_accept(key, at))
        if writes:
            await asyncio.wait(writes)

    def _accepted(self, task_id: str, attempt: int, moved: asyncio.Future[bool]) -> None:
        """An Accepted was written (the reader did not wait for it)."""
        if moved.cancelled():
            return
        if (err := moved.exception()) is not None:
            self.close(
                grpc.StatusCode.UNAVAILABLE,
                f"database unavailable ({type(err).__name__}); reconnect and resend",
            )
        elif not moved.result() and (task_id, attempt) in self._held:
            # Not when its Result came first (written in an earlier batch): it is over, and
            # a Cancel would only be remembered in _cancels_sent for the stream's life.
            self.cancel_attempt(task_id, attempt, "attempt is no longer current")

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        """A pump or writer that failed ends the stream with its error."""
        failed = not task.cancelled() and task.exception() is not None
        if failed and not self._closed.done():
            self._closed.set_exception(task.exception())  # type: ignore[arg-type]

    # The stream

    async def run(
        self,
        requests: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.ServerMessage],
    ) -> None:
        hello = await self._receive_hello(requests)
        self._check_hello(hello)
        self.batches = hello.batches
        self._outbox = Drain(
            self._write,
            name=f"write-{self.session_id}",
            bound=hello.max_concurrency + OUTBOX_SLACK,
            max_batch=batching.MAX_ITEMS,
            on_error=self._writer_failed,
            paused=True,  # nothing is written before Welcome
        )
        dispatcher = self.dispatcher
        in_flight = [(a.task_id, a.attempt) for a in hello.in_flight]
        adopted, lost = await dispatcher.adopt(self.agent_id, self.session_id, in_flight)
        self.kinds = sorted(set(hello.capabilities))
        self.max_concurrency = hello.max_concurrency
        self._held.update(in_flight)
        # Unadopted attempts still occupy a slot until the agent has cancelled them.
        self.credit = max(0, hello.max_concurrency - len(in_flight))
        await self._present()  # before Welcome: a welcomed agent counts as connected
        try:
            await context.write(self._welcome())
        except BaseException:
            await asyncio.shield(self._absent())
            raise
        self.welcomed = True
        self._context = context  # from here on, only the writer writes
        self._outbox.resume()
        for task_id, attempt in lost:
            self.cancel_attempt(task_id, attempt, "attempt is no longer current")
        self._rate = dispatcher.suspicion.rate_watch(self.max_concurrency)
        self.started_at = time.time()
        dispatcher.hub.register(self)
        reader: asyncio.Task[None] | None = None
        timers: dict[str, asyncio.TimerHandle] = {}
        reason = "stream closed"
        # From registration on, every way out unregisters: the agent may go away while
        # the connect is still being recorded (it would otherwise stay in the hub).
        try:
            # One live stream per agent: older streams of this agent, on any replica, go.
            dispatcher.fanout.stream_started(self._as_new())
            await dispatcher.record(
                self._audit("stream.connect", {"adopted": len(adopted), "lost": len(lost)})
            )
            # Per-stream lines are DEBUG: a fleet reconnecting writes thousands a second,
            # and the audit trail has every connect and disconnect with its reason.
            log.debug(
                "agent %s connected (session %s, credit %d)",
                self.agent_id,
                self.session_id,
                self.credit,
            )
            reader = asyncio.create_task(self._read(requests), name=f"read-{self.session_id}")
            timers = self._arm_timers()
            if self.rotation_requested_at is not None:
                self.request_renewal(
                    "an operator asked this agent to rotate its certificate",
                    self.rotation_requested_at.timestamp(),
                )
            self.follow_trust()  # a root rotated, or the bundle changed since Welcome
            self.wake()
            ending: list[asyncio.Future[Any]] = [reader, self._closed]
            await asyncio.wait(ending, return_when=asyncio.FIRST_COMPLETED)
            if self._closed.done():
                if (failure := self._closed.exception()) is not None:
                    reason = repr(failure)
                    raise failure
                closed = self._closed.result()
                reason = closed.message
                await self._flush_outbox()
                raise closed
            if (exc := reader.exception()) is not None:
                reason = exc.message if isinstance(exc, StreamClosed) else repr(exc)
                raise exc
        finally:
            for timer in timers.values():
                timer.cancel()
            self.close(grpc.StatusCode.CANCELLED, reason)  # no pump starts now
            workers = [t for t in (reader, self._pump_task) if t is not None]
            if (writer := self._outbox.task) is not None:
                workers.append(writer)
            self._outbox.abort()  # nothing more is written
            for worker in workers:
                worker.cancel()
            for worker in workers:
                with contextlib.suppress(BaseException):
                    await worker
            # Shielded: the stream may be ending because the handler was cancelled. The
            # hub keeps the stream until its work is released, so shutdown can wait for it.
            try:
                await asyncio.shield(self._write_waiting_accepts())
                await asyncio.shield(self._release(reason))
            finally:
                dispatcher.hub.unregister(self)

    async def _present(self) -> None:
        """Count as connected, on every replica, until the stream ends (``_absent``)."""
        try:
            await self.dispatcher.presence.connected(
                session_id=self.session_id,
                agent_id=self.agent_id,
                capabilities=self.kinds,
                max_concurrency=self.max_concurrency,
                cert_serial=self.serial,
                cert_not_after=self.not_after,
            )
        except DATABASE_ERRORS as err:
            raise StreamClosed(
                grpc.StatusCode.UNAVAILABLE,
                f"database unavailable ({type(err).__name__}); reconnect",
            ) from None

    async def _absent(self) -> None:
        """No longer connected; should this fail, the row expires (storage/presence.py)."""
        try:
            await self.dispatcher.presence.disconnected(
                session_id=self.session_id, agent_id=self.agent_id
            )
        except DATABASE_ERRORS as err:
            log.warning(
                "could not end the presence of session %s (%s); it will expire",
                self.session_id,
                type(err).__name__,
            )

    async def _release(self, reason: str) -> None:
        await self._absent()
        handed_over = 0
        try:
            if self._handing_over and (self._held or self._claiming):
                # A planned end (this replica drained it): the agent brings its attempts to
                # its next stream, here or elsewhere, with the same numbers; no requeue.
                handed_over = await self.dispatcher.hand_over(self.session_id, set(self._held))
            elif self._held or self._claiming:
                await self.dispatcher.release_session(
                    self.session_id, f"agent stream ended: {reason}"
                )
        except DATABASE_ERRORS as err:
            # The leases of whatever this stream held expire, and a reaper requeues them.
            log.warning(
                "could not release session %s (%s); its leases will expire",
                self.session_id,
                type(err).__name__,
            )
        if self._replaced is not None:
            new, handover = self._replaced
            await self.dispatcher.record(
                self._audit(
                    "stream.replaced",
                    {
                        "old_peer": self.peer,
                        "new_peer": new.peer,
                        "new_session": new.session_id,
                        "new_serial": new.serial,
                        "handover": handover,
                    },
                )
            )
        await self.dispatcher.record(
            self._audit("stream.disconnect", {"reason": reason[:200], "handed_over": handed_over})
        )
        log.debug("agent %s disconnected (session %s): %s", self.agent_id, self.session_id, reason)

    async def _receive_hello(
        self, requests: AsyncIterator[agent_pb2.AgentMessage]
    ) -> agent_pb2.Hello:
        try:
            first = await asyncio.wait_for(
                anext(requests), self.config.hello_timeout.total_seconds()
            )
        except TimeoutError:
            raise StreamClosed(
                grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello received in time"
            ) from None
        except StopAsyncIteration:
            raise StreamClosed(
                grpc.StatusCode.INVALID_ARGUMENT, "stream closed before Hello"
            ) from None
        if first.WhichOneof("body") != "hello":
            raise StreamClosed(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        return first.hello

    def _check_hello(self, hello: agent_pb2.Hello) -> None:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not 1 <= hello.max_concurrency <= MAX_CONCURRENCY:
            raise StreamClosed(
                invalid, f"Hello.max_concurrency must be between 1 and {MAX_CONCURRENCY}"
            )
        if not hello.capabilities or len(hello.capabilities) > MAX_CAPABILITIES:
            raise StreamClosed(
                invalid, f"Hello.capabilities must list 1 to {MAX_CAPABILITIES} task kinds"
            )
        for kind in hello.capabilities:
            if KIND.fullmatch(kind) is None:
                raise StreamClosed(
                    invalid, f"Hello.capabilities: {kind[:70]!a} is not a task kind name"
                )
        if len(hello.in_flight) > hello.max_concurrency:
            raise StreamClosed(invalid, "Hello.in_flight lists more attempts than max_concurrency")
        for key, value in hello.labels.items():
            if self.labels.get(key) != value:
                raise StreamClosed(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"label {key[:50]!a}={value[:50]!a} is not in this agent's enrolled scope",
                )

    def _welcome(self) -> agent_pb2.ServerMessage:
        lifetime = self.not_after - self.not_before
        renew_after = self.not_before + lifetime * random.uniform(0.5, 2 / 3)
        self.renew_after = renew_after
        bundle = None
        if self.trust is not None:
            bundle = self._trust_bundle(self.trust)
            self._bundle_version = bundle.version
        return agent_pb2.ServerMessage(
            welcome=agent_pb2.Welcome(
                trust_bundle=bundle,
                session_id=self.session_id,
                agent_id=self.agent_id,
                spiffe_id=self.spiffe_id,
                heartbeat_interval=convert.duration(self.config.heartbeat_interval),
                lease_duration=convert.duration(self.config.lease_duration),
                renew_after=convert.timestamp(renew_after),
                pool=self.pool,
                labels=self.labels,
                batches=True,
            )
        )

    def _send(self, message: agent_pb2.ServerMessage) -> None:
        outbox = self._outbox
        if outbox is None:
            return  # before Hello: nothing can be sent yet
        try:
            outbox.put(message)
        except DrainFull:
            # The agent stopped reading (or reads far slower than it sends): what it holds
            # is requeued as after any cut, rather than the replica holding its messages.
            self.close(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the agent is not reading its stream: {len(outbox)} messages wait to be "
                "written to it",
            )
        except DrainClosed:
            pass  # the stream is ending

    async def _write(self, messages: list[agent_pb2.ServerMessage]) -> None:
        """The one writer: one write per message, or per ServerBatch if the agent reads them."""
        context = self._context
        assert context is not None  # the outbox is paused until Welcome
        if not self.batches or len(messages) == 1:
            for message in messages:
                await context.write(message)
            return
        for group in batching.split(messages):
            if len(group) == 1:
                await context.write(group[0])
            else:
                await context.write(
                    agent_pb2.ServerMessage(batch=agent_pb2.ServerBatch(messages=group))
                )

    def _writer_failed(self, err: BaseException) -> None:
        """A write that failed ends the stream with its error."""
        if not self._closed.done():
            self._closed.set_exception(err)

    async def _flush_outbox(self) -> None:
        """Let the writer write what is queued (a closing stream's last words), briefly: a
        stuck write (an agent that stopped reading) is abandoned."""
        if self._outbox is None or self._context is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._outbox.close(), FLUSH_TIMEOUT)

    async def _pump(self) -> None:
        """Claim while woken and the agent has credit; then stop until the next wake-up."""
        while self._woken and self.credit > 0 and not self.draining:
            self._woken = False
            limit = self.credit
            self._claiming = True
            announced = self.dispatcher.hub.announced(self.pool)
            claimed_ns = time.time_ns()  # the end of the queue wait of what this claims
            try:
                claimed = await self.dispatcher.claim(
                    agent_id=self.agent_id,
                    session_id=self.session_id,
                    pool=self.pool,
                    labels=self.labels,
                    kinds=self.kinds,
                    limit=limit,
                )
            except DATABASE_ERRORS as err:
                # Nothing was claimed; keep the stream and look again after a pause.
                log.warning("claim for %s failed (%s)", self.agent_id, type(err).__name__)
                self._claiming = False
                await asyncio.sleep(self.config.poll_interval.total_seconds())
                self._woken = True
                continue
            if self.draining:
                # Drain went out while this claim ran: no Assignment may follow it. Until
                # they are given back, _release would give them back (they are unsent).
                try:
                    if claimed:
                        await self.dispatcher.give_back(claimed, self.session_id)
                except DATABASE_ERRORS as err:
                    log.warning("give-back for %s failed (%s)", self.agent_id, type(err).__name__)
                    return
                self._claiming = False
                return
            self._found_nothing_at = None if claimed else announced
            if self._rate is not None:
                self._rate.assigned(len(claimed))
            for task in claimed:
                self.credit -= 1
                self._held.add((task.task_id, task.attempt))
                assignment = self._assignment(task, claimed_ns)
                self._send(agent_pb2.ServerMessage(assignment=assignment))
            self._claiming = False
            if len(claimed) == limit:
                self._woken = True  # credit used up, or more work may be waiting: look again
        # Idle streams do not poll the database each: the replica looks once per
        # poll_interval for claimable work and wakes as many streams as it found tasks
        # (Dispatcher.poll_queues); a timer wakes each stream now and then as a safety net.

    def _assignment(
        self, task: task_store.Claimed, claimed_ns: int | None = None
    ) -> agent_pb2.Assignment:
        assignment = agent_pb2.Assignment(
            task_id=task.task_id,
            attempt=task.attempt,
            kind=task.kind,
            payload=task.payload,
            start_to_close_timeout=convert.duration(task.start_to_close_timeout),
            deadline=convert.timestamp(task.deadline),
            accept_within=convert.duration(self.config.accept_timeout),
            max_cost_micros=task.ceiling_micros,
            output_schema=task.output_schema or "",
        )
        if task.signature:
            # The envelope as stored: the agent verifies it, so it is forwarded unchanged.
            try:
                assignment.signature.MergeFromString(task.signature)
            except DecodeError:
                # Only a row altered in the database: sent unsigned, which an agent that
                # requires a signature refuses (and one that does not would run anyway).
                log.warning("task %s: its stored signature does not parse", task.task_id)
                assignment.ClearField("signature")
        if task.trace_context is not None:
            traced = tracing.dispatched(task, self.agent_id, claimed_ns)
            if traced is not None:
                assignment.trace_context.CopyFrom(traced)
        return assignment

    async def _read(self, requests: AsyncIterator[agent_pb2.AgentMessage]) -> None:
        try:
            await self._read_messages(requests)
        except DATABASE_ERRORS as err:
            # A result we could not record was not acknowledged: the agent keeps it in
            # its outbox and sends it again on the stream it opens next.
            raise StreamClosed(
                grpc.StatusCode.UNAVAILABLE,
                f"database unavailable ({type(err).__name__}); reconnect and resend",
            ) from None

    async def _read_messages(self, requests: AsyncIterator[agent_pb2.AgentMessage]) -> None:
        loop = asyncio.get_running_loop()
        async for message in requests:
            self._last_heard = loop.time()
            body = message.WhichOneof("body")
            if body != "batch":
                if (problem := _malformed(message, body)) is not None:
                    raise StreamClosed(grpc.StatusCode.INVALID_ARGUMENT, problem)
                await self._handle(message, body)
                continue
            # A batch is checked whole before any of it counts: nothing of a bad one is done.
            items = message.batch.messages
            if not 1 <= len(items) <= MAX_AGENT_BATCH:
                raise StreamClosed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"AgentBatch must hold 1 to {MAX_AGENT_BATCH} messages, not {len(items)}",
                )
            bodies = [item.WhichOneof("body") for item in items]
            for index, (item, item_body) in enumerate(zip(items, bodies, strict=True)):
                problem = (
                    "batches do not nest" if item_body == "batch" else _malformed(item, item_body)
                )
                if problem is not None:
                    raise StreamClosed(
                        grpc.StatusCode.INVALID_ARGUMENT, f"AgentBatch item {index}: {problem}"
                    )
            index = 0
            while index < len(items):
                run = _result_run(items, bodies, index)
                if len(run) > 1:
                    await self._record_results(run)
                    index += len(run)
                else:
                    await self._handle(items[index], bodies[index])
                    index += 1

    async def _record_results(self, results: list[agent_pb2.Result]) -> None:
        """Results for distinct attempts (one, or consecutive ones of a batch): recorded
        together (one group commit rather than one each), each with its attempt's waiting
        Accepted folded in, then acknowledged in their order."""
        dispatcher = self.dispatcher
        started = [await self._fold_accept(r) for r in results]
        try:
            acks = await asyncio.gather(
                *(
                    dispatcher.record_result(self.agent_id, r, accepted_at=at)
                    for r, at in zip(results, started, strict=True)
                )
            )
        finally:
            for r, at in zip(results, started, strict=True):
                if at is not None:
                    dispatcher.hub.accept_taken(r.task_id, r.attempt)
        for ack in acks:
            await self._recorded(ack)

    async def _recorded(self, ack: agent_pb2.Ack) -> None:
        """What follows a recorded Result: the stale check, the slot, the Ack."""
        key = (ack.task_id, ack.attempt)
        if ack.status == agent_pb2.ACK_STATUS_STALE and key not in self._held:
            await self._check_stale(ack.task_id, ack.attempt)
        self._held.discard(key)
        self._cancels_sent.discard(key)  # over: its Cancel need not be remembered
        self._send(agent_pb2.ServerMessage(ack=ack))

    async def _handle(self, message: agent_pb2.AgentMessage, body: str | None) -> None:
        """One agent message (alone, or an item of a batch), already checked by
        ``_malformed``."""
        dispatcher = self.dispatcher
        # Results are not counted: an outbox resend after a reconnect is a burst.
        rate = self._rate
        if body != "result" and rate is not None and (seen := rate.count()) is not None:
            self._suspicious(
                "message_rate",
                {"messages": seen, "window_s": RATE_WINDOW, "allowance": rate.limit()},
            )
        if body == "credit":
            # Never more than the agent said it runs at once, whatever it grants:
            # in-flight per agent is the server's limit, not the agent's promise. An
            # excess is capped, and counted as suspicious (an agent that keeps count
            # as agent.proto says never grants one).
            room = self.max_concurrency - len(self._held) - self._eager
            wanted = self.credit + message.credit.credits
            if wanted > room:
                self._suspicious(
                    "excess_credit",
                    {"granted": message.credit.credits, "credit": self.credit, "room": room},
                )
            self.credit = max(0, min(wanted, room))
            if self._may_find_work():
                self.wake()
        elif body == "accepted":
            a = message.accepted
            key = (a.task_id, a.attempt)
            if key in self._accepts:
                return  # a repeat while the first waits: written once
            if key not in self._held:
                self._suspicious(
                    "unheld_attempt",
                    {"message": "accepted", "task": a.task_id[:64], "attempt": a.attempt},
                )
                moved = self._write_accept(key, dispatcher.clock.now())
                if len(self._accepting) > self.max_concurrency:
                    await asyncio.wait([moved])  # an agent flooding Accepted waits for them
                return
            self._defer_accept(key)
        elif body == "result":
            await self._record_results([message.result])
        elif body == "heartbeat":
            await dispatcher.heartbeat(
                self.session_id, [(a.task_id, a.attempt) for a in message.heartbeat.in_flight]
            )
        elif body == "progress":
            p = message.progress
            await dispatcher.heartbeat(self.session_id, [(p.task_id, p.attempt)])
        elif body == "draining":
            self.draining = True
            log.debug("agent %s is draining: %s", self.agent_id, message.draining.reason[:200])

    def _arm_timers(self) -> dict[str, asyncio.TimerHandle]:
        """Close a stream that goes silent, and one whose certificate expires; drain one
        that reaches its maximum age, so agents spread again over replicas; look for
        work now and then even without a wake-up.

        Timers rather than a watchdog task: an idle stream costs no wake-ups but these.
        Timers that re-arm replace their entry, so cancelling the values stops them all.
        """
        loop = asyncio.get_running_loop()
        timers = {
            "expiry": loop.call_later(
                max(0.0, (self.not_after - utcnow()).total_seconds()),
                self.close,
                grpc.StatusCode.UNAUTHENTICATED,
                "client certificate expired",
            )
        }
        if max_age := self.config.max_stream_age.total_seconds():
            timers["max_age"] = loop.call_later(
                max_age * random.uniform(0.9, 1.1),
                self.drain,
                "maximum stream age reached; reconnect",
            )

        def recheck() -> None:
            if self.dispatcher.hub.may_find_work(self.pool, self.kinds):
                self.wake()
            timers["recheck"] = loop.call_later(IDLE_RECHECK * random.uniform(0.8, 1.2), recheck)

        timers["recheck"] = loop.call_later(IDLE_RECHECK * random.uniform(0.8, 1.2), recheck)

        def overdue() -> None:
            self.check_renewal(utcnow())
            # Asked again now and then (a lost or ignored Renew) until the expiry timer.
            timers["renew"] = loop.call_later(self.renewal_grace.total_seconds() / 2, overdue)

        if self.renew_after is not None:
            due = self.renew_after + self.renewal_grace
            timers["renew"] = loop.call_later(max(0.0, (due - utcnow()).total_seconds()), overdue)
        silence = self.config.lease_duration.total_seconds()

        def check_silence() -> None:
            quiet_until = self._last_heard + silence
            if loop.time() >= quiet_until:
                self.close(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "no message from the agent within the lease"
                )
            else:
                timers["silence"] = loop.call_at(quiet_until, check_silence)

        timers["silence"] = loop.call_at(self._last_heard + silence, check_silence)
        return timers

    def _suspicious(self, kind: str, details: dict[str, object]) -> None:
        self.dispatcher.suspicion.flag(
            kind,
            self.agent_id,
            actor=self.spiffe_id,
            peer=self.peer,
            details={"session": self.session_id, **details},
        )

    async def _check_stale(self, task_id: str, attempt: int) -> None:
        """A stale Result for an attempt this stream does not hold: an outbox resend of an
        attempt the agent lost (fine), or one it never held (suspicious): no such task, an
        attempt that never was, or the current attempt of another agent."""
        async with self.dispatcher.db.transaction() as session:
            current = await self.dispatcher.tasks.attempt_of(session, task_id)
        if (
            current is None
            or attempt > current.attempt
            or (
                attempt == current.attempt
                and (
                    current.agent_id not in (None, self.agent_id)
                    or current.state == State.QUEUED  # a queued attempt nobody held
                )
            )
        ):
            self._suspicious(
                "unheld_attempt",
                {"message": "result", "task": task_id[:64], "attempt": attempt},
            )

    def _audit(self, action: str, details: dict[str, object]) -> AuditRecord:
        return AuditRecord(
            actor=self.spiffe_id,
            action=action,
            target=self.session_id,
            peer=self.peer,
            details={"serial": self.serial, **details},
        )


def _malformed(message: agent_pb2.AgentMessage, body: str | None) -> str | None:
    """What makes an agent message (after Hello) a protocol error, or None: the same
    checks for a message alone and for each item of a batch."""
    if body is None:
        return "empty or unknown agent message"
    if body == "hello":
        return "Hello may only be the first message"
    if body == "credit" and message.credit.credits < 0:
        return "Credit.credits must not be negative"
    if body == "result" and message.result.outcome not in OUTCOMES:
        return "Result.outcome must be OUTCOME_SUCCEEDED, OUTCOME_FAILED or OUTCOME_CANCELLED"
    return None


def _result_run(
    items: Sequence[agent_pb2.AgentMessage], bodies: list[str | None], start: int
) -> list[agent_pb2.Result]:
    """The Results from ``start`` on, up to the first other item or a repeated attempt
    (a resend of the same Result in one batch is recorded after the first, as alone)."""
    run: list[agent_pb2.Result] = []
    seen: set[tuple[str, int]] = set()
    for index in range(start, len(items)):
        if bodies[index] != "result":
            break
        r = items[index].result
        if (r.task_id, r.attempt) in seen:
            break
        seen.add((r.task_id, r.attempt))
        run.append(r)
    return run
