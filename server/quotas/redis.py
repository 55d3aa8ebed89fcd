"""The shared quota store: the QuotaStore contract in Redis, so every replica decides
from the same counters.

Why Lua: each decision is one ``EVALSHA`` of one script (``lua/*.lua``), which Redis runs
atomically, so no two replicas can both take the last slot and a decision costs at most
one round trip. Rate limits and lease decisions, the ones on the hot path, share theirs:
those asked while one is on its way go together in the next ``batch.lua`` run, each
answered as if asked alone (:mod:`~server.quotas.coalesce`).

Time is Redis ``TIME`` (one clock for all replicas) unless a ``clock`` is injected, for
tests. Connection trouble of any kind becomes
:class:`~server.quotas.base.QuotaStoreUnavailable` within a bounded time.

Connecting (:meth:`RedisQuotaStore.from_url`)::

    redis://[[user]:password@]host[:port][/db]      plain TCP; ``user`` is an ACL user
    rediss://[[user]:password@]host[:port][/db]     TLS, server certificate verified

Percent-encode reserved characters in the user and password. TLS options go in the URL
query or as keyword arguments (keyword arguments lose to the query): ``ssl_ca_certs``
(CA bundle file), ``ssl_ca_data`` (PEM text), ``ssl_certfile``/``ssl_keyfile`` (client
certificate), ``ssl_cert_reqs`` (``required``, the default), ``ssl_check_hostname``.
Timeouts likewise: ``socket_timeout`` and ``socket_connect_timeout`` (seconds, default
0.5), ``max_connections`` (default 16) and ``timeout`` (seconds a call waits for a free
connection, default 1). Example::

    rediss://muster:s3cret@redis.internal:6380/0?ssl_ca_certs=/etc/muster/ca.pem

Run Redis with ``maxmemory-policy noeviction``: an evicted budget forgets its spend.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from muster.server.quotas.base import (
    DEFAULT_BUDGET_SLACK,
    MICROS,
    BudgetHold,
    BudgetUsage,
    BudgetVerdict,
    LeaseDecision,
    LeaseRequest,
    QuotaStore,
    QuotaStoreUnavailable,
    RateCheck,
    RateDecision,
    emission_interval_us,
    to_micros,
    validate_amount,
    validate_hold_off,
    validate_lease,
    validate_lease_requests,
    validate_rate,
    validate_reservation,
    validate_stale,
)
from muster.server.quotas.coalesce import Coalescer, WriterCrashed

__all__ = ["DEFAULT_SOCKET_TIMEOUT", "RedisQuotaStore", "redact_url"]


DEFAULT_SOCKET_TIMEOUT = 0.5
"""Seconds to connect, and to wait for a reply, before Redis counts as unreachable."""
DEFAULT_DEADLINE = 2.0
"""Hard cap (seconds) on one decision, retries included: a request never hangs on Redis."""
DEFAULT_MAX_CONNECTIONS = 16
"""Connections per store; further concurrent calls wait (at most ``DEFAULT_POOL_WAIT``)."""
DEFAULT_POOL_WAIT = 1.0
"""Seconds a call waits for a free pooled connection."""
DEFAULT_COOLDOWN = 1.0
"""After a failure, seconds during which calls fail at once instead of waiting again."""

_SLACK_MS_REDIS_TIME = 1_000
"""Extra life of a key past its last meaningful instant, for clock jitter."""
_SLACK_MS_INJECTED_CLOCK = 300_000
"""With an injected clock, key expiry (Redis time) and decisions (that clock) disagree;
generous slack keeps keys alive for as long as a test can need them."""

_OPEN = "reservations"
"""The ZSET of open reservation ids, scored by reservation time (microseconds)."""

_UNREACHABLE: tuple[type[Exception], ...] = (
    rexc.ConnectionError,  # includes authentication failures, busy loading, pool exhaustion
    rexc.TimeoutError,
    OSError,  # includes the builtin TimeoutError raised by asyncio.timeout
)
"""Redis cannot be reached: calls fail at once for a cooldown."""
_REFUSED: tuple[type[Exception], ...] = (
    rexc.NoPermissionError,  # an ACL that does not cover our keys or commands
    rexc.ReadOnlyError,  # talking to a replica after a failover
    rexc.OutOfMemoryError,
    rexc.AuthenticationWrongNumberOfArgsError,
)
"""Redis answers but will not serve us: no decision, but no cooldown either."""


def _script(name: str) -> str:
    files = importlib.resources.files("muster.server.quotas").joinpath("lua")
    return files.joinpath(name).read_text(encoding="utf-8")


def _load_scripts() -> dict[str, str]:
    common = _script("common.lua")
    return {
        "batch": common
        + _script("gcra_common.lua")
        + _script("lease_common.lua")
        + _script("batch.lua"),
        "lease_count": common + _script("lease_count.lua"),
        "budget_reserve": common + _script("budget_reserve.lua"),
        "budget_close": common + _script("budget_close.lua"),
        "budget_stale": common + _script("budget_stale.lua"),
        "hold_off": common + _script("hold_off.lua"),
        "held_off": common + _script("held_off.lua"),
    }


_SCRIPTS = _load_scripts()


MAX_BATCH = 500
"""Decisions one script run may make: a batch keeps Redis busy for well under a
millisecond, and callers beyond it go in the next."""


@dataclass(frozen=True, slots=True)
class _Decision:
    """One caller's part of a ``batch.lua`` run: its keys (prefixed) and arguments."""

    keys: list[str]
    args: list[str | int]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` and its query dropped, for messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable Redis URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    if parts.username is not None or parts.password is not None:
        user = parts.username or ""
        netloc = f"{user}:***@{netloc}" if parts.password is not None else f"{user}@{netloc}"
    return f"{parts.scheme}://{netloc}{parts.path}"


class RedisQuotaStore(QuotaStore):
    """Quotas shared by every replica through one Redis (7 or later).

    Keys: ``<prefix>:rate:<key>`` (a TAT string), ``<prefix>:lease:<key>`` (a ZSET of
    holder -> expiry), ``<prefix>:spend:<key>`` (a budget: a hash of ``spent`` and
    ``reserved``), ``<prefix>:reservation:<id>`` (an open reservation: its amount,
    time and budget keys), ``<prefix>:reservations`` (a ZSET of open reservation ids by
    time) and ``<prefix>:holdoff:<key>`` (the end of a provider back-off). Rate, lease
    and hold-off keys expire once idle; a budget ``budget_slack`` seconds after the end
    of its period; a budget without a period and open reservations are kept (deleting
    them would forget spend). Settling reads a reservation's budget keys from its record
    inside the script, so the store needs one Redis, not a Redis Cluster.

    ``client`` is used as given (its timeouts and retries too) and not closed by
    :meth:`close`; :meth:`from_url` builds one with short timeouts that it owns.
    ``clock`` (seconds) replaces Redis ``TIME``: every store sharing keys must then
    share that clock. ``deadline`` caps one decision (seconds); for ``cooldown`` seconds
    after a connection failure calls fail at once, so an outage costs requests no waiting.
    ``where`` names the server in messages (default: host, port and db of ``client``).
    ``budget_slack``: seconds a budget key outlives its period's ``expires_at``.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        clock: Callable[[], float] | None = None,
        deadline: float = DEFAULT_DEADLINE,
        cooldown: float = DEFAULT_COOLDOWN,
        where: str | None = None,
        budget_slack: float = DEFAULT_BUDGET_SLACK,
    ) -> None:
        prefix = prefix.rstrip(":")
        if not prefix:
            raise ValueError("a Redis quota store needs a key prefix")
        self._client = client
        self._prefix = prefix + ":"
        self._clock = clock
        self._slack_ms = _SLACK_MS_REDIS_TIME if clock is None else _SLACK_MS_INJECTED_CLOCK
        self._budget_slack_ms = math.ceil(budget_slack * 1000)
        self._deadline = deadline
        self._cooldown = cooldown
        self._down_until = 0.0
        self._last_error = ""
        self._owns_client = False
        self._where = where or _describe_client(client)
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(text) for name, text in _SCRIPTS.items()
        }
        self._decisions: Coalescer[_Decision, list[Any]] = Coalescer(
            self._decide_all,
            name="quota-decisions",
            max_batch=MAX_BATCH,
            weight=lambda decision: max(1, len(decision.keys)),
            # The batch ahead may be waiting for Redis: a queued caller's deadline counts
            # from its own request, as a call of its own would.
            patience=deadline,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str,
        clock: Callable[[], float] | None = None,
        deadline: float = DEFAULT_DEADLINE,
        cooldown: float = DEFAULT_COOLDOWN,
        budget_slack: float = DEFAULT_BUDGET_SLACK,
        **redis_options: Any,
    ) -> RedisQuotaStore:
        """A store on its own connection pool to ``url`` (see the module docstring).

        ``redis_options`` go to :meth:`redis.asyncio.BlockingConnectionPool.from_url`
        (``ssl_ca_certs``, ``max_connections``, ``client_name``, ...); the URL query
        overrides them. No connection is made until the first call (or :meth:`ping`).
        A malformed URL is a ValueError whose message never shows the password.
        """
        options: dict[str, Any] = {
            "max_connections": DEFAULT_MAX_CONNECTIONS,
            "timeout": DEFAULT_POOL_WAIT,
            "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
            "socket_connect_timeout": DEFAULT_SOCKET_TIMEOUT,
            # One immediate retry on a fresh connection: a pooled connection that Redis or
            # a proxy closed while idle must not cost a decision. Timeouts are not retried.
            "retry": Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
        }
        options.update(redis_options)
        where = redact_url(url)
        try:
            # A blocking pool: a burst of calls queues for connections instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(url, **options)
        except ValueError as err:
            # redis-py and urllib may quote parts of the URL, so the cause is not chained.
            reason = _without_password(str(err), url)
            raise ValueError(f"invalid Redis URL {where}: {reason}") from None
        client = aioredis.Redis.from_pool(pool)
        store = cls(
            client,
            prefix=prefix,
            clock=clock,
            deadline=deadline,
            cooldown=cooldown,
            where=where,
            budget_slack=budget_slack,
        )
        store._owns_client = True
        return store

    def __repr__(self) -> str:
        return f"RedisQuotaStore({self._where}, prefix={self._prefix!r})"

    @property
    def prefix(self) -> str:
        """Every key this store touches starts with this (it ends with ``:``)."""
        return self._prefix

    async def ping(self) -> None:
        """Check that Redis answers and accepts our credentials (for start-up checks)."""
        await self._call(self._client.ping)

    @property
    def decisions(self) -> Coalescer[_Decision, list[Any]]:
        """Where concurrent decisions meet to share a script run; its writer is a
        background task of the server (supervised through ``on_crash``)."""
        return self._decisions

    @property
    def round_trips(self) -> int:
        """Script runs made for rate and lease decisions so far (each answers a batch)."""
        return self._decisions.calls

    async def close(self) -> None:
        await self._decisions.close()
        if self._owns_client:
            await self._client.aclose()

    # --- rate limits ------------------------------------------------------------------

    async def rate_limit(self, key: str, *, rate: float, burst: int, cost: int = 1) -> RateDecision:
        return (await self.rate_limits([RateCheck(key, rate, burst, cost)]))[0]

    async def rate_limits(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        args: list[str | int] = ["rate", len(checks)]
        for check in checks:
            validate_rate(check.rate, check.burst, check.cost)
            args += [emission_interval_us(check.rate), check.burst, check.cost]
        flat = await self._decide([f"rate:{check.key}" for check in checks], args)
        return [
            RateDecision(bool(flat[i]), int(flat[i + 1]) / MICROS, int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    # --- leases -----------------------------------------------------------------------

    async def acquire_lease(
        self, key: str, holder: str, *, limit: int, ttl: float
    ) -> LeaseDecision:
        return (await self.acquire_leases(holder, [LeaseRequest(key, limit)], ttl=ttl))[0]

    async def acquire_leases(
        self, holder: str, requests: Sequence[LeaseRequest], *, ttl: float
    ) -> list[LeaseDecision]:
        return (await self.acquire_leases_many([(holder, requests)], ttl=ttl))[0]

    async def acquire_leases_many(
        self, items: Sequence[tuple[str, Sequence[LeaseRequest]]], *, ttl: float
    ) -> list[list[LeaseDecision]]:
        # One decision per holder, all in the same batch, in order: one EVALSHA.
        decisions = []
        for holder, requests in items:
            validate_lease_requests(requests, ttl)
            args: list[str | int] = ["take", holder, to_micros(ttl), len(requests)]
            args += [request.limit for request in requests]
            keys = [f"{self._prefix}lease:{request.key}" for request in requests]
            decisions.append(_Decision(keys, args))
        answers = await self._ask_all(decisions) if decisions else []
        return [
            [
                LeaseDecision(bool(flat[2 * i]), int(flat[2 * i + 1]), requests[i].limit)
                for i in range(len(flat) // 2)
            ]
            for flat, (_, requests) in zip(answers, items, strict=True)
        ]

    async def renew_lease(self, key: str, holder: str, ttl: float) -> bool:
        validate_lease(0, ttl)
        (renewed,) = await self._decide([f"lease:{key}"], ["renew", holder, to_micros(ttl)])
        return bool(renewed)

    async def renew_leases(self, leases: Sequence[tuple[str, str]], ttl: float) -> list[bool]:
        validate_lease(0, ttl)
        ttl_us = to_micros(ttl)
        decisions = [
            _Decision([f"{self._prefix}lease:{key}"], ["renew", holder, ttl_us])
            for key, holder in leases
        ]
        answers = await self._ask_all(decisions)
        return [bool(renewed) for (renewed,) in answers]

    async def release_lease(self, key: str, holder: str) -> None:
        # One ZREM is atomic on its own; no script, no clock needed.
        await self._call(lambda: self._client.zrem(self._prefix + f"lease:{key}", holder))

    async def release_leases(self, leases: Sequence[tuple[str, str]]) -> None:
        # With the decisions of other callers: releases come in bulk as attempts end.
        if leases:
            holders = [holder for _, holder in leases]
            await self._decide(
                [f"lease:{key}" for key, _ in leases], ["drop", len(leases), *holders]
            )

    async def lease_count(self, key: str) -> int:
        return int(await self._run("lease_count", f"lease:{key}"))

    # --- budgets ----------------------------------------------------------------------

    async def reserve_budgets(
        self, reservation_id: str, amount: int, holds: Sequence[BudgetHold]
    ) -> BudgetVerdict:
        validate_reservation(reservation_id, amount, holds)
        keys = [f"reservation:{reservation_id}", _OPEN, *(f"spend:{h.key}" for h in holds)]
        args: list[str | int] = [reservation_id, amount, self._budget_slack_ms]
        for hold in holds:
            expire: str | int = ""
            if hold.expires_at is not None:
                expire = math.ceil(hold.expires_at * 1000) + self._budget_slack_ms
            args += [hold.limit, expire]
        allowed, index, used = await self._eval("budget_reserve", keys, args)
        if allowed:
            return BudgetVerdict(True, None, 0)
        return BudgetVerdict(False, holds[int(index) - 1], int(used))

    async def settle_reservation(self, reservation_id: str, actual: int) -> bool:
        validate_amount("actual spend", actual)
        return await self._close_reservation(reservation_id, actual)

    async def release_reservation(self, reservation_id: str) -> bool:
        return await self._close_reservation(reservation_id, "")

    async def _close_reservation(self, reservation_id: str, actual: int | str) -> bool:
        keys = [f"reservation:{reservation_id}", _OPEN]
        return bool(await self._eval("budget_close", keys, [reservation_id, actual]))

    async def budget_usage(self, key: str) -> BudgetUsage:
        # One HMGET is atomic on its own; an expired period's key is simply gone.
        spent, reserved = await self._call(
            lambda: self._client.hmget(f"{self._prefix}spend:{key}", ["spent", "reserved"])
        )
        return BudgetUsage(int(spent or 0), int(reserved or 0))

    async def stale_reservations(self, older_than: float, limit: int = 1000) -> list[str]:
        validate_stale(older_than, limit)
        ids = await self._run("budget_stale", _OPEN, to_micros(older_than), limit)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    # --- provider back-off ------------------------------------------------------------

    async def hold_off(self, key: str, seconds: float) -> None:
        validate_hold_off(seconds)
        await self._run("hold_off", f"holdoff:{key}", to_micros(seconds), self._slack_ms)

    async def held_off(self, keys: Sequence[str]) -> dict[str, float]:
        if not keys:
            return {}
        left = await self._eval("held_off", [f"holdoff:{key}" for key in keys], [])
        return {key: int(us) / MICROS for key, us in zip(keys, left, strict=True) if int(us) > 0}

    # --- plumbing ---------------------------------------------------------------------

    async def _decide(self, keys: list[str], args: list[str | int]) -> list[Any]:
        """One decision of ``batch.lua`` (its kind first in ``args``), sent together with
        the decisions other callers ask for meanwhile: one EVALSHA answers them all."""
        decision = _Decision([self._prefix + key for key in keys], args)
        return (await self._ask_all([decision]))[0]

    async def _ask_all(self, decisions: list[_Decision]) -> list[list[Any]]:
        self._fail_fast()
        try:
            if len(decisions) == 1:
                return [await self._decisions.ask(decisions[0])]
            return await self._decisions.ask_all(decisions)
        except TimeoutError:  # queued past the deadline (a call's own failures are ours)
            raise QuotaStoreUnavailable(
                f"quota store {self._where} unreachable: no answer in time"
            ) from None
        except WriterCrashed as err:  # the server's supervisor is stopping the server
            raise QuotaStoreUnavailable(f"quota store {self._where}: {err}") from None

    async def _decide_all(self, decisions: list[_Decision]) -> list[Any]:
        """The coalescer's call: the decisions of many callers in one script run."""
        keys: list[str] = []
        args: list[str | int] = [
            "" if self._clock is None else to_micros(self._clock()),
            self._slack_ms,
        ]
        for decision in decisions:
            keys += decision.keys
            args += decision.args
        run = self._scripts["batch"]
        answers: list[Any] = await self._call(lambda: run(keys=keys, args=args))
        return answers

    async def _run(self, script: str, key: str, *args: str | int) -> Any:
        """One EVALSHA of ``script`` on ``<prefix><key>``; ARGV[1] is the clock."""
        return await self._eval(script, [key], args)

    async def _eval(self, script: str, keys: list[str], args: Sequence[str | int]) -> Any:
        """One EVALSHA of ``script`` on ``keys`` (prefixed here); ARGV[1] is the clock."""
        now = "" if self._clock is None else to_micros(self._clock())
        run = self._scripts[script]
        full = [self._prefix + key for key in keys]
        return await self._call(lambda: run(keys=full, args=[now, *args]))

    async def _call(self, request: Callable[[], Awaitable[Any]]) -> Any:
        """Make one Redis call, turning every way of not getting an answer into
        QuotaStoreUnavailable within ``deadline`` seconds."""
        self._fail_fast()
        try:
            async with asyncio.timeout(self._deadline):
                return await request()
        except _UNREACHABLE as err:
            self._last_error = _error_text(err)
            if not _pool_exhausted(err):  # a busy pool is ours, not Redis's, to blame
                self._down_until = time.monotonic() + self._cooldown
            raise QuotaStoreUnavailable(
                f"quota store {self._where} unreachable: {self._last_error}"
            ) from err
        except _REFUSED as err:
            raise QuotaStoreUnavailable(
                f"quota store {self._where} refused the call: {_error_text(err)}"
            ) from err

    def _fail_fast(self) -> None:
        if time.monotonic() < self._down_until:
            raise QuotaStoreUnavailable(
                f"quota store {self._where} unreachable (recently: {self._last_error})"
            )


def _describe_client(client: aioredis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    host, port, db = kwargs.get("host", "?"), kwargs.get("port", "?"), kwargs.get("db", 0)
    user = kwargs.get("username")
    return f"redis://{f'{user}@' if user else ''}{host}:{port}/{db}"


def _pool_exhausted(err: BaseException) -> bool:
    """All pooled connections stayed busy for the pool's wait: this process is
    overloaded, Redis may be fine."""
    return isinstance(err, rexc.MaxConnectionsError) or (
        type(err) is rexc.ConnectionError and str(err).startswith("No connection available")
    )


def _error_text(err: BaseException) -> str:
    if _pool_exhausted(err):
        return "every pooled connection stayed busy (raise max_connections?)"
    if isinstance(err, rexc.AuthenticationError):
        return f"authentication failed (check the user and password): {err}"
    if isinstance(err, rexc.NoPermissionError):
        return f"permission denied by the Redis ACL (keys or commands not granted): {err}"
    if isinstance(err, TimeoutError):  # asyncio.timeout: the decision's own deadline
        return "no answer in time"
    return str(err) or type(err).__name__


def _without_password(text: str, url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        return "malformed"
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(str(secret), "***")
    return text
