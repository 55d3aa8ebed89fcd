"""The long-running agent: enroll if needed, keep one stream up, rotate, drain, reconnect.

``Agent`` owns what outlives a stream (credentials, the runner, the outbox) and
follows one :class:`~agent.session.Session` at a time, except during
certificate rotation, when the new stream is opened before the old one closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import random
from collections.abc import Callable
from types import TracebackType

import grpc
from grpc import aio

from muster.agent import __version__
from muster.agent.backoff import Backoff
from muster.agent.channel import describe_rpc_error
from muster.agent.config import AgentConfig, split_address
from muster.agent.enroll import enroll, reenroll
from muster.agent.executors import ExecutorRegistry
from muster.agent.metrics import AgentMetrics, serve_metrics
from muster.agent.outbox import Outbox
from muster.agent.renewal import refused_retry_after, renew_certificate, renewal_time
from muster.agent.runner import TaskRunner
from muster.agent.session import Session, SessionEnd, SessionError, welcome_renew_after
from muster.agent.signatures import gate_for
from muster.agent.state import Credentials, Identity, StateDir
from muster.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    InvalidArgumentError,
    MusterError,
    PermissionDeniedError,
)
from muster.metrics_http import MetricsServer
from muster.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)

STABLE_STREAM = 10.0
"""Seconds a stream must have lived after Welcome for its end to reset the backoff."""
MIN_RENEW_INTERVAL = 30.0
"""Scheduled renewals come at least this many seconds apart (a server's Renew is obeyed at once)."""

_REFUSED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class Agent:
    """The daemon. ``await run()`` until :meth:`shutdown`, or use ``async with``."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        registry: ExecutorRegistry | None = None,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.config = config
        self.state = StateDir(config.state_dir, key_passphrase=config.key_passphrase)
        self._registry = registry
        self._rand = rand
        self._backoff = Backoff(config.backoff_initial, config.backoff_max, rand=rand)
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._renew_requested = asyncio.Event()
        self._schedule_changed = asyncio.Event()
        self.connected = asyncio.Event()
        """Set while a stream is established (after Welcome); for tests and health checks."""
        self._active: Session | None = None
        self._identity: Identity | None = None
        self._credentials: Credentials | None = None
        self._runner: TaskRunner | None = None
        self._outbox: Outbox | None = None
        self._target = ""
        self._renew_at: dt.datetime | None = None
        self._last_renewal: float | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._reenroll_refused = False
        """The configured token was refused for re-enrollment: it is not tried again
        (each try is a failed authentication at the server)."""
        self.metrics = AgentMetrics()
        """This daemon's metrics, in a registry of its own; served at /metrics when
        ``config.metrics_addr`` is set."""
        self.metrics.watch(self)
        self._metrics_server: MetricsServer | None = None

    # SessionHost ------------------------------------------------------------

    @property
    def runner(self) -> TaskRunner:
        if self._runner is None:
            raise RuntimeError("the agent is not running")
        return self._runner

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("the agent is not running")
        return self._outbox

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            raise RuntimeError("the agent is not running")
        return self._identity

    @property
    def credentials(self) -> Credentials:
        if self._credentials is None:
            raise RuntimeError("the agent is not running")
        return self._credentials

    @property
    def accepting_work(self) -> bool:
        return not self._stop.is_set()

    @property
    def drain_timeout(self) -> float:
        return self.config.drain_timeout

    def build_hello(self) -> agent_pb2.Hello:
        return agent_pb2.Hello(
            agent_version=__version__,
            capabilities=self.runner.registry.kinds,
            labels=self.identity.labels,
            max_concurrency=self.config.concurrency,
            in_flight=[
                common_pb2.AttemptRef(task_id=task_id, attempt=attempt)
                for task_id, attempt in self.runner.running()
            ],
            batches=True,  # we read ServerBatch (agent/session.py)
        )

    def on_welcome(self, session: Session) -> None:
        self._active = session
        self.connected.set()
        self.metrics.welcomed()
        if session.welcome is not None:
            renew_after = welcome_renew_after(session.welcome)
            if renew_after is not None:
                self._set_renew_at(renewal_time(self.credentials.leaf, renew_after))
        if self._stop.is_set():
            session.begin_draining("agent shutting down")
        self.notify_changed()

    def on_renew_requested(self, reason: str) -> None:
        log.info("certificate renewal requested: %s", reason)
        self._renew_requested.set()

    def on_trust_bundle(self, bundle: agent_pb2.TrustBundle) -> None:
        roots = self.state.save_trust_bundle(bundle.roots_pem, bundle.version)
        if roots is not None:
            # Open streams keep the roots they were verified with; the next one uses these.
            self._credentials = dataclasses.replace(self.credentials, bundle_pem=roots)

    def record_result(self, result: agent_pb2.Result) -> None:
        """Make the Result durable, then send it if a stream is up (else on the next Welcome)."""
        self.outbox.put(result)
        self.notify_changed()
        session = self._active
        if session is not None and session.established:
            session.deliver(result)

    def acknowledged(self, ack: agent_pb2.Ack) -> None:
        """The server is done with a Result: drop it from the outbox, count its cost."""
        self.outbox.remove(ack.task_id, ack.attempt)
        self.metrics.acknowledged(ack)

    def notify_changed(self) -> None:
        self._changed.set()

    async def wait_quiet(self) -> None:
        """Until no attempt runs and every Result is acknowledged."""
        while not (self.runner.idle and len(self.outbox) == 0):
            self._changed.clear()
            await self._changed.wait()

    async def wait_acked(self) -> None:
        """Until every Result in the outbox is acknowledged (running attempts aside)."""
        while len(self.outbox) != 0:
            self._changed.clear()
            await self._changed.wait()

    def _on_progress(
        self, task_id: str, attempt: int, message: str, percent: int, output_tokens: int
    ) -> None:
        session = self._active
        if session is not None and session.established:
            session.send_progress(task_id, attempt, message, percent, output_tokens)

    # AgentState (read by the metrics at scrape time) ------------------------------

    def metrics_connected(self) -> bool:
        return self.connected.is_set()

    def metrics_running(self) -> int:
        return 0 if self._runner is None else len(self._runner.running())

    def metrics_concurrency(self) -> int:
        return self.config.concurrency

    def metrics_outbox(self) -> int | None:
        return None if self._outbox is None else len(self._outbox)

    def metrics_certificate_not_after(self) -> dt.datetime | None:
        return None if self._credentials is None else self._credentials.leaf.not_after

    @property
    def metrics_server(self) -> MetricsServer | None:
        """The /metrics endpoint while :meth:`run` runs with ``config.metrics_addr``."""
        return self._metrics_server

    # Lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`shutdown` has drained, or raise a MusterError that needs a human."""
        if self.config.metrics_addr is not None:
            # First, so an agent stuck enrolling or reconnecting can be seen doing so.
            host, port = split_address(self.config.metrics_addr, flag="--metrics-addr")
            try:
                self._metrics_server = await serve_metrics(self.metrics, host, port)
            except OSError as err:
                raise ConfigError(
                    f"--metrics-addr: cannot listen on {self.config.metrics_addr}: {err.strerror}"
                ) from None
        try:
            await self._run()
        finally:
            if self._metrics_server is not None:
                await self._metrics_server.close()
                self._metrics_server = None

    async def _run(self) -> None:
        await self._prepare()
        conn = asyncio.create_task(self._connection_loop(), name="agent connection")
        timer = asyncio.create_task(self._renewal_timer(), name="agent renewal timer")
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({conn, stop}, return_when=asyncio.FIRST_COMPLETED)
            if conn.done():
                conn.result()
                return
            await self._drain(conn)
        finally:
            for task in (stop, timer, conn):
                task.cancel()
            await asyncio.gather(stop, timer, conn, return_exceptions=True)
            abandoned = await self.runner.abandon_all()
            if abandoned:
                self._report_abandoned(abandoned)
            await self.runner.registry.aclose()
            self.connected.clear()
            log.info("agent stopped")

    def _report_abandoned(self, abandoned: list[tuple[str, int]]) -> None:
        """Keep a retryable failure for each attempt stopped unfinished, sent on the next
        start. Usually the server requeued it already when the stream ended (the copy is
        then Acked STALE); but a replica that drained us keeps our attempts for its
        handover grace, and this report frees them at once instead of after it."""
        for task_id, attempt in abandoned:
            self.outbox.put(
                agent_pb2.Result(
                    task_id=task_id,
                    attempt=attempt,
                    outcome=agent_pb2.OUTCOME_FAILED,
                    error="the agent stopped before the attempt finished",
                    retryable=True,
                )
            )
        log.warning(
            "stopped %d attempt(s) before they finished; they are reported as failed "
            "(to be retried) on the next start, or requeued by the server when their "
            "leases end",
            len(abandoned),
        )

    def shutdown(self) -> None:
        """Begin a graceful stop: Draining, finish in-flight work, await Acks, close."""
        if not self._stop.is_set():
            log.info("shutting down: finishing in-flight work")
            self._stop.set()
            session = self._active
            if session is not None and session.established:
                session.begin_draining("agent shutting down")

    async def __aenter__(self) -> Agent:
        self._run_task = asyncio.create_task(self.run(), name="agent")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()
        if self._run_task is not None:
            await self._run_task

    async def wait(self) -> None:
        """Wait for a run started by ``async with`` to end (re-raising its error)."""
        if self._run_task is not None:
            await asyncio.shield(self._run_task)

    async def _prepare(self) -> None:
        trusted = self.config.load_trusted_submitters()  # a bad file stops us before enrolling
        self.state.ensure()
        if not self.state.is_enrolled():
            await enroll(self.config, self.state)
        identity = self.state.load_identity()
        credentials = self.state.load_credentials()
        if credentials.leaf.expired():
            expired_at = credentials.leaf.not_after.isoformat()
            identity, credentials = await self._reenroll(
                identity, f"the agent certificate in {self.state.path} expired at {expired_at}"
            )
        self._identity = identity
        self._credentials = credentials
        registry = self._registry or ExecutorRegistry.discover(
            self.config.executors, settings=self.config.executor_settings()
        )
        self._outbox = Outbox(self.state.outbox_path)
        gate = gate_for(
            trusted, self.config.require_signed, pool=identity.pool, labels=identity.labels
        )
        self._runner = TaskRunner(
            registry,
            self.config.concurrency,
            self.record_result,
            self._on_progress,
            gate=gate,
            metrics=self.metrics,
            max_output_bytes=self.config.max_output_bytes,
        )
        self.metrics.identify(agent_id=identity.agent_id, pool=identity.pool, version=__version__)
        self._target = self.config.agent_server or identity.agent_endpoint
        self._set_renew_at(renewal_time(credentials.leaf, rand=self._rand))
        log.info(
            "agent %s: executors %s, concurrency %d, %d result(s) waiting in the outbox",
            identity.spiffe_id,
            ", ".join(registry.kinds),
            self.config.concurrency,
            len(self._outbox),
        )

    async def _reenroll(self, identity: Identity, why: str) -> tuple[Identity, Credentials]:
        """Re-enroll as the same agent id with the configured token (a re-enrollment token
        from ``muster token create --reenroll ID``). The old key and certificate stay
        until the new ones are stored; a refusal leaves them as they were."""
        if not (self.config.token and self.config.server):
            raise AuthenticationError(
                f"{why}; re-enrollment needs a new bootstrap token made for this agent "
                f"(muster token create --reenroll {identity.agent_id}): run again with "
                "--server and --token"
            )
        log.warning("%s; re-enrolling as %s with the given token", why, identity.agent_id)
        try:
            new_identity = await reenroll(self.config, self.state, identity)
        except (AuthenticationError, PermissionDeniedError, ConflictError, InvalidArgumentError):
            self._reenroll_refused = True
            raise
        return new_identity, self.state.load_credentials()

    async def _try_reenroll(self, why: str) -> bool:
        """While running: re-enroll after the server refused our identity, once per
        token; True if the agent now has new credentials (reconnect at once)."""
        if self._reenroll_refused or not (self.config.token and self.config.server):
            return False
        try:
            identity, credentials = await self._reenroll(self.identity, why)
        except MusterError as err:
            log.error("re-enrollment failed: %s", err)
            return False
        self._identity = identity
        self._credentials = credentials
        self.metrics.identify(agent_id=identity.agent_id, pool=identity.pool, version=__version__)
        self._target = self.config.agent_server or identity.agent_endpoint
        self._last_renewal = None
        self._set_renew_at(renewal_time(credentials.leaf, rand=self._rand))
        return True

    async def _drain(self, conn: asyncio.Task[None]) -> None:
        quiet = asyncio.create_task(self.wait_quiet())
        try:
            done, _ = await asyncio.wait(
                {quiet, conn},
                timeout=self.config.drain_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            quiet.cancel()
        if conn in done:
            conn.result()
            return
        if quiet not in done:
            log.warning(
                "drain timeout (%gs): %d attempt(s) still running, %d result(s) unacknowledged "
                "(kept in the outbox for the next start)",
                self.config.drain_timeout,
                len(self.runner.running()),
                len(self.outbox),
            )
        session = self._active
        if session is not None and not session.done:
            session.close()
            try:
                await session.wait()
            except Exception as err:
                log.debug("stream ended while closing: %s", err)

    # Connection -------------------------------------------------------------

    def _new_session(self) -> Session:
        return Session(
            self,
            target=self._target,
            credentials=self.credentials,
            tls_server_name=self.config.tls_server_name,
            welcome_timeout=self.config.welcome_timeout,
        )

    async def _check_not_expired(self) -> None:
        """Raise if the certificate expired, unless a re-enrollment token replaces it."""
        leaf = self.credentials.leaf
        if leaf.expired():
            why = f"the agent certificate expired at {leaf.not_after.isoformat()}"
            if await self._try_reenroll(why):
                return
            raise AuthenticationError(
                f"{why} before it could be renewed; re-enrollment needs a new bootstrap "
                f"token (muster token create --reenroll {self.identity.agent_id})"
            )

    async def _connection_loop(self) -> None:
        """Keep a stream up forever, with capped, jittered backoff between attempts."""
        while True:
            await self._check_not_expired()
            session, outcome = await self._follow(self._new_session())
            if self._stop.is_set() and self.runner.idle and len(self.outbox) == 0:
                return
            welcomed_at = session.welcomed_at
            lived = 0.0 if welcomed_at is None else asyncio.get_running_loop().time() - welcomed_at
            if outcome is SessionEnd.DRAINED or lived >= STABLE_STREAM:
                # The replica let us go (a drain, a restart, a broken healthy stream): it
                # or another is back within seconds, so retry at a steady jittered pace
                # for a while before backing off. Only a stream that stayed up counts: a
                # server that welcomes and then drops us at once gets the growing backoff.
                self._backoff.reset(steady=True)
            if isinstance(outcome, SessionEnd):
                delay = self._backoff.next_delay()
                log.info("stream to %s ended (%s); reconnecting", session.target, outcome.value)
            elif isinstance(outcome, aio.AioRpcError) and outcome.code() in _REFUSED:
                await self._check_not_expired()  # an expired certificate is refused too
                why = f"the server refused this agent's identity ({describe_rpc_error(outcome)})"
                if await self._try_reenroll(why):
                    self._backoff.reset()
                    self.metrics.reconnecting(_reconnect_reason(outcome))
                    continue  # new credentials: reconnect now
                log.error(
                    "the server refused this agent's identity (%s): it may be revoked, "
                    "removed or disabled; an operator must re-enable it, or make a "
                    "re-enrollment token (muster token create --reenroll %s) to run this "
                    "agent with",
                    describe_rpc_error(outcome),
                    self.identity.agent_id,
                )
                if self.config.exit_on_revoke:
                    error_type = (
                        PermissionDeniedError
                        if outcome.code() == grpc.StatusCode.PERMISSION_DENIED
                        else AuthenticationError
                    )
                    raise error_type(
                        f"the server refused agent {self.identity.spiffe_id} "
                        f"({describe_rpc_error(outcome)}); exiting (--exit-on-revoke)"
                    ) from outcome
                delay = self._backoff.max_delay()
            else:
                delay = self._backoff.next_delay()
                log.warning(
                    "stream to %s failed: %s; retrying in %.1fs",
                    session.target,
                    describe_rpc_error(outcome)
                    if isinstance(outcome, aio.AioRpcError)
                    else outcome,
                    delay,
                )
            self.metrics.reconnecting(_reconnect_reason(outcome))
            await asyncio.sleep(delay)

    async def _follow(self, session: Session) -> tuple[Session, SessionEnd | Exception]:
        """Drive ``session`` (and whatever replaces it on renewal) until a stream ends."""
        try:
            return await self._follow_until_end(session)
        except asyncio.CancelledError:
            # Shutdown cancelled us: take the stream down with us, not leave it orphaned.
            for each in (session, self._active):
                if each is not None:
                    await each.stop()
            raise

    async def _follow_until_end(self, session: Session) -> tuple[Session, SessionEnd | Exception]:
        task = session.start()
        while True:
            gate = session.welcomed if not session.welcomed.is_set() else self._renew_requested
            waiter = asyncio.create_task(gate.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if task.done():
                if self._active is session:
                    self._active = None
                    self.connected.clear()
                try:
                    return session, task.result()
                except (aio.AioRpcError, SessionError) as err:
                    return session, err
                except Exception as err:
                    log.exception("stream to %s crashed", session.target)
                    return session, err
            if self._renew_requested.is_set() and session.established:
                self._renew_requested.clear()
                if not self._stop.is_set():
                    session = await self._rotate(session)
                    task = session.start()

    # Renewal ----------------------------------------------------------------

    def _set_renew_at(self, when: dt.datetime | None) -> None:
        self._renew_at = when
        self._schedule_changed.set()
        if when is not None:
            log.debug("certificate renewal scheduled for %s", when.isoformat())

    async def _renewal_timer(self) -> None:
        while True:
            self._schedule_changed.clear()
            when = self._renew_at
            if when is None:
                await self._schedule_changed.wait()
                continue
            delay = (when - dt.datetime.now(dt.UTC)).total_seconds()
            if self._last_renewal is not None:
                # A server whose renew_after is always past must not make us renew in a loop.
                since = asyncio.get_running_loop().time() - self._last_renewal
                delay = max(delay, MIN_RENEW_INTERVAL - since)
            if delay <= 0:
                self._renew_at = None
                self.on_renew_requested("scheduled renewal time reached")
                continue
            try:
                async with asyncio.timeout(delay):
                    await self._schedule_changed.wait()
            except TimeoutError:
                pass

    async def _rotate(self, old: Session) -> Session:
        """Renew over the current mTLS channel, open a stream with the new cert, close the old."""
        assert old.channel is not None
        try:
            credentials = await renew_certificate(
                old.channel, self.state, rpc_timeout=self.config.rpc_timeout
            )
        except (aio.AioRpcError, MusterError) as err:
            detail = describe_rpc_error(err) if isinstance(err, aio.AioRpcError) else str(err)
            left = (self.credentials.leaf.not_after - dt.datetime.now(dt.UTC)).total_seconds()
            retry = self._rand(0.5, 1.0) * min(60.0, max(1.0, left / 20))
            if isinstance(err, aio.AioRpcError):
                # Rate-limited: not before the server's retry time (left ample anyway).
                retry = max(retry, refused_retry_after(err) or 0.0)
            log.warning("certificate renewal failed (%s); retrying in %.0fs", detail, retry)
            self.metrics.renewed(False)
            self._set_renew_at(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=retry))
            return old
        self._credentials = credentials
        self.metrics.renewed(True)
        self._last_renewal = asyncio.get_running_loop().time()
        self._set_renew_at(renewal_time(credentials.leaf, rand=self._rand))
        if old.done:
            return old  # the next connection uses the new certificate
        old.stop_accepting()
        new = self._new_session()
        task = new.start()
        welcomed = asyncio.create_task(new.welcomed.wait())
        try:
            await asyncio.wait({task, welcomed}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await new.stop()
            raise
        finally:
            welcomed.cancel()
        if new.welcomed.is_set() and not task.done():
            log.info("switched to a stream with the renewed certificate; closing the old one")
            old.close()
            try:
                await old.wait()
            except Exception as err:
                log.debug("old stream ended with %s", err)
            return new
        try:
            await task
        except Exception as err:
            log.warning("could not open a stream with the renewed certificate: %s", err)
        old.resume_accepting()
        return old


def _reconnect_reason(outcome: SessionEnd | Exception) -> str:
    """The ``reason`` label of ``muster_agent_reconnects_total``: a small, fixed set."""
    if isinstance(outcome, SessionEnd):
        return outcome.value
    if isinstance(outcome, aio.AioRpcError):
        code = outcome.code()
        return "refused" if code in _REFUSED else str(code.name).lower()
    if isinstance(outcome, SessionError):
        return "protocol"
    return "error"
