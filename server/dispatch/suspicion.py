"""Suspicious agents: detect, audit, count, and (per the operator's policy) disable.

Every kind is one ``agent.suspicious`` audit row (``kind`` in its details) and one
``muster_suspicious_events_total{kind}``. The policy (``suspicious_policy``, ``kind=action``
pairs) says per kind whether to only ``log`` (the default) or to ``disable`` the agent,
which closes its streams on every replica with PERMISSION_DENIED, as an administrator's
disable does, and writes an ``agent.disable`` row that says why.

The kinds:

- ``two_addresses``: a stream of the agent replaced (or handed over from) a live one
  that came from another address: the credential is used in two places.
- ``unheld_attempt``: Accepted for an attempt the stream does not hold, or a Result
  for an attempt this agent never held (no such task or attempt, or the current
  attempt of another agent).
- ``message_rate``: more messages (Results not counted: an outbox resend is a
  legitimate burst) in a window than its heartbeats and credit could explain,
  many times over.
- ``renewal_rate``: more renewals within half a certificate lifetime than an agent
  renewing at 1/2..2/3 of it (with a retry or two) ever needs.
- ``hello_refused``: repeated refusals of an agent's Hello (bad limits, labels it
  was not enrolled with, no Hello in time).
- ``excess_credit``: a Credit grant beyond ``max_concurrency`` minus the attempts the
  stream holds (the grant is capped either way).

Counting is per replica and in memory (windows of seconds to minutes; a restart forgets
them), except renewals, which are counted from the certificates table. One kind is
audited at most once per agent per ``FLAG_INTERVAL`` on a replica, so a flood writes
one row, not thousands; the metric counts every event.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
from sqlalchemy import func, select

from muster.server.audit import AuditRecord, AuditWriter, record_in
from muster.server.drain import Drain
from muster.server.metrics import MusterMetrics
from muster.server.storage import identities
from muster.server.storage.database import Database
from muster.server.storage.models import Certificate
from muster.server.storage.types import utcnow

if TYPE_CHECKING:
    from muster.server.dispatch.fanout import Fanout

log = logging.getLogger(__name__)

KINDS = (
    "two_addresses",
    "unheld_attempt",
    "message_rate",
    "renewal_rate",
    "hello_refused",
    "excess_credit",
)
ACTIONS = ("log", "disable")

FLAG_INTERVAL = 60.0
"""Seconds between two audit rows of one kind for one agent on one replica."""
RATE_WINDOW = 10.0
"""Seconds over which a stream's messages are counted."""
RATE_FACTOR = 4
"""How many times the rate a stream's heartbeats and credit explain counts as a spike."""
PROGRESS_PER_SECOND = 4
"""Progress messages a running attempt may send per second (the AI executors send at
most four)."""
RATE_SLACK = 10
"""Messages per window allowed on top (a Draining, a late Credit, ...)."""
RENEWALS_PER_HALF_LIFETIME = 3
"""Renewals of one agent within half a certificate lifetime before it is suspicious:
one is the schedule (1/2..2/3 of the lifetime), the rest retries after a lost answer."""
HELLO_REFUSALS = 5
"""Refused Hellos of one agent within ``HELLO_WINDOW`` before it is suspicious."""
HELLO_WINDOW = 600.0
MAX_REPORTS = 10_000
"""Reports waiting to be audited (and applied) before more are dropped (still counted)."""


def parse_policy(text: str) -> dict[str, str]:
    """``kind=action,...`` (``action``: log or disable) -> {kind: action}; ValueError if bad."""
    policy: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        kind, sep, action = (p.strip() for p in part.partition("="))
        if not sep or kind not in KINDS:
            raise ValueError(f"{part[:60]!r}: expected kind=action with kind one of {KINDS}")
        if action not in ACTIONS:
            raise ValueError(f"{part[:60]!r}: the action must be one of {ACTIONS}")
        policy[kind] = action
    return policy


class RateWatch:
    """Counts one stream's messages per window; says when a window exceeds the allowance:
    what its heartbeats and Progress explain (times RATE_FACTOR), plus two messages
    (Accepted, Credit) per Assignment pushed in this window or the one before, so a fast
    agent turning over many short tasks is not a spike."""

    def __init__(
        self, heartbeat_interval: float, max_concurrency: int, clock: Callable[[], float]
    ) -> None:
        expected = RATE_WINDOW / heartbeat_interval + max_concurrency * (
            RATE_WINDOW * PROGRESS_PER_SECOND
        )
        self.allowance = int(RATE_FACTOR * expected) + RATE_SLACK
        self._clock = clock
        self._window_start = clock()
        self._count = 0
        self._assigned = 0
        self._assigned_before = 0
        self._flagged = False

    def _roll(self) -> None:
        now = self._clock()
        if now - self._window_start >= RATE_WINDOW:
            fresh = now - self._window_start >= 2 * RATE_WINDOW
            self._assigned_before = 0 if fresh else self._assigned
            self._window_start, self._count, self._assigned = now, 0, 0
            self._flagged = False

    def limit(self) -> int:
        return self.allowance + 2 * (self._assigned + self._assigned_before)

    def assigned(self, count: int = 1) -> None:
        """Assignments pushed: each explains an Accepted and a Credit."""
        self._roll()
        self._assigned += count

    def count(self) -> int | None:
        """Count one message; the window's count the first time it passes the limit."""
        self._roll()
        self._count += 1
        if self._flagged or self._count <= self.limit():
            return None
        self._flagged = True
        return self._count


@dataclass(frozen=True)
class Report:
    """One flag to audit and act on."""

    kind: str
    agent_id: str
    actor: str
    peer: str
    action: str
    details: dict[str, Any] = field(default_factory=dict)


class Suspicion:
    def __init__(
        self,
        db: Database,
        fanout: Fanout,
        audit: AuditWriter,
        metrics: MusterMetrics,
        policy: Mapping[str, str],
        *,
        heartbeat_interval: timedelta,
        cert_lifetime: timedelta,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._fanout = fanout
        self._audit = audit
        self._metrics = metrics
        for kind in KINDS:  # every kind at 0 from the start, so an alert sees the first event
            metrics.suspicious_events.labels(kind=kind)
        self._policy = dict(policy)
        self._heartbeat = heartbeat_interval.total_seconds()
        self._cert_lifetime = cert_lifetime
        self.clock = clock
        self._flagged: dict[tuple[str, str], float] = {}
        self._refusals: dict[str, deque[float]] = {}
        self.reports: Drain[Report] = Drain(
            self._report_all, name="suspicion-reports", bound=MAX_REPORTS
        )
        """Audits and applies the flags one at a time, behind the callers (the server's
        supervisor watches it for a crash)."""

    def action(self, kind: str) -> str:
        return self._policy.get(kind, "log")

    def rate_watch(self, max_concurrency: int) -> RateWatch:
        return RateWatch(self._heartbeat, max_concurrency, self.clock)

    def flag(
        self,
        kind: str,
        agent_id: str,
        *,
        actor: str,
        peer: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Count, and (at most once per FLAG_INTERVAL per agent and kind) audit and apply
        the policy, in the background: callers are stream readers and the hub."""
        assert kind in KINDS, kind
        self._metrics.suspicious_events.labels(kind=kind).inc()
        now = self.clock()
        last = self._flagged.get((agent_id, kind))
        if last is not None and now - last < FLAG_INTERVAL:
            return
        self._flagged[(agent_id, kind)] = now
        if len(self._flagged) > 100_000:  # a bound, not a policy: forget the oldest half
            for key in sorted(self._flagged, key=self._flagged.__getitem__)[:50_000]:
                del self._flagged[key]
        action = self.action(kind)
        log.warning("agent %s is suspicious (%s; policy %s)", agent_id, kind, action)
        report = Report(kind, agent_id, actor, peer, action, dict(details or {}))
        if not self.reports.offer(report):
            log.warning("suspicious agent %s (%s) not audited: too many reports", agent_id, kind)

    async def _report_all(self, reports: list[Report]) -> None:
        for report in reports:
            await self._report(report)

    async def _report(self, report: Report) -> None:
        kind, agent_id, actor, action = report.kind, report.agent_id, report.actor, report.action
        peer, details = report.peer, report.details
        try:
            await self._audit.submit(
                AuditRecord(
                    actor=actor,
                    action="agent.suspicious",
                    target=agent_id,
                    outcome="denied" if action == "disable" else "ok",
                    peer=peer,
                    details={"kind": kind, "policy": action, **details},
                )
            )
            if action == "disable":
                await self.disable(agent_id, kind)
        except Exception:
            log.exception("could not report suspicious agent %s (%s)", agent_id, kind)

    async def disable(self, agent_id: str, kind: str) -> None:
        """Disable the agent as SetAgentEnabled(false) does, saying why; close its streams."""
        async with self._db.transaction() as session:
            row = await identities.agent(session, agent_id)
            if row is None:
                return
            if row.enabled:
                row.enabled = False
                await record_in(
                    session,
                    AuditRecord(
                        actor="server",
                        action="agent.disable",
                        target=agent_id,
                        details={"reason": f"suspicious: {kind}", "policy": "disable"},
                    ),
                )
        self._fanout.close_agent(
            agent_id,
            grpc.StatusCode.PERMISSION_DENIED,
            f"agent disabled: suspicious activity ({kind})",
        )

    # Detectors that keep state across streams

    def hello_refused(self, agent_id: str, *, actor: str, peer: str, reason: str) -> None:
        now = self.clock()
        times = self._refusals.setdefault(agent_id, deque())
        while times and now - times[0] > HELLO_WINDOW:
            times.popleft()
        times.append(now)
        if len(self._refusals) > 100_000:
            self._refusals.clear()  # a bound: a fleet this size refused at once is an outage
        if len(times) >= HELLO_REFUSALS:
            count = len(times)
            times.clear()
            self.flag(
                "hello_refused",
                agent_id,
                actor=actor,
                peer=peer,
                details={"refusals": count, "window_s": HELLO_WINDOW, "last": reason[:200]},
            )

    async def renewed(self, agent_id: str, *, actor: str, peer: str) -> None:
        """After a renewal: flag an agent renewing far more often than its lifetime needs."""
        since = utcnow() - self._cert_lifetime / 2
        async with self._db.transaction() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(Certificate)
                .where(
                    Certificate.agent_id == agent_id,
                    Certificate.reason == "renew",
                    Certificate.not_before >= since - timedelta(minutes=10),
                )
            )
        if (count or 0) > RENEWALS_PER_HALF_LIFETIME:
            self.flag(
                "renewal_rate",
                agent_id,
                actor=actor,
                peer=peer,
                details={
                    "renewals": int(count or 0),
                    "within_s": int(self._cert_lifetime.total_seconds() / 2),
                },
            )
