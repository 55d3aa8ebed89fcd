"""Shared fixtures: a real Muster server on loopback (port 0) with its own data directory.

The server runs in the test's event loop, on embedded defaults unless
``MUSTER_TEST_BACKEND=postgres`` (see ``backend``).

``make test`` runs two passes. The first runs everything on embedded defaults. The second
(``MUSTER_TEST_BACKEND=postgres``) runs only the tests the backend can change: those that
request the ``backend`` fixture (directly or through ``server``, ``admin``, ``client``,
``enroller``...) and those with a ``skipif`` mark, such as the replica tests marked
``skipif(BACKEND != "postgres")`` that the first pass skips. Every other test ran, the
same, in the first pass and is deselected (``pytest_collection_modifyitems``). A test
that runs only in the Postgres pass says so with that mark, never with a ``pytest.skip``
call: a test that neither requests ``backend`` nor has the mark would run in no pass.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from muster import AsyncAdminClient, AsyncClient, ClientConfig
from muster.server.app import ServerHandle, start_server
from muster.server.config import ServerConfig
from tests.agentsim import Enroller
from tests.pg import fresh_database


def server_config(data_dir: Path, **overrides: object) -> ServerConfig:
    """Fast timings so lease and heartbeat behaviour shows within a test's patience."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "api_addr": "127.0.0.1:0",
        "agent_addr": "127.0.0.1:0",
        "metrics_addr": "127.0.0.1:0",
        "heartbeat_interval": timedelta(seconds=0.5),
        "lease_duration": timedelta(seconds=3),
        "accept_timeout": timedelta(seconds=2),
        "poll_interval": timedelta(seconds=0.2),
        "shutdown_grace": timedelta(seconds=2),
    }
    if overrides.get("redis_url") and not overrides.get("fanout_secret_file"):
        values["fanout_secret"] = FANOUT_SECRET  # required with Redis; shared by replicas
    values.update(overrides)
    return ServerConfig(**values)  # type: ignore[arg-type]


BACKEND = os.environ.get("MUSTER_TEST_BACKEND", "embedded")
"""``embedded`` (SQLite, in-process quotas and fan-out) or ``postgres`` (a fresh Postgres
database per test, Redis quotas and fan-out under a key prefix of the test's own)."""
REDIS_URL = os.environ.get("MUSTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FANOUT_SECRET = secrets.token_hex(32)
"""The fan-out key of every server a test run starts with Redis (replicas must share it)."""


E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e ``slow`` (each runs whole processes; ``make check``
    leaves them to ``make test``). In the Postgres pass, deselect the tests the backend
    cannot change (module docstring)."""
    for item in items:
        if item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.slow)
    if BACKEND != "postgres":
        return
    selected: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        uses_backend = "backend" in getattr(item, "fixturenames", ())
        conditional = item.get_closest_marker("skipif") is not None
        (selected if uses_backend or conditional else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture
async def backend() -> AsyncIterator[dict[str, object]]:
    """Server settings for the configured backend, torn down after the test."""
    if BACKEND == "embedded":
        yield {}
        return
    if BACKEND != "postgres":
        raise pytest.UsageError(f"MUSTER_TEST_BACKEND={BACKEND!r}: use embedded or postgres")
    prefix = f"muster-test-{secrets.token_hex(6)}"
    async with fresh_database() as url:
        yield {"database_url": url, "redis_url": REDIS_URL, "redis_prefix": prefix}
    await forget_redis(prefix)


async def forget_redis(prefix: str) -> None:
    """Delete the keys a test's Redis prefix left behind."""
    redis = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


@pytest.fixture
async def server(tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[ServerHandle]:
    handle = await start_server(server_config(tmp_path / "data", **backend))
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


def client_config(handle: ServerHandle, token: str | None = None) -> ClientConfig:
    config = handle.config
    return ClientConfig(
        address=handle.api_address,
        token=token or config.admin_token_file.read_text().strip(),
        ca_file=config.ca_dir / "bundle.pem",
    )


@pytest.fixture
async def admin(server: ServerHandle) -> AsyncIterator[AsyncAdminClient]:
    async with AsyncAdminClient(client_config(server)) as client:
        yield client


@pytest.fixture
async def client(server: ServerHandle) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(client_config(server)) as c:
        yield c


@pytest.fixture
def enroller(server: ServerHandle, admin: AsyncAdminClient) -> Enroller:
    return Enroller(server, admin)
