"""The limits Muster enforces and the façade services call to enforce them.

Why a façade: handlers ask one question ("may this principal submit?") and get one
decision they can turn into a RESOURCE_EXHAUSTED status; keys, limits, metrics and the
policy for an unreachable store stay here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from muster.server.metrics import MusterMetrics
from muster.server.quotas.base import (
    BudgetHold,
    BudgetUsage,
    BudgetVerdict,
    LeaseDecision,
    LeaseRequest,
    QuotaStore,
    QuotaStoreUnavailable,
    RateCheck,
    RateDecision,
)
from muster.server.quotas.memory import InMemoryQuotaStore
from muster.server.quotas.redis import RedisQuotaStore

__all__ = [
    "AI_REQUESTS",
    "AI_TOKENS",
    "AUTH_FAILURES",
    "BUDGETS",
    "DEGRADED_LOG_INTERVAL",
    "ENROLLMENTS",
    "INFLIGHT_TASKS",
    "LEASE_RETRY_AFTER",
    "PROVIDER_BACKOFF",
    "RENEWALS",
    "SUBMISSIONS",
    "AuthFailure",
    "QuotaDecision",
    "QuotaPolicy",
    "Quotas",
    "RateLimit",
    "auth_failure_subject",
    "lockout_address",
    "quota_exceeded_status",
]

_log = logging.getLogger(__name__)

SUBMISSIONS = "submissions"
"""Limit name (metric label, QuotaFailure description) of task submissions per principal."""
ENROLLMENTS = "enrollments"
"""Limit name of enrollment attempts per peer address."""
RENEWALS = "renewals"
"""Limit name of certificate renewals per agent."""
AUTH_FAILURES = "auth_failures"
"""Limit name of failed authentications per peer address (the lockout)."""
INFLIGHT_TASKS = "inflight_tasks"
"""Limit name of tasks in flight per tenant."""
AI_REQUESTS = "ai_requests"
"""Limit name of AI task submissions per tenant per minute."""
AI_TOKENS = "ai_tokens"
"""Limit name of AI tokens submitted per tenant per minute."""
BUDGETS = "budgets"
"""Names spend budgets in outage warnings (their decisions are counted in
``muster_budget_reservations_total``)."""
PROVIDER_BACKOFF = "provider_backoff"
"""Names provider back-offs in outage warnings."""

LEASE_RETRY_AFTER = 1.0
"""Retry hint (seconds) for a full concurrency limit, whose freeing time is unknown."""
DEGRADED_LOG_INTERVAL = 30.0
"""Seconds between warnings about one limit class decided without the store."""
VERIFIED_TTL = 1.0
"""Seconds the store's lockout allowance for a key whose right secret was presented is
reused by this process (see :meth:`Quotas.check_lockout`)."""
MAX_VERIFIED = 10_000
"""Keys remembered so at most; the oldest is forgotten first."""


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
    renewals: RateLimit = field(default_factory=lambda: RateLimit(rate=1 / 60, burst=5))
    """Certificate renewals per agent: one a minute after a burst of five. An agent needs
    one per half lifetime (plus any rotation an operator forces): more is a runaway loop
    or a stolen key minting certificates."""
    auth_failure_threshold: int = 10
    """Failed authentications from one peer address that lock it out..."""
    auth_failure_window: float = 300.0
    """...within this many seconds. Locked out, a peer regains one attempt every
    ``auth_failure_window / auth_failure_threshold`` seconds."""
    inflight_per_tenant: int = 1000
    """Tasks one tenant may have assigned or running at once."""
    inflight_per_pool: int = 0
    """Tasks one pool may have assigned or running at once; 0 means no limit."""
    inflight_lease_ttl: float = 120.0
    """Seconds an in-flight slot lives unless renewed (a crashed holder frees it)."""
    ai_requests_per_minute: int = 600
    """AI tasks one tenant may submit per minute (a minute's worth at once); 0: no limit."""
    ai_tokens_per_minute: int = 2_000_000
    """Tokens (input estimate plus ``max_tokens``) of the AI tasks one tenant may submit
    per minute; 0: no limit."""

    def __post_init__(self) -> None:
        if self.auth_failure_threshold < 1:
            raise ValueError("auth_failure_threshold must be at least 1")
        if not (math.isfinite(self.auth_failure_window) and self.auth_failure_window > 0):
            raise ValueError("auth_failure_window must be a positive number of seconds")
        if self.inflight_per_tenant < 0 or self.inflight_per_pool < 0:
            raise ValueError("in-flight limits must not be negative")
        if not (math.isfinite(self.inflight_lease_ttl) and self.inflight_lease_ttl > 0):
            raise ValueError("inflight_lease_ttl must be a positive number of seconds")
        for name in ("ai_requests_per_minute", "ai_tokens_per_minute"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer (0: no limit)")

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


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """The answer of :meth:`Quotas.record_auth_failure`."""

    decision: QuotaDecision
    """Allowed: the failure was counted within the allowance (answer UNAUTHENTICATED).
    Refused: its key is locked out (answer ``decision.status()``); nothing was counted."""
    locked_now: bool
    """This failure used the key's last attempt: it is locked out from now (audit that)."""
    retry_after: float | None
    """When ``locked_now``: seconds until the key regains one attempt."""


def auth_failure_subject(peer: str, token: str | None = None) -> str:
    """The lockout key of a failed authentication from the address ``peer``.

    ``token`` is the public part of a well-formed token of a known id (``mat_<id>``,
    ``mbt_<id>``): guessing that token's secret locks out only that token at that
    address, so a broken script behind a shared address cannot lock out the others'
    valid tokens. Without it (no token, a malformed one, an unknown id) the address's
    own allowance is spent, which bounds guessing of random tokens.

    An IPv6 address counts as its /64, the block one host or site is usually given
    (else each of its 2**64 addresses would guess afresh); an IPv4-mapped one as IPv4.
    """
    address = lockout_address(peer)
    return f"peer:{address}" if token is None else f"peer:{address}/token:{token}"


def lockout_address(peer: str) -> str:
    """The address a lockout counts ``peer`` under: IPv4 as is, IPv6 as its /64."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return peer  # not an IP (a Unix socket peer, say): itself
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def quota_exceeded_status(
    decision: QuotaDecision | RateDecision | LeaseDecision | BudgetVerdict,
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
    decision: QuotaDecision | RateDecision | LeaseDecision | BudgetVerdict,
) -> float | None:
    if isinstance(decision, BudgetVerdict):
        return None
    if isinstance(decision, LeaseDecision):
        return LEASE_RETRY_AFTER
    return decision.retry_after


class Quotas:
    """The quota questions services ask, answered from ``store`` under ``policy``.

    Every rate and concurrency decision is counted in ``muster_quota_decisions_total``,
    every budget reservation in ``muster_budget_reservations_total``. When the store is
    unreachable the policy is explicit per limit class: rate limits fail open to a
    per-process cap (the same limits kept in ``fallback``); concurrency, budgets and
    provider back-offs fail closed, raising :class:`QuotaStoreUnavailable` for the
    caller to answer UNAVAILABLE or to hold the task back.
    Either way the decision is counted with outcome ``degraded`` and logged, once per
    ``degraded_log_interval`` seconds per limit class (``clock`` times that, in seconds).
    """

    def __init__(
        self,
        store: QuotaStore,
        policy: QuotaPolicy | None = None,
        metrics: MusterMetrics | None = None,
        *,
        fallback: QuotaStore | None = None,
        degraded_log_interval: float = DEGRADED_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.policy = policy or QuotaPolicy()
        self._metrics = metrics
        self._fallback = fallback or InMemoryQuotaStore()
        self._outage = _OutageLog(degraded_log_interval, clock)
        self._clock = clock
        self._verified: dict[str, float] = {}
        """Lockout keys a correct secret was answered for, until when (see check_lockout)."""

    @classmethod
    def from_config(
        cls,
        redis_url: str,
        prefix: str,
        policy: QuotaPolicy | None = None,
        metrics: MusterMetrics | None = None,
        **redis_options: Any,
    ) -> Quotas:
        """Quotas shared through Redis when ``redis_url`` is set, else kept in-process.

        Keys live under ``<prefix>:quota:``, apart from anything else the deployment
        keeps under ``prefix``; ``redis_options`` go to :meth:`RedisQuotaStore.from_url`
        (e.g. ``ssl_ca_certs``). Nothing connects yet: call :meth:`ping` to fail fast at
        start-up, and :meth:`close` at shutdown.
        """
        store: QuotaStore
        if redis_url:
            namespace = f"{prefix.rstrip(':')}:quota"
            store = RedisQuotaStore.from_url(redis_url, prefix=namespace, **redis_options)
        else:
            store = InMemoryQuotaStore()
        return cls(store, policy, metrics)

    async def ping(self) -> None:
        """Raise QuotaStoreUnavailable (with a clear reason) if the shared store cannot
        serve: unreachable, wrong credentials, TLS trouble. In-process: never."""
        if isinstance(self.store, RedisQuotaStore):
            await self.store.ping()

    async def close(self) -> None:
        """Release the store's connections."""
        await self.store.close()

    # --- rate limits ------------------------------------------------------------------

    async def check_submission(self, principal: str) -> QuotaDecision:
        """May ``principal`` submit one more task now?"""
        return await self._rate(SUBMISSIONS, f"principal:{principal}", self.policy.submissions)

    async def check_enrollment(self, peer: str) -> QuotaDecision:
        """May the peer address ``peer`` (no port) attempt an enrollment now?"""
        return await self._rate(ENROLLMENTS, f"peer:{peer}", self.policy.enrollments)

    async def check_renewal(self, agent_id: str) -> QuotaDecision:
        """May the agent ``agent_id`` renew its certificate now? (Fails open to a local
        cap, like every rate limit.)"""
        return await self._rate(RENEWALS, f"agent:{agent_id}", self.policy.renewals)

    async def check_enrollment_attempt(self, peer: str, token: str) -> QuotaDecision:
        """May an enrollment with the well-formed bootstrap token ``token`` (its public
        ``mbt_<id>``, whose secret just checked out) go ahead from ``peer``? A look at
        the token's lockout at that address (:meth:`check_lockout`), then (unless it is
        locked out) one of the address's enrollments, in one store call; the answer is
        the refusal, or the enrollment limit's decision when both allow."""
        lockout, failures = auth_failure_subject(peer, token), self.policy.auth_failures
        enrollments = self.policy.enrollments
        checks = [
            RateCheck(f"{AUTH_FAILURES}:{lockout}", failures.rate, failures.burst, 0),
            RateCheck(f"{ENROLLMENTS}:peer:{peer}", enrollments.rate, enrollments.burst, 1),
        ]
        answers, degraded = await self._rate_checks(checks, (AUTH_FAILURES, ENROLLMENTS))
        subjects = ((AUTH_FAILURES, lockout), (ENROLLMENTS, f"peer:{peer}"))
        decisions = [
            self._decision(limit, subject, answer, degraded)
            for (limit, subject), answer in zip(subjects, answers, strict=False)
        ]
        for decision in decisions:
            self._count(decision)
        return decisions[-1]

    async def record_auth_failure(self, peer: str, token: str | None = None) -> AuthFailure:
        """Count one failed authentication against its lockout key (see
        :func:`auth_failure_subject`): ``token`` is the public part (``mat_<id>``,
        ``mbt_<id>``) of a well-formed token whose id is known; None for a missing or
        malformed token or an unknown id, which count against the address alone.

        Counted before the caller answers, atomically: however many failures are in
        flight, at most ``auth_failure_threshold`` per key per window are counted (the
        caller answers UNAUTHENTICATED); the others are refused (the caller answers the
        lockout's RESOURCE_EXHAUSTED) and spend nothing."""
        rule = self.policy.auth_failures
        subject = auth_failure_subject(peer, token)
        self._verified.pop(subject, None)
        answer, degraded = await self._ask(AUTH_FAILURES, subject, rule, cost=1)
        if answer.allowed:
            decision = QuotaDecision(True, AUTH_FAILURES, subject, None, degraded)
        else:
            decision = self._decision(AUTH_FAILURES, subject, answer, degraded)
        self._count(decision)
        locked_now = answer.allowed and answer.remaining == 0
        # The failure that used the last attempt: locked out for at most one interval.
        return AuthFailure(decision, locked_now, 1 / rule.rate if locked_now else None)

    async def check_lockout(
        self, peer: str, token: str | None = None, *, verified: bool = False
    ) -> QuotaDecision:
        """May ``peer`` authenticate with ``token`` (as in :meth:`record_auth_failure`)?
        Not allowed while that key is locked out; spends nothing. A success is answered
        only after this allows it, so a right guess among many in flight counts only if
        it came within the allowance.

        ``verified``: the caller checked that ``token``'s secret is right. The store's
        allowance for such a key is then reused for :data:`VERIFIED_TTL` seconds, until
        a failure of that key is recorded here: a client that keeps using its token costs
        one store call per key and interval, not one per call. What guessing needs is
        unchanged (every failure is counted in the store before it is answered, and only
        a right secret that the store allowed is reused); a key locked out by failures
        on another replica is refused here once the interval ends."""
        subject = auth_failure_subject(peer, token)
        now = self._clock()
        if verified and self._verified.get(subject, 0.0) > now:
            decision = QuotaDecision(True, AUTH_FAILURES, subject, None)
            self._count(decision)
            return decision
        decision = await self._rate(AUTH_FAILURES, subject, self.policy.auth_failures, cost=0)
        if verified and decision.allowed and not decision.degraded:
            self._verified.pop(subject, None)
            if len(self._verified) >= MAX_VERIFIED:
                del self._verified[next(iter(self._verified))]  # the oldest
            self._verified[subject] = now + VERIFIED_TTL
        return decision

    async def is_locked_out(self, peer: str, token: str | None = None) -> bool:
        """True while that lockout key has used up its failed authentications."""
        return not (await self.check_lockout(peer, token)).allowed

    # --- concurrency (fails closed) ---------------------------------------------------

    async def acquire_inflight(
        self, tenant: str, holder: str, *, scope: str = "tenant"
    ) -> QuotaDecision:
        """Take one of the in-flight slots of ``tenant`` (or, with ``scope="pool"``, of
        a pool) for ``holder`` (an attempt). A pool limit of 0 means unlimited.

        Raises QuotaStoreUnavailable when the store is unreachable (fail closed)."""
        subject = f"{scope}:{tenant}"
        limit = self._inflight_limit(scope)
        if limit == 0 and scope == "pool":
            return QuotaDecision(True, INFLIGHT_TASKS, subject, None)
        try:
            lease = await self.store.acquire_lease(
                self._inflight_key(scope, tenant),
                holder,
                limit=limit,
                ttl=self.policy.inflight_lease_ttl,
            )
        except QuotaStoreUnavailable as err:
            self._closed(INFLIGHT_TASKS, err)
            raise
        self._outage.recovered()
        retry = None if lease.acquired else LEASE_RETRY_AFTER
        decision = QuotaDecision(lease.acquired, INFLIGHT_TASKS, subject, retry)
        self._count(decision)
        return decision

    async def acquire_inflight_slots(self, tenant: str, pool: str, holder: str) -> QuotaDecision:
        """:meth:`acquire_inflight` of ``tenant``'s slot, then of ``pool``'s, for ``holder``,
        in one store call: all or none (refused by the pool, ``holder`` holds no tenant
        slot either). The answer is the refusal (its subject says which: ``tenant:...`` or
        ``pool:...``), else the last slot's decision.

        Raises QuotaStoreUnavailable when the store is unreachable (fail closed)."""
        return (await self.acquire_inflight_slots_many([(tenant, pool, holder)]))[0]

    async def acquire_inflight_slots_many(
        self, attempts: Sequence[tuple[str, str, str]]
    ) -> list[QuotaDecision]:
        """:meth:`acquire_inflight_slots` of many (tenant, pool, holder), decided in that
        order (an earlier one takes a slot first), in one store call.

        Raises QuotaStoreUnavailable when the store is unreachable (fail closed)."""
        scoped = [
            (
                holder,
                [("tenant", tenant)] + ([("pool", pool)] if self.policy.inflight_per_pool else []),
            )
            for tenant, pool, holder in attempts
        ]
        requests = [
            (
                holder,
                [
                    LeaseRequest(self._inflight_key(s, n), self._inflight_limit(s))
                    for s, n in scopes
                ],
            )
            for holder, scopes in scoped
        ]
        try:
            answers = await self.store.acquire_leases_many(
                requests, ttl=self.policy.inflight_lease_ttl
            )
        except QuotaStoreUnavailable as err:
            self._closed(INFLIGHT_TASKS, err)
            raise
        self._outage.recovered()
        decisions = []
        for (_, pool, _), (_, scopes), leases in zip(attempts, scoped, answers, strict=True):
            decision = QuotaDecision(True, INFLIGHT_TASKS, f"pool:{pool}", None)
            for (scope, name), lease in zip(scopes, leases, strict=False):
                retry = None if lease.acquired else LEASE_RETRY_AFTER
                decision = QuotaDecision(lease.acquired, INFLIGHT_TASKS, f"{scope}:{name}", retry)
                self._count(decision)
            decisions.append(decision)
        return decisions

    async def renew_inflight(self, tenant: str, holder: str, *, scope: str = "tenant") -> bool:
        """Keep ``holder``'s slot alive; False if it had expired (take a new one).

        Raises QuotaStoreUnavailable when the store is unreachable: whether the slot is
        still held is unknown, and the caller decides (it expires after its ttl)."""
        if scope == "pool" and self.policy.inflight_per_pool == 0:
            return True
        try:
            return await self.store.renew_lease(
                self._inflight_key(scope, tenant), holder, self.policy.inflight_lease_ttl
            )
        except QuotaStoreUnavailable as err:
            self._outage.failed(INFLIGHT_TASKS, err)
            raise

    async def renew_inflight_many(self, attempts: Sequence[tuple[str, str, str]]) -> None:
        """:meth:`renew_inflight` of the tenant and pool slots of many (tenant, pool,
        holder), retaking with :meth:`acquire_inflight` each that had expired: one store
        call for the renewals, one for the retakes (if any).

        Raises QuotaStoreUnavailable when the store is unreachable (the slots expire
        after their ttl unless a later renewal reaches it)."""
        slots = [("tenant", tenant, holder) for tenant, _, holder in attempts]
        if self.policy.inflight_per_pool:
            slots += [("pool", pool, holder) for _, pool, holder in attempts]
        leases = [(self._inflight_key(scope, name), holder) for scope, name, holder in slots]
        try:
            renewed = await self.store.renew_leases(leases, self.policy.inflight_lease_ttl)
        except QuotaStoreUnavailable as err:
            self._outage.failed(INFLIGHT_TASKS, err)
            raise
        expired = [slot for slot, alive in zip(slots, renewed, strict=True) if not alive]
        # Asked together: the Redis store sends them in one call.
        await asyncio.gather(
            *(self.acquire_inflight(name, holder, scope=scope) for scope, name, holder in expired)
        )

    async def release_inflight(self, tenant: str, holder: str, *, scope: str = "tenant") -> None:
        """Free ``holder``'s slot. If the store is unreachable the slot stays taken until
        its ttl ends (failing closed), so this logs instead of raising."""
        if scope == "pool" and self.policy.inflight_per_pool == 0:
            return
        try:
            await self.store.release_lease(self._inflight_key(scope, tenant), holder)
        except QuotaStoreUnavailable as err:
            self._outage.failed(INFLIGHT_TASKS, err)

    async def release_inflight_many(self, attempts: Sequence[tuple[str, str, str]]) -> None:
        """:meth:`release_inflight` of the tenant and pool slots of many (tenant, pool,
        holder) at once: one round trip to the store."""
        leases = [(self._inflight_key("tenant", t), holder) for t, _, holder in attempts]
        if self.policy.inflight_per_pool:
            leases += [(self._inflight_key("pool", p), holder) for _, p, holder in attempts]
        try:
            await self.store.release_leases(leases)
        except QuotaStoreUnavailable as err:
            self._outage.failed(INFLIGHT_TASKS, err)

    def _inflight_limit(self, scope: str) -> int:
        if scope == "tenant":
            return self.policy.inflight_per_tenant
        if scope == "pool":
            return self.policy.inflight_per_pool
        raise ValueError(f"in-flight scope must be 'tenant' or 'pool', not {scope!r}")

    @staticmethod
    def _inflight_key(scope: str, name: str) -> str:
        # Tenants keep the key they always had; pools get their own namespace.
        return f"inflight:{name}" if scope == "tenant" else f"inflight-pool:{name}"

    # --- AI submissions ---------------------------------------------------------------

    async def check_ai_submission(self, tenant: str, tokens: int) -> QuotaDecision:
        """May ``tenant`` submit one more AI task of about ``tokens`` tokens now?

        Its requests per minute and its tokens per minute (GCRA), in one store call: a
        look at the request limit, then the tokens, then the request, so a refusal by
        either limit spends neither. The answer is the refusal, else the last decision.
        A task of more tokens than a minute's allowance is refused without a retry time
        (waiting will not help). Fails open to a local cap, like every rate limit."""
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, not {tokens!r}")
        subject = f"tenant:{tenant}"
        rpm, tpm = self.policy.ai_requests_per_minute, self.policy.ai_tokens_per_minute
        if tpm and tokens > tpm:
            decision = QuotaDecision(False, AI_TOKENS, subject, None)
            self._count(decision)
            return decision
        steps: list[tuple[str, RateLimit, int]] = []
        if rpm:
            requests = RateLimit(rate=rpm / 60, burst=rpm)
            steps.append((AI_REQUESTS, requests, 0))
        if tpm:
            steps.append((AI_TOKENS, RateLimit(rate=tpm / 60, burst=tpm), tokens))
        if rpm:
            steps.append((AI_REQUESTS, requests, 1))
        if not steps:
            return QuotaDecision(True, AI_REQUESTS, subject, None)
        checks = [RateCheck(f"{name}:{subject}", r.rate, r.burst, cost) for name, r, cost in steps]
        answers, degraded = await self._rate_checks(checks, (AI_REQUESTS, AI_TOKENS))
        decision = QuotaDecision(True, AI_REQUESTS, subject, None)
        for (name, _, cost), answer in zip(steps, answers, strict=False):
            decision = self._decision(name, subject, answer, degraded)
            if cost > 0 or not answer.allowed or name == AI_TOKENS:
                self._count(decision)  # the look at the request limit counts if it refuses
        return decision

    # --- spend budgets (fail closed) --------------------------------------------------

    async def reserve_budget(
        self, reservation_id: str, amount: int, holds: Sequence[BudgetHold]
    ) -> BudgetVerdict:
        """Reserve ``amount`` on every budget in ``holds`` at once, or on none (see
        :meth:`QuotaStore.reserve_budgets`); counted in
        ``muster_budget_reservations_total`` as ``reserved`` or ``refused``.

        Raises QuotaStoreUnavailable when the store is unreachable (fail closed: nothing
        is dispatched on an unknown budget), counted as ``degraded``."""
        try:
            verdict = await self.store.reserve_budgets(reservation_id, amount, holds)
        except QuotaStoreUnavailable as err:
            self._outage.failed(BUDGETS, err)
            self._reservation("degraded")
            raise
        self._outage.recovered()
        self._reservation("reserved" if verdict.allowed else "refused")
        return verdict

    async def settle_budget(self, reservation_id: str, actual: int) -> bool:
        """Replace the reservation by the ``actual`` spend on every budget it held; False
        if it was not open (already settled or released). Raises QuotaStoreUnavailable:
        until settled, the reservation keeps its budgets held (fail closed)."""
        try:
            settled = await self.store.settle_reservation(reservation_id, actual)
        except QuotaStoreUnavailable as err:
            self._outage.failed(BUDGETS, err)
            raise
        self._outage.recovered()
        return settled

    async def release_budget(self, reservation_id: str) -> bool:
        """Drop the reservation unspent; False if it was not open. Raises
        QuotaStoreUnavailable (the amount stays reserved until released)."""
        try:
            released = await self.store.release_reservation(reservation_id)
        except QuotaStoreUnavailable as err:
            self._outage.failed(BUDGETS, err)
            raise
        self._outage.recovered()
        return released

    async def budget_usage(self, key: str) -> BudgetUsage:
        """Spent and reserved on a budget key (see :meth:`BudgetRule.key`). Raises
        QuotaStoreUnavailable."""
        try:
            return await self.store.budget_usage(key)
        except QuotaStoreUnavailable as err:
            self._outage.failed(BUDGETS, err)
            raise

    async def stale_reservations(self, older_than: float, limit: int = 1000) -> list[str]:
        """Open reservations older than ``older_than`` seconds, for the reaper. Raises
        QuotaStoreUnavailable."""
        try:
            return await self.store.stale_reservations(older_than, limit)
        except QuotaStoreUnavailable as err:
            self._outage.failed(BUDGETS, err)
            raise

    # --- provider back-off ------------------------------------------------------------

    async def hold_off(self, key: str, seconds: float) -> None:
        """Hold ``key`` (say, a model in a pool) off for ``seconds``; a later end already
        set stays. Raises QuotaStoreUnavailable."""
        try:
            await self.store.hold_off(key, seconds)
        except QuotaStoreUnavailable as err:
            self._outage.failed(PROVIDER_BACKOFF, err)
            raise

    async def held_off(self, keys: Sequence[str]) -> dict[str, float]:
        """Seconds left for each of ``keys`` still held off. Raises QuotaStoreUnavailable."""
        try:
            return await self.store.held_off(keys)
        except QuotaStoreUnavailable as err:
            self._outage.failed(PROVIDER_BACKOFF, err)
            raise

    # --- internals --------------------------------------------------------------------

    async def _rate(
        self, limit: str, subject: str, rule: RateLimit, *, cost: int = 1
    ) -> QuotaDecision:
        answer, degraded = await self._ask(limit, subject, rule, cost=cost)
        decision = self._decision(limit, subject, answer, degraded)
        self._count(decision)
        return decision

    async def _rate_checks(
        self, checks: Sequence[RateCheck], names: Sequence[str]
    ) -> tuple[list[RateDecision], bool]:
        """The store's answers to ``checks``, or the local fallback's (degraded) if the
        store is down; ``names`` are the limit classes to warn about then."""
        try:
            answers = await self.store.rate_limits(checks)
        except QuotaStoreUnavailable as err:
            for name in dict.fromkeys(names):
                self._outage.failed(name, err, fail_open=True)
            return await self._fallback.rate_limits(checks), True
        self._outage.recovered()
        return answers, False

    async def _ask(
        self, limit: str, subject: str, rule: RateLimit, *, cost: int
    ) -> tuple[RateDecision, bool]:
        """The store's answer, or the local fallback's (degraded) if the store is down."""
        key = f"{limit}:{subject}"
        try:
            answer = await self.store.rate_limit(key, rate=rule.rate, burst=rule.burst, cost=cost)
        except QuotaStoreUnavailable as err:
            self._outage.failed(limit, err, fail_open=True)
            answer = await self._fallback.rate_limit(
                key, rate=rule.rate, burst=rule.burst, cost=cost
            )
            return answer, True
        self._outage.recovered()
        return answer, False

    @staticmethod
    def _decision(limit: str, subject: str, answer: RateDecision, degraded: bool) -> QuotaDecision:
        retry = None if answer.allowed else answer.retry_after
        return QuotaDecision(answer.allowed, limit, subject, retry, degraded)

    def _count(self, decision: QuotaDecision) -> None:
        if decision.degraded:
            outcome = "degraded"  # decided without the shared store, whatever the answer
        elif decision.allowed:
            outcome = "allowed"
        else:
            outcome = "rejected"
        self._record(decision.limit, outcome)

    def _closed(self, limit: str, err: QuotaStoreUnavailable) -> None:
        """A fail-closed decision: refused for want of the store."""
        self._outage.failed(limit, err)
        self._record(limit, "degraded")

    def _record(self, limit: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.quota_decision(limit, outcome)

    def _reservation(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.budget_reservations.labels(outcome=outcome).inc()


class _OutageLog:
    """Warns about decisions made without the store at most once per interval per limit
    class, so an outage yields a few lines saying how many calls it touched, not one
    line per call."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._last_warning: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self._warned = False
        """A warning went out since the last "reachable again" (which then follows once)."""

    def failed(self, limit: str, err: QuotaStoreUnavailable, *, fail_open: bool = False) -> None:
        now = self._clock()
        last = self._last_warning.get(limit)
        if last is not None and now - last < self._interval:
            self._unlogged[limit] = self._unlogged.get(limit, 0) + 1
            return
        more = self._unlogged.pop(limit, 0)
        self._last_warning[limit] = now
        self._warned = True
        mode = "failing open to a local cap" if fail_open else "failing closed"
        since = f" ({more} more since the last warning)" if more else ""
        _log.warning("quota store unavailable, %s for %s%s: %s", mode, limit, since, err)

    def recovered(self) -> None:
        if self._warned:
            self._warned = False
            _log.info("quota store reachable again")
