"""Tenants: explicit owners of tasks and idempotency keys, never a token's re-usable name.

Against a real server (embedded, or Postgres + Redis with MUSTER_TEST_BACKEND=postgres),
plus the migration that turns existing token names into tenants, on both databases.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import column, insert, select, table
from sqlalchemy.sql.expression import TableClause

from muster import (
    AsyncAdminClient,
    AsyncClient,
    InvalidArgumentError,
    MusterError,
    NotFoundError,
    Role,
)
from muster.server import tokens
from muster.server.app import ServerHandle, start_server
from muster.server.storage import migrate
from muster.server.storage.database import Database
from muster.server.storage.models import ApiToken, Task, Tenant
from muster.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import client_config, server_config
from tests.pg import fresh_database

pytestmark = pytest.mark.slow


def status_of(err: MusterError) -> grpc.StatusCode:
    """The exact status code behind an SDK error."""
    cause = err.__cause__
    assert isinstance(cause, grpc.RpcError)
    code: grpc.StatusCode = cause.code()
    return code


async def as_client(server: ServerHandle, secret: str) -> AsyncClient:
    return AsyncClient(client_config(server, secret))


async def test_a_reused_token_name_sees_nothing_of_the_old_tenant(
    server: ServerHandle, admin: AsyncAdminClient
) -> None:
    old_token, old_secret = await admin.create_api_token("alice", Role.SUBMITTER)
    assert old_token.tenant == "alice"
    async with await as_client(server, old_secret) as old:
        task = await old.submit("echo", b"mine", pool="nobody", idempotency_key="k-1")
    assert (task.owner, task.submitted_by) == ("alice", "alice")
    await admin.delete_api_token(old_token.token_id)

    new_token, new_secret = await admin.create_api_token("alice", Role.SUBMITTER)
    assert new_token.name == "alice"
    assert new_token.tenant == f"alice-{new_token.token_id}"
    async with await as_client(server, new_secret) as new:
        with pytest.raises(NotFoundError) as info:
            await new.get(task.task_id)
        assert status_of(info.value) is grpc.StatusCode.NOT_FOUND
        with pytest.raises(NotFoundError):
            await new.cancel(task.task_id)
        assert await new.list() == []
        again = await new.submit("echo", b"theirs", pool="nobody", idempotency_key="k-1")
        assert again.task_id != task.task_id
        assert (again.owner, again.submitted_by, again.payload) == (
            new_token.tenant,
            "alice",
            b"theirs",
        )
        assert [t.task_id for t in await new.list()] == [again.task_id]

    tenants = {t.name: t for t in await admin.list_tenants()}
    assert tenants["alice"].tokens == 0  # the deleted token no longer counts
    assert tenants[new_token.tenant].tokens == 1


async def test_tokens_of_one_tenant_share_tasks_and_idempotency_keys(
    server: ServerHandle, admin: AsyncAdminClient
) -> None:
    first, first_secret = await admin.create_api_token("ci-1", "submitter", tenant="acme")
    second, second_secret = await admin.create_api_token("ci-2", "submitter", tenant="acme")
    _, other_secret = await admin.create_api_token("ci-3", "submitter")
    assert (first.tenant, second.tenant) == ("acme", "acme")
    async with (
        await as_client(server, first_secret) as one,
        await as_client(server, second_secret) as two,
        await as_client(server, other_secret) as other,
    ):
        task = await one.submit("echo", b"shared", pool="nobody", idempotency_key="nightly")
        assert (task.owner, task.submitted_by) == ("acme", "ci-1")
        seen = await two.get(task.task_id)
        assert seen.task_id == task.task_id
        assert [t.task_id for t in await two.list()] == [task.task_id]
        repeat = await two.submit("echo", b"shared", pool="nobody", idempotency_key="nightly")
        assert repeat.task_id == task.task_id
        assert repeat.submitted_by == "ci-1"  # the first submission stands
        with pytest.raises(NotFoundError):
            await other.get(task.task_id)
        assert (await other.submit("echo", pool="nobody", idempotency_key="nightly")).task_id != (
            task.task_id
        )
        cancelled = await two.cancel(task.task_id, reason="a colleague's")
        assert cancelled.is_terminal

    listed = {t.name: t.tokens for t in await admin.list_tenants()}
    assert listed["acme"] == 2
    assert listed["ci-3"] == 1
    assert [t.tenant for t in await admin.list_api_tokens() if t.name.startswith("ci-")] == [
        "acme",
        "acme",
        "ci-3",
    ]
    await server.flush_audit()
    created = await admin.query_audit(action="api_token.create", limit=10)
    assert {e.details_json().get("tenant") for e in created} >= {"acme", "ci-3"}


@pytest.mark.parametrize(
    "tenant", ["Acme", "-acme", "acme corp", "a" * 64, "acme/x", "tenant:acme", "ac\x1bme"]
)
async def test_a_bad_tenant_name_is_invalid_argument(admin: AsyncAdminClient, tenant: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^tenant: ") as info:
        await admin.create_api_token("ci", "submitter", tenant=tenant)
    assert status_of(info.value) is grpc.StatusCode.INVALID_ARGUMENT
    assert "ci" not in {t.name for t in await admin.list_api_tokens()}


async def test_list_tenants_needs_the_admin_role(
    server: ServerHandle, admin: AsyncAdminClient
) -> None:
    _, secret = await admin.create_api_token("bob", "submitter")
    bundle = (server.config.ca_dir / "bundle.pem").read_bytes()
    async with grpc.aio.secure_channel(
        server.api_address, grpc.ssl_channel_credentials(bundle)
    ) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListTenants(
                admin_pb2.ListTenantsRequest(), metadata=[("authorization", f"Bearer {secret}")]
            )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


# The migration: token names become tenants


@pytest.fixture(params=["sqlite", "postgresql"])
async def url_at_0001(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each backend, migrated to revision 0001 only."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'muster.db'}"
        await migrate.upgrade(url, "0001")
        yield url
    else:
        async with fresh_database(migrated=False) as url:
            await migrate.upgrade(url, "0001")
            yield url


def at_0001(model: Any, row: dict[str, Any]) -> TableClause:
    """``model``'s table with only the columns ``row`` names (those of revision 0001),
    typed as the models type them (aware datetimes, JSON)."""
    columns = model.__table__.c
    return table(model.__tablename__, *(column(name, columns[name].type) for name in row))


def _token_row(name: str, minted: tokens.MintedToken, **extra: Any) -> dict[str, Any]:
    return {
        "token_id": minted.token_id,
        "name": name,
        "secret_hash": minted.secret_hash,
        "role": "submitter",
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "expires_at": None,
        "deleted_at": None,
        **extra,
    }


def _task_row(task_id: str, owner: str, key: str | None) -> dict[str, Any]:
    now = datetime(2026, 2, 1, tzinfo=UTC)
    return {
        "task_id": task_id,
        "kind": "echo",
        "payload": b"old",
        "pool": "nobody",
        "selector": {},
        "priority": 0,
        "state": "QUEUED",
        "attempt": 1,
        "max_attempts": 3,
        "owner": owner,
        "idempotency_key": key,
        "error": "",
        "cancel_requested": False,
        "created_at": now,
        "updated_at": now,
        "queued_at": now,
        "input_tokens": 0,
        "output_tokens": 0,
        "cost_micros": 0,
    }


async def test_the_migration_makes_a_tenant_of_every_token_name(
    url_at_0001: str, tmp_path: Path
) -> None:
    ci = tokens.mint(tokens.API)
    ci_again = tokens.mint(tokens.API)
    gone = tokens.mint(tokens.API)
    db = Database(url_at_0001, audit_chain="test")
    try:
        async with db.engine.begin() as conn:
            await conn.execute(
                insert(at_0001(ApiToken, _token_row("x", ci))),
                [
                    _token_row("ci", ci),
                    _token_row("ci", ci_again, created_at=datetime(2026, 3, 1, tzinfo=UTC)),
                    _token_row("old-team", gone, deleted_at=datetime(2026, 4, 1, tzinfo=UTC)),
                ],
            )
            await conn.execute(
                insert(at_0001(Task, _task_row("x", "y", None))),
                [
                    _task_row("t-ci", "ci", "nightly"),
                    _task_row("t-old", "old-team", None),
                    _task_row("t-orphan", "vanished", "k"),
                ],
            )
        await migrate.upgrade(db)

        async with db.transaction() as session:
            tenants = {t.name: t for t in (await session.execute(select(Tenant))).scalars()}
            token_tenants = {
                t.token_id: t.tenant for t in (await session.execute(select(ApiToken))).scalars()
            }
            tasks = {t.task_id: t for t in (await session.execute(select(Task))).scalars()}
    finally:
        await db.close()
    assert sorted(tenants) == ["ci", "old-team", "vanished"]
    assert tenants["ci"].created_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert {t.created_by for t in tenants.values()} == {"migration 0002"}
    assert token_tenants == {ci.token_id: "ci", ci_again.token_id: "ci", gone.token_id: "old-team"}
    assert {k: (t.owner, t.submitted_by) for k, t in tasks.items()} == {
        "t-ci": ("ci", "ci"),
        "t-old": ("old-team", "old-team"),
        "t-orphan": ("vanished", "vanished"),
    }

    # The server runs on the migrated data: both old "ci" tokens still see their task
    # and key, and a new token named like the deleted one owns nothing.
    handle = await start_server(server_config(tmp_path / "data", database_url=url_at_0001))
    try:
        async with await as_client(handle, ci_again.secret) as client:
            assert [t.task_id for t in await client.list()] == ["t-ci"]
            repeat = await client.submit("echo", b"new", pool="nobody", idempotency_key="nightly")
            assert repeat.task_id == "t-ci"
        async with AsyncAdminClient(client_config(handle)) as admin:
            token, secret = await admin.create_api_token("old-team", "submitter")
            assert token.tenant == f"old-team-{token.token_id}"
            counts = {t.name: t.tokens for t in await admin.list_tenants()}
        assert (counts["ci"], counts["old-team"], counts["vanished"]) == (2, 0, 0)
        async with await as_client(handle, secret) as newcomer:
            assert await newcomer.list() == []
            with pytest.raises(NotFoundError):
                await newcomer.get("t-old")
    finally:
        await handle.stop(grace=1.0)
