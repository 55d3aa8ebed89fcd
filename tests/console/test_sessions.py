"""Sessions: forged and stale cookies are nobody, sessions end when idle, at their
lifetime, and with their token."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from muster import AsyncAdminClient
from muster.server.app import ServerHandle, start_server
from muster.server.clock import ManualClock
from muster.server.console.sessions import IDLE, SessionStore
from muster.server.console.signin import COOKIE
from muster.server.principals import Principal
from tests.conftest import client_config, server_config
from tests.console.conftest import Console, admin_token

ALICE = Principal(name="alice", role="viewer", token_id="0123456789abcdef", tenant="alice")


async def test_forged_cookies_are_nobody(console_server: ServerHandle, console: Console) -> None:
    await console.login(admin_token(console_server))
    real = console.session_id()
    assert real is not None
    altered = real[:-1] + ("B" if real[-1] != "B" else "C")  # one character off
    for forged in ("", "x", secrets.token_urlsafe(32), altered, real + "A", "A" * 5000):
        console.session.cookie_jar.clear()
        console.session.cookie_jar.update_cookies({COOKIE: forged})
        response, _ = await console.get("/agents")
        assert (response.status, response.headers.get("Location")) == (303, "/login"), forged
        response, _ = await console.request("POST", "/logout")
        assert response.status == 401


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def timed_server(
    tmp_path: Path, backend: dict[str, object], clock: ManualClock
) -> AsyncIterator[ServerHandle]:
    config = server_config(
        tmp_path / "data",
        console_addr="127.0.0.1:0",
        console_session_ttl=timedelta(hours=1),
        **backend,
    )
    handle = await start_server(config, clock=clock)
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


async def test_a_session_ends_when_idle_and_at_its_lifetime(
    timed_server: ServerHandle, clock: ManualClock
) -> None:
    console = Console(timed_server)
    try:
        await console.login(admin_token(timed_server))
        clock.advance(IDLE - timedelta(seconds=1))
        assert (await console.get("/agents"))[0].status == 200  # and that counts as a request
        clock.advance(IDLE - timedelta(seconds=1))
        assert (await console.get("/agents"))[0].status == 200
        clock.advance(IDLE)
        response, _ = await console.get("/agents")
        assert (response.status, response.headers["Location"]) == (303, "/login")

        await console.login(admin_token(timed_server))
        for _ in range(3):  # busy, never idle, but an hour is the most
            clock.advance(timedelta(minutes=20) - timedelta(seconds=1))
            assert (await console.get("/"))[0].status == 200
        clock.advance(timedelta(seconds=10))
        assert (await console.get("/"))[0].status == 303
    finally:
        await console.close()


async def test_deleting_the_token_ends_its_sessions(
    console_server: ServerHandle, console: Console
) -> None:
    async with AsyncAdminClient(client_config(console_server)) as admin:
        token, secret = await admin.create_api_token("watcher", "viewer")
        await console.login(secret)
        assert (await console.get("/"))[0].status == 200
        await admin.delete_api_token(token.token_id)  # forgotten at once on this replica
    response, _ = await console.get("/")
    assert (response.status, response.headers["Location"]) == (303, "/login")
    assert len(console_server.console.sessions) == 0  # type: ignore[union-attr]


def test_the_store_keeps_hashes_and_a_bounded_number() -> None:
    clock = ManualClock()
    store = SessionStore(timedelta(hours=8), clock=clock, limit=50)
    first = store.create(ALICE)
    assert first not in repr(store._sessions)  # only its SHA-256 is kept
    assert store.get(first) is not None and store.get(first + "x") is None
    second = store.create(ALICE)
    for _ in range(49):
        clock.advance(0.001)
        store.create(ALICE)
    assert len(store) == 50
    assert store.get(first) is None and store.get(second) is not None  # the oldest went
    clock.advance(IDLE)
    store.create(ALICE)
    assert len(store) == 1  # a full store sweeps the expired first
    store.end_token(ALICE.token_id)
    assert len(store) == 0
