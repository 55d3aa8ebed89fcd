"""Shared fixtures: a real Muster server on loopback (port 0) with its own data directory.

The server runs in the test's event loop on embedded defaults unless
``MUSTER_TEST_DATABASE_URL`` points the suite at another database.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from muster import AsyncAdminClient, AsyncClient, ClientConfig
from server.app import ServerHandle, start_server
from server.config import ServerConfig
from tests.agentsim import Enroller


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
        "database_url": os.environ.get("MUSTER_TEST_DATABASE_URL", ""),
    }
    values.update(overrides)
    return ServerConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerHandle]:
    handle = await start_server(server_config(tmp_path / "data"))
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
