"""The QuotaStore contract (every implementation must pass it), the Quotas façade and
the RESOURCE_EXHAUSTED status it builds.

The contract tests take the ``store`` fixture, parametrized over implementations with
an injected clock. To add the Redis store: add "redis" to the fixture's params and
build it there on a per-test key prefix, passing ``clock`` through so the scripts use
the test's time instead of Redis ``TIME``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from server.metrics import MusterMetrics
from server.quotas import (
    AUTH_FAILURES,
    INFLIGHT_TASKS,
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
    RateDecision,
    RateLimit,
    quota_exceeded_status,
)


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


@pytest.fixture(params=["memory"])  # the Redis store joins here as "redis"
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[QuotaStore]:
    if request.param == "memory":
        implementation: QuotaStore = InMemoryQuotaStore(clock=clock)
    else:  # pragma: no cover - no other implementation yet
        raise AssertionError(f"unknown store {request.param}")
    try:
        yield implementation
    finally:
        await implementation.close()


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
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary("/test.v1.Quota/Refuse")(b"")
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

    async def acquire_lease(
        self, key: str, holder: str, *, limit: int, ttl: float
    ) -> LeaseDecision:
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
    assert decisions(registry, SUBMISSIONS, "degraded") == 3
    assert decisions(registry, SUBMISSIONS, "rejected") == 1


async def test_concurrency_fails_closed(registry: CollectorRegistry) -> None:
    quotas = Quotas(DownStore(), POLICY, metrics=MusterMetrics(registry))
    with pytest.raises(QuotaStoreUnavailable):
        await quotas.acquire_inflight("tenant", "t1")
    assert decisions(registry, INFLIGHT_TASKS, "rejected") == 1


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
