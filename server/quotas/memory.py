"""The embedded quota store: the QuotaStore contract in one process's memory.

Why it is safe under asyncio without a lock: no method awaits between reading and
writing its state, so each decision runs to completion before any other task runs.
It is not meant to be shared between threads, nor between replicas (use Redis).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from server.quotas.base import (
    MICROS,
    BudgetDecision,
    BudgetUsage,
    LeaseDecision,
    QuotaStore,
    RateCheck,
    RateDecision,
    emission_interval_us,
    gcra,
    to_micros,
    validate_budget,
    validate_lease,
    validate_rate,
)

__all__ = ["InMemoryQuotaStore"]

_SWEEP_EVERY = 1024
"""Decisions between sweeps of expired state, which bounds memory to live keys."""


@dataclass(slots=True)
class _Budget:
    spent: int = 0
    reservations: dict[str, int] = field(default_factory=dict)
    window_end_us: int | None = None

    @property
    def reserved(self) -> int:
        return sum(self.reservations.values())


class InMemoryQuotaStore(QuotaStore):
    """Quotas for a single server process. ``clock`` returns monotonic seconds."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[str, int] = {}
        self._leases: dict[str, dict[str, int]] = {}
        self._budgets: dict[str, _Budget] = {}
        self._decisions = 0

    def _now(self) -> int:
        now = to_micros(self._clock())
        self._decisions += 1
        if self._decisions % _SWEEP_EVERY == 0:
            self._sweep(now)
        return now

    def _sweep(self, now: int) -> None:
        self._tats = {k: tat for k, tat in self._tats.items() if tat > now}
        for key in list(self._leases):
            if not self._live_leases(key, now):
                del self._leases[key]
        for key in list(self._budgets):
            self._current_budget(key, now)

    # --- rate limits ------------------------------------------------------------------

    async def rate_limit(self, key: str, *, rate: float, burst: int, cost: int = 1) -> RateDecision:
        validate_rate(rate, burst, cost)
        return self._rate(RateCheck(key, rate, burst, cost), self._now())

    async def rate_limits(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        for check in checks:
            validate_rate(check.rate, check.burst, check.cost)
        now = self._now()
        answers = []
        for check in checks:
            answers.append(answer := self._rate(check, now))
            if not answer.allowed:
                break
        return answers

    def _rate(self, check: RateCheck, now: int) -> RateDecision:
        result = gcra(
            self._tats.get(check.key),
            now,
            interval_us=emission_interval_us(check.rate),
            burst=check.burst,
            cost=check.cost,
        )
        if result.allowed and check.cost > 0:
            self._tats[check.key] = result.tat_us
        return RateDecision(result.allowed, result.retry_after_us / MICROS, result.remaining)

    # --- leases -----------------------------------------------------------------------

    def _live_leases(self, key: str, now: int) -> dict[str, int]:
        leases = self._leases.get(key, {})
        expired = [holder for holder, expires in leases.items() if expires <= now]
        for holder in expired:
            del leases[holder]
        return leases

    async def acquire_lease(
        self, key: str, holder: str, *, limit: int, ttl: float
    ) -> LeaseDecision:
        validate_lease(limit, ttl)
        now = self._now()
        leases = self._live_leases(key, now)
        if holder not in leases and len(leases) >= limit:
            return LeaseDecision(False, len(leases), limit)
        leases[holder] = now + to_micros(ttl)
        self._leases[key] = leases
        return LeaseDecision(True, len(leases), limit)

    async def renew_lease(self, key: str, holder: str, ttl: float) -> bool:
        validate_lease(0, ttl)
        leases = self._live_leases(key, now := self._now())
        if holder not in leases:
            return False
        leases[holder] = now + to_micros(ttl)
        return True

    async def release_lease(self, key: str, holder: str) -> None:
        self._live_leases(key, self._now()).pop(holder, None)

    async def lease_count(self, key: str) -> int:
        return len(self._live_leases(key, self._now()))

    # --- budgets ----------------------------------------------------------------------

    def _current_budget(self, key: str, now: int) -> _Budget | None:
        budget = self._budgets.get(key)
        if budget is not None and budget.window_end_us is not None and now >= budget.window_end_us:
            del self._budgets[key]
            return None
        return budget

    async def reserve(
        self,
        budget_key: str,
        reservation_id: str,
        amount: int,
        *,
        limit: int,
        window: float | None = None,
    ) -> BudgetDecision:
        validate_budget(amount, limit, window)
        now = self._now()
        budget = self._current_budget(budget_key, now)
        if budget is None:
            budget = _Budget(window_end_us=None if window is None else now + to_micros(window))
        used = budget.spent + budget.reserved
        if reservation_id in budget.reservations:
            return BudgetDecision(True, used, limit)
        if used + amount > limit:
            return BudgetDecision(False, used, limit)
        budget.reservations[reservation_id] = amount
        self._budgets[budget_key] = budget
        return BudgetDecision(True, used + amount, limit)

    async def settle(self, budget_key: str, reservation_id: str, actual: int) -> bool:
        validate_budget(actual, 0, None)
        budget = self._current_budget(budget_key, self._now())
        if budget is None or reservation_id not in budget.reservations:
            return False
        del budget.reservations[reservation_id]
        budget.spent += actual
        return True

    async def release(self, budget_key: str, reservation_id: str) -> bool:
        budget = self._current_budget(budget_key, self._now())
        if budget is None:
            return False
        return budget.reservations.pop(reservation_id, None) is not None

    async def budget_usage(self, budget_key: str) -> BudgetUsage:
        budget = self._current_budget(budget_key, self._now())
        if budget is None:
            return BudgetUsage(0, 0)
        return BudgetUsage(budget.spent, budget.reserved)
