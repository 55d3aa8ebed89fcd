"""The embedded quota store: the QuotaStore contract in one process's memory.

Why it is safe under asyncio without a lock: no method awaits between reading and
writing its state, so each decision runs to completion before any other task runs.
It is not meant to be shared between threads, nor between replicas (use Redis).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from muster.server.quotas.base import (
    DEFAULT_BUDGET_SLACK,
    MICROS,
    BudgetHold,
    BudgetUsage,
    BudgetVerdict,
    LeaseDecision,
    QuotaStore,
    RateCheck,
    RateDecision,
    emission_interval_us,
    gcra,
    to_micros,
    validate_amount,
    validate_hold_off,
    validate_lease,
    validate_rate,
    validate_reservation,
    validate_stale,
)

__all__ = ["InMemoryQuotaStore"]

_SWEEP_EVERY = 1024
"""Decisions between sweeps of expired state, which bounds memory to live keys."""


@dataclass(slots=True)
class _Budget:
    spent: int = 0
    reserved: int = 0
    expires_at: float | None = None
    """Wall-clock seconds from which the budget is forgotten (None: never)."""


@dataclass(frozen=True, slots=True)
class _Reservation:
    amount: int
    keys: tuple[str, ...]
    at_us: int


class InMemoryQuotaStore(QuotaStore):
    """Quotas for a single server process. ``clock`` returns monotonic seconds (rates,
    leases, reservation ages, hold-offs); ``wall_clock`` returns Unix seconds, against
    which budget keys expire ``budget_slack`` seconds after their ``expires_at``."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        budget_slack: float = DEFAULT_BUDGET_SLACK,
    ) -> None:
        self._clock = clock
        self._wall = wall_clock
        self._budget_slack = budget_slack
        self._tats: dict[str, int] = {}
        self._leases: dict[str, dict[str, int]] = {}
        self._budgets: dict[str, _Budget] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._hold_offs: dict[str, int] = {}
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
        wall = self._wall()
        for key in list(self._budgets):
            self._budget(key, wall)
        self._hold_offs = {k: end for k, end in self._hold_offs.items() if end > now}

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

    def _budget(self, key: str, wall: float) -> _Budget | None:
        """The budget of ``key``, or None if never used or expired (then forgotten)."""
        budget = self._budgets.get(key)
        if budget is not None and budget.expires_at is not None and wall >= budget.expires_at:
            del self._budgets[key]
            return None
        return budget

    async def reserve_budgets(
        self, reservation_id: str, amount: int, holds: Sequence[BudgetHold]
    ) -> BudgetVerdict:
        validate_reservation(reservation_id, amount, holds)
        now, wall = self._now(), self._wall()
        if reservation_id in self._reservations:
            return BudgetVerdict(True, None, 0)
        for hold in holds:
            budget = self._budget(hold.key, wall)
            used = 0 if budget is None else budget.spent + budget.reserved
            if used + amount > hold.limit:
                return BudgetVerdict(False, hold, used)
        for hold in holds:
            budget = self._budget(hold.key, wall) or self._budgets.setdefault(hold.key, _Budget())
            budget.reserved += amount
            if hold.expires_at is not None:
                # As Redis PEXPIREAT: the period's end plus slack, never already past.
                budget.expires_at = max(hold.expires_at, wall) + self._budget_slack
        self._reservations[reservation_id] = _Reservation(amount, tuple(h.key for h in holds), now)
        return BudgetVerdict(True, None, 0)

    def _close(self, reservation_id: str, actual: int | None) -> bool:
        self._now()
        reservation = self._reservations.pop(reservation_id, None)
        if reservation is None:
            return False
        wall = self._wall()
        for key in reservation.keys:
            budget = self._budget(key, wall)
            if budget is None:
                continue  # its period ended long ago: nothing left to count against
            budget.reserved -= reservation.amount
            if actual is not None:
                budget.spent += actual
        return True

    async def settle_reservation(self, reservation_id: str, actual: int) -> bool:
        validate_amount("actual spend", actual)
        return self._close(reservation_id, actual)

    async def release_reservation(self, reservation_id: str) -> bool:
        return self._close(reservation_id, None)

    async def budget_usage(self, key: str) -> BudgetUsage:
        self._now()
        budget = self._budget(key, self._wall())
        return BudgetUsage(0, 0) if budget is None else BudgetUsage(budget.spent, budget.reserved)

    async def stale_reservations(self, older_than: float, limit: int = 1000) -> list[str]:
        validate_stale(older_than, limit)
        before = self._now() - to_micros(older_than)
        stale = sorted((r.at_us, rid) for rid, r in self._reservations.items() if r.at_us < before)
        return [rid for _, rid in stale[:limit]]

    # --- provider back-off ------------------------------------------------------------

    async def hold_off(self, key: str, seconds: float) -> None:
        validate_hold_off(seconds)
        end = self._now() + to_micros(seconds)
        if end > self._hold_offs.get(key, 0):
            self._hold_offs[key] = end

    async def held_off(self, keys: Sequence[str]) -> dict[str, float]:
        now = self._now()
        left = {key: self._hold_offs.get(key, now) - now for key in keys}
        return {key: us / MICROS for key, us in left.items() if us > 0}
