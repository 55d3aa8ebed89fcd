"""Concurrent quota decisions sharing one round trip (``server/quotas/coalesce.py`` and
the Redis store's ``batch.lua``), and the calls that ask many at once (a tenant's and its
pool's slot together, renewals in bulk).

What must hold: many concurrent callers cost few round trips, yet each gets the answer it
would have got alone, in the order asked, right at the edge of the limit; a store that
cannot be reached fails every caller (rates then fail open, leases closed), as before.
The ``store`` fixture (from ``tests/test_quotas.py``) runs each contract case against the
in-process store and against real Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from muster.server.metrics import MusterMetrics
from muster.server.quotas import (
    INFLIGHT_TASKS,
    SUBMISSIONS,
    InMemoryQuotaStore,
    LeaseDecision,
    LeaseRequest,
    QuotaDecision,
    QuotaPolicy,
    Quotas,
    QuotaStore,
    QuotaStoreUnavailable,
    RateCheck,
    RateDecision,
    RateLimit,
    RedisQuotaStore,
)
from muster.server.quotas.base import MICROS, emission_interval_us, gcra, to_micros
from muster.server.quotas.coalesce import Coalescer, WriterCrashed
from tests.test_quotas import (
    PATIENT,
    FakeClock,
    decisions,
    delete_prefix,
    redis_url,
    unique_prefix,
)

pytestmark = pytest.mark.slow

CLOSED = "redis://127.0.0.1:1/0"
"""Nothing listens on port 1: connections are refused at once."""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[QuotaStore]:
    """The in-process store, or the Redis store on a fresh prefix, both on ``clock``."""
    if request.param == "memory":
        yield InMemoryQuotaStore(clock=clock)
        return
    prefix = unique_prefix()
    redis_store = RedisQuotaStore.from_url(redis_url(), prefix=prefix, clock=clock, **PATIENT)
    try:
        yield redis_store
    finally:
        await redis_store.close()
        await delete_prefix(prefix)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = unique_prefix()
    try:
        yield name
    finally:
        await delete_prefix(name)


def reference(n: int, *, rate: float, burst: int, now: float) -> list[RateDecision]:
    """What ``n`` calls in a row at one instant answer, from the reference arithmetic."""
    answers, tat = [], None
    interval = emission_interval_us(rate)
    for _ in range(n):
        result = gcra(tat, to_micros(now), interval_us=interval, burst=burst, cost=1)
        if result.allowed:
            tat = result.tat_us
        answers.append(
            RateDecision(result.allowed, result.retry_after_us / MICROS, result.remaining)
        )
    return answers


def by_answer(decision: RateDecision) -> tuple[bool, int, float]:
    """Sorts answers as calls in a row get them: passes (most remaining first), then
    refusals."""
    return (not decision.allowed, -decision.remaining, decision.retry_after)


async def warm(store: QuotaStore) -> None:
    """One call first, so the pool has a connection: the lone call that starts a gather
    then reaches Redis before the batch behind it (which needs a connection of its own),
    and the test can check the answers in the order asked."""
    await store.lease_count("warm-up")
    await store.rate_limit(f"warm-up:{uuid.uuid4().hex}", rate=1, burst=1)


# --- the coalescer itself ------------------------------------------------------------


async def test_concurrent_asks_share_calls_and_each_gets_its_own_answer() -> None:
    batches: list[list[int]] = []

    async def call(requests: list[int]) -> list[int]:
        batches.append(requests)
        await asyncio.sleep(0.01)  # a round trip
        return [r * 10 for r in requests]

    coalescer: Coalescer[int, int] = Coalescer(call, name="test", max_batch=100)
    answers = await asyncio.gather(*(coalescer.ask(i) for i in range(250)))
    assert answers == [i * 10 for i in range(250)]
    # The first finds nothing on its way and goes alone; the others queue behind it and
    # go in batches of at most 100, one at a time, in order.
    assert [r for batch in batches for r in batch] == list(range(250))
    assert [len(batch) for batch in batches] == [1, 100, 100, 49]
    assert coalescer.calls == 4
    assert await coalescer.ask_all([1, 2, 3]) == [10, 20, 30]
    assert batches[-1] == [1, 2, 3]


async def test_a_lone_caller_goes_at_once() -> None:
    coalescer: Coalescer[int, int] = Coalescer(
        lambda rs: asyncio.sleep(0, [r + 1 for r in rs]), name="test", max_batch=10
    )
    for i in range(5):
        assert await coalescer.ask(i) == i + 1
    assert coalescer.calls == 5


async def test_a_failed_call_fails_each_caller_with_its_own_error() -> None:
    async def call(requests: list[int]) -> list[int]:
        raise QuotaStoreUnavailable("down") from OSError("refused")

    coalescer: Coalescer[int, int] = Coalescer(call, name="test", max_batch=10)
    results = await asyncio.gather(*(coalescer.ask(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, QuotaStoreUnavailable) for r in results)
    assert len({id(r) for r in results}) == 5
    assert all(isinstance(r.__cause__, OSError) for r in results if isinstance(r, BaseException))
    with pytest.raises(QuotaStoreUnavailable):
        await coalescer.ask_all([1, 2])
    # Still serving: a failed call is an answer, not a crash of the writer.
    coalescer._call = lambda rs: asyncio.sleep(0, list(rs))
    assert await coalescer.ask(7) == 7


async def test_a_caller_that_gave_up_is_left_out_of_the_next_call() -> None:
    gate = asyncio.Event()
    batches: list[list[str]] = []

    async def call(requests: list[str]) -> list[str]:
        batches.append(requests)
        await gate.wait()
        return requests

    coalescer: Coalescer[str, str] = Coalescer(call, name="test", max_batch=10)
    first = asyncio.create_task(coalescer.ask("first"))
    await asyncio.sleep(0)
    impatient = asyncio.create_task(coalescer.ask("impatient"))
    patient = asyncio.create_task(coalescer.ask("patient"))
    await asyncio.sleep(0)
    impatient.cancel()
    gate.set()
    assert await first == "first"
    assert await patient == "patient"
    assert batches == [["first"], ["patient"]]


async def test_a_wrong_number_of_answers_fails_the_callers() -> None:
    coalescer: Coalescer[int, int] = Coalescer(
        lambda rs: asyncio.sleep(0, [0, *rs]), name="test", max_batch=10
    )
    results = await asyncio.gather(*(coalescer.ask(i) for i in range(3)), return_exceptions=True)
    assert [str(r) for r in results] == [
        "test: 2 answers to 1 request",
        "test: 3 answers to 2 requests",
        "test: 3 answers to 2 requests",
    ]
    with pytest.raises(RuntimeError, match="4 answers to 3 requests"):
        await coalescer.ask_all([1, 2, 3])


async def test_a_crashed_writer_fails_its_queued_callers_at_once_and_says_so() -> None:
    gate = asyncio.Event()

    async def call(requests: list[int]) -> list[int]:
        await gate.wait()
        return requests

    crashes: list[BaseException] = []
    coalescer: Coalescer[int, int] = Coalescer(call, name="test", max_batch=10, patience=60)
    coalescer.on_crash = crashes.append
    queued = asyncio.create_task(coalescer.ask_all([1, 2]))
    await asyncio.sleep(0)
    writer = coalescer.drain.task
    assert writer is not None and len(coalescer.drain) == 2  # queued, not yet sent
    writer.cancel()  # the crash: nothing will ever send them
    with pytest.raises(WriterCrashed, match="test: its writer crashed"):
        await asyncio.wait_for(queued, 5)  # at once, not after its 60 s of patience
    assert len(crashes) == 1 and isinstance(crashes[0], asyncio.CancelledError)
    # The next caller gets a writer of its own.
    gate.set()
    assert await coalescer.ask_all([3, 4]) == [3, 4]


# --- the stores: answers at the edge, whoever shares the call ------------------------


async def test_concurrent_checks_at_the_limit_edge(store: QuotaStore, clock: FakeClock) -> None:
    key = f"test:{uuid.uuid4().hex}"
    answers = await asyncio.gather(*(store.rate_limit(key, rate=10, burst=20) for _ in range(50)))
    # Exactly the burst passes, each with its own remaining count, and each refusal
    # carries the retry time a call of its own would have got (concurrent callers have
    # no order among themselves: the answers are those of some order of calls).
    assert sorted(answers, key=by_answer) == reference(50, rate=10, burst=20, now=clock())
    assert sum(a.allowed for a in answers) == 20
    if isinstance(store, RedisQuotaStore):
        assert store.round_trips <= 3


async def test_concurrent_chains_and_looks_keep_their_order(
    store: QuotaStore, clock: FakeClock
) -> None:
    lock, rate = f"lock:{uuid.uuid4().hex}", f"rate:{uuid.uuid4().hex}"
    await warm(store)
    chain = [RateCheck(lock, 1, 2, 0), RateCheck(rate, 1, 3, 1)]
    asks = [
        store.rate_limits(chain),
        store.rate_limit(lock, rate=1, burst=2),  # a failure counted
        store.rate_limits(chain),
        store.rate_limit(lock, rate=1, burst=2),  # the last allowed failure: locked now
        store.rate_limits(chain),  # refused by the look: the rate is not spent
        store.rate_limit(rate, rate=1, burst=3, cost=0),
    ]
    answers = await asyncio.gather(*asks)
    assert answers == [
        [RateDecision(True, 0.0, 2), RateDecision(True, 0.0, 2)],
        RateDecision(True, 0.0, 1),
        [RateDecision(True, 0.0, 1), RateDecision(True, 0.0, 1)],
        RateDecision(True, 0.0, 0),
        [RateDecision(False, 1.0, 0)],
        RateDecision(True, 0.0, 1),
    ]
    clock.advance(1.0)
    assert (await store.rate_limit(rate, rate=1, burst=3)).remaining == 1


async def test_concurrent_leases_at_the_limit_edge(store: QuotaStore) -> None:
    key = f"test:{uuid.uuid4().hex}"
    await warm(store)
    answers = await asyncio.gather(
        *(store.acquire_lease(key, f"h{i}", limit=5, ttl=30) for i in range(12))
    )
    assert answers[:5] == [LeaseDecision(True, n, 5) for n in range(1, 6)]
    assert answers[5:] == [LeaseDecision(False, 5, 5)] * 7
    assert await store.lease_count(key) == 5
    # A retry of a holder already in keeps its slot (and takes no second one).
    again = await asyncio.gather(
        *(store.acquire_lease(key, "h0", limit=5, ttl=30) for _ in range(3))
    )
    assert again == [LeaseDecision(True, 5, 5)] * 3


async def test_acquire_leases_is_all_or_none(store: QuotaStore, clock: FakeClock) -> None:
    tenant, pool = f"tenant:{uuid.uuid4().hex}", f"pool:{uuid.uuid4().hex}"
    both = [LeaseRequest(tenant, 3), LeaseRequest(pool, 2)]
    await warm(store)
    answers = await asyncio.gather(*(store.acquire_leases(f"h{i}", both, ttl=30) for i in range(4)))
    assert answers == [
        [LeaseDecision(True, 1, 3), LeaseDecision(True, 1, 2)],
        [LeaseDecision(True, 2, 3), LeaseDecision(True, 2, 2)],
        # The pool is full: the tenant slot taken for it is given back.
        [LeaseDecision(True, 3, 3), LeaseDecision(False, 2, 2)],
        [LeaseDecision(True, 3, 3), LeaseDecision(False, 2, 2)],
    ]
    assert (await store.lease_count(tenant), await store.lease_count(pool)) == (2, 2)
    # Refused by the first: the second is not looked at.
    assert await store.acquire_leases(
        "x", [LeaseRequest(pool, 2), LeaseRequest(tenant, 3)], ttl=30
    ) == [LeaseDecision(False, 2, 2)]
    # A holder already in the tenant that the pool refuses holds neither afterwards.
    assert (await store.acquire_lease(tenant, "h9", limit=3, ttl=30)).acquired
    refused = await store.acquire_leases("h9", both, ttl=30)
    assert refused[-1] == LeaseDecision(False, 2, 2)
    assert await store.lease_count(tenant) == 2
    with pytest.raises(ValueError):
        await store.acquire_leases("h", [LeaseRequest(tenant, 1), LeaseRequest(tenant, 1)], ttl=30)
    with pytest.raises(ValueError):
        await store.acquire_leases("h", [LeaseRequest(tenant, -1)], ttl=30)
    assert await store.acquire_leases("h", [], ttl=30) == []


async def test_renew_leases_in_bulk(store: QuotaStore, clock: FakeClock) -> None:
    key = f"test:{uuid.uuid4().hex}"
    for holder in ("a", "b"):
        assert (await store.acquire_lease(key, holder, limit=3, ttl=10)).acquired
    clock.advance(5)
    assert await store.renew_leases([(key, "a"), (key, "nobody"), (key, "b")], 10) == [
        True,
        False,
        True,
    ]
    clock.advance(8)  # past the first ttl, within the renewed one
    assert await store.lease_count(key) == 2
    assert await store.renew_leases([], 10) == []


# --- Redis: round trips, and the same failures as before -----------------------------


async def test_a_submit_burst_costs_a_few_round_trips(prefix: str) -> None:
    """1,000 concurrent submission checks of one principal (a SubmitMany): a handful of
    script runs, and exactly the burst passes."""
    policy = QuotaPolicy(submissions=RateLimit(rate=0.01, burst=600))
    store = RedisQuotaStore.from_url(redis_url(), prefix=prefix, **PATIENT)
    registry = CollectorRegistry()
    quotas = Quotas(store, policy, MusterMetrics(registry))
    admin = aioredis.Redis.from_url(redis_url())
    try:
        await quotas.check_submission("warm-up")  # loads the script once
        before = store.round_trips
        answers = await asyncio.gather(*(quotas.check_submission("alice") for _ in range(1000)))
        assert [a.allowed for a in answers] == [True] * 600 + [False] * 400
        assert all(a.retry_after is not None and a.retry_after > 0 for a in answers[600:])
        assert store.round_trips - before == 3  # one alone, then batches of at most 500
        assert decisions(registry, SUBMISSIONS, "allowed") == 601  # the warm-up's too
        assert decisions(registry, SUBMISSIONS, "rejected") == 400
        # The TAT was written once, with the expiry of its last value.
        assert await admin.pttl(f"{prefix}:rate:{SUBMISSIONS}:principal:alice") > 0
    finally:
        await admin.aclose()
        await store.close()


async def test_batched_decisions_are_one_evalsha_each(prefix: str) -> None:
    name = f"muster-test-{uuid.uuid4().hex}"
    store = RedisQuotaStore.from_url(redis_url(), prefix=prefix, client_name=name, **PATIENT)
    admin = aioredis.Redis.from_url(redis_url(), decode_responses=True)
    watcher = aioredis.Redis.from_url(redis_url())
    try:
        await store.rate_limit("warm", rate=1, burst=1)
        sentinel = uuid.uuid4().hex
        commands: list[tuple[str, str]] = []
        async with watcher.monitor() as monitor:
            await asyncio.gather(
                *(store.rate_limit("r", rate=1, burst=100) for _ in range(40)),
                *(store.acquire_lease("l", f"h{i}", limit=10, ttl=30) for i in range(20)),
                store.acquire_leases("h0", [LeaseRequest("t", 1), LeaseRequest("p", 1)], ttl=30),
                store.renew_leases([("l", "h1"), ("l", "h2")], 30),
                store.release_leases([("l", "h3"), ("t", "h0")]),
            )
            await admin.echo(sentinel)
            while True:
                command = await asyncio.wait_for(monitor.next_command(), 5)
                if sentinel in command["command"]:
                    break
                address = f"{command['client_address']}:{command['client_port']}"
                commands.append((address, command["command"].split()[0].upper()))
        # The store's connections, the one the batch opened included.
        ours = {c["addr"] for c in await admin.client_list() if c["name"] == name}
        setup = {"HELLO", "CLIENT"}  # the batch's new connection introducing itself
        seen = [c for address, c in commands if address in ours and c not in setup]
        assert seen == ["EVALSHA"] * 2  # the first alone, all the others in one batch
        assert await store.lease_count("l") == 10 - 1
        assert await store.lease_count("t") == 0
    finally:
        await watcher.aclose()
        await admin.aclose()
        await store.close()


async def test_an_unreachable_redis_fails_every_caller() -> None:
    store = RedisQuotaStore.from_url(CLOSED, prefix="muster-test:closed", cooldown=0)
    try:
        results = await asyncio.gather(
            *(store.rate_limit("r", rate=1, burst=1) for _ in range(5)),
            *(store.acquire_lease("l", f"h{i}", limit=1, ttl=1) for i in range(5)),
            store.renew_leases([("l", "a")], 1),
            return_exceptions=True,
        )
        assert all(isinstance(r, QuotaStoreUnavailable) for r in results), results
        assert all("127.0.0.1:1" in str(r) for r in results)
    finally:
        await store.close()


async def test_the_facade_fails_open_for_rates_and_closed_for_slots_per_caller() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    policy = QuotaPolicy(submissions=RateLimit(rate=1, burst=3), inflight_per_pool=5)
    quotas = Quotas(
        RedisQuotaStore.from_url(CLOSED, prefix="muster-test:closed", cooldown=0),
        policy,
        MusterMetrics(registry),
        fallback=InMemoryQuotaStore(clock=clock),
    )
    try:
        answers = await asyncio.gather(*(quotas.check_submission("bob") for _ in range(5)))
        assert [(a.allowed, a.degraded) for a in answers] == [(True, True)] * 3 + [
            (False, True)
        ] * 2
        results = await asyncio.gather(
            *(quotas.acquire_inflight_slots("acme", "gpu", f"h{i}") for i in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(r, QuotaStoreUnavailable) for r in results)
        assert decisions(registry, INFLIGHT_TASKS, "degraded") == 3
        with pytest.raises(QuotaStoreUnavailable):
            await quotas.renew_inflight_many([("acme", "gpu", "h0")])
    finally:
        await quotas.close()


async def test_a_queued_caller_keeps_its_deadline(prefix: str) -> None:
    """A caller queued behind a call that Redis does not answer gives up after its own
    deadline, as a call of its own would."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bare = RedisQuotaStore(
        aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=None),
        prefix=prefix,
        deadline=0.3,
    )
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(bare.rate_limit("r", rate=1, burst=1) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, QuotaStoreUnavailable) for r in results)
        assert all("no answer in time" in str(r) for r in results)
        assert loop.time() - started < 1.0
    finally:
        await bare._client.aclose()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


# --- the façade's slots ----------------------------------------------------------------


def three_of_a_then_two_of_b(a: str, pool: str) -> list[QuotaDecision]:
    """Tenant limit 2, pool limit 3: a's third attempt waits for its tenant, b's second
    for the pool."""
    allowed = QuotaDecision(True, INFLIGHT_TASKS, f"pool:{pool}", None)
    return [
        allowed,
        allowed,
        QuotaDecision(False, INFLIGHT_TASKS, f"tenant:{a}", 1.0),
        allowed,
        QuotaDecision(False, INFLIGHT_TASKS, f"pool:{pool}", 1.0),
    ]


@pytest.fixture
def slot_quotas(store: QuotaStore, registry: CollectorRegistry) -> Quotas:
    policy = QuotaPolicy(inflight_per_tenant=2, inflight_per_pool=3, inflight_lease_ttl=10)
    return Quotas(store, policy, metrics=MusterMetrics(registry))


async def test_tenant_and_pool_slots_in_one_decision(
    slot_quotas: Quotas, registry: CollectorRegistry
) -> None:
    a, b, pool = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    await warm(slot_quotas.store)
    got = await asyncio.gather(
        *(slot_quotas.acquire_inflight_slots(a, pool, f"a{i}") for i in range(3)),
        *(slot_quotas.acquire_inflight_slots(b, pool, f"b{i}") for i in range(2)),
    )
    assert got == three_of_a_then_two_of_b(a, pool)
    store = slot_quotas.store
    assert await store.lease_count(f"inflight:{b}") == 1  # b1's tenant slot was given back
    assert await store.lease_count(f"inflight-pool:{pool}") == 3
    assert decisions(registry, INFLIGHT_TASKS, "allowed") == 3 * 2 + 1
    assert decisions(registry, INFLIGHT_TASKS, "rejected") == 2


async def test_many_attempts_slots_are_decided_in_order_in_one_call(
    slot_quotas: Quotas, registry: CollectorRegistry
) -> None:
    """A claim's attempts (priority order) take their slots in that order, in one store
    call: the same decisions as asking one after another."""
    a, b, pool = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    await warm(slot_quotas.store)
    attempts = [(a, pool, "a0"), (a, pool, "a1"), (a, pool, "a2"), (b, pool, "b0"), (b, pool, "b1")]
    before = getattr(slot_quotas.store, "round_trips", 0)
    got = await slot_quotas.acquire_inflight_slots_many(attempts)
    assert got == three_of_a_then_two_of_b(a, pool)
    if isinstance(slot_quotas.store, RedisQuotaStore):
        assert slot_quotas.store.round_trips - before == 1
    assert await slot_quotas.store.lease_count(f"inflight:{b}") == 1
    assert await slot_quotas.store.lease_count(f"inflight-pool:{pool}") == 3
    assert await slot_quotas.acquire_inflight_slots_many([]) == []
    assert decisions(registry, INFLIGHT_TASKS, "allowed") == 3 * 2 + 1
    assert decisions(registry, INFLIGHT_TASKS, "rejected") == 2


async def test_without_a_pool_limit_only_the_tenant_slot_is_taken(store: QuotaStore) -> None:
    quotas = Quotas(store, QuotaPolicy(inflight_per_tenant=1))
    tenant, pool = uuid.uuid4().hex, uuid.uuid4().hex
    assert (await quotas.acquire_inflight_slots(tenant, pool, "h1")).allowed
    refused = await quotas.acquire_inflight_slots(tenant, pool, "h2")
    assert (refused.allowed, refused.subject) == (False, f"tenant:{tenant}")
    assert await store.lease_count(f"inflight-pool:{pool}") == 0


async def test_renewals_in_bulk_retake_expired_slots(slot_quotas: Quotas, clock: FakeClock) -> None:
    tenant, pool = uuid.uuid4().hex, uuid.uuid4().hex
    store = slot_quotas.store
    assert (await slot_quotas.acquire_inflight_slots(tenant, pool, "h1")).allowed
    clock.advance(6)
    assert (await slot_quotas.acquire_inflight_slots(tenant, pool, "h2")).allowed
    clock.advance(6)  # h1's slots expired, h2's live
    assert await store.lease_count(f"inflight:{tenant}") == 1
    await slot_quotas.renew_inflight_many([(tenant, pool, "h1"), (tenant, pool, "h2")])
    assert await store.lease_count(f"inflight:{tenant}") == 2
    assert await store.lease_count(f"inflight-pool:{pool}") == 2
    clock.advance(9)  # both renewed (or retaken) 9 s ago: still live
    assert await store.lease_count(f"inflight:{tenant}") == 2
    await slot_quotas.renew_inflight_many([])
