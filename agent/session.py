"""One ``AgentService.Connect`` stream: Hello/Welcome, then the message loop until it ends.

A Session speaks the protocol; the daemon (its host) owns everything that
outlives a stream: the runner, the outbox, credentials, reconnecting. Writes go
through one writer task, because a grpc.aio call takes one write at a time.

Credit bookkeeping: the server starts us at ``max_concurrency - len(in_flight)``.
``_counted`` holds the attempts that occupy a slot in the server's view of this
stream (those in Hello plus those accepted here); when one of them finishes we
grant ``Credit(1)``, so the server's count always equals our free slots.

Batches (agent.proto): the daemon's Hello says it reads ServerBatch, and once the
Welcome says the server reads AgentBatch, the writer sends what has queued up meanwhile
(Accepted, Result and Credit of attempts that finished together) as one message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import itertools
import logging
from typing import Protocol

from grpc import aio

from muster import batching
from muster.agent.channel import agent_channel
from muster.agent.outbox import Outbox
from muster.agent.runner import AttemptKey, TaskRunner
from muster.agent.state import Credentials
from muster.errors import MusterError
from muster.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT = 10.0
MIN_HEARTBEAT = 0.05
HANDOVER_ACK_WAIT = 5.0
"""On a server's Drain, how long to wait for the Acks of Results already sent before
reconnecting (what is still unacknowledged is resent on the next stream)."""
_ids = itertools.count(1)


class SessionEnd(enum.Enum):
    """Why a stream ended without an error."""

    CLOSED = "closed"
    """We closed it (shutdown, or a replacement stream took over)."""
    DRAINED = "drained"
    """The server asked us to drain and we did: reconnect, probably to another replica."""
    SERVER_CLOSED = "server_closed"
    """The server ended the stream cleanly without being asked."""


class SessionError(MusterError):
    """The server broke the protocol (no Welcome, wrong first message)."""


class SessionHost(Protocol):
    """What a Session needs from the daemon that outlives it."""

    @property
    def runner(self) -> TaskRunner: ...

    @property
    def outbox(self) -> Outbox: ...

    @property
    def accepting_work(self) -> bool: ...

    @property
    def drain_timeout(self) -> float: ...

    def build_hello(self) -> agent_pb2.Hello: ...

    def on_welcome(self, session: Session) -> None: ...

    def on_renew_requested(self, reason: str) -> None: ...

    def on_trust_bundle(self, bundle: agent_pb2.TrustBundle) -> None: ...

    def record_result(self, result: agent_pb2.Result) -> None: ...

    def acknowledged(self, ack: agent_pb2.Ack) -> None:
        """The server is done with a Result: drop it from the outbox."""
        ...

    def notify_changed(self) -> None: ...

    async def wait_acked(self) -> None: ...


class _Close:
    """Queue sentinel: half-close the stream."""


_CLOSE = _Close()


class Session:
    """One stream to one server replica."""

    def __init__(
        self,
        host: SessionHost,
        *,
        target: str,
        credentials: Credentials,
        tls_server_name: str | None = None,
        welcome_timeout: float = 15.0,
        close_grace: float = 2.0,
    ) -> None:
        self.host = host
        self.target = target
        self.credentials = credentials
        self.tls_server_name = tls_server_name
        self.welcome_timeout = welcome_timeout
        self.close_grace = close_grace
        self.id = next(_ids)
        self.welcome: agent_pb2.Welcome | None = None
        self.welcomed_at: float | None = None
        """Event-loop time of the Welcome, to tell a healthy stream from a flapping one."""
        self.welcomed = asyncio.Event()
        self.channel: aio.Channel | None = None
        self.task: asyncio.Task[SessionEnd] | None = None
        self._call: aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ServerMessage] | None
        self._call = None
        self._outq: asyncio.Queue[agent_pb2.AgentMessage | _Close] = asyncio.Queue()
        self._counted: set[AttemptKey] = set()
        self._helpers: list[asyncio.Task[None]] = []
        self._force_handle: asyncio.TimerHandle | None = None
        self._closing = False
        self._forced = False
        self._server_draining = False
        self._draining_sent = False
        self._replacing = False
        self._batches = False
        """The server reads AgentBatch (its Welcome said so): the writer batches."""

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.target}>"

    # Lifecycle --------------------------------------------------------------

    def start(self) -> asyncio.Task[SessionEnd]:
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"session {self.id}")
        return self.task

    async def wait(self) -> SessionEnd:
        """The outcome; raises the stream's AioRpcError or a SessionError."""
        return await self.start()

    async def stop(self) -> None:
        """Cancel the stream now and wait for it, whatever its outcome (for shutdown)."""
        if self.task is None:
            return
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    @property
    def established(self) -> bool:
        return self.welcomed.is_set() and not self.done

    @property
    def accepting(self) -> bool:
        """Whether this stream takes new assignments."""
        blocked = self._server_draining or self._draining_sent or self._closing or self._replacing
        return not blocked and self.host.accepting_work

    def stop_accepting(self) -> None:
        """Take no new work here (a replacement stream is being opened)."""
        self._replacing = True

    def resume_accepting(self) -> None:
        """The replacement stream failed; keep using this one."""
        self._replacing = False

    def begin_draining(self, reason: str) -> None:
        """Tell the server we take no new work (our own shutdown)."""
        if not self._draining_sent and not self._closing:
            self._draining_sent = True
            self.send(agent_pb2.AgentMessage(draining=agent_pb2.Draining(reason=reason)))

    def close(self) -> None:
        """Half-close the stream; if the server has not ended it within the grace, cancel it."""
        if self._closing:
            return
        self._closing = True
        self._outq.put_nowait(_CLOSE)
        self._force_handle = asyncio.get_running_loop().call_later(
            self.close_grace, self._force_close
        )

    def _force_close(self) -> None:
        if self._call is not None and not self._call.done():
            self._forced = True
            self._call.cancel()

    # Sending ----------------------------------------------------------------

    def send(self, message: agent_pb2.AgentMessage) -> None:
        """Queue a message for the writer; dropped once we half-closed."""
        if not self._closing:
            self._outq.put_nowait(message)

    def deliver(self, result: agent_pb2.Result) -> None:
        """Send a finished attempt's Result, and give its slot back to the server."""
        key = (result.task_id, result.attempt)
        self.send(agent_pb2.AgentMessage(result=result))
        if key in self._counted:
            self._counted.discard(key)
            if self.accepting:
                self.send(agent_pb2.AgentMessage(credit=agent_pb2.Credit(credits=1)))

    def send_progress(
        self, task_id: str, attempt: int, message: str, percent: int, output_tokens: int = 0
    ) -> None:
        progress = agent_pb2.Progress(
            task_id=task_id,
            attempt=attempt,
            message=message,
            percent=percent,
            output_tokens=output_tokens,
        )
        self.send(agent_pb2.AgentMessage(progress=progress))

    # The stream -------------------------------------------------------------

    async def _run(self) -> SessionEnd:
        self.channel = agent_channel(self.target, self.credentials, self.tls_server_name)
        try:
            return await self._stream(self.channel)
        finally:
            if self._force_handle is not None:
                self._force_handle.cancel()
            for helper in self._helpers:
                helper.cancel()
            await asyncio.gather(*self._helpers, return_exceptions=True)
            await self.channel.close(grace=None)

    async def _stream(self, channel: aio.Channel) -> SessionEnd:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        call = stub.Connect()
        self._call = call
        hello = self.host.build_hello()
        self._counted = {(ref.task_id, ref.attempt) for ref in hello.in_flight}
        try:
            await call.write(agent_pb2.AgentMessage(hello=hello))
            async with asyncio.timeout(self.welcome_timeout):
                first = await call.read()
        except TimeoutError:
            raise SessionError(
                f"no Welcome from {self.target} within {self.welcome_timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            return self._locally_cancelled()
        if not isinstance(first, agent_pb2.ServerMessage):
            raise SessionError(f"{self.target} closed the stream before Welcome")
        if first.WhichOneof("body") != "welcome":
            raise SessionError(f"expected Welcome, got {first.WhichOneof('body')}")
        self._on_welcome(first.welcome)
        while True:
            try:
                message = await call.read()
            except asyncio.CancelledError:
                return self._locally_cancelled()
            if not isinstance(message, agent_pb2.ServerMessage):
                break  # EOF: the server ended the stream with OK
            self._dispatch(message)
        if self._server_draining:
            return SessionEnd.DRAINED
        if self._closing:
            return SessionEnd.CLOSED
        return SessionEnd.SERVER_CLOSED

    def _locally_cancelled(self) -> SessionEnd:
        """A read ended because we cancelled the call after the close grace, not our task."""
        current = asyncio.current_task()
        if self._forced and current is not None and not current.cancelling():
            return SessionEnd.DRAINED if self._server_draining else SessionEnd.CLOSED
        raise asyncio.CancelledError

    async def _writer(self) -> None:
        assert self._call is not None
        call = self._call
        while True:
            first = await self._outq.get()
            # What queued up meanwhile goes with it, as one AgentBatch if the server reads
            # them (in order; a half-close ends the run).
            taken = [first]
            if self._batches:
                while (
                    len(taken) < batching.MAX_ITEMS
                    and not isinstance(taken[-1], _Close)
                    and not self._outq.empty()
                ):
                    taken.append(self._outq.get_nowait())
            messages = [m for m in taken if not isinstance(m, _Close)]
            try:
                if len(messages) == 1:
                    await call.write(messages[0])
                elif messages:
                    for group in batching.split(messages):
                        await call.write(
                            group[0]
                            if len(group) == 1
                            else agent_pb2.AgentMessage(batch=agent_pb2.AgentBatch(messages=group))
                        )
                if isinstance(taken[-1], _Close):
                    await call.done_writing()
                    return
            except (aio.AioRpcError, asyncio.InvalidStateError) as err:
                # The reader sees the same failure and ends the session.
                log.debug("session %d: write failed: %s", self.id, err)
                return

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            running = self.host.runner.running()
            refs = [common_pb2.AttemptRef(task_id=t, attempt=a) for t, a in running]
            self.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(in_flight=refs)))

    # Incoming ---------------------------------------------------------------

    def _on_welcome(self, welcome: agent_pb2.Welcome) -> None:
        self.welcome = welcome
        self._batches = welcome.batches  # a server from before batches would refuse one
        interval = DEFAULT_HEARTBEAT
        if welcome.HasField("heartbeat_interval"):
            interval = welcome.heartbeat_interval.ToTimedelta().total_seconds() or interval
        interval = max(MIN_HEARTBEAT, interval)
        log.info(
            "session %d: connected to %s as %s (session %s, heartbeat %gs)",
            self.id,
            self.target,
            welcome.spiffe_id or "?",
            welcome.session_id or "?",
            interval,
        )
        self._helpers.append(asyncio.create_task(self._writer(), name=f"session {self.id} writer"))
        self._helpers.append(
            asyncio.create_task(self._heartbeats(interval), name=f"session {self.id} heartbeat")
        )
        if welcome.HasField("trust_bundle"):  # absent from servers before CA rotation
            self.host.on_trust_bundle(welcome.trust_bundle)
        self.welcomed_at = asyncio.get_running_loop().time()
        self.welcomed.set()
        self.host.on_welcome(self)
        pending = self.host.outbox.pending()
        if pending:
            log.info("session %d: resending %d unacknowledged result(s)", self.id, len(pending))
        for result in pending:
            self.send(agent_pb2.AgentMessage(result=result))
        # Attempts counted in Hello that finished before Welcome: their slots are free again.
        finished = {key for key in self._counted if not self.host.runner.is_running(key)}
        self._counted -= finished
        if finished and self.accepting:
            credit = agent_pb2.Credit(credits=len(finished))
            self.send(agent_pb2.AgentMessage(credit=credit))

    def _dispatch(self, message: agent_pb2.ServerMessage) -> None:
        body = message.WhichOneof("body")
        if body == "batch":
            # Sent only because our Hello asked for them; the items in order, as if alone.
            for item in message.batch.messages:
                if item.WhichOneof("body") == "batch":
                    log.warning("session %d: ignoring a nested batch", self.id)
                else:
                    self._dispatch(item)
        elif body == "assignment":
            self._on_assignment(message.assignment)
        elif body == "cancel":
            self._on_cancel(message.cancel)
        elif body == "ack":
            ack = message.ack
            self.host.acknowledged(ack)
            log.log(
                # A stale Result was work the server had already given to another attempt.
                logging.INFO if ack.status == agent_pb2.ACK_STATUS_STALE else logging.DEBUG,
                "session %d: ack %s#%d %s",
                self.id,
                ack.task_id,
                ack.attempt,
                agent_pb2.AckStatus.Name(ack.status),
            )
            self.host.notify_changed()
        elif body == "drain":
            self._on_drain(message.drain.reason)
        elif body == "renew":
            log.info("session %d: server asks to renew: %s", self.id, message.renew.reason)
            self.host.on_renew_requested(message.renew.reason or "server request")
        elif body == "trust_bundle":
            self.host.on_trust_bundle(message.trust_bundle)
        elif body == "welcome":
            log.warning("session %d: ignoring a second Welcome", self.id)
        else:
            log.warning("session %d: ignoring an unknown message from the server", self.id)

    def _accepted(self, key: AttemptKey) -> None:
        accepted = agent_pb2.Accepted(task_id=key[0], attempt=key[1])
        self.send(agent_pb2.AgentMessage(accepted=accepted))

    def _on_assignment(self, assignment: agent_pb2.Assignment) -> None:
        key = (assignment.task_id, assignment.attempt)
        runner = self.host.runner
        if runner.is_running(key):
            # A repeat (e.g. after a reconnect): it is running, say so again.
            self._accepted(key)
            return
        stored = self.host.outbox.get(*key)
        if stored is not None:
            # Already finished: the server missed our Result. The push took a credit; return it.
            self._accepted(key)
            self._counted.add(key)
            self.deliver(stored)
            return
        if not self.accepting:
            log.info("session %d: not taking %s#%d: draining", self.id, *key)
            return
        if not runner.free_slots():
            # The server pushed beyond our credit; unaccepted, it is requeued after accept_within.
            log.warning("session %d: no free slot for %s#%d; not accepting it", self.id, *key)
            return
        self._accepted(key)
        self._counted.add(key)
        runner.start(assignment)

    def _on_cancel(self, cancel: agent_pb2.Cancel) -> None:
        key = (cancel.task_id, cancel.attempt)
        reason = cancel.reason or "cancelled by the server"
        if self.host.runner.cancel(key, reason):
            return
        stored = self.host.outbox.get(*key)
        if stored is not None:
            self.send(agent_pb2.AgentMessage(result=stored))
            return
        # Never started here (or long gone): tell the server it will not run.
        log.info("session %d: cancel for %s#%d, which is not running", self.id, *key)
        self.host.record_result(
            agent_pb2.Result(
                task_id=key[0], attempt=key[1], outcome=agent_pb2.OUTCOME_CANCELLED, error=reason
            )
        )

    def _on_drain(self, reason: str) -> None:
        if self._server_draining:
            return
        running = len(self.host.runner.running())
        log.info(
            "session %d: server is draining (%s); reconnecting, %d running attempt(s) handed over",
            self.id,
            reason,
            running,
        )
        self._server_draining = True
        self._helpers.append(asyncio.create_task(self._hand_over()))

    async def _hand_over(self) -> None:
        """Take no new work, let the Results already sent be acknowledged, then half-close:
        the daemon reconnects (to another replica if it knows one) and lists the attempts
        still running in its next Hello, where they are adopted with the same numbers, so
        running work is never stopped or repeated for a drain. Results that finish in
        between wait in the outbox and are resent after the next Welcome."""
        try:
            async with asyncio.timeout(min(self.host.drain_timeout, HANDOVER_ACK_WAIT)):
                await self.host.wait_acked()
        except TimeoutError:
            log.info("session %d: reconnecting with results unacknowledged (resent)", self.id)
        self.close()


def welcome_renew_after(welcome: agent_pb2.Welcome) -> dt.datetime | None:
    """The server's renewal time from Welcome, if it sent one."""
    if not welcome.HasField("renew_after"):
        return None
    return welcome.renew_after.ToDatetime(tzinfo=dt.UTC)
