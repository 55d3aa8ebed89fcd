"""Task transitions with their side effects: every change is written to the database
with its audit rows, in the same transaction, then announced (wake the pool's streams,
notify watchers, tell the holder to stop, count). Streams, the reaper and TaskService all
go through here."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import asyncpg
import grpc
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession

from muster.server import tracing
from muster.server.audit import AuditRecord, AuditWriter, record_in
from muster.server.clock import Clock
from muster.server.config import ServerConfig
from muster.server.dispatch.budgets import BudgetGate
from muster.server.dispatch.fanout import Fanout
from muster.server.dispatch.hub import Stream
from muster.server.dispatch.inflight import InflightLimits
from muster.server.dispatch.metering import Metering
from muster.server.dispatch.presence import Presence
from muster.server.dispatch.suspicion import Suspicion, parse_policy
from muster.server.metrics import MusterMetrics, QueueStats
from muster.server.storage import identities
from muster.server.storage import taskstore as task_store
from muster.server.storage import usage as usage_store
from muster.server.storage.database import Database
from muster.server.storage.models import Task
from muster.server.storage.taskstore import Retry
from muster.server.storage.types import utcnow
from muster.signing import signer_key_id
from muster.states import HELD, TERMINAL, State
from muster.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)

UNREACHABLE = (DBAPIError, OSError, PoolTimeout, asyncpg.PostgresError, asyncpg.InterfaceError)
"""What a database that is down or refusing connections raises: asyncpg's own errors
escape unwrapped when a new connection is refused (ALLOW_CONNECTIONS false, shutdown)."""

MAX_RETRY_BACKOFF = timedelta(seconds=60)
SYNC_OVERLAP = timedelta(seconds=2)
"""Each sync re-reads a little of the previous window: commits land out of clock order."""
INFLIGHT_RETRY = timedelta(seconds=1)
DEFAULT_PROVIDER_BACKOFF = timedelta(seconds=5)
"""How long a model is held back in a pool after a provider rate limit without retry-after."""
MAX_PROVIDER_BACKOFF = 3600.0
"""The longest retry-after honoured (seconds): a provider's answer, not our schedule."""

"""How long a task refused by a full tenant or pool waits before it is considered again."""


def retry_backoff(attempt: int) -> timedelta:
    """Exponential backoff after a failed attempt: 1 s, 2 s, 4 s ... capped at a minute."""
    return min(timedelta(seconds=2 ** (attempt - 1)), MAX_RETRY_BACKOFF)


def new_task_id() -> str:
    return "t_" + secrets.token_hex(12)


class Submission(NamedTuple):
    """What :meth:`Dispatcher.submit` did with a submitted task."""

    task: Task
    """As it entered the queue (eager or not), or the task a repeat found."""
    created: bool
    assigned: bool
    """Pushed at once to an idle stream of this replica (eager dispatch)."""


class Dispatcher:
    def __init__(
        self,
        db: Database,
        fanout: Fanout,
        audit: AuditWriter,
        metrics: MusterMetrics,
        config: ServerConfig,
        inflight: InflightLimits,
        budgets: BudgetGate,
        metering: Metering,
        *,
        clock: Clock,
    ) -> None:
        self.db = db
        self.tasks = db.tasks
        self.clock = clock
        """The time of every transition, lease and timeout (tests move a manual one)."""
        self.inflight = inflight
        self.budgets = budgets
        self.metering = metering
        self.fanout = fanout
        self.hub = fanout.hub
        # Compared with revoked_at, which identities stamp with the real time, not the clock.
        self._synced_until = utcnow()
        self.audit = audit
        self.metrics = metrics
        self.config = config
        self.presence = Presence(
            db,
            replica=config.resolved_replica_id,
            refresh_every=config.heartbeat_interval,
            clock=clock.now,
        )
        """Cluster-wide presence: this replica's streams in agent_sessions."""
        self.suspicion = Suspicion(
            db,
            fanout,
            audit,
            metrics,
            parse_policy(config.suspicious_policy),
            heartbeat_interval=config.heartbeat_interval,
            cert_lifetime=config.cert_lifetime,
        )

    # Submission and cancellation (TaskService)

    async def submit(
        self, values: dict[str, Any], *, actor: str, peer: str, request_id: str
    ) -> Submission:
        now = self.clock.now()
        values = {
            **values,
            "task_id": values.get("task_id") or new_task_id(),
            "state": State.QUEUED,
            "attempt": 1,
            "created_at": now,
            "updated_at": now,
            "queued_at": now,
        }

        def submitted(task: Task) -> AuditRecord:
            return AuditRecord(
                actor=actor,
                action="task.submit",
                target=task.task_id,
                peer=peer,
                request_id=request_id,
                details={
                    "kind": task.kind,
                    "pool": task.pool,
                    "bytes": len(task.payload),
                    **({"key_id": signer_key_id(task.signature)} if task.signature else {}),
                },
            )

        # A signed task's id is bound to its envelope: a repeat finds the first, as an
        # idempotency key does.
        if values.get("idempotency_key") or values.get("signature"):
            async with self.db.transaction() as session:
                task, created = await self.tasks.insert_or_find(session, values)
                if created:
                    await record_in(session, submitted(task))
            if created:
                self.fanout.wake_pool(task.pool)
            assigned = False
        else:
            (task, assigned), created = await self._insert(values, submitted), True
        if created:
            self.metrics.tasks_submitted.inc()
        return Submission(task, created, assigned)

    async def _insert(
        self, values: dict[str, Any], submitted: Callable[[Task], AuditRecord]
    ) -> tuple[Task, bool]:
        """Insert a new unkeyed task. Eager dispatch: while a stream of its pool on this
        replica is idle with credit, the task is inserted already ASSIGNED to it (one
        transaction, audited as submitted and assigned) and pushed at once, with no claim
        statement; otherwise it is queued and a stream is woken to claim it."""
        stream: Stream | None = None
        holder = task_store.attempt_key(values["task_id"], 1)
        # Budgeted kinds go through the claim's checks.
        if self.config.eager_dispatch and not values.get("reserve_micros"):
            stream = self.hub.take_for(values["pool"], values["kind"], values.get("selector") or {})
        if stream is not None:
            try:
                full = await self.inflight.admit(values["owner"], values["pool"], holder)
            except BaseException:
                stream.return_credit()
                raise
            if full is not None:
                stream.return_credit()  # the tenant or pool is full: the claim path says why
                stream = None
        if stream is None:
            task = Task(**values)
            record = submitted(task)
            record.check()  # encoded now, not in the transaction
            await self.tasks.insert(values, audit=lambda _: (record,))
            self.fanout.wake_pool(task.pool)
            return task, False
        queued = Task(**values)
        values = {
            **values,
            "state": State.ASSIGNED,
            "agent_id": stream.agent_id,
            "session_id": stream.session_id,
            "lease_expires_at": values["queued_at"] + self.config.accept_timeout,
        }
        task = Task(**values)
        records = (
            submitted(task),
            AuditRecord(
                actor=f"agent:{stream.agent_id}",
                action="task.assign",
                target=task.task_id,
                details={"attempt": 1, "session": stream.session_id, "eager": True},
            ),
        )
        for record in records:
            record.check()

        async def assign(stream: Stream) -> bool:
            try:
                await self.tasks.insert(values, audit=lambda _: records)
            except BaseException:
                stream.return_credit()
                self.inflight.release(task.owner, task.pool, holder)
                raise
            claimed = _claimed(values)
            if stream.deliver(claimed):
                # No task_changed: nobody can watch a task whose id its Submit has not
                # answered yet (an eager task's id is the server's, never the caller's).
                self.metrics.schedule_to_start_seconds.labels(pool=task.pool).observe(0.0)
                return True
            await self.give_back([claimed], stream.session_id)  # it went away meanwhile
            return False

        # Shielded: once handed to the group commit the row may commit whatever happens
        # to this caller, and then its stream must get it (or the queue, given back).
        delivered = await asyncio.shield(assign(stream))
        # Submit answers with the task as it entered the queue, eager or not: being
        # assigned in the same instant is what a fast claim would have done.
        return queued, delivered

    async def cancel(
        self, task_id: str, reason: str, *, actor: str, request_id: str
    ) -> Task | None:
        async with self.db.transaction() as session:
            task = await self.tasks.request_cancel(session, task_id, reason, now=self.clock.now())
            if task is not None:
                await record_in(
                    session,
                    AuditRecord(
                        actor=actor,
                        action="task.cancel",
                        target=task_id,
                        request_id=request_id,
                        details={"state": task.state},
                    ),
                )
        if task is None:
            return None
        if task.state in HELD:
            self.fanout.cancel_attempt(task.session_id, task.task_id, task.attempt, task.error)
        elif task.state == State.CANCELLED:
            self.metrics.tasks_finished.labels(outcome=task.state.lower()).inc()
        self.fanout.task_changed(task_id)
        return task

    # Stream side (AgentSession)

    async def record(self, *records: AuditRecord) -> None:
        """Make audit records of events that change no row (a stream's connect, end or
        replacement) durable before going on: committed in the next shared transaction or,
        while the database is unreachable, fsynced in the audit spool (replayed later)."""
        try:
            await self.db.group.record(records)
        except UNREACHABLE as err:
            log.warning("audit: database unreachable (%s); spooling", type(err).__name__)
            for record in records:
                await self.audit.keep(record)

    async def claim(
        self,
        *,
        agent_id: str,
        session_id: str,
        pool: str,
        labels: dict[str, str],
        kinds: Sequence[str],
        limit: int,
    ) -> list[task_store.Claimed]:
        request = task_store.ClaimRequest(pool, labels, tuple(kinds), agent_id, session_id, limit)

        def assigned(tasks: list[task_store.Claimed]) -> list[AuditRecord]:
            return [
                AuditRecord(
                    actor=f"agent:{agent_id}",
                    action="task.assign",
                    target=task.task_id,
                    details={"attempt": task.attempt, "session": session_id},
                )
                for task in tasks
            ]

        claimed = await self.tasks.claim(
            request, accept_timeout=self.config.accept_timeout, now=self.clock.now(), audit=assigned
        )
        claimed = await self._admit(claimed, session_id)
        now = self.clock.now()
        for task in claimed:
            self.metrics.schedule_to_start_seconds.labels(pool=pool).observe(
                (now - task.queued_at).total_seconds()
            )
            self.fanout.task_changed(task.task_id)
        return claimed

    async def _admit(
        self, claimed: list[task_store.Claimed], session_id: str
    ) -> list[task_store.Claimed]:
        """Keep the claimed attempts whose tenant and pool have a free slot and, for AI
        kinds, whose worst case is reserved on every budget; give back the rest (or end a
        task whose own spend cap is used up)."""
        admitted: list[task_store.Claimed] = []
        held_back: list[task_store.HoldBack] = []
        failed: list[tuple[task_store.Claimed, str]] = []
        audits: list[AuditRecord] = []
        budgeted = any(task.reserve_micros for task in claimed)
        rules = await self.budgets.rules() if budgeted else []
        holders = [task_store.attempt_key(task.task_id, task.attempt) for task in claimed]
        # In claim order (priority first), in one quota store call rather than one each.
        fulls = await self.inflight.admit_many(
            [(task.owner, task.pool, holder) for task, holder in zip(claimed, holders, strict=True)]
        )
        for task, holder, full in zip(claimed, holders, fulls, strict=True):
            if full is not None:
                retry_at = self.clock.now() + INFLIGHT_RETRY
                held_back.append(task_store.HoldBack(task.task_id, task.attempt, retry_at, full))
                continue
            verdict = await self.budgets.admit(task, rules)
            if verdict.audit is not None:
                audits.append(verdict.audit)
            if verdict.hold is None and verdict.fail is None:
                admitted.append(replace(task, ceiling_micros=verdict.ceiling))
                continue
            self.inflight.release(task.owner, task.pool, holder)
            if verdict.hold is not None:
                held_back.append(verdict.hold)
            elif verdict.fail is not None:
                failed.append((task, verdict.fail))
        if held_back or failed:
            now = self.clock.now()
            async with self.db.transaction() as session:
                await self.tasks.unclaim(session, held_back, session_id, now=now)
                ended = [
                    task
                    for task, error in failed
                    if await self.tasks.fail_claimed(session, task, session_id, error, now=now)
                ]
                audits += [
                    AuditRecord(
                        actor="server",
                        action="task.finish",
                        target=task.task_id,
                        outcome="error",
                        details={
                            "attempt": task.attempt,
                            "state": State.FAILED,
                            "reason": "task spend cap used up",
                        },
                    )
                    for task in ended
                ]
                await record_in(session, *audits)
            for task in ended:
                self.metrics.tasks_finished.labels(outcome="failed").inc()
                self.fanout.task_changed(task.task_id)
            for hold in held_back:
                if hold.reason:
                    self.fanout.task_changed(hold.task_id)
        elif audits:
            await self.db.group.record(audits)
        return admitted

    async def renew_inflight(self) -> None:
        """Renew the in-flight slots of every attempt this replica's streams hold."""
        sessions = {s.session_id for s in self.hub.streams()}
        if sessions:
            async with self.db.transaction() as session:
                held = await self.tasks.held_by_sessions(session, sessions)
            await self.inflight.renew(held)

    def accept(
        self, task_id: str, attempt: int, session_id: str, *, at: datetime | None = None
    ) -> asyncio.Future[bool]:
        """Queue the move of an assigned attempt to RUNNING, started ``at`` (when its
        Accepted arrived; default now); the future says whether it moved. Queued at once,
        so the attempt's Result, handed in after, is written after it."""
        moved = self.tasks.accept(
            task_store.Acceptance(task_id, attempt, session_id),
            lease=self.config.lease_duration,
            now=at or self.clock.now(),
        )

        def announce(done: asyncio.Future[bool]) -> None:
            if not done.cancelled() and done.exception() is None and done.result():
                self.fanout.task_changed(task_id)

        moved.add_done_callback(announce)
        return moved

    async def heartbeat(self, session_id: str, attempts: Sequence[tuple[str, int]]) -> None:
        if attempts:
            await self.tasks.renew_leases(
                session_id, attempts, lease=self.config.lease_duration, now=self.clock.now()
            )

    async def adopt(
        self, agent_id: str, session_id: str, attempts: Sequence[tuple[str, int]]
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        if not attempts:
            return [], []
        async with self.db.transaction() as session:
            return await self.tasks.adopt(
                session,
                agent_id,
                session_id,
                attempts,
                lease=self.config.lease_duration,
                now=self.clock.now(),
            )

    def ends_in_one_write(self, result: agent_pb2.Result) -> bool:
        """Whether ``record_result`` ends this Result's attempt with the common end (one
        gathered UPDATE): a success, or a failure not to be retried; not a refusal. Only
        then may the attempt's unwritten Accepted be folded into it (``accepted_at``)."""
        if result.refusal:
            return False
        if len(result.output) > self.config.max_payload_bytes:
            return not result.retryable  # recorded as failed: the output is too large
        return result.outcome == agent_pb2.OUTCOME_SUCCEEDED or (
            result.outcome == agent_pb2.OUTCOME_FAILED and not result.retryable
        )

    async def record_result(
        self, agent_id: str, result: agent_pb2.Result, *, accepted_at: datetime | None = None
    ) -> agent_pb2.Ack:
        """Record an attempt's end; the Ack says whether it was new, a resend, or stale,
        and what the attempt was priced at when it was new. ``accepted_at``: the attempt's
        Accepted was not written (only for a Result that ``ends_in_one_write``); the end
        records it as the attempt's start."""
        with tracing.recording(agent_id, result) as span:
            status, cost_micros = await self._record_result(agent_id, result, accepted_at)
            tracing.acknowledged(span, status)
            return agent_pb2.Ack(
                task_id=result.task_id,
                attempt=result.attempt,
                status=status,
                cost_micros=cost_micros,
            )

    async def _record_result(
        self, agent_id: str, result: agent_pb2.Result, accepted_at: datetime | None
    ) -> tuple[agent_pb2.AckStatus, int]:
        outcome = result.outcome
        # Outputs are bytes, kept as they are; an error is text, and Postgres text cannot
        # hold a NUL, so one is kept visibly escaped instead of failing the whole Result.
        output, error = result.output, result.error[:4000].replace("\x00", "\\x00")
        if len(output) > self.config.max_payload_bytes:
            outcome, output = agent_pb2.OUTCOME_FAILED, b""
            cap = self.config.max_payload_bytes
            error = f"output of {len(result.output)} bytes exceeds the {cap}-byte cap"
        usage = await self._priced(result)
        ended: tuple[State, task_store.Finished] | agent_pb2.AckStatus
        if self.ends_in_one_write(result):
            # The common end: one multi-row UPDATE, in a shared transaction.
            state = State.SUCCEEDED if outcome == agent_pb2.OUTCOME_SUCCEEDED else State.FAILED
            end = task_store.Ending(
                result.task_id, result.attempt, agent_id, state, output, error, usage, accepted_at
            )

            def finished(answer: task_store.Ended) -> list[AuditRecord]:
                if not isinstance(answer, tuple):
                    return []
                return [_finish_record(agent_id, result, answer[0], usage)]

            answer = await self.tasks.finish(end, now=self.clock.now(), audit=finished)
            if isinstance(answer, tuple):
                ended = answer
            else:
                ended = _unrecorded(result.attempt, agent_id, answer)
        elif result.refusal:
            ended = await self._end_refused(agent_id, result, output, error, usage)
        else:
            ended = await self._end_otherwise(agent_id, result, outcome, output, error, usage)
        if not isinstance(ended, tuple):
            return ended, 0
        new_state, task = ended
        holder = task_store.attempt_key(result.task_id, result.attempt)
        self.inflight.release(task.owner, task.pool, holder)
        if task.reserve_micros:
            await self._close_reservation(holder, task, result, usage)
        if usage is not None:
            self.metering.count(task.kind, usage)
        if new_state in TERMINAL:
            self.metrics.tasks_finished.labels(outcome=new_state.lower()).inc()
            if task.started_at is not None:
                self.metrics.task_run_seconds.labels(pool=task.pool, kind=task.kind).observe(
                    (self.clock.now() - task.started_at).total_seconds()
                )
        else:
            self.fanout.wake_pool(task.pool)
        # This replica's watchers get the ended row instead of reading it, when nothing
        # was written after it: no usage added, no budget settled.
        whole = new_state in TERMINAL and usage is None and not task.reserve_micros
        self.fanout.task_changed(result.task_id, task.row if whole and task.row else None)
        return agent_pb2.ACK_STATUS_RECORDED, usage.cost_micros if usage is not None else 0

    async def _priced(self, result: agent_pb2.Result) -> usage_store.AttemptCost | None:
        """The attempt's usage at the server's prices for the task's kind and model; None
        when it reported none (every non-AI result: it costs no extra query)."""
        if not Metering.reports_usage(result.usage):
            return None
        async with self.db.transaction() as session:
            found = await self.tasks.kind_and_model(session, result.task_id)
        if found is None:
            return None  # no such task: the result is stale anyway
        kind, model = found
        return self.metering.cost(kind, model, result.usage)

    async def _close_reservation(
        self,
        holder: str,
        task: task_store.Finished,
        result: agent_pb2.Result,
        usage: usage_store.AttemptCost | None,
    ) -> None:
        """Settle the attempt's budget hold to what it cost, or release it unspent; after a
        provider rate limit, hold the model back in the pool for its retry-after."""
        if usage is not None:
            await self.budgets.settle(holder, usage.cost_micros)
        else:
            await self.budgets.release(holder)
        if result.rate_limited and task.model:
            wait = _retry_after(result) or DEFAULT_PROVIDER_BACKOFF.total_seconds()
            await self.budgets.hold_off(task.pool, task.model, wait)

    async def _end_refused(
        self,
        agent_id: str,
        result: agent_pb2.Result,
        output: bytes,
        error: str,
        usage: usage_store.AttemptCost | None,
    ) -> tuple[State, task_store.Finished] | agent_pb2.AckStatus:
        """The agent refused to run the attempt (a signature it requires is missing or
        does not hold): the task fails for good, whatever ``retryable`` says, and the
        refusal is audited and counted."""
        reason = _refusal_name(result.refusal)
        async with self.db.transaction() as session:
            ending = task_store.Ending(
                result.task_id,
                result.attempt,
                agent_id,
                State.FAILED,
                output,
                error or f"refused by agent {agent_id} ({reason})",
                usage,
            )
            finished = await self.tasks.end_attempt(session, ending, now=self.clock.now())
            if finished is None:
                current = await self.tasks.attempt_of(session, result.task_id)
                return _unrecorded(result.attempt, agent_id, current)
            envelope = await self.tasks.signature_of(session, result.task_id)
            await record_in(
                session,
                _finish_record(agent_id, result, State.FAILED, usage),
                AuditRecord(
                    actor=f"agent:{agent_id}",
                    action="task.refused",
                    target=result.task_id,
                    outcome="error",
                    details={
                        "task": result.task_id,
                        "attempt": result.attempt,
                        "agent": agent_id,
                        "reason": reason,
                        "key_id": signer_key_id(envelope),
                    },
                ),
            )
        self.metrics.task_refusals.labels(reason=reason.lower()).inc()
        return State.FAILED, finished

    async def _end_otherwise(
        self,
        agent_id: str,
        result: agent_pb2.Result,
        outcome: int,
        output: bytes,
        error: str,
        usage: usage_store.AttemptCost | None,
    ) -> tuple[State, task_store.Finished] | agent_pb2.AckStatus:
        """A cancelled or retryable end: what happens depends on the task's row."""
        async with self.db.transaction() as session:
            task = await self.tasks.get(session, result.task_id)
            if task is None:
                return agent_pb2.ACK_STATUS_STALE
            new_state: State | None
            if outcome == agent_pb2.OUTCOME_CANCELLED and task.cancel_requested:
                ending = task_store.Ending(
                    task.task_id,
                    result.attempt,
                    agent_id,
                    State.CANCELLED,
                    output,
                    task.error or error,
                    usage,
                )
                finished = await self.tasks.end_attempt(session, ending, now=self.clock.now())
                new_state = State.CANCELLED if finished else None
            else:
                reason = error or (
                    "cancelled by the agent" if outcome == agent_pb2.OUTCOME_CANCELLED else "failed"
                )
                backoff = max(
                    retry_backoff(result.attempt), timedelta(seconds=_retry_after(result))
                )
                retry = Retry(
                    task.task_id,
                    result.attempt,
                    reason,
                    backoff,
                    rate_limited=result.rate_limited,
                    agent_id=agent_id,
                )
                new_state = await self.tasks.retry_or_fail(session, retry, now=self.clock.now())
                if new_state is not None and usage is not None:
                    await usage_store.record(
                        await session.connection(),
                        [usage_store.Used(task.task_id, result.attempt, agent_id, usage)],
                    )
            if new_state is None:
                current = task_store.Current(task.attempt, task.agent_id, State(task.state))
                return _unrecorded(result.attempt, agent_id, current)
            await record_in(session, _finish_record(agent_id, result, new_state, usage))
            return new_state, task_store.Finished(
                task.owner, task.pool, task.kind, task.started_at, task.model, task.reserve_micros
            )

    async def release_session(self, session_id: str, reason: str) -> None:
        """A stream ended: every attempt it still holds goes back to the queue (or ends)."""
        async with self.db.transaction() as session:
            held = await self.tasks.held_by_session(session, session_id)
            outcomes = []
            for h in held:
                retry = Retry(h.task_id, h.attempt, reason, session_id=session_id)
                state = await self.tasks.retry_or_fail(session, retry, now=self.clock.now())
                outcomes.append((h, state))
            await record_in(session, *_requeue_records(outcomes, reason))
        await self._announce_requeues(outcomes)

    async def hand_over(self, session_id: str, sent: set[tuple[str, int]]) -> int:
        """A stream this replica drained ended: keep the attempts it delivered (``sent``:
        assigned on it or listed in its Hello) for the agent's next stream, same attempt
        numbers, for ``handover_grace``, instead of requeueing them; give back, unchanged,
        what was claimed for it but never sent. Returns how many were handed over."""
        now = self.clock.now()
        until = now + self.config.handover_grace
        async with self.db.transaction() as session:
            held = await self.tasks.held_by_session(session, session_id)
            unsent = [h for h in held if (h.task_id, h.attempt) not in sent]
            if unsent:
                await self._unclaim(session, unsent, session_id, now)
            kept = await self.tasks.hand_over(session, session_id, until, now=now)
            await record_in(session, *_given_back_records(unsent))
        await self._given_back(unsent)
        return kept

    async def give_back(self, claimed: Sequence[task_store.Claimed], session_id: str) -> None:
        """Return attempts claimed for a stream that began draining before they were sent:
        queued again with the same attempt number (nothing was delivered)."""
        async with self.db.transaction() as session:
            await self._unclaim(session, claimed, session_id, self.clock.now())
            await record_in(session, *_given_back_records(claimed))
        await self._given_back(claimed)

    async def _unclaim(
        self,
        session: AsyncSession,
        attempts: Sequence[task_store.Claimed | task_store.Held],
        session_id: str,
        now: datetime,
    ) -> None:
        back = [task_store.HoldBack(a.task_id, a.attempt, now) for a in attempts]
        await self.tasks.unclaim(session, back, session_id, now=now)

    async def _given_back(self, attempts: Sequence[task_store.Claimed | task_store.Held]) -> None:
        for task in attempts:
            holder = task_store.attempt_key(task.task_id, task.attempt)
            self.inflight.release(task.owner, task.pool, holder)
            if task.reserve_micros:
                await self.budgets.release(holder)
            self.fanout.task_changed(task.task_id)
            self.fanout.wake_pool(task.pool)

    async def _announce_requeues(
        self, outcomes: list[tuple[task_store.Held, State | None]]
    ) -> None:
        for held, state in outcomes:
            if state is None:
                continue
            await self._let_go(held)
            self.fanout.task_changed(held.task_id)
            if state == State.QUEUED:
                self.fanout.wake_pool(held.pool)
            else:
                self.metrics.tasks_finished.labels(outcome=state.lower()).inc()

    async def _let_go(self, held: task_store.Held) -> None:
        """An attempt ended without a result: free its slots and release its budget hold."""
        self.inflight.release(held.owner, held.pool, held.holder)
        if held.reserve_micros:
            await self.budgets.release(held.holder)

    # Reaper side

    async def reap(self) -> None:
        """Requeue lost leases, stop overrunning attempts, time out late tasks."""
        # What reads show RUNNING is RUNNING for the timeouts too: the Accepted messages
        # this replica holds back (session.ACCEPT_DELAY) are written first.
        await self.hub.write_waiting_accepts()
        now = self.clock.now()
        outcomes: list[tuple[task_store.Held, State | None]] = []
        async with self.db.transaction() as session:
            for h in await self.tasks.expired_leases(session, now):
                retry = Retry(h.task_id, h.attempt, "lease expired", lease_expired_before=now)
                outcomes.append((h, await self.tasks.retry_or_fail(session, retry, now=now)))
            for h in await self.tasks.overrun_attempts(session, now):
                retry = Retry(
                    h.task_id,
                    h.attempt,
                    "start-to-close timeout exceeded",
                    exhausted_state=State.TIMED_OUT,
                )
                outcomes.append((h, await self.tasks.retry_or_fail(session, retry, now=now)))
            timed_out, ended = await self.tasks.time_out_expired(session, now)
            await record_in(
                session,
                *_requeue_records(outcomes, "lease expired or attempt overran"),
                *(
                    AuditRecord(
                        actor="server",
                        action="task.finish",
                        target=end.task_id,
                        outcome="error",
                        details={
                            "attempt": end.attempt,
                            "state": State.TIMED_OUT,
                            "reason": end.reason,
                        },
                    )
                    for end in ended
                ),
            )
        for h, state in outcomes:
            if state is not None:
                self.fanout.cancel_attempt(
                    h.session_id, h.task_id, h.attempt, "attempt lost its lease or overran"
                )
        await self._announce_requeues(outcomes)
        # Older than a lease: a settle racing with this pass would write the same figure
        # (usage is recorded with the attempt's end), so the margin only saves work.
        await self.budgets.reconcile(self.config.lease_duration)
        for h in timed_out:
            await self._let_go(h)
            self.fanout.cancel_attempt(h.session_id, h.task_id, h.attempt, "task timed out")
            self.fanout.task_changed(h.task_id)
            self.metrics.tasks_finished.labels(outcome="timed_out").inc()

    async def sync_streams(self) -> None:
        """Apply to this replica's streams what the database says changed elsewhere.

        The backstop for lost fan-out messages: revoked certificates and disabled agents
        close their streams, requested cancellations reach the agents holding them.
        """
        streams = self.hub.streams()
        if not streams:
            self._synced_until = utcnow()
            return
        since = self._synced_until - SYNC_OVERLAP
        self._synced_until = utcnow()
        sessions = {s.session_id for s in streams}
        async with self.db.transaction() as session:
            revoked = await identities.revoked_since(session, since)
            disabled = await identities.disabled_agents(session, {s.agent_id for s in streams})
            cancels = await self.tasks.cancel_requested(session, sessions)
        for agent_id, serial in revoked:
            self.hub.close_agent(
                agent_id,
                grpc.StatusCode.PERMISSION_DENIED,
                "certificate revoked",
                frozenset({serial}),
            )
        for agent_id in disabled:
            self.hub.close_agent(agent_id, grpc.StatusCode.PERMISSION_DENIED, "agent disabled")
        for task_id, attempt, session_id, reason in cancels:
            self.hub.cancel_attempt(session_id, task_id, attempt, reason)

    async def poll_queues(self) -> None:
        """The polling backstop for new work, once per replica rather than per stream:
        count claimable tasks by pool and kind, wake that many idle streams able to run them."""
        pools = self.hub.pools_wanting_work()
        if not pools:
            self.hub.found_claimable({})
            return
        async with self.db.transaction() as session:
            claimable = await self.tasks.claimable(session, pools, now=self.clock.now())
        found: dict[str, set[str]] = {}
        for pool, kind, count in claimable:
            found.setdefault(pool, set()).add(kind)
            self.hub.wake_for(pool, kind, count)
        self.hub.found_claimable(found)

    async def refresh_gauges(self) -> None:
        """The queue and budget gauges."""
        await self.refresh_queue_gauges()
        await self.budgets.refresh_gauges()

    async def refresh_queue_gauges(self) -> None:
        async with self.db.transaction() as session:
            stats = await self.tasks.queue_stats(session)
        now = self.clock.now()
        self.metrics.update_queues(
            {
                (pool, kind): QueueStats(count, (now - oldest).total_seconds() if oldest else 0.0)
                for pool, kind, count, oldest in stats
            }
        )


def _claimed(values: dict[str, Any]) -> task_store.Claimed:
    """The first attempt of a task being inserted, as a claim would have returned it."""
    return task_store.Claimed(
        task_id=values["task_id"],
        attempt=1,
        kind=values["kind"],
        payload=values["payload"],
        pool=values["pool"],
        owner=values["owner"],
        priority=values.get("priority", 0),
        queued_at=values["queued_at"],
        start_to_close_timeout=values.get("start_to_close_timeout"),
        deadline=values.get("deadline"),
        model=values.get("model"),
        reserve_micros=0,
        max_cost_micros=values.get("max_cost_micros"),
        output_schema=values.get("output_schema"),
        waiting_reason="",
        signature=None,
        trace_context=values.get("trace_context"),
    )


def _finish_record(
    agent_id: str, result: agent_pb2.Result, state: State, usage: usage_store.AttemptCost | None
) -> AuditRecord:
    """The audit record of an attempt ended by its agent's Result."""
    details: dict[str, Any] = {"attempt": result.attempt, "state": state}
    if usage is not None:
        details["cost_micros"] = usage.cost_micros
    return AuditRecord(
        actor=f"agent:{agent_id}",
        action="task.finish",
        target=result.task_id,
        outcome="ok" if state == State.SUCCEEDED else "error",
        details=details,
    )


def _requeue_records(
    outcomes: list[tuple[task_store.Held, State | None]], reason: str
) -> list[AuditRecord]:
    """The audit records of attempts the server took back (requeued, or ended for good)."""
    return [
        AuditRecord(
            actor="server",
            action="task.requeue" if state == State.QUEUED else "task.finish",
            target=held.task_id,
            outcome="ok" if state == State.QUEUED else "error",
            details={"attempt": held.attempt, "state": state, "reason": reason},
        )
        for held, state in outcomes
        if state is not None
    ]


def _given_back_records(
    attempts: Sequence[task_store.Claimed | task_store.Held],
) -> list[AuditRecord]:
    """The audit records of attempts claimed for a draining stream and never sent."""
    return [
        AuditRecord(
            actor="server",
            action="task.requeue",
            target=task.task_id,
            details={
                "attempt": task.attempt,
                "state": State.QUEUED,
                "reason": "claimed as its stream began draining; never sent",
            },
        )
        for task in attempts
    ]


def _refusal_name(reason: int) -> str:
    """``SIGNATURE_MISMATCH`` and so on; ``UNKNOWN`` for a number this server does not know."""
    try:
        return common_pb2.RefusalReason.Name(reason).removeprefix("REFUSAL_REASON_")
    except ValueError:
        return "UNKNOWN"


def _retry_after(result: agent_pb2.Result) -> float:
    """The provider's retry-after a Result carries, in seconds (0 when none), bounded."""
    if not result.HasField("retry_after"):
        return 0.0
    seconds = result.retry_after.seconds + result.retry_after.nanos / 1e9
    return min(max(seconds, 0.0), MAX_PROVIDER_BACKOFF)


def _unrecorded(
    attempt: int, agent_id: str, current: task_store.Current | None
) -> agent_pb2.AckStatus:
    """DUPLICATE when this agent's attempt already ended (a resent Result), else STALE."""
    if (
        current is not None
        and (current.attempt, current.agent_id) == (attempt, agent_id)
        and current.state in TERMINAL
    ):
        return agent_pb2.ACK_STATUS_DUPLICATE
    return agent_pb2.ACK_STATUS_STALE
