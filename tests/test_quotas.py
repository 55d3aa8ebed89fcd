"""The QuotaStore contract (every implementation must pass it), the Quotas façade and
the RESOURCE_EXHAUSTED status it builds.

The contract tests take the ``store`` fixture, parametrized over implementations with
an injected clock: the in-process store, and the Redis store on a fresh key prefix per
test (its scripts then take the test's time instead of Redis ``TIME``). Redis is
``MUSTER_TEST_REDIS_URL`` (default: the local one); setting it to an empty string is
the explicit way to leave the Redis cases out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from muster.server.metrics import MusterMetrics
from muster.server.quotas import (
    AI_REQUESTS,
    AI_TOKENS,
    AUTH_FAILURES,
    ENROLLMENTS,
    INFLIGHT_TASKS,
    SUBMISSIONS,
    BudgetHold,
    BudgetUsage,
    BudgetVerdict,
    InMemoryQuotaStore,
    LeaseDecision,
    QuotaDecision,
    QuotaPolicy,
    Quotas,
    QuotaStore,
    QuotaStoreUnavailable,
    RateCheck,
    RateDecision,
    RateLimit,
    RedisQuotaStore,
    quota_exceeded_status,
)
from muster.server.quotas.base import MAX_AMOUNT
from muster.server.quotas.policy import VERIFIED_TTL

REDIS_URL = os.environ.get("MUSTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


PATIENT: dict[str, float] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 5.0,
    "timeout": 5.0,  # the pool's wait for a free connection
    "deadline": 10.0,
}
"""Redis store options for tests about answers, not latency: production's 0.5 s connect
and socket timeouts fail a decision open to the local cap, which a connect on a busy CI
machine can exceed. Tests of timeouts and outages keep the defaults."""


def redis_url() -> str:
    """The test Redis; skips (explicitly, by configuration) when it is switched off."""
    if not REDIS_URL:
        pytest.skip("MUSTER_TEST_REDIS_URL is empty: Redis tests switched off")
    return REDIS_URL


def unique_prefix() -> str:
    return f"muster-test:{uuid.uuid4().hex}"


async def delete_prefix(prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many there were."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[QuotaStore]:
    prefix = None
    if request.param == "memory":
        implementation: QuotaStore = InMemoryQuotaStore(clock=clock)
    elif request.param == "redis":
        prefix = unique_prefix()
        implementation = RedisQuotaStore.from_url(
            redis_url(), prefix=prefix, clock=clock, **PATIENT
        )
    else:  # pragma: no cover - a typo in params
        raise AssertionError(f"unknown store {request.param}")
    try:
        yield implementation
    finally:
        await implementation.close()
        if prefix is not None:
            await delete_prefix(prefix)


@pytest.fixture
def key() -> Iterator[str]:
    """A fresh key per test, so a shared backend never mixes two tests' state."""
    yield f"test:{uuid.uuid4().hex}"


# --- GCRA rate limits ----------------------------------------------------------------


async def test_gcra_allows_exactly_burst_then_spaces_at_the_rate(
    store: QuotaStore, clock: FakeClock, key: str
) -> None:
    decisions = [await store.rate_limit(key, rate=10, burst=5) for _ in range(5)]
    assert decisions == [RateDecision(True, 0.0, n) for n in (4, 3, 2, 1, 0)]
    assert await store.rate_limit(key, rate=10, burst=5) == RateDecision(False, 0.1, 0)

    clock.advance(0.05)
    assert await store.rate_limit(key, rate=10, burst=5) == RateDecision(False, 0.05, 0)
    clock.advance(0.05)
    assert await store.rate_limit(key, rate=10, burst=5) == RateDecision(True, 0.0, 0)
    assert await store.rate_limit(key, rate=10, burst=5) == RateDecision(False, 0.1, 0)

    # One request per interval passes for as long as the client keeps to the rate.
    for _ in range(20):
        clock.advance(0.1)
        assert (await store.rate_limit(key, rate=10, burst=5)).allowed
        assert not (await store.rate_limit(key, rate=10, burst=5)).allowed

    # A long quiet period refills the burst, and no more than the burst.
    clock.advance(3600)
    allowed = [(await store.rate_limit(key, rate=10, burst=5)).allowed for _ in range(7)]
    assert allowed == [True] * 5 + [False] * 2


async def test_gcra_cost_and_refusals_spend_nothing(
    store: QuotaStore, clock: FakeClock, key: str
) -> None:
    assert await store.rate_limit(key, rate=10, burst=5, cost=3) == RateDecision(True, 0.0, 2)
    # 3 more would need one interval more than is left; the refusal spends nothing...
    assert await store.rate_limit(key, rate=10, burst=5, cost=3) == RateDecision(False, 0.1, 2)
    # ...so the 2 that are left still pass.
    assert await store.rate_limit(key, rate=10, burst=5, cost=2) == RateDecision(True, 0.0, 0)


async def test_gcra_cost_zero_only_looks(store: QuotaStore, clock: FakeClock, key: str) -> None:
    for _ in range(3):
        assert await store.rate_limit(key, rate=1, burst=2, cost=0) == RateDecision(True, 0.0, 2)
    await store.rate_limit(key, rate=1, burst=2, cost=2)
    assert await store.rate_limit(key, rate=1, burst=2, cost=0) == RateDecision(False, 1.0, 0)
    clock.advance(1)
    assert await store.rate_limit(key, rate=1, burst=2, cost=0) == RateDecision(True, 0.0, 1)


async def test_several_limits_decide_in_turn_up_to_the_first_refusal(
    store: QuotaStore, clock: FakeClock, key: str
) -> None:
    look, take = RateCheck(f"{key}:a", 1, 2, cost=0), RateCheck(f"{key}:b", 1, 1)
    assert await store.rate_limits([look, take]) == [
        RateDecision(True, 0.0, 2),
        RateDecision(True, 0.0, 0),
    ]
    assert await store.rate_limits([look, take]) == [
        RateDecision(True, 0.0, 2),
        RateDecision(False, 1.0, 0),
    ]
    # A refusal ends the answers, and the limits after it are not spent.
    await store.rate_limit(look.key, rate=1, burst=2, cost=2)
    assert await store.rate_limits([look, take]) == [RateDecision(False, 1.0, 0)]
    clock.advance(1)
    assert await store.rate_limits([take, look]) == [
        RateDecision(True, 0.0, 0),
        RateDecision(True, 0.0, 1),
    ]
    with pytest.raises(ValueError):
        await store.rate_limits([take, RateCheck(key, 1, 1, cost=2)])


async def test_gcra_fractional_rate(store: QuotaStore, clock: FakeClock, key: str) -> None:
    assert (await store.rate_limit(key, rate=3, burst=1)).allowed
    refused = await store.rate_limit(key, rate=3, burst=1)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(1 / 3, abs=1e-6)
    clock.advance(refused.retry_after)
    assert (await store.rate_limit(key, rate=3, burst=1)).allowed


async def test_gcra_keys_are_independent(store: QuotaStore, key: str) -> None:
    assert (await store.rate_limit(key + ":a", rate=1, burst=1)).allowed
    assert not (await store.rate_limit(key + ":a", rate=1, burst=1)).allowed
    assert (await store.rate_limit(key + ":b", rate=1, burst=1)).allowed


@pytest.mark.parametrize(
    "arguments",
    [
        {"rate": 0, "burst": 1},
        {"rate": -1, "burst": 1},
        {"rate": float("inf"), "burst": 1},
        {"rate": 1, "burst": 0},
        {"rate": 1, "burst": 2, "cost": 3},
        {"rate": 1, "burst": 2, "cost": -1},
    ],
)
async def test_gcra_rejects_impossible_arguments(
    store: QuotaStore, key: str, arguments: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        await store.rate_limit(key, **arguments)


async def test_gcra_holds_under_concurrency(store: QuotaStore, key: str) -> None:
    decisions = await asyncio.gather(*(store.rate_limit(key, rate=1, burst=25) for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 25


# --- concurrency leases --------------------------------------------------------------


async def test_leases_cap_at_limit_and_are_idempotent_per_holder(
    store: QuotaStore, key: str
) -> None:
    assert await store.acquire_lease(key, "a", limit=2, ttl=10) == LeaseDecision(True, 1, 2)
    assert await store.acquire_lease(key, "b", limit=2, ttl=10) == LeaseDecision(True, 2, 2)
    assert await store.acquire_lease(key, "c", limit=2, ttl=10) == LeaseDecision(False, 2, 2)
    # A retry by a holder never takes a second slot.
    assert await store.acquire_lease(key, "a", limit=2, ttl=10) == LeaseDecision(True, 2, 2)
    assert await store.lease_count(key) == 2


async def test_leases_expire_after_ttl_unless_renewed(
    store: QuotaStore, clock: FakeClock, key: str
) -> None:
    await store.acquire_lease(key, "a", limit=2, ttl=10)
    await store.acquire_lease(key, "b", limit=2, ttl=10)
    clock.advance(6)
    assert await store.renew_lease(key, "a", 10)
    clock.advance(3.999)
    assert await store.lease_count(key) == 2
    clock.advance(0.001)  # b's ttl is over; a was renewed at t=6
    assert await store.lease_count(key) == 1
    assert not await store.renew_lease(key, "b", 10)
    assert (await store.acquire_lease(key, "c", limit=2, ttl=10)).acquired
    clock.advance(6)
    assert await store.lease_count(key) == 1  # only c
    assert not await store.renew_lease(key, "a", 10)


async def test_release_frees_a_slot(store: QuotaStore, key: str) -> None:
    await store.acquire_lease(key, "a", limit=1, ttl=10)
    assert not (await store.acquire_lease(key, "b", limit=1, ttl=10)).acquired
    await store.release_lease(key, "a")
    await store.release_lease(key, "a")  # twice is harmless
    await store.release_lease(key, "nobody")
    assert await store.lease_count(key) == 0
    assert (await store.acquire_lease(key, "b", limit=1, ttl=10)).acquired


async def test_release_many_frees_every_slot_named(store: QuotaStore, key: str) -> None:
    other = key + "-other"
    for holder in ("a", "b", "c"):
        await store.acquire_lease(key, holder, limit=3, ttl=10)
    await store.acquire_lease(other, "a", limit=1, ttl=10)
    await store.release_leases([(key, "a"), (key, "c"), (other, "a"), (key, "nobody")])
    assert await store.lease_count(key) == 1  # b
    assert await store.lease_count(other) == 0
    await store.release_leases([])


async def test_leases_hold_under_concurrency(store: QuotaStore, key: str) -> None:
    decisions = await asyncio.gather(
        *(store.acquire_lease(key, f"h{i}", limit=10, ttl=30) for i in range(200))
    )
    assert sum(d.acquired for d in decisions) == 10
    assert await store.lease_count(key) == 10


@pytest.mark.parametrize("arguments", [{"limit": -1, "ttl": 1}, {"limit": 1, "ttl": 0}])
async def test_lease_rejects_impossible_arguments(
    store: QuotaStore, key: str, arguments: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        await store.acquire_lease(key, "a", **arguments)


# --- spend budgets -------------------------------------------------------------------


def hold(key: str, limit: int, expires_at: float | None = None) -> BudgetHold:
    return BudgetHold(key, limit, expires_at)


async def usages(store: QuotaStore, *holds: BudgetHold) -> list[BudgetUsage]:
    return [await store.budget_usage(h.key) for h in holds]


async def test_a_reservation_takes_every_budget_or_none(
    store: QuotaStore, clock: FakeClock, key: str
) -> None:
    a, b, c = hold(f"{key}:a", 100), hold(f"{key}:b", 50), hold(f"{key}:c", 1000)
    assert await store.reserve_budgets("r1", 40, [a, b, c]) == BudgetVerdict(True, None, 0)
    assert await usages(store, a, b, c) == [BudgetUsage(0, 40)] * 3
    # b cannot take 20 more (60 > 50): nothing is reserved anywhere, a included.
    assert await store.reserve_budgets("r2", 20, [a, b, c]) == BudgetVerdict(False, b, 40)
    assert await usages(store, a, b, c) == [BudgetUsage(0, 40)] * 3
    clock.advance(1)
    assert await store.stale_reservations(0) == ["r1"]  # the refusal recorded nothing
    # Exactly up to the limit passes.
    assert (await store.reserve_budgets("r3", 10, [a, b])).allowed
    assert await usages(store, a, b, c) == [
        BudgetUsage(0, 50),
        BudgetUsage(0, 50),
        BudgetUsage(0, 40),
    ]


async def test_a_refusal_names_the_first_budget_that_cannot_take_it(
    store: QuotaStore, key: str
) -> None:
    a, b = hold(f"{key}:a", 10), hold(f"{key}:b", 10)
    assert (await store.reserve_budgets("r1", 8, [a, b])).allowed
    verdict = await store.reserve_budgets("r2", 5, [b, a])
    assert verdict == BudgetVerdict(False, b, 8)
    assert verdict.left == 2
    assert (await store.reserve_budgets("r2", 5, [a, b])).refused == a


async def test_reserving_an_open_id_again_counts_once(store: QuotaStore, key: str) -> None:
    a = hold(f"{key}:a", 100)
    assert (await store.reserve_budgets("r1", 30, [a])).allowed
    # A retry (even one that would no longer fit, or names other budgets) changes nothing.
    assert (await store.reserve_budgets("r1", 30, [a])).allowed
    assert (await store.reserve_budgets("r1", 90, [a, hold(f"{key}:b", 1)])).allowed
    assert await store.budget_usage(a.key) == BudgetUsage(0, 30)
    assert await store.budget_usage(f"{key}:b") == BudgetUsage(0, 0)


async def test_settle_replaces_the_hold_by_the_spend_on_every_budget(
    store: QuotaStore, key: str
) -> None:
    a, b = hold(f"{key}:a", 150), hold(f"{key}:b", 1000)
    assert (await store.reserve_budgets("r1", 100, [a, b])).allowed
    assert (await store.reserve_budgets("r2", 20, [b])).allowed
    assert await store.settle_reservation("r1", 40)
    assert await usages(store, a, b) == [BudgetUsage(40, 0), BudgetUsage(40, 20)]
    assert not await store.settle_reservation("r1", 40)  # settled once
    assert not await store.release_reservation("r1")
    assert await usages(store, a, b) == [BudgetUsage(40, 0), BudgetUsage(40, 20)]
    # The id is free again: a new reservation under it counts afresh.
    assert (await store.reserve_budgets("r1", 110, [a])).allowed
    assert await store.budget_usage(a.key) == BudgetUsage(40, 110)
    assert await store.reserve_budgets("r3", 1, [a]) == BudgetVerdict(False, a, 150)


async def test_spend_beyond_the_hold_counts_in_full(store: QuotaStore, key: str) -> None:
    a = hold(f"{key}:a", 100)
    assert (await store.reserve_budgets("r1", 60, [a])).allowed
    assert await store.settle_reservation("r1", 130)  # money spent is money spent
    assert await store.budget_usage(a.key) == BudgetUsage(130, 0)
    assert await store.reserve_budgets("r2", 0, [a]) == BudgetVerdict(False, a, 130)


async def test_release_frees_every_budget(store: QuotaStore, key: str) -> None:
    a, b = hold(f"{key}:a", 100), hold(f"{key}:b", 100)
    await store.reserve_budgets("r1", 100, [a, b])
    assert not (await store.reserve_budgets("r2", 1, [b])).allowed
    assert await store.release_reservation("r1")
    assert not await store.release_reservation("r1")
    assert not await store.settle_reservation("r1", 100)
    assert await usages(store, a, b) == [BudgetUsage(0, 0)] * 2
    assert (await store.reserve_budgets("r2", 100, [b, a])).allowed


async def test_unknown_reservations_and_budgets(store: QuotaStore, key: str) -> None:
    assert await store.budget_usage(f"{key}:nothing") == BudgetUsage(0, 0)
    assert not await store.release_reservation(f"{key}:r")
    assert not await store.settle_reservation(f"{key}:r", 1)


async def test_zero_amounts_zero_limits_and_no_budgets(store: QuotaStore, key: str) -> None:
    zero, full = hold(f"{key}:zero", 0), hold(f"{key}:full", 5)
    assert (await store.reserve_budgets("r0", 0, [zero])).allowed
    assert await store.reserve_budgets("r1", 1, [zero]) == BudgetVerdict(False, zero, 0)
    assert (await store.reserve_budgets("r2", 5, [full])).allowed
    assert (await store.reserve_budgets("r3", 0, [full])).allowed  # used + 0 <= limit
    # No budgets at all: allowed, and still a reservation to settle.
    assert (await store.reserve_budgets("r4", 7, [])).allowed
    assert await store.settle_reservation("r4", 7)
    assert not await store.settle_reservation("r4", 7)


async def test_stale_reservations_are_the_old_open_ones(
    store: QuotaStore, clock: FakeClock, key: str
) -> None:
    a = hold(f"{key}:a", 1000)
    await store.reserve_budgets("r1", 1, [a])
    clock.advance(10)
    await store.reserve_budgets("r2", 1, [a])
    await store.reserve_budgets("r0", 1, [a])
    clock.advance(5)
    assert await store.stale_reservations(12) == ["r1"]
    assert await store.stale_reservations(5) == ["r1"]  # r0 and r2 are exactly 5 s old
    assert await store.stale_reservations(4.5) == ["r1", "r0", "r2"]  # by time, then id
    assert await store.stale_reservations(4.5, limit=2) == ["r1", "r0"]
    assert await store.stale_reservations(20) == []
    assert await store.settle_reservation("r1", 1)
    assert await store.release_reservation("r0")
    assert await store.stale_reservations(0) == ["r2"]


async def test_period_keys_expire_some_slack_after_the_period(store: QuotaStore, key: str) -> None:
    # The same kind of store, with a budget slack short enough to wait for.
    short: QuotaStore
    if isinstance(store, RedisQuotaStore):
        short = RedisQuotaStore.from_url(
            redis_url(), prefix=store.prefix, budget_slack=0.3, **PATIENT
        )
    else:
        short = InMemoryQuotaStore(budget_slack=0.3)
    now = time.time()
    ending = hold(f"{key}:ending", 100, now + 0.2)  # goes 0.3 s after its end
    ended = hold(f"{key}:ended", 100, now - 100)  # goes 0.3 s after this reservation
    later = hold(f"{key}:later", 100, now + 60)
    forever = hold(f"{key}:forever", 100)
    budgets = (ending, ended, later, forever)
    try:
        assert (await short.reserve_budgets("r1", 30, budgets)).allowed
        assert await usages(short, *budgets) == [BudgetUsage(0, 30)] * 4
        await asyncio.sleep(0.2)
        assert await usages(short, *budgets) == [BudgetUsage(0, 30)] * 4
        await asyncio.sleep(0.45)
        assert await usages(short, *budgets) == [BudgetUsage(0, 0)] * 2 + [BudgetUsage(0, 30)] * 2
        # Settling counts on the budgets that are left and does not revive the others.
        assert await short.settle_reservation("r1", 20)
        assert await usages(short, *budgets) == [BudgetUsage(0, 0)] * 2 + [BudgetUsage(20, 0)] * 2
    finally:
        await short.close()


async def test_budgets_hold_under_concurrency(store: QuotaStore, key: str) -> None:
    await check_concurrent_budgets([store], key, seed=1)


async def check_concurrent_budgets(stores: Sequence[QuotaStore], key: str, *, seed: int) -> None:
    """200 concurrent reservations of random amounts on random overlapping sets of three
    budgets (spread over ``stores``, as over replicas): what is accepted never exceeds a
    limit, every refusal really did not fit, and settling and releasing everything
    leaves exactly the settled spend."""
    rng = random.Random(seed)
    budgets = [hold(f"{key}:x", 5_000), hold(f"{key}:y", 3_000), hold(f"{key}:z", 8_000)]
    plans = []
    for i in range(200):
        chosen = [b for b in budgets if rng.random() < 0.7] or [rng.choice(budgets)]
        rng.shuffle(chosen)
        plans.append((f"{key}:r{i}", rng.randint(1, 400), chosen))
    verdicts = await asyncio.gather(
        *(
            stores[i % len(stores)].reserve_budgets(rid, n, hs)
            for i, (rid, n, hs) in enumerate(plans)
        )
    )
    accepted = [plan for plan, v in zip(plans, verdicts, strict=True) if v.allowed]
    assert 0 < len(accepted) < len(plans)
    for budget in budgets:
        held = sum(n for _, n, hs in accepted if budget in hs)
        assert held <= budget.limit
        assert await stores[0].budget_usage(budget.key) == BudgetUsage(0, held)
    for (_, amount, chosen), verdict in zip(plans, verdicts, strict=True):
        if not verdict.allowed:
            assert verdict.refused in chosen
            assert verdict.used + amount > verdict.refused.limit

    # Settle half (some above their hold) and release the rest, all at once.
    actual = {rid: rng.randint(0, n + 50) if rng.random() < 0.5 else None for rid, n, _ in accepted}
    closed = await asyncio.gather(
        *(
            stores[i % len(stores)].release_reservation(rid)
            if cost is None
            else stores[i % len(stores)].settle_reservation(rid, cost)
            for i, (rid, cost) in enumerate(actual.items())
        )
    )
    assert all(closed)
    for budget in budgets:
        spent = sum(actual[rid] or 0 for rid, _, hs in accepted if budget in hs)
        assert await stores[-1].budget_usage(budget.key) == BudgetUsage(spent, 0)
    assert await stores[0].stale_reservations(0) == []


@pytest.mark.parametrize(
    ("reservation_id", "amount", "holds"),
    [
        ("r", -1, []),
        ("r", 1.5, []),
        ("r", MAX_AMOUNT + 1, []),
        ("", 1, []),
        ("r", 1, [BudgetHold("k", -1, None)]),
        ("r", 1, [BudgetHold("k", MAX_AMOUNT + 1, None)]),
        ("r", 1, [BudgetHold("k", 1, float("nan"))]),
        ("r", 1, [BudgetHold("k", 1, None), BudgetHold("k", 2, None)]),
    ],
)
async def test_reserve_rejects_impossible_arguments(
    store: QuotaStore, reservation_id: str, amount: int, holds: list[BudgetHold]
) -> None:
    with pytest.raises(ValueError):
        await store.reserve_budgets(reservation_id, amount, holds)


async def test_other_budget_calls_reject_impossible_arguments(store: QuotaStore) -> None:
    with pytest.raises(ValueError):
        await store.settle_reservation("r", -1)
    with pytest.raises(ValueError):
        await store.stale_reservations(-1)
    with pytest.raises(ValueError):
        await store.stale_reservations(1, limit=0)
    with pytest.raises(ValueError):
        await store.hold_off("k", -1)
    with pytest.raises(ValueError):
        await store.hold_off("k", float("nan"))


# --- provider back-off ---------------------------------------------------------------


async def test_hold_off_keeps_the_later_end(store: QuotaStore, clock: FakeClock, key: str) -> None:
    a, b = f"{key}:a", f"{key}:b"
    assert await store.held_off([a, b]) == {}
    assert await store.held_off([]) == {}
    await store.hold_off(a, 10)
    assert await store.held_off([a, b]) == {a: 10.0}
    clock.advance(4)
    await store.hold_off(a, 2)  # an earlier end: the later one stays
    assert await store.held_off([a, b]) == {a: 6.0}
    await store.hold_off(a, 20)
    await store.hold_off(b, 0.5)
    assert await store.held_off([a, b]) == {a: 20.0, b: 0.5}
    clock.advance(0.5)
    assert await store.held_off([b, a]) == {a: 19.5}
    await store.hold_off(b, 0)  # nothing to hold off
    clock.advance(19.5)
    assert await store.held_off([a, b]) == {}


# --- the RESOURCE_EXHAUSTED status ---------------------------------------------------


def details_of(status: grpc.Status) -> status_pb2.Status:
    """The google.rpc.Status carried in the trailing metadata, as a client receives it."""
    metadata = dict(status.trailing_metadata)
    return status_pb2.Status.FromString(metadata["grpc-status-details-bin"])


def unpack(status: status_pb2.Status) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for detail in status.details:
        for kind in (error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


def test_status_carries_retry_info_and_quota_failure() -> None:
    status = quota_exceeded_status(RateDecision(False, 0.1, 0), SUBMISSIONS, "principal:alice")
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "principal:alice" in status.details
    found = unpack(details_of(status))
    assert found["RetryInfo"].retry_delay.ToMicroseconds() == 100_000
    violation = found["QuotaFailure"].violations[0]
    assert (violation.subject, violation.description) == ("principal:alice", SUBMISSIONS)


def test_retry_delay_rounds_up_to_the_microsecond() -> None:
    status = quota_exceeded_status(RateDecision(False, 1 / 3, 0), SUBMISSIONS, "x")
    assert unpack(details_of(status))["RetryInfo"].retry_delay.ToMicroseconds() == 333_334


def test_exhausted_budget_is_terminal() -> None:
    verdict = BudgetVerdict(False, BudgetHold("budget:tenant:t:all", 100, None), 100)
    status = quota_exceeded_status(verdict, "budget", "tenant:t")
    found = unpack(details_of(status))
    assert "RetryInfo" not in found
    assert found["QuotaFailure"].violations[0].subject == "tenant:t"


def test_full_lease_gets_a_retry_hint() -> None:
    status = quota_exceeded_status(LeaseDecision(False, 5, 5), INFLIGHT_TASKS, "tenant:t")
    assert unpack(details_of(status))["RetryInfo"].retry_delay.ToSeconds() == 1


async def test_status_reaches_a_grpc_client() -> None:
    decision = QuotaDecision(False, SUBMISSIONS, "principal:bob", 2.5)

    async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await context.abort_with_status(decision.status())

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.v1.Quota", {"Refuse": grpc.unary_unary_rpc_method_handler(refuse)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            refuse_call: Any = channel.unary_unary("/test.v1.Quota/Refuse")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await refuse_call(b"")
    finally:
        await server.stop(None)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    received = rpc_status.from_call(err.value)
    assert received is not None
    found = unpack(received)
    assert found["RetryInfo"].retry_delay.ToMilliseconds() == 2500
    assert found["QuotaFailure"].violations[0].subject == "principal:bob"


# --- the Quotas façade ---------------------------------------------------------------


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def decisions(registry: CollectorRegistry, limit: str, outcome: str) -> float:
    value = registry.get_sample_value(
        "muster_quota_decisions_total", {"limit": limit, "outcome": outcome}
    )
    return value or 0.0


POLICY = QuotaPolicy(
    submissions=RateLimit(rate=2, burst=3),
    enrollments=RateLimit(rate=1, burst=1),
    auth_failure_threshold=3,
    auth_failure_window=30,
    inflight_per_tenant=2,
)


@pytest.fixture
def quotas(store: QuotaStore, registry: CollectorRegistry) -> Quotas:
    return Quotas(store, POLICY, metrics=MusterMetrics(registry))


async def test_submissions_are_limited_per_principal(
    quotas: Quotas, registry: CollectorRegistry, clock: FakeClock
) -> None:
    principal = uuid.uuid4().hex
    outcomes = [(await quotas.check_submission(principal)).allowed for _ in range(4)]
    assert outcomes == [True, True, True, False]
    refused = await quotas.check_submission(principal)
    assert refused == QuotaDecision(False, SUBMISSIONS, f"principal:{principal}", 0.5)
    assert refused.exceeded
    assert (await quotas.check_submission(principal + "-other")).allowed
    assert decisions(registry, SUBMISSIONS, "allowed") == 4
    assert decisions(registry, SUBMISSIONS, "rejected") == 2
    clock.advance(0.5)
    assert (await quotas.check_submission(principal)).allowed


async def test_enrollments_are_limited_per_peer(quotas: Quotas) -> None:
    peer = f"10.9.{uuid.uuid4().int % 250}.1"
    assert (await quotas.check_enrollment(peer)).allowed
    refused = await quotas.check_enrollment(peer)
    assert not refused.allowed
    assert refused.retry_after == 1.0
    assert refused.status().code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_auth_failures_lock_a_peer_out(
    quotas: Quotas, clock: FakeClock, registry: CollectorRegistry
) -> None:
    peer = f"peer-{uuid.uuid4().hex}"
    assert (await quotas.record_auth_failure(peer)).decision.allowed
    assert (await quotas.record_auth_failure(peer)).decision.allowed
    assert not await quotas.is_locked_out(peer)
    third = await quotas.record_auth_failure(peer)  # counted, and it locks the peer out
    assert (third.decision.allowed, third.locked_now, third.retry_after) == (True, True, 10.0)
    assert await quotas.is_locked_out(peer)
    lockout = await quotas.check_lockout(peer)
    assert (lockout.allowed, lockout.limit, lockout.retry_after) == (False, AUTH_FAILURES, 10.0)
    fourth = await quotas.record_auth_failure(peer)  # refused: nothing more is counted
    assert (fourth.decision.allowed, fourth.locked_now) == (False, False)
    assert fourth.decision.status().code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not await quotas.is_locked_out(f"{peer}-elsewhere")

    clock.advance(10)  # 3 failures per 30 s: one attempt back every 10 s
    assert not await quotas.is_locked_out(peer)
    assert (await quotas.record_auth_failure(peer)).locked_now
    assert await quotas.is_locked_out(peer)
    # Every failure recorded and every lockout check is a decision.
    assert decisions(registry, AUTH_FAILURES, "allowed") == 7
    assert decisions(registry, AUTH_FAILURES, "rejected") == 4


async def test_a_known_token_has_its_own_lockout_at_each_address(quotas: Quotas) -> None:
    peer, token = f"peer-{uuid.uuid4().hex}", "mat_0123456789abcdef"
    for _ in range(3):
        await quotas.record_auth_failure(peer, token)
    assert await quotas.is_locked_out(peer, token)
    # Neither the address's own allowance, another token there, nor the token elsewhere.
    assert not await quotas.is_locked_out(peer)
    assert not await quotas.is_locked_out(peer, "mat_fedcba9876543210")
    assert not await quotas.is_locked_out(f"{peer}-elsewhere", token)
    for _ in range(3):
        await quotas.record_auth_failure(peer)
    assert await quotas.is_locked_out(peer)
    assert not await quotas.is_locked_out(peer, "mbt_0123456789abcdef")


async def test_an_enrollment_attempt_is_refused_while_its_token_is_locked_out(
    quotas: Quotas, clock: FakeClock, registry: CollectorRegistry
) -> None:
    peer, token = f"peer-{uuid.uuid4().hex}", "mbt_0123456789abcdef"
    first = await quotas.check_enrollment_attempt(peer, token)
    assert (first.allowed, first.limit, first.subject) == (True, ENROLLMENTS, f"peer:{peer}")
    refused = await quotas.check_enrollment_attempt(peer, token)
    assert (refused.allowed, refused.limit, refused.retry_after) == (False, ENROLLMENTS, 1.0)
    assert refused.status().code == grpc.StatusCode.RESOURCE_EXHAUSTED

    for _ in range(3):  # failed authentications with this token lock it out here
        await quotas.record_auth_failure(peer, token)
    clock.advance(1)
    locked = await quotas.check_enrollment_attempt(peer, token)
    assert (locked.allowed, locked.limit, locked.retry_after) == (False, AUTH_FAILURES, 9.0)
    assert locked.subject == f"peer:{peer}/token:{token}"
    assert unpack(details_of(locked.status()))["RetryInfo"].retry_delay.ToSeconds() == 9
    # The address's failures (malformed or unknown tokens) do not lock this token out.
    other = f"peer-{uuid.uuid4().hex}"
    for _ in range(3):
        await quotas.record_auth_failure(other)
    assert (await quotas.check_enrollment_attempt(other, token)).allowed
    clock.advance(9)  # the lockout took no enrollment: one is left after it
    assert (await quotas.check_enrollment_attempt(peer, token)).allowed
    # The same decisions as asking check_lockout and then check_enrollment.
    assert decisions(registry, ENROLLMENTS, "allowed") == 3
    assert decisions(registry, ENROLLMENTS, "rejected") == 1
    assert decisions(registry, AUTH_FAILURES, "rejected") == 1  # the locked-out attempt


async def test_an_enrollment_attempt_fails_open_to_a_local_cap(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    quotas = Quotas(
        DownStore(),
        POLICY,
        metrics=MusterMetrics(registry),
        fallback=InMemoryQuotaStore(clock=clock),
    )
    token = "mbt_0123456789abcdef"
    answers = [await quotas.check_enrollment_attempt("10.0.0.1", token) for _ in range(2)]
    assert [(a.allowed, a.limit, a.degraded) for a in answers] == [
        (True, ENROLLMENTS, True),
        (False, ENROLLMENTS, True),
    ]
    assert decisions(registry, ENROLLMENTS, "degraded") == 2
    assert decisions(registry, AUTH_FAILURES, "degraded") == 2


async def test_inflight_slots_per_tenant(quotas: Quotas, clock: FakeClock) -> None:
    tenant = uuid.uuid4().hex
    assert (await quotas.acquire_inflight(tenant, "t1")).allowed
    assert (await quotas.acquire_inflight(tenant, "t2")).allowed
    refused = await quotas.acquire_inflight(tenant, "t3")
    assert (refused.allowed, refused.retry_after) == (False, 1.0)
    await quotas.release_inflight(tenant, "t1")
    assert (await quotas.acquire_inflight(tenant, "t3")).allowed
    assert await quotas.renew_inflight(tenant, "t2")
    clock.advance(POLICY.inflight_lease_ttl)
    assert not await quotas.renew_inflight(tenant, "t2")


class DownStore(InMemoryQuotaStore):
    """A store whose backend is unreachable."""

    async def rate_limit(self, key: str, *, rate: float, burst: int, cost: int = 1) -> RateDecision:
        raise QuotaStoreUnavailable("connection refused")

    async def rate_limits(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        raise QuotaStoreUnavailable("connection refused")

    async def acquire_lease(
        self, key: str, holder: str, *, limit: int, ttl: float
    ) -> LeaseDecision:
        raise QuotaStoreUnavailable("connection refused")

    async def renew_lease(self, key: str, holder: str, ttl: float) -> bool:
        raise QuotaStoreUnavailable("connection refused")

    async def release_lease(self, key: str, holder: str) -> None:
        raise QuotaStoreUnavailable("connection refused")

    async def reserve_budgets(
        self, reservation_id: str, amount: int, holds: Sequence[BudgetHold]
    ) -> BudgetVerdict:
        raise QuotaStoreUnavailable("connection refused")

    async def settle_reservation(self, reservation_id: str, actual: int) -> bool:
        raise QuotaStoreUnavailable("connection refused")

    async def release_reservation(self, reservation_id: str) -> bool:
        raise QuotaStoreUnavailable("connection refused")

    async def budget_usage(self, key: str) -> BudgetUsage:
        raise QuotaStoreUnavailable("connection refused")

    async def stale_reservations(self, older_than: float, limit: int = 1000) -> list[str]:
        raise QuotaStoreUnavailable("connection refused")

    async def hold_off(self, key: str, seconds: float) -> None:
        raise QuotaStoreUnavailable("connection refused")

    async def held_off(self, keys: Sequence[str]) -> dict[str, float]:
        raise QuotaStoreUnavailable("connection refused")


async def test_rate_limits_fail_open_to_a_local_cap(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    quotas = Quotas(
        DownStore(),
        POLICY,
        metrics=MusterMetrics(registry),
        fallback=InMemoryQuotaStore(clock=clock),
    )
    answers = [await quotas.check_submission("alice") for _ in range(4)]
    assert [(a.allowed, a.degraded) for a in answers] == [(True, True)] * 3 + [(False, True)]
    # Every decision made without the shared store is "degraded", the local refusal too.
    assert decisions(registry, SUBMISSIONS, "degraded") == 4
    assert decisions(registry, SUBMISSIONS, "rejected") == 0
    assert answers[3].status().code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_concurrency_budgets_and_back_offs_fail_closed(
    registry: CollectorRegistry,
) -> None:
    quotas = Quotas(DownStore(), POLICY, metrics=MusterMetrics(registry))
    with pytest.raises(QuotaStoreUnavailable):
        await quotas.acquire_inflight("tenant", "t1")
    with pytest.raises(QuotaStoreUnavailable):
        await quotas.renew_inflight("tenant", "t1")
    await quotas.release_inflight("tenant", "t1")  # the slot's ttl frees it; no error
    budget = BudgetHold("budget:tenant:t:all", 100, None)
    failing: list[Any] = [
        lambda: quotas.reserve_budget("r1", 10, [budget]),
        lambda: quotas.reserve_budget("r2", 10, [budget]),
        lambda: quotas.settle_budget("r1", 10),
        lambda: quotas.release_budget("r1"),
        lambda: quotas.budget_usage(budget.key),
        lambda: quotas.stale_reservations(60),
        lambda: quotas.hold_off("backoff:pool:model", 5),
        lambda: quotas.held_off(["backoff:pool:model"]),
    ]
    for call in failing:
        with pytest.raises(QuotaStoreUnavailable):
            await call()
    assert decisions(registry, INFLIGHT_TASKS, "degraded") == 1
    assert decisions(registry, INFLIGHT_TASKS, "rejected") == 0
    assert decisions(registry, INFLIGHT_TASKS, "allowed") == 0
    # Only reservations are decisions: two of them, both degraded.
    assert reservations(registry) == {"degraded": 2}


async def test_degraded_decisions_are_logged_once_per_interval(
    registry: CollectorRegistry, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    quotas = Quotas(
        DownStore(),
        POLICY,
        metrics=MusterMetrics(registry),
        fallback=InMemoryQuotaStore(clock=clock),
        degraded_log_interval=30,
        clock=clock,
    )
    caplog.set_level(logging.INFO, logger="muster.server.quotas.policy")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    for _ in range(10):
        await quotas.check_submission("alice")
        await quotas.check_enrollment("10.0.0.1")
        with pytest.raises(QuotaStoreUnavailable):
            await quotas.acquire_inflight("tenant", "t1")
    assert len(warnings()) == 3  # one per limit class, not one per call
    assert any("failing open" in w and SUBMISSIONS in w for w in warnings())
    assert any("failing closed" in w and INFLIGHT_TASKS in w for w in warnings())
    assert decisions(registry, SUBMISSIONS, "degraded") == 10

    clock.advance(29.9)
    await quotas.check_submission("alice")
    assert len(warnings()) == 3
    clock.advance(0.1)
    await quotas.check_submission("alice")
    assert len(warnings()) == 4
    assert "(10 more since the last warning)" in warnings()[-1]


async def test_recovery_is_logged_once(
    registry: CollectorRegistry, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    class FlakyStore(InMemoryQuotaStore):
        down = True

        async def rate_limit(
            self, key: str, *, rate: float, burst: int, cost: int = 1
        ) -> RateDecision:
            if self.down:
                raise QuotaStoreUnavailable("connection refused")
            return await super().rate_limit(key, rate=rate, burst=burst, cost=cost)

    store = FlakyStore(clock=clock)
    quotas = Quotas(store, POLICY, metrics=MusterMetrics(registry), clock=clock)
    caplog.set_level(logging.INFO, logger="muster.server.quotas.policy")
    await quotas.check_submission("alice")
    store.down = False
    for _ in range(3):
        assert not (await quotas.check_submission("bob")).degraded
    store.down = True
    await quotas.check_submission("alice")  # within the interval: no new warning...
    store.down = False
    await quotas.check_submission("bob")  # ...so no second "reachable again" either
    messages = [r.getMessage() for r in caplog.records]
    assert sum("reachable again" in m for m in messages) == 1
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def reservations(registry: CollectorRegistry) -> dict[str, float]:
    found = {}
    for outcome in ("reserved", "refused", "degraded"):
        value = registry.get_sample_value("muster_budget_reservations_total", {"outcome": outcome})
        if value:
            found[outcome] = value
    return found


async def test_budget_reservations_through_the_facade(
    quotas: Quotas, registry: CollectorRegistry, clock: FakeClock
) -> None:
    prefix = uuid.uuid4().hex
    tenant = BudgetHold(f"budget:tenant:{prefix}:2026-12", 1000, None)
    task = BudgetHold(f"budget:task:{prefix}:all", 700, None)
    assert await quotas.reserve_budget("t1:1", 600, [tenant, task]) == BudgetVerdict(True, None, 0)
    assert (await quotas.reserve_budget("t1:1", 600, [tenant, task])).allowed  # a retry
    refused = await quotas.reserve_budget("t2:1", 600, [tenant])
    assert refused == BudgetVerdict(False, tenant, 600)
    assert "RetryInfo" not in unpack(details_of(quota_exceeded_status(refused, "budget", "x")))
    clock.advance(61)
    assert await quotas.stale_reservations(60) == ["t1:1"]
    assert await quotas.settle_budget("t1:1", 250)
    assert not await quotas.settle_budget("t1:1", 250)  # settled once
    assert await quotas.budget_usage(task.key) == BudgetUsage(250, 0)
    assert (await quotas.reserve_budget("t2:1", 600, [tenant])).allowed
    assert await quotas.release_budget("t2:1")
    assert not await quotas.release_budget("t2:1")
    assert await quotas.budget_usage(tenant.key) == BudgetUsage(250, 0)
    assert reservations(registry) == {"reserved": 3, "refused": 1}
    await quotas.hold_off(f"backoff:{prefix}", 30)
    assert await quotas.held_off([f"backoff:{prefix}"]) == {f"backoff:{prefix}": 30.0}


AI_POLICY = QuotaPolicy(ai_requests_per_minute=3, ai_tokens_per_minute=1000)


async def test_ai_submissions_are_limited_in_requests_and_tokens(
    store: QuotaStore, registry: CollectorRegistry, clock: FakeClock
) -> None:
    quotas = Quotas(store, AI_POLICY, metrics=MusterMetrics(registry))
    tenant = uuid.uuid4().hex
    subject = f"tenant:{tenant}"
    first = await quotas.check_ai_submission(tenant, 400)
    assert first == QuotaDecision(True, AI_REQUESTS, subject, None)
    assert (await quotas.check_ai_submission(tenant, 400)).allowed
    # 200 tokens are left of this minute's 1000; 400 more come back in 12 s (1000/min).
    tokens = await quotas.check_ai_submission(tenant, 400)
    assert (tokens.allowed, tokens.limit, tokens.subject) == (False, AI_TOKENS, subject)
    assert tokens.retry_after == pytest.approx(12.0)
    # The refusal spent no request: this is the third.
    assert (await quotas.check_ai_submission(tenant, 200)).allowed
    # Three requests per minute: the fourth waits 20 s, whatever its tokens.
    requests = await quotas.check_ai_submission(tenant, 0)
    assert (requests.allowed, requests.limit) == (False, AI_REQUESTS)
    assert requests.retry_after == pytest.approx(20.0)
    status = requests.status()
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert unpack(details_of(status))["QuotaFailure"].violations[0].description == AI_REQUESTS
    clock.advance(20)
    assert (await quotas.check_ai_submission(tenant, 300)).allowed
    # Other tenants have their own limits.
    assert (await quotas.check_ai_submission(uuid.uuid4().hex, 1000)).allowed
    assert decisions(registry, AI_REQUESTS, "allowed") == 5
    assert decisions(registry, AI_REQUESTS, "rejected") == 1
    assert decisions(registry, AI_TOKENS, "allowed") == 5
    assert decisions(registry, AI_TOKENS, "rejected") == 1


async def test_an_ai_task_larger_than_a_minute_of_tokens_never_passes(
    store: QuotaStore, registry: CollectorRegistry
) -> None:
    quotas = Quotas(store, AI_POLICY, metrics=MusterMetrics(registry))
    tenant = uuid.uuid4().hex
    refused = await quotas.check_ai_submission(tenant, 1001)
    assert refused == QuotaDecision(False, AI_TOKENS, f"tenant:{tenant}", None)
    assert "RetryInfo" not in unpack(details_of(refused.status()))
    # It spent nothing: the whole allowance is still there.
    assert (await quotas.check_ai_submission(tenant, 1000)).allowed
    assert decisions(registry, AI_TOKENS, "rejected") == 1
    with pytest.raises(ValueError):
        await quotas.check_ai_submission(tenant, -1)


async def test_ai_limits_of_zero_are_off(store: QuotaStore) -> None:
    tenant = uuid.uuid4().hex
    quotas = Quotas(store, QuotaPolicy(ai_requests_per_minute=0, ai_tokens_per_minute=0))
    for _ in range(5):
        assert (await quotas.check_ai_submission(tenant, 10**9)).allowed
    tokens_only = Quotas(store, QuotaPolicy(ai_requests_per_minute=0, ai_tokens_per_minute=10))
    assert (await tokens_only.check_ai_submission(tenant, 10)).allowed
    assert (await tokens_only.check_ai_submission(tenant, 1)).limit == AI_TOKENS


async def test_ai_submissions_fail_open_to_a_local_cap(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    quotas = Quotas(
        DownStore(),
        AI_POLICY,
        metrics=MusterMetrics(registry),
        fallback=InMemoryQuotaStore(clock=clock),
    )
    answers = [await quotas.check_ai_submission("acme", 100) for _ in range(4)]
    assert [(a.allowed, a.degraded) for a in answers] == [(True, True)] * 3 + [(False, True)]
    assert answers[3].limit == AI_REQUESTS
    assert decisions(registry, AI_REQUESTS, "degraded") == 4
    assert decisions(registry, AI_TOKENS, "degraded") == 3


async def test_from_config_picks_the_store(registry: CollectorRegistry) -> None:
    local = Quotas.from_config("", "muster", POLICY, MusterMetrics(registry))
    assert isinstance(local.store, InMemoryQuotaStore)
    await local.ping()  # in-process: always there
    await local.close()

    prefix = unique_prefix()
    shared = Quotas.from_config(redis_url(), prefix, POLICY, MusterMetrics(CollectorRegistry()))
    try:
        assert isinstance(shared.store, RedisQuotaStore)
        assert shared.store.prefix == prefix + ":quota:"
        await shared.ping()
        assert (await shared.check_submission("alice")).allowed
        assert await delete_prefix(prefix) == 1
    finally:
        await shared.close()


@pytest.mark.parametrize(
    "build",
    [
        lambda: RateLimit(rate=0, burst=1),
        lambda: RateLimit(rate=1, burst=0),
        lambda: QuotaPolicy(auth_failure_threshold=0),
        lambda: QuotaPolicy(auth_failure_window=-1),
        lambda: QuotaPolicy(inflight_per_tenant=-1),
        lambda: QuotaPolicy(inflight_lease_ttl=0),
        lambda: QuotaPolicy(ai_requests_per_minute=-1),
        lambda: QuotaPolicy(ai_tokens_per_minute=-1),
        lambda: QuotaPolicy(ai_tokens_per_minute=1.5),  # type: ignore[arg-type]
    ],
)
def test_policy_is_validated_when_built(build: Any) -> None:
    with pytest.raises(ValueError):
        build()


async def test_a_verified_lockout_check_is_reused_until_a_failure_or_the_interval_ends(
    store: QuotaStore, registry: CollectorRegistry, clock: FakeClock
) -> None:
    """An authentication whose secret was right asks the store once per key and
    interval; a failure of that key here asks again at once, one recorded by another
    replica is seen when the interval ends; a refusal is never reused."""
    asked: list[str] = []
    original = store.rate_limit

    async def counted(key: str, **kwargs: Any) -> Any:
        asked.append(key)
        return await original(key, **kwargs)

    store.rate_limit = counted  # type: ignore[method-assign]
    quotas = Quotas(store, POLICY, metrics=MusterMetrics(registry), clock=clock)
    other_replica = Quotas(store, POLICY, clock=clock)
    peer, token = f"peer-{uuid.uuid4().hex}", "mat_0123456789abcdef"

    for _ in range(3):
        assert (await quotas.check_lockout(peer, token, verified=True)).allowed
    assert len(asked) == 1
    assert (await quotas.check_lockout(peer, token)).allowed  # unverified: always asked
    assert len(asked) == 2
    assert decisions(registry, AUTH_FAILURES, "allowed") == 4

    await quotas.record_auth_failure(peer, token)  # a failure here forgets the key
    assert (await quotas.check_lockout(peer, token, verified=True)).allowed
    assert len(asked) == 4

    for _ in range(2):  # another replica counts the failures that lock the key out
        await other_replica.record_auth_failure(peer, token)
    assert (await quotas.check_lockout(peer, token, verified=True)).allowed  # reused
    clock.advance(VERIFIED_TTL)
    for _ in range(2):  # then refused, and the refusal is asked for each time
        refused = await quotas.check_lockout(peer, token, verified=True)
        assert (refused.allowed, refused.limit) == (False, AUTH_FAILURES)
    assert decisions(registry, AUTH_FAILURES, "rejected") == 2
