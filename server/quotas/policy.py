"""The limits Muster enforces and the façade services call to enforce them.

Why a façade: handlers ask one question ("may this principal submit?") and get one
decision they can turn into a RESOURCE_EXHAUSTED status; keys, limits, metrics and the
policy for an unreachable store stay here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.metrics import MusterMetrics
from server.quotas.base import (
    BudgetDecision,
    LeaseDecision,
    QuotaStore,
    QuotaStoreUnavailable,
    RateDecision,
)
from server.quotas.memory import InMemoryQuotaStore

__all__ = [
    "AUTH_FAILURES",
    "ENROLLMENTS",
    "INFLIGHT_TASKS",
    "LEASE_RETRY_AFTER",
    "SUBMISSIONS",
    "QuotaDecision",
    "QuotaPolicy",
    "Quotas",
    "RateLimit",
    "quota_exceeded_status",
]

_log = logging.getLogger(__name__)

SUBMISSIONS = "submissions"
"""Limit name (metric label, QuotaFailure description) of task submissions per principal."""
ENROLLMENTS = "enrollments"
"""Limit name of enrollment attempts per peer address."""
AUTH_FAILURES = "auth_failures"
"""Limit name of failed authentications per peer address (the lockout)."""
INFLIGHT_TASKS = "inflight_tasks"
"""Limit name of tasks in flight per tenant."""

LEASE_RETRY_AFTER = 1.0
"""Retry hint (seconds) for a full concurrency limit, whose freeing time is unknown."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A GCRA limit: a sustained ``rate`` per second with bursts of up to ``burst``."""

    rate: float
    """Units per second, sustained."""
    burst: int
    """Units allowed at once after a quiet period."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be positive, not {self.rate!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst!r}")


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """Every limit the control plane enforces, validated when built."""

    submissions: RateLimit = field(default_factory=lambda: RateLimit(rate=20.0, burst=100))
    """Task submissions per principal (API token name)."""
    enrollments: RateLimit = field(default_factory=lambda: RateLimit(rate=1.0, burst=30))
    """Enrollment attempts per peer IP address."""
    auth_failure_threshold: int = 10
    """Failed authentications from one peer address that lock it out..."""
    auth_failure_window: float = 300.0
    """...within this many seconds. Locked out, a peer regains one attempt every
    ``auth_failure_window / auth_failure_threshold`` seconds."""
    inflight_per_tenant: int = 1000
    """Tasks one tenant may have assigned or running at once."""
    inflight_lease_ttl: float = 120.0
    """Seconds an in-flight slot lives unless renewed (a crashed holder frees it)."""

    def __post_init__(self) -> None:
        if self.auth_failure_threshold < 1:
            raise ValueError("auth_failure_threshold must be at least 1")
        if not (math.isfinite(self.auth_failure_window) and self.auth_failure_window > 0):
            raise ValueError("auth_failure_window must be a positive number of seconds")
        if self.inflight_per_tenant < 0:
            raise ValueError("inflight_per_tenant must not be negative")
        if not (math.isfinite(self.inflight_lease_ttl) and self.inflight_lease_ttl > 0):
            raise ValueError("inflight_lease_ttl must be a positive number of seconds")

    @property
    def auth_failures(self) -> RateLimit:
        """The lockout as a GCRA limit: ``threshold`` failures per ``window``."""
        return RateLimit(
            rate=self.auth_failure_threshold / self.auth_failure_window,
            burst=self.auth_failure_threshold,
        )


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """One answer of :class:`Quotas`; when not ``allowed``, ``status()`` is the error."""

    allowed: bool
    limit: str
    """Which limit decided (``submissions``, ``enrollments``, ...)."""
    subject: str
    """Whom it limits, e.g. ``principal:alice`` or ``peer:10.0.0.7``."""
    retry_after: float | None
    """Seconds before trying again may succeed; None when waiting will not help."""
    degraded: bool = False
    """Decided by this process alone because the shared store was unreachable."""

    @property
    def exceeded(self) -> bool:
        return not self.allowed

    def status(self) -> grpc.Status:
        """RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure, for ``abort_with_status``."""
        return quota_exceeded_status(self, self.limit, self.subject)


def quota_exceeded_status(
    decision: QuotaDecision | RateDecision | LeaseDecision | BudgetDecision,
    limit: str,
    subject: str,
) -> grpc.Status:
    """Build the RESOURCE_EXHAUSTED status of a refused decision.

    Details: ``google.rpc.QuotaFailure`` (one violation: ``subject``, ``limit``) and,
    unless the refusal is terminal (an exhausted budget), ``google.rpc.RetryInfo``.
    Use it as ``await context.abort_with_status(quota_exceeded_status(...))``.
    """
    retry_after = _retry_after(decision)
    if retry_after is None:
        message = f"{limit} exhausted for {subject}"
    else:
        message = f"{limit} exceeded for {subject}; retry in {retry_after:.3f}s"
    details: list[error_details_pb2.QuotaFailure | error_details_pb2.RetryInfo] = [
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=limit)
            ]
        )
    ]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        # Round up: waiting exactly this long must not be refused again (whole ns first,
        # so 0.1 s stays 100000 us despite binary floats).
        delay.FromMicroseconds(-(-round(retry_after * 1e9) // 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    for detail in details:
        status.details.add().Pack(detail)
    built: grpc.Status = rpc_status.to_status(status)
    return built


def _retry_after(
    decision: QuotaDecision | RateDecision | LeaseDecision | BudgetDecision,
) -> float | None:
    if isinstance(decision, BudgetDecision):
        return None
    if isinstance(decision, LeaseDecision):
        return LEASE_RETRY_AFTER
    return decision.retry_after


class Quotas:
    """The quota questions services ask, answered from ``store`` under ``policy``.

    Every decision is counted in ``muster_quota_decisions_total``. When the store is
    unreachable, rate limits fail open to a per-process cap (the same limits kept in
    ``fallback``, outcome ``degraded``), while concurrency fails closed: the
    :class:`QuotaStoreUnavailable` propagates, for the caller to answer UNAVAILABLE.
    """

    def __init__(
        self,
        store: QuotaStore,
        policy: QuotaPolicy | None = None,
        metrics: MusterMetrics | None = None,
        *,
        fallback: QuotaStore | None = None,
    ) -> None:
        self.store = store
        self.policy = policy or QuotaPolicy()
        self._metrics = metrics
        self._fallback = fallback or InMemoryQuotaStore()
        self._degraded = False

    async def check_submission(self, principal: str) -> QuotaDecision:
        """May ``principal`` submit one more task now?"""
        return await self._rate(SUBMISSIONS, f"principal:{principal}", self.policy.submissions)

    async def check_enrollment(self, peer: str) -> QuotaDecision:
        """May the peer address ``peer`` (no port) attempt an enrollment now?"""
        return await self._rate(ENROLLMENTS, f"peer:{peer}", self.policy.enrollments)

    async def record_auth_failure(self, peer: str) -> QuotaDecision:
        """Count a failed authentication; ``allowed`` is False once ``peer`` is locked out."""
        rule = self.policy.auth_failures
        subject = f"peer:{peer}"
        answer, degraded = await self._ask(AUTH_FAILURES, subject, rule, cost=1)
        if answer.allowed and answer.remaining == 0:
            # This failure used the last attempt: locked out for at most one interval.
            decision = QuotaDecision(False, AUTH_FAILURES, subject, 1 / rule.rate, degraded)
        else:
            decision = self._decision(AUTH_FAILURES, subject, answer, degraded)
        self._count(decision)
        return decision

    async def check_lockout(self, peer: str) -> QuotaDecision:
        """May ``peer`` try to authenticate? Not allowed while it is locked out."""
        return await self._rate(AUTH_FAILURES, f"peer:{peer}", self.policy.auth_failures, cost=0)

    async def is_locked_out(self, peer: str) -> bool:
        """True while ``peer`` has used up its failed authentications."""
        return not (await self.check_lockout(peer)).allowed

    async def acquire_inflight(self, tenant: str, holder: str) -> QuotaDecision:
        """Take one of ``tenant``'s in-flight slots for ``holder`` (e.g. a task id)."""
        subject = f"tenant:{tenant}"
        try:
            lease = await self.store.acquire_lease(
                f"inflight:{tenant}",
                holder,
                limit=self.policy.inflight_per_tenant,
                ttl=self.policy.inflight_lease_ttl,
            )
        except QuotaStoreUnavailable:
            self._store_failed(INFLIGHT_TASKS)
            self._record(INFLIGHT_TASKS, "rejected")
            raise
        self._store_ok()
        retry = None if lease.acquired else LEASE_RETRY_AFTER
        decision = QuotaDecision(lease.acquired, INFLIGHT_TASKS, subject, retry)
        self._count(decision)
        return decision

    async def renew_inflight(self, tenant: str, holder: str) -> bool:
        """Keep ``holder``'s slot alive; False if it had expired (take a new one)."""
        return await self.store.renew_lease(
            f"inflight:{tenant}", holder, self.policy.inflight_lease_ttl
        )

    async def release_inflight(self, tenant: str, holder: str) -> None:
        """Free ``holder``'s slot."""
        await self.store.release_lease(f"inflight:{tenant}", holder)

    # --- internals --------------------------------------------------------------------

    async def _rate(
        self, limit: str, subject: str, rule: RateLimit, *, cost: int = 1
    ) -> QuotaDecision:
        answer, degraded = await self._ask(limit, subject, rule, cost=cost)
        decision = self._decision(limit, subject, answer, degraded)
        self._count(decision)
        return decision

    async def _ask(
        self, limit: str, subject: str, rule: RateLimit, *, cost: int
    ) -> tuple[RateDecision, bool]:
        """The store's answer, or the local fallback's (degraded) if the store is down."""
        key = f"{limit}:{subject}"
        try:
            answer = await self.store.rate_limit(key, rate=rule.rate, burst=rule.burst, cost=cost)
        except QuotaStoreUnavailable:
            self._store_failed(limit)
            answer = await self._fallback.rate_limit(
                key, rate=rule.rate, burst=rule.burst, cost=cost
            )
            return answer, True
        self._store_ok()
        return answer, False

    @staticmethod
    def _decision(limit: str, subject: str, answer: RateDecision, degraded: bool) -> QuotaDecision:
        retry = None if answer.allowed else answer.retry_after
        return QuotaDecision(answer.allowed, limit, subject, retry, degraded)

    def _count(self, decision: QuotaDecision) -> None:
        if not decision.allowed:
            outcome = "rejected"
        elif decision.degraded:
            outcome = "degraded"
        else:
            outcome = "allowed"
        self._record(decision.limit, outcome)

    def _record(self, limit: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.quota_decision(limit, outcome)

    def _store_failed(self, limit: str) -> None:
        if not self._degraded:
            self._degraded = True
            _log.warning("quota store unreachable (deciding %s locally until it is back)", limit)

    def _store_ok(self) -> None:
        if self._degraded:
            self._degraded = False
            _log.info("quota store reachable again")
