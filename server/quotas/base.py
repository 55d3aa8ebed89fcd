"""The quota store interface: rate limits, concurrency leases, spend budgets and provider
back-offs, one call per decision, so the Redis store can make each decision in one atomic script.

Time is counted in whole microseconds and amounts in integers: a Redis script (Lua
doubles hold integers exactly up to 2**53) can then reproduce every decision of the
in-process store bit for bit. :func:`gcra` is the reference arithmetic for both.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_BUDGET_SLACK",
    "MAX_AMOUNT",
    "MICROS",
    "BudgetHold",
    "BudgetUsage",
    "BudgetVerdict",
    "GcraResult",
    "LeaseDecision",
    "LeaseRequest",
    "QuotaStore",
    "QuotaStoreUnavailable",
    "RateCheck",
    "RateDecision",
    "emission_interval_us",
    "gcra",
    "to_micros",
    "validate_amount",
    "validate_hold_off",
    "validate_lease",
    "validate_lease_requests",
    "validate_rate",
    "validate_reservation",
    "validate_stale",
]

MICROS = 1_000_000
"""Microseconds per second: the store's unit of time."""
MAX_AMOUNT = 2**50
"""Largest amount or limit (micro-dollars: over a billion USD). Sums of a few such
values stay below 2**53, where Lua's doubles stop holding integers exactly."""
DEFAULT_BUDGET_SLACK = 3 * 24 * 3600.0
"""Seconds a budget key outlives its period: settlements of attempts that straddle
the period's end still find it."""


class QuotaStoreUnavailable(Exception):
    """The store's backend could not be reached; no decision was made."""


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The answer of a GCRA rate limit."""

    allowed: bool
    retry_after: float
    """Seconds until this request would be allowed; 0 when allowed."""
    remaining: int
    """Requests of cost 1 that would still be allowed right now, after this one."""


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One limit of :meth:`QuotaStore.rate_limits`: the arguments of a ``rate_limit`` call."""

    key: str
    rate: float
    burst: int
    cost: int = 1


@dataclass(frozen=True, slots=True)
class LeaseDecision:
    """The answer of a concurrency lease request."""

    acquired: bool
    count: int
    """Live leases on the key after the call (including this holder's, if acquired)."""
    limit: int


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """One lease of :meth:`QuotaStore.acquire_leases`: a slot of ``key``, of ``limit``."""

    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class BudgetHold:
    """One budget an amount is reserved against: its period's key and limit."""

    key: str
    limit: int
    """Micro-dollars: spent plus reserved never exceeds it through a reservation."""
    expires_at: float | None
    """Unix seconds when the period ends; the key may expire some slack after it.
    None: the budget never ends (its key is kept)."""


@dataclass(frozen=True, slots=True)
class BudgetVerdict:
    """The answer of :meth:`QuotaStore.reserve_budgets`: all holds taken, or none."""

    allowed: bool
    refused: BudgetHold | None
    """The first hold that could not take the amount (None when allowed)."""
    used: int
    """That hold's spent plus reserved before this call (0 when allowed)."""

    @property
    def left(self) -> int:
        """What the refusing budget could still take (0 when allowed)."""
        return 0 if self.refused is None else max(0, self.refused.limit - self.used)


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """A budget's state: settled spend and open reservations."""

    spent: int
    reserved: int

    @property
    def total(self) -> int:
        return self.spent + self.reserved


class QuotaStore(abc.ABC):
    """Shared counters behind Muster's quotas; every method is one atomic decision.

    Keys are opaque strings chosen by the caller (see :mod:`muster.server.quotas.policy`).
    Implementations: :class:`~server.quotas.memory.InMemoryQuotaStore` (embedded) and
    a Redis store; both must pass ``tests/test_quotas.py``. A backend that cannot be
    reached raises :class:`QuotaStoreUnavailable`.
    """

    # --- GCRA rate limits -------------------------------------------------------------

    @abc.abstractmethod
    async def rate_limit(self, key: str, *, rate: float, burst: int, cost: int = 1) -> RateDecision:
        """Spend ``cost`` from a limit of ``rate`` per second with bursts of ``burst``.

        A refused request spends nothing. ``cost=0`` only looks: ``allowed`` then
        says whether a request of cost 1 would pass now. ``cost > burst`` is a
        ValueError (it could never pass).
        """

    @abc.abstractmethod
    async def rate_limits(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        """:meth:`rate_limit` for each of ``checks`` in turn, as one atomic decision.

        Stops at the first refusal: the answers end with it, and the checks after it
        spend nothing. One call where a request must pass several limits (a peer's
        lockout, then its enrollment rate), with the same answers as calls in a row.
        """

    # --- Concurrency leases -----------------------------------------------------------

    @abc.abstractmethod
    async def acquire_lease(
        self, key: str, holder: str, *, limit: int, ttl: float
    ) -> LeaseDecision:
        """Hold one of ``limit`` slots of ``key`` for ``ttl`` seconds unless renewed.

        A holder that already has a live lease keeps it (and its ttl restarts): retries
        never take a second slot.
        """

    async def acquire_leases(
        self, holder: str, requests: Sequence[LeaseRequest], *, ttl: float
    ) -> list[LeaseDecision]:
        """:meth:`acquire_lease` of each of ``requests`` in turn for ``holder``, all or
        none, as one decision (a tenant's slot and its pool's, say).

        Stops at the first refusal: the answers end with it, and ``holder`` then holds
        none of the keys before it (a lease it had there already is given back too).
        Keys must differ. Stores that answer from elsewhere do it in one call."""
        validate_lease_requests(requests, ttl)
        answers: list[LeaseDecision] = []
        for request in requests:
            answer = await self.acquire_lease(request.key, holder, limit=request.limit, ttl=ttl)
            answers.append(answer)
            if not answer.acquired:
                for taken in requests[: len(answers) - 1]:
                    await self.release_lease(taken.key, holder)
                break
        return answers

    async def acquire_leases_many(
        self, items: Sequence[tuple[str, Sequence[LeaseRequest]]], *, ttl: float
    ) -> list[list[LeaseDecision]]:
        """:meth:`acquire_leases` for each (holder, requests), decided in that order;
        stores that answer from elsewhere do it in one call."""
        return [await self.acquire_leases(holder, requests, ttl=ttl) for holder, requests in items]

    @abc.abstractmethod
    async def renew_lease(self, key: str, holder: str, ttl: float) -> bool:
        """Extend a live lease to ``ttl`` seconds from now; False if it already expired."""

    async def renew_leases(self, leases: Sequence[tuple[str, str]], ttl: float) -> list[bool]:
        """:meth:`renew_lease` of each (key, holder); stores may do it in one call."""
        return [await self.renew_lease(key, holder, ttl) for key, holder in leases]

    @abc.abstractmethod
    async def release_lease(self, key: str, holder: str) -> None:
        """Give the slot back; releasing a lease not held is a no-op."""

    async def release_leases(self, leases: Sequence[tuple[str, str]]) -> None:
        """:meth:`release_lease` for each (key, holder); stores may do it in one call."""
        for key, holder in leases:
            await self.release_lease(key, holder)

    @abc.abstractmethod
    async def lease_count(self, key: str) -> int:
        """Live leases on ``key``."""

    # --- Spend budgets ----------------------------------------------------------------

    @abc.abstractmethod
    async def reserve_budgets(
        self, reservation_id: str, amount: int, holds: Sequence[BudgetHold]
    ) -> BudgetVerdict:
        """Reserve ``amount`` on every hold at once, or on none: each hold's spent plus
        reserved plus ``amount`` must stay within its limit.

        The reservation is recorded (its keys, amount and time) under ``reservation_id``,
        so settling or releasing it needs only the id. Reserving an id that is already
        open changes nothing and is allowed, whatever the arguments (retries are safe);
        once settled or released, the id may be reserved afresh. Hold keys must differ.
        A key with ``expires_at`` expires the store's slack after it (spend of an ended
        period is then forgotten); a key without one is kept.
        """

    @abc.abstractmethod
    async def settle_reservation(self, reservation_id: str, actual: int) -> bool:
        """Replace the reservation by the ``actual`` spend on every key it holds (more
        than was held counts in full: it was spent). False if the id is not open."""

    @abc.abstractmethod
    async def release_reservation(self, reservation_id: str) -> bool:
        """Drop the reservation unspent on every key it holds; False if not open."""

    @abc.abstractmethod
    async def budget_usage(self, key: str) -> BudgetUsage:
        """Spent and reserved on ``key`` (zeros for a key never used, or expired)."""

    @abc.abstractmethod
    async def stale_reservations(self, older_than: float, limit: int = 1000) -> list[str]:
        """Ids of open reservations made more than ``older_than`` seconds ago, oldest
        first, at most ``limit``: for a reaper to settle or release."""

    # --- Provider back-off ------------------------------------------------------------

    @abc.abstractmethod
    async def hold_off(self, key: str, seconds: float) -> None:
        """Mark ``key`` held off for ``seconds`` from now; an end already later stays."""

    @abc.abstractmethod
    async def held_off(self, keys: Sequence[str]) -> dict[str, float]:
        """Seconds left of each key's hold-off, for the keys still held off (> 0)."""

    async def close(self) -> None:  # noqa: B027 (optional hook, nothing to do by default)
        """Release connections; the default has none."""


# --- Reference arithmetic shared by every implementation ----------------------------


def to_micros(seconds: float) -> int:
    """Seconds as whole microseconds (rounded to nearest)."""
    return round(seconds * MICROS)


def emission_interval_us(rate: float) -> int:
    """GCRA's emission interval: microseconds per unit at ``rate`` units per second."""
    return max(1, round(MICROS / rate))


@dataclass(frozen=True, slots=True)
class GcraResult:
    allowed: bool
    tat_us: int
    """The theoretical arrival time to store (unchanged when refused)."""
    retry_after_us: int
    remaining: int


def gcra(tat_us: int | None, now_us: int, *, interval_us: int, burst: int, cost: int) -> GcraResult:
    """One GCRA decision. ``tat_us`` is the stored theoretical arrival time (None: never
    used). A request passes if, after it, the TAT is at most ``burst`` intervals ahead."""
    tat = now_us if tat_us is None else max(tat_us, now_us)
    horizon = now_us + burst * interval_us
    needed = tat + max(cost, 1) * interval_us
    if needed > horizon:
        remaining = max(0, (horizon - tat) // interval_us)
        return GcraResult(False, tat, needed - horizon, remaining)
    new_tat = tat + cost * interval_us
    return GcraResult(True, new_tat, 0, (horizon - new_tat) // interval_us)


def validate_rate(rate: float, burst: int, cost: int) -> None:
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number of units per second, not {rate!r}")
    if burst < 1:
        raise ValueError(f"burst must be at least 1, not {burst!r}")
    if cost < 0 or cost > burst:
        raise ValueError(f"cost must be between 0 and burst ({burst}), not {cost!r}")


def validate_lease(limit: int, ttl: float) -> None:
    if limit < 0:
        raise ValueError(f"lease limit must not be negative, not {limit!r}")
    if not (math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"lease ttl must be a positive number of seconds, not {ttl!r}")


def validate_lease_requests(requests: Sequence[LeaseRequest], ttl: float) -> None:
    for request in requests:
        validate_lease(request.limit, ttl)
    if len({request.key for request in requests}) != len(requests):
        raise ValueError("a holder's leases must be on different keys")


def validate_amount(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_AMOUNT:
        raise ValueError(f"{name} must be an integer from 0 to {MAX_AMOUNT}, not {value!r}")


def validate_reservation(reservation_id: str, amount: int, holds: Sequence[BudgetHold]) -> None:
    if not reservation_id:
        raise ValueError("a reservation needs an id")
    validate_amount("reserved amount", amount)
    keys = set()
    for hold in holds:
        validate_amount(f"limit of {hold.key!r}", hold.limit)
        if hold.expires_at is not None and not math.isfinite(hold.expires_at):
            raise ValueError(f"expires_at of {hold.key!r} must be finite, not {hold.expires_at!r}")
        if hold.key in keys:
            raise ValueError(f"budget key {hold.key!r} is held twice in one reservation")
        keys.add(hold.key)


def validate_hold_off(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"hold-off must be a non-negative number of seconds, not {seconds!r}")


def validate_stale(older_than: float, limit: int) -> None:
    if not (math.isfinite(older_than) and older_than >= 0):
        raise ValueError(f"older_than must be a non-negative number of seconds, not {older_than!r}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit!r}")
