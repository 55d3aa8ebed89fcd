"""The Redis quota store beyond the shared contract (``tests/test_quotas.py``): limits
that hold across replicas, one round trip per decision, a Redis that is unreachable,
silent, cut or killing connections, the façade's policy then, ACL users and passwords,
and TLS. Every test works under its own key prefix and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from muster.server.metrics import MusterMetrics
from muster.server.quotas import (
    INFLIGHT_TASKS,
    SUBMISSIONS,
    BudgetHold,
    BudgetUsage,
    InMemoryQuotaStore,
    Quotas,
    QuotaStoreUnavailable,
    RateCheck,
    RateDecision,
    RedisQuotaStore,
)
from muster.server.quotas.base import DEFAULT_BUDGET_SLACK
from tests.test_quotas import (
    PATIENT,
    POLICY,
    FakeClock,
    check_concurrent_budgets,
    decisions,
    delete_prefix,
    redis_url,
    reservations,
    unique_prefix,
)
from tests.testca import TestCA

pytestmark = pytest.mark.slow

CLOSED = "redis://127.0.0.1:1/0"
"""Nothing listens on port 1: connections are refused at once."""


@pytest.fixture
async def admin() -> AsyncIterator[aioredis.Redis]:
    """A separate connection for what the test itself asks Redis."""
    client = aioredis.Redis.from_url(redis_url(), decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = unique_prefix()
    try:
        yield name
    finally:
        await delete_prefix(name)


@pytest.fixture
async def replicas(prefix: str) -> AsyncIterator[list[RedisQuotaStore]]:
    """Four stores on four connection pools, as four server replicas would have (with
    patient timeouts: these tests are about answers under concurrency, not latency, and
    the machine may be busy)."""
    stores = [RedisQuotaStore.from_url(redis_url(), prefix=prefix, **PATIENT) for _ in range(4)]
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


def redis_address() -> tuple[str, int]:
    parts = urlsplit(redis_url())
    return parts.hostname or "127.0.0.1", parts.port or 6379


def text_of(err: BaseException | None) -> str:
    """Everything an exception and its causes would print."""
    seen = []
    while err is not None:
        seen += [str(err), repr(err)]
        err = err.__cause__ or err.__context__
    return "\n".join(seen)


class Proxy:
    """A TCP relay in front of Redis that a test can cut, as a partition would, and
    heal; optionally terminating TLS, as a TLS-enabled Redis would."""

    def __init__(self, target: tuple[str, int], *, tls: ssl.SSLContext | None = None) -> None:
        self._target = target
        self._tls = tls
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.refusing = False

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self._tls)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def cut(self) -> None:
        """Drop every open connection and every new one until :meth:`heal`."""
        self.refusing = True
        for writer in list(self._writers):
            writer.transport.abort()

    def heal(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()


# --- limits across replicas ----------------------------------------------------------


async def test_limits_hold_across_replicas(replicas: list[RedisQuotaStore]) -> None:
    n = len(replicas)
    b = BudgetHold("b", 1000, None)
    budget = await asyncio.gather(
        *(replicas[i % n].reserve_budgets(f"r{i}", 7, [b]) for i in range(400))
    )
    assert sum(d.allowed for d in budget) == 1000 // 7
    assert max(d.used for d in budget) <= 1000
    assert await replicas[1].budget_usage("b") == BudgetUsage(0, 7 * (1000 // 7))

    leases = await asyncio.gather(
        *(replicas[i % n].acquire_lease("l", f"h{i}", limit=10, ttl=30) for i in range(400))
    )
    assert sum(d.acquired for d in leases) == 10
    assert max(d.count for d in leases) == 10
    assert await replicas[2].lease_count("l") == 10

    # Redis TIME is the clock here; at one request per 1000 s only the burst passes.
    rates = await asyncio.gather(
        *(replicas[i % n].rate_limit("r", rate=0.001, burst=25) for i in range(200))
    )
    assert sum(d.allowed for d in rates) == 25


async def test_churn_across_replicas_never_exceeds_limits(
    replicas: list[RedisQuotaStore],
) -> None:
    n = len(replicas)
    limit = 5
    holding = peak = 0

    async def hold_slots(worker: int) -> None:
        nonlocal holding, peak
        store = replicas[worker % n]
        for i in range(15):
            holder = f"w{worker}-{i}"
            if (await store.acquire_lease("l", holder, limit=limit, ttl=30)).acquired:
                # Counted only between a granted acquire and the release being sent, so
                # this is never more than Redis holds: the peak must stay within limit.
                holding += 1
                peak = max(peak, holding)
                await asyncio.sleep(0)
                holding -= 1
                await store.release_lease("l", holder)

    settled = 0

    budget = BudgetHold("b", 1000, None)

    async def spend(worker: int) -> None:
        nonlocal settled
        store, other = replicas[worker % n], replicas[(worker + 1) % n]
        for i in range(15):
            rid = f"w{worker}-{i}"
            decision = await store.reserve_budgets(rid, 20, [budget])
            assert decision.used <= 1000
            if not decision.allowed:
                continue
            assert (await other.reserve_budgets(rid, 20, [budget])).allowed  # a retry
            actual = (worker + i) % 21
            assert await other.settle_reservation(rid, actual)  # by id alone, anywhere
            assert not await store.settle_reservation(rid, actual)  # settled once
            settled += actual

    await asyncio.gather(*(hold_slots(w) for w in range(40)), *(spend(w) for w in range(40)))
    assert 1 <= peak <= limit
    assert await replicas[0].lease_count("l") == 0
    usage = await replicas[3].budget_usage("b")
    assert usage == BudgetUsage(spent=settled, reserved=0)
    assert usage.spent <= 1000


async def test_budgets_hold_across_replicas(replicas: list[RedisQuotaStore]) -> None:
    for seed in range(3):
        await check_concurrent_budgets(replicas, f"round{seed}", seed=seed)


async def test_a_reservation_is_recorded_in_redis(
    admin: aioredis.Redis, replicas: list[RedisQuotaStore], prefix: str
) -> None:
    """The record holds the keys and the amount, so any replica settles by id alone."""
    tenant = BudgetHold("budget:tenant:acme:2026-12", 100, time.time() + 3600)
    task = BudgetHold("budget:task:t_1:all", 50, None)
    assert (await replicas[0].reserve_budgets("t_1:1", 40, [tenant, task])).allowed
    record = await admin.hgetall(f"{prefix}:reservation:t_1:1")
    assert record["amount"] == "40"
    assert record["n"] == "2"
    assert [record["1"], record["2"]] == [
        f"{prefix}:spend:budget:tenant:acme:2026-12",
        f"{prefix}:spend:budget:task:t_1:all",
    ]
    assert await admin.zrange(f"{prefix}:reservations", 0, -1) == ["t_1:1"]
    assert await admin.hgetall(f"{prefix}:spend:budget:task:t_1:all") == {"reserved": "40"}

    assert await replicas[3].settle_reservation("t_1:1", 55)
    assert not await admin.exists(f"{prefix}:reservation:t_1:1")
    assert await admin.zcard(f"{prefix}:reservations") == 0
    assert await replicas[1].budget_usage(task.key) == BudgetUsage(55, 0)
    assert await replicas[2].budget_usage(tenant.key) == BudgetUsage(55, 0)


async def test_redis_time_ages_reservations_and_hold_offs(
    replicas: list[RedisQuotaStore],
) -> None:
    """Without an injected clock the scripts use Redis TIME, the clock of all replicas."""
    await replicas[0].reserve_budgets("old", 1, [])
    await replicas[1].hold_off("model", 0.2)
    assert 0 < (await replicas[2].held_off(["model"]))["model"] <= 0.2
    await asyncio.sleep(0.25)
    assert await replicas[3].held_off(["model"]) == {}
    assert await replicas[0].stale_reservations(0.2) == ["old"]
    assert await replicas[0].stale_reservations(10) == []


# --- one round trip ------------------------------------------------------------------


async def test_each_decision_is_one_round_trip(admin: aioredis.Redis, prefix: str) -> None:
    name = f"muster-test-{uuid.uuid4().hex}"
    b = BudgetHold("b", 10, time.time() + 60)
    c = BudgetHold("c", 10, None)
    store = RedisQuotaStore.from_url(redis_url(), prefix=prefix, client_name=name, **PATIENT)
    calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("EVALSHA", lambda: store.rate_limit("r", rate=1, burst=5)),
        ("EVALSHA", lambda: store.rate_limits([RateCheck("r", 1, 5, 0), RateCheck("s", 1, 5)])),
        ("EVALSHA", lambda: store.acquire_lease("l", "a", limit=2, ttl=30)),
        ("EVALSHA", lambda: store.renew_lease("l", "a", 30)),
        ("EVALSHA", lambda: store.lease_count("l")),
        ("ZREM", lambda: store.release_lease("l", "a")),
        ("EVALSHA", lambda: store.release_leases([("l", "a"), ("m", "b")])),
        ("EVALSHA", lambda: store.reserve_budgets("r1", 5, [b, c])),
        ("EVALSHA", lambda: store.settle_reservation("r1", 3)),
        ("EVALSHA", lambda: store.reserve_budgets("r2", 5, [b, c])),
        ("EVALSHA", lambda: store.release_reservation("r2")),
        ("HMGET", lambda: store.budget_usage("b")),
        ("EVALSHA", lambda: store.stale_reservations(60)),
        ("EVALSHA", lambda: store.hold_off("h", 5)),
        ("EVALSHA", lambda: store.held_off(["h", "i"])),
    ]
    watcher = aioredis.Redis.from_url(redis_url())
    try:
        for _, call in calls:  # a script's first run may load it (NOSCRIPT) once per server
            await call()
        clients = await admin.client_list()
        address = next(c["addr"] for c in clients if c["name"] == name)
        sentinel = uuid.uuid4().hex
        seen: list[str] = []
        async with watcher.monitor() as monitor:
            for _, call in calls:
                await call()
            await admin.echo(sentinel)
            while True:
                command = await asyncio.wait_for(monitor.next_command(), 5)
                if sentinel in command["command"]:
                    break
                if f"{command['client_address']}:{command['client_port']}" == address:
                    seen.append(command["command"].split()[0].upper())
    finally:
        await watcher.aclose()
        await store.close()
    assert seen == [expected for expected, _ in calls]


# --- an unreachable, silent, cut or killing Redis ------------------------------------


def every_call(store: RedisQuotaStore) -> list[Callable[[], Awaitable[Any]]]:
    return [
        store.ping,
        lambda: store.rate_limit("r", rate=1, burst=1),
        lambda: store.acquire_lease("l", "a", limit=1, ttl=1),
        lambda: store.renew_lease("l", "a", 1),
        lambda: store.release_lease("l", "a"),
        lambda: store.lease_count("l"),
        lambda: store.reserve_budgets("r", 1, [BudgetHold("b", 1, None)]),
        lambda: store.settle_reservation("r", 1),
        lambda: store.release_reservation("r"),
        lambda: store.budget_usage("b"),
        lambda: store.stale_reservations(60),
        lambda: store.hold_off("h", 1),
        lambda: store.held_off(["h"]),
    ]


async def test_an_unreachable_redis_is_quota_store_unavailable() -> None:
    store = RedisQuotaStore.from_url(CLOSED, prefix="muster-test:closed", cooldown=0)
    try:
        for call in every_call(store):
            started = time.monotonic()
            with pytest.raises(QuotaStoreUnavailable, match=re.escape("127.0.0.1:1")) as err:
                await call()
            assert time.monotonic() - started < 1.0
            assert "unreachable" in str(err.value)
    finally:
        await store.close()


async def test_after_a_failure_calls_fail_at_once_for_the_cooldown() -> None:
    store = RedisQuotaStore.from_url(CLOSED, prefix="muster-test:closed", cooldown=60)
    try:
        with pytest.raises(QuotaStoreUnavailable, match="Connect call failed"):
            await store.rate_limit("r", rate=1, burst=1)
        with pytest.raises(QuotaStoreUnavailable, match=r"recently: .*Connect call failed"):
            await store.rate_limit("r", rate=1, burst=1)
    finally:
        await store.close()


async def test_a_redis_that_never_answers_times_out() -> None:
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisQuotaStore.from_url(
        f"redis://127.0.0.1:{port}/0", prefix="muster-test:silent", socket_timeout=0.2
    )
    # A client built without any timeout is still cut off by the decision deadline.
    bare = RedisQuotaStore(
        aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=None),
        prefix="muster-test:silent",
        deadline=0.3,
    )
    try:
        started = time.monotonic()
        with pytest.raises(QuotaStoreUnavailable):
            await store.acquire_lease("l", "a", limit=1, ttl=1)
        assert 0.15 < time.monotonic() - started < 1.0
        started = time.monotonic()
        with pytest.raises(QuotaStoreUnavailable, match="recently"):
            await store.acquire_lease("l", "a", limit=1, ttl=1)
        assert time.monotonic() - started < 0.1  # the cooldown: no waiting again

        started = time.monotonic()
        with pytest.raises(QuotaStoreUnavailable, match="no answer in time"):
            await bare.reserve_budgets("r", 1, [BudgetHold("b", 1, None)])
        assert 0.25 < time.monotonic() - started < 1.0
    finally:
        await store.close()
        await bare._client.aclose()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_busy_pool_fails_the_call_but_not_the_store(prefix: str) -> None:
    store = RedisQuotaStore.from_url(
        redis_url(), prefix=prefix, max_connections=1, timeout=0.05, cooldown=60
    )
    try:
        # Hold the only connection for a while (BLPOP on a key nobody pushes to).
        async def hold() -> None:
            await store._client.blpop([f"{prefix}:nothing"], timeout=0.3)

        blocked = asyncio.create_task(hold())
        await asyncio.sleep(0.05)
        with pytest.raises(QuotaStoreUnavailable, match="busy"):
            await store.lease_count("l")
        await blocked
        # No cooldown: Redis itself was never in doubt.
        assert await store.lease_count("l") == 0
    finally:
        await store.close()


async def test_a_cut_redis_fails_fast_and_recovers(prefix: str) -> None:
    proxy = Proxy(redis_address())
    port = await proxy.start()
    store = RedisQuotaStore.from_url(f"redis://127.0.0.1:{port}/0", prefix=prefix, cooldown=0.1)
    try:
        assert (await store.acquire_lease("l", "a", limit=1, ttl=30)).acquired
        proxy.cut()
        for call in every_call(store):
            started = time.monotonic()
            with pytest.raises(QuotaStoreUnavailable):
                await call()
            assert time.monotonic() - started < 1.0
        proxy.heal()
        await asyncio.sleep(0.15)
        # Redis kept the state through the cut: a's slot is still taken.
        assert not (await store.acquire_lease("l", "b", limit=1, ttl=30)).acquired
        assert await store.lease_count("l") == 1
    finally:
        await store.close()
        await proxy.close()


async def test_connections_killed_mid_run(admin: aioredis.Redis, prefix: str) -> None:
    name = f"muster-test-{uuid.uuid4().hex}"
    store = RedisQuotaStore.from_url(redis_url(), prefix=prefix, client_name=name, cooldown=0.02)
    outcomes: list[RateDecision | QuotaStoreUnavailable] = []
    kills = 0
    done = asyncio.Event()

    async def decide() -> None:
        for _ in range(40):
            try:
                outcomes.append(await store.rate_limit("r", rate=0.001, burst=60))
            except QuotaStoreUnavailable as err:
                outcomes.append(err)
                await asyncio.sleep(0.02)

    async def kill() -> None:
        nonlocal kills
        while not done.is_set():
            for client in await admin.client_list():
                if client["name"] == name:
                    kills += await admin.client_kill_filter(_id=client["id"])
            await asyncio.sleep(0.005)

    killer = asyncio.create_task(kill())
    try:
        await asyncio.gather(*(decide() for _ in range(5)))
    finally:
        done.set()
        await killer
    try:
        assert kills > 0
        assert len(outcomes) == 200  # every call answered: a decision or unavailable
        allowed = sum(isinstance(o, RateDecision) and o.allowed for o in outcomes)
        assert allowed <= 60  # a retried script can only spend more, never let more pass
        await asyncio.sleep(0.03)
        assert (await store.rate_limit("other", rate=1, burst=1)).allowed  # back to normal
    finally:
        await store.close()


# --- the façade's policy when Redis is unreachable -----------------------------------


async def test_facade_fails_open_for_rates_and_closed_for_leases_and_budgets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    quotas = Quotas(
        RedisQuotaStore.from_url(CLOSED, prefix="muster-test:closed"),
        POLICY,
        MusterMetrics(registry),
        fallback=InMemoryQuotaStore(clock=clock),
        clock=clock,
    )
    caplog.set_level(logging.WARNING, logger="muster.server.quotas.policy")
    try:
        answers = [await quotas.check_submission("alice") for _ in range(5)]
        # Open, but only up to this process's own copy of the limit (burst 3).
        assert [(a.allowed, a.degraded) for a in answers] == [(True, True)] * 3 + [
            (False, True)
        ] * 2
        for i in range(5):
            with pytest.raises(QuotaStoreUnavailable):
                await quotas.acquire_inflight("tenant", f"t{i}")
            with pytest.raises(QuotaStoreUnavailable):
                await quotas.reserve_budget(f"t{i}:1", 10, [BudgetHold("b", 1000, None)])
    finally:
        await quotas.close()
    for limit in (SUBMISSIONS, INFLIGHT_TASKS):
        assert decisions(registry, limit, "degraded") == 5
        assert decisions(registry, limit, "allowed") == 0
        assert decisions(registry, limit, "rejected") == 0
    assert reservations(registry) == {"degraded": 5}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # one per limit class for 15 degraded decisions
    assert all("127.0.0.1:1" in w for w in warnings)


# --- ACL users, passwords, TLS -------------------------------------------------------


async def create_user(admin: aioredis.Redis, user: str, password: str, prefix: str) -> None:
    """An ACL user that may do anything, but only to keys under ``prefix``."""
    await admin.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=[f"{prefix}:*"],
        commands=["+@all"],
    )


def url_for(user: str, password: str, *, scheme: str = "redis") -> str:
    host, port = redis_address()
    path = urlsplit(redis_url()).path
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}{path}"


async def test_acl_user_with_a_password_from_the_url(
    admin: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    user = f"muster-test-{uuid.uuid4().hex}"
    password = f"p@ss:w/rd {uuid.uuid4().hex}"  # reserved characters, percent-encoded
    await create_user(admin, user, password, prefix)
    store = RedisQuotaStore.from_url(url_for(user, password), prefix=prefix)
    outside = RedisQuotaStore.from_url(url_for(user, password), prefix=unique_prefix())
    try:
        await store.ping()
        assert (await store.acquire_lease("l", "a", limit=1, ttl=30)).acquired
        assert (await store.reserve_budgets("r", 5, [BudgetHold("b", 10, None)])).allowed
        assert any(c.get("user") == user for c in await admin.client_list())
        assert password not in repr(store)
        assert quote(password, safe="") not in repr(store)

        # The ACL grants this user only its prefix: elsewhere, a clear refusal.
        with pytest.raises(QuotaStoreUnavailable, match="ACL") as refused:
            await outside.rate_limit("r", rate=1, burst=1)
        assert password not in text_of(refused.value)
    finally:
        await store.close()
        await outside.close()
        await admin.acl_deluser(user)


async def test_a_wrong_password_is_a_clear_error_that_never_shows_it(
    admin: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    user = f"muster-test-{uuid.uuid4().hex}"
    right = uuid.uuid4().hex
    wrong = f"wrong-{uuid.uuid4().hex}"
    await create_user(admin, user, right, prefix)
    caplog.set_level(logging.DEBUG)
    store = RedisQuotaStore.from_url(url_for(user, wrong), prefix=prefix)
    quotas = Quotas(store, POLICY, MusterMetrics(CollectorRegistry()))
    try:
        with pytest.raises(QuotaStoreUnavailable, match="authentication failed") as err:
            await quotas.ping()
        assert (await quotas.check_submission("alice")).degraded  # logged by the façade
    finally:
        await quotas.close()
        await admin.acl_deluser(user)
    shown = text_of(err.value) + repr(store) + caplog.text
    assert "authentication failed" in caplog.text
    assert wrong not in shown
    assert right not in shown

    # A URL that cannot be parsed is a ValueError that does not show it either.
    with pytest.raises(ValueError, match="invalid Redis URL") as bad:
        RedisQuotaStore.from_url(f"redis://{user}:{wrong}@127.0.0.1:port/0", prefix=prefix)
    assert wrong not in text_of(bad.value)
    with pytest.raises(ValueError, match="invalid Redis URL") as bad:
        RedisQuotaStore.from_url(f"http://{user}:{wrong}@127.0.0.1/0", prefix=prefix)
    assert wrong not in text_of(bad.value)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[ssl.SSLContext, Path, Path]:
    """A TLS server context from a test CA, that CA's bundle, and a foreign CA's bundle."""
    ca = TestCA.new()
    chain, key = ca.server_credentials(hostnames=("localhost",), ips=("127.0.0.1",))
    (tmp_path / "server.pem").write_bytes(chain)
    (tmp_path / "server.key").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(ca.bundle_pem)
    foreign = tmp_path / "foreign.pem"
    foreign.write_bytes(TestCA.new().bundle_pem)
    return context, bundle, foreign


async def test_rediss_with_a_private_ca(
    prefix: str, tls_files: tuple[ssl.SSLContext, Path, Path]
) -> None:
    context, bundle, foreign = tls_files
    proxy = Proxy(redis_address(), tls=context)
    port = await proxy.start()
    url = f"rediss://127.0.0.1:{port}/0"
    via_query = RedisQuotaStore.from_url(
        f"{url}?ssl_ca_certs={quote(str(bundle))}&ssl_cert_reqs=required", prefix=prefix
    )
    via_keywords = RedisQuotaStore.from_url(url, prefix=prefix, ssl_ca_certs=str(bundle))
    untrusting = RedisQuotaStore.from_url(url, prefix=prefix, ssl_ca_certs=str(foreign))
    plain = RedisQuotaStore.from_url(f"redis://127.0.0.1:{port}/0", prefix=prefix)
    try:
        assert (await via_query.acquire_lease("l", "a", limit=1, ttl=30)).acquired
        assert await via_keywords.lease_count("l") == 1
        with pytest.raises(QuotaStoreUnavailable, match="certificate verify failed"):
            await untrusting.lease_count("l")
        with pytest.raises(QuotaStoreUnavailable):
            await plain.lease_count("l")
    finally:
        for store in (via_query, via_keywords, untrusting, plain):
            await store.close()
        await proxy.close()


# --- keys ----------------------------------------------------------------------------


async def test_keys_live_under_the_prefix_and_idle_ones_expire(
    admin: aioredis.Redis, prefix: str
) -> None:
    store = RedisQuotaStore.from_url(redis_url(), prefix=prefix + ":")  # one ":" either way
    try:
        await store.rate_limit("r", rate=10, burst=5)
        await store.acquire_lease("l", "a", limit=2, ttl=30)
        month = BudgetHold("budget:global:2026-12", 10, time.time() + 60)
        forever = BudgetHold("budget:global:all", 10, None)
        await store.reserve_budgets("t_1:1", 5, [month, forever])
        await store.hold_off("model", 30)
        ttls = {key: await admin.pttl(key) async for key in admin.scan_iter(f"{prefix}:*")}
        assert set(ttls) == {
            f"{prefix}:rate:r",
            f"{prefix}:lease:l",
            f"{prefix}:spend:budget:global:2026-12",
            f"{prefix}:spend:budget:global:all",
            f"{prefix}:reservation:t_1:1",
            f"{prefix}:reservations",
            f"{prefix}:holdoff:model",
        }
        assert 0 < ttls[f"{prefix}:rate:r"] <= 1_100  # the TAT (0.1 s ahead) + 1 s slack
        assert 30_000 < ttls[f"{prefix}:lease:l"] <= 31_000
        # A period's budget lives until the period's end plus the slack.
        slack_ms = DEFAULT_BUDGET_SLACK * 1000
        assert (
            59_000 + slack_ms < ttls[f"{prefix}:spend:budget:global:2026-12"] <= 61_000 + slack_ms
        )
        assert ttls[f"{prefix}:spend:budget:global:all"] == -1  # spend without a period is kept
        assert ttls[f"{prefix}:reservation:t_1:1"] == -1  # open until settled or reaped
        assert ttls[f"{prefix}:reservations"] == -1
        assert 30_000 < ttls[f"{prefix}:holdoff:model"] <= 31_000

        # A lease key lives as long as its longest lease.
        await store.acquire_lease("l", "b", limit=2, ttl=300)
        await store.renew_lease("l", "a", 1)
        assert await admin.pttl(f"{prefix}:lease:l") > 300_000
    finally:
        await store.close()


def test_a_prefix_is_required() -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisQuotaStore.from_url(redis_url(), prefix=":")
