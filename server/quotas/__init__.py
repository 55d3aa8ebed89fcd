"""Quotas and spend budgets: the store interface, its in-process and Redis
implementations, and the policy façade the services call (``Quotas``)."""

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
from muster.server.quotas.policy import (
    AI_REQUESTS,
    AI_TOKENS,
    AUTH_FAILURES,
    ENROLLMENTS,
    INFLIGHT_TASKS,
    SUBMISSIONS,
    QuotaDecision,
    QuotaPolicy,
    Quotas,
    RateLimit,
    quota_exceeded_status,
)
from muster.server.quotas.redis import RedisQuotaStore

__all__ = [
    "AI_REQUESTS",
    "AI_TOKENS",
    "AUTH_FAILURES",
    "ENROLLMENTS",
    "INFLIGHT_TASKS",
    "SUBMISSIONS",
    "BudgetHold",
    "BudgetUsage",
    "BudgetVerdict",
    "InMemoryQuotaStore",
    "LeaseDecision",
    "LeaseRequest",
    "QuotaDecision",
    "QuotaPolicy",
    "QuotaStore",
    "QuotaStoreUnavailable",
    "Quotas",
    "RateCheck",
    "RateDecision",
    "RateLimit",
    "RedisQuotaStore",
    "quota_exceeded_status",
]
