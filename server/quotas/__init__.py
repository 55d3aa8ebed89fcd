"""Quotas and spend budgets: the store interface, its in-process implementation, and
the policy façade the services call (``Quotas``)."""

from server.quotas.base import (
    BudgetDecision,
    BudgetUsage,
    LeaseDecision,
    QuotaStore,
    QuotaStoreUnavailable,
    RateDecision,
)
from server.quotas.memory import InMemoryQuotaStore
from server.quotas.policy import (
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

__all__ = [
    "AUTH_FAILURES",
    "ENROLLMENTS",
    "INFLIGHT_TASKS",
    "SUBMISSIONS",
    "BudgetDecision",
    "BudgetUsage",
    "InMemoryQuotaStore",
    "LeaseDecision",
    "QuotaDecision",
    "QuotaPolicy",
    "QuotaStore",
    "QuotaStoreUnavailable",
    "Quotas",
    "RateDecision",
    "RateLimit",
    "quota_exceeded_status",
]
