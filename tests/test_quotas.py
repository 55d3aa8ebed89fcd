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

from server.metrics import MusterMetrics
from server.quotas import (
    AUTH_FAILURES,
    ENROLLMENTS,
    INFLIGHT_TASKS,
    SPEND,
    SUBMISSIONS,
    BudgetDecision,
    BudgetUsage,
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

REDIS_URL = os.environ.get("MUSTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


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
        implementation = RedisQuotaStore.from_url(redis_url(), prefix=prefix, clock=clock)
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


async def test_budget_never_exceeds_limit_under_concurrency(store: QuotaStore, key: str) -> None:
    decisions = await asyncio.gather(
        *(store.reserve(key, f"r{i}", 7, limit=1000) for i in range(200))
    )
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 1000 // 7
    assert max(d.used for d in decisions) <= 1000
    assert await store.budget_usage(key) == BudgetUsage(spent=0, reserved=7 * (1000 // 7))


async def test_settle_replaces_the_reservation_by_actual_spend(store: QuotaStore, key: str) -> None:
    assert await store.reserve(key, "r1", 100, limit=150) == BudgetDecision(True, 100, 150)
    assert await store.reserve(key, "r2", 60, limit=150) == BudgetDecision(False, 100, 150)
    assert await store.settle(key, "r1", 40)
    assert await store.budget_usage(key) == BudgetUsage(spent=40, reserved=0)
    assert await store.reserve(key, "r2", 110, limit=150) == BudgetDecision(True, 150, 150)
    refused = await store.reserve(key, "r3", 1, limit=150)
    assert refused == BudgetDecision(False, 150, 150)
    assert refused.remaining == 0
    # Settling twice (a retried result) counts once.
    assert not await store.settle(key, "r1", 40)
    assert await store.budget_usage(key) == BudgetUsage(spent=40, reserved=110)


async def test_release_frees_the_reservation(store: QuotaStore, key: str) -> None:
    await store.reserve(key, "r1", 100, limit=100)
    assert not (await store.reserve(key, "r2", 1, limit=100)).allowed
    assert await store.release(key, "r1")
    assert not await store.release(key, "r1")
    assert not await store.settle(key, "r1", 100)
    assert await store.budget_usage(key) == BudgetUsage(0, 0)
    assert (await store.reserve(key, "r2", 100, limit=100)).allowed


async def test_reserving_the_same_id_twice_counts_once(store: QuotaStore, key: str) -> None:
    assert await store.reserve(key, "r1", 30, limit=100) == BudgetDecision(True, 30, 100)
    assert await store.reserve(key, "r1", 30, limit=100) == BudgetDecision(True, 30, 100)
    assert await store.budget_usage(key) == BudgetUsage(0, 30)


async def test_budget_window_resets(store: QuotaStore, clock: FakeClock, key: str) -> None:
    assert (await store.reserve(key, "r1", 100, limit=100, window=60)).allowed
    clock.advance(59.9)
    assert not (await store.reserve(key, "r2", 1, limit=100, window=60)).allowed
    clock.advance(0.1)
    assert await store.budget_usage(key) == BudgetUsage(0, 0)
    # The old window's reservation is gone with it.
    assert not await store.settle(key, "r1", 100)
    assert (await store.reserve(key, "r2", 100, limit=100, window=60)).allowed


async def test_unknown_budget_is_empty(store: QuotaStore, key: str) -> None:
    assert await store.budget_usage(key) == BudgetUsage(0, 0)
    assert not await store.release(key, "r")
    assert not await store.settle(key, "r", 1)


@pytest.mark.parametrize(
    "arguments",
    [
        {"amount": -1, "limit": 1},
        {"amount": 1, "limit": -1},
        {"amount": 1, "limit": 1, "window": 0},
    ],
)
async def test_budget_rejects_impossible_arguments(
    store: QuotaStore, key: str, arguments: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        await store.reserve(key, "r", **arguments)


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
    status = quota_exceeded_status(BudgetDecision(False, 100, 100), "llm_spend", "tenant:t")
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
    assert (await quotas.record_auth_failure(peer)).allowed
    assert (await quotas.record_auth_failure(peer)).allowed
    assert not await quotas.is_locked_out(peer)
    third = await quotas.record_auth_failure(peer)
    assert (third.allowed, third.limit, third.retry_after) == (False, AUTH_FAILURES, 10.0)
    assert await quotas.is_locked_out(peer)
    lockout = await quotas.check_lockout(peer)
    assert (lockout.allowed, lockout.retry_after) == (False, 10.0)
    assert not await quotas.is_locked_out(f"{peer}-elsewhere")

    clock.advance(10)  # 3 failures per 30 s: one attempt back every 10 s
    assert not await quotas.is_locked_out(peer)
    assert not (await quotas.record_auth_failure(peer)).allowed
    assert await quotas.is_locked_out(peer)
    # Every failure recorded and every lockout check is a decision.
    assert decisions(registry, AUTH_FAILURES, "allowed") == 5
    assert decisions(registry, AUTH_FAILURES, "rejected") == 5


async def test_an_enrollment_attempt_is_refused_while_locked_out_and_spends_nothing(
    quotas: Quotas, clock: FakeClock, registry: CollectorRegistry
) -> None:
    peer = f"peer-{uuid.uuid4().hex}"
    first = await quotas.check_enrollment_attempt(peer)
    assert (first.allowed, first.limit, first.subject) == (True, ENROLLMENTS, f"peer:{peer}")
    refused = await quotas.check_enrollment_attempt(peer)
    assert (refused.allowed, refused.limit, refused.retry_after) == (False, ENROLLMENTS, 1.0)
    assert refused.status().code == grpc.StatusCode.RESOURCE_EXHAUSTED

    for _ in range(3):  # failed authentications still count, and lock the peer out
        await quotas.record_auth_failure(peer)
    clock.advance(1)
    locked = await quotas.check_enrollment_attempt(peer)
    assert (locked.allowed, locked.limit, locked.retry_after) == (False, AUTH_FAILURES, 9.0)
    assert unpack(details_of(locked.status()))["RetryInfo"].retry_delay.ToSeconds() == 9
    clock.advance(9)  # the lockout took no enrollment: one is left after it
    assert (await quotas.check_enrollment_attempt(peer)).allowed
    # The same decisions as asking check_lockout and then check_enrollment.
    assert decisions(registry, ENROLLMENTS, "allowed") == 2
    assert decisions(registry, ENROLLMENTS, "rejected") == 1
    assert decisions(registry, AUTH_FAILURES, "rejected") == 2  # the third failure, the lockout


async def test_an_enrollment_attempt_fails_open_to_a_local_cap(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    quotas = Quotas(
        DownStore(),
        POLICY,
        metrics=MusterMetrics(registry),
        fallback=InMemoryQuotaStore(clock=clock),
    )
    answers = [await quotas.check_enrollment_attempt("10.0.0.1") for _ in range(2)]
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

    async def reserve(
        self,
        budget_key: str,
        reservation_id: str,
        amount: int,
        *,
        limit: int,
        window: float | None = None,
    ) -> BudgetDecision:
        raise QuotaStoreUnavailable("connection refused")

    async def settle(self, budget_key: str, reservation_id: str, actual: int) -> bool:
        raise QuotaStoreUnavailable("connection refused")

    async def release(self, budget_key: str, reservation_id: str) -> bool:
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


async def test_concurrency_and_spend_fail_closed(registry: CollectorRegistry) -> None:
    quotas = Quotas(DownStore(), POLICY, metrics=MusterMetrics(registry))
    with pytest.raises(QuotaStoreUnavailable):
        await quotas.acquire_inflight("tenant", "t1")
    with pytest.raises(QuotaStoreUnavailable):
        await quotas.renew_inflight("tenant", "t1")
    await quotas.release_inflight("tenant", "t1")  # the slot's ttl frees it; no error
    with pytest.raises(QuotaStoreUnavailable):
        await quotas.reserve_spend("tenant", "r1", 10, limit=100)
    with pytest.raises(QuotaStoreUnavailable):
        await quotas.settle_spend("tenant", "r1", 10)
    with pytest.raises(QuotaStoreUnavailable):
        await quotas.release_spend("tenant", "r1")
    assert decisions(registry, INFLIGHT_TASKS, "degraded") == 1
    assert decisions(registry, SPEND, "degraded") == 1
    assert decisions(registry, INFLIGHT_TASKS, "rejected") == 0
    assert decisions(registry, INFLIGHT_TASKS, "allowed") == 0


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
    caplog.set_level(logging.INFO, logger="server.quotas.policy")

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
    caplog.set_level(logging.INFO, logger="server.quotas.policy")
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


async def test_spend_budget_per_tenant(quotas: Quotas, registry: CollectorRegistry) -> None:
    tenant = uuid.uuid4().hex
    first = await quotas.reserve_spend(tenant, "task-1", 600, limit=1000)
    assert first == QuotaDecision(True, SPEND, f"tenant:{tenant}", None)
    assert (await quotas.reserve_spend(tenant, "task-1", 600, limit=1000)).allowed  # a retry
    refused = await quotas.reserve_spend(tenant, "task-2", 600, limit=1000)
    assert refused == QuotaDecision(False, SPEND, f"tenant:{tenant}", None)
    # An exhausted budget is terminal: no RetryInfo.
    assert "RetryInfo" not in unpack(details_of(refused.status()))
    assert await quotas.settle_spend(tenant, "task-1", 250)
    assert not await quotas.settle_spend(tenant, "task-1", 250)  # settled once
    assert (await quotas.reserve_spend(tenant, "task-2", 600, limit=1000)).allowed
    assert await quotas.release_spend(tenant, "task-2")
    assert not await quotas.release_spend(tenant, "task-2")
    assert await quotas.store.budget_usage(f"spend:{tenant}") == BudgetUsage(250, 0)
    assert decisions(registry, SPEND, "allowed") == 3
    assert decisions(registry, SPEND, "rejected") == 1


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
    ],
)
def test_policy_is_validated_when_built(build: Any) -> None:
    with pytest.raises(ValueError):
        build()
