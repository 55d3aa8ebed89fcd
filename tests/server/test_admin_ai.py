"""AdminService for AI work: spend budgets and pool model lists, against a real server.

Budget definitions live in the database; their spent and reserved figures come from the
quota store (in-process, or Redis with MUSTER_TEST_BACKEND=postgres), so the tests
reserve and settle through the server's own ``Quotas`` to see the figures move.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from muster import (
    AsyncAdminClient,
    AsyncClient,
    Budget,
    InvalidArgumentError,
    MusterError,
    NotFoundError,
)
from muster.cli import main
from muster.server.ai.budgets import BudgetRule
from muster.server.ai.prices import PriceTable
from muster.server.app import ServerHandle, start_server
from muster.v1 import admin_pb2, admin_pb2_grpc, agent_pb2
from tests.agentsim import Enroller, SimAgent
from tests.conftest import client_config, server_config

pytestmark = pytest.mark.slow


def status_of(err: MusterError) -> grpc.StatusCode:
    cause = err.__cause__
    assert isinstance(cause, grpc.RpcError)
    code: grpc.StatusCode = cause.code()
    return code


@pytest.fixture
async def stub(server: ServerHandle) -> AsyncIterator[admin_pb2_grpc.AdminServiceStub]:
    """The raw stub, for requests the SDK refuses to send (a negative limit, say)."""
    bundle = (server.config.ca_dir / "bundle.pem").read_bytes()
    async with grpc.aio.secure_channel(
        server.api_address, grpc.ssl_channel_credentials(bundle)
    ) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def admin_metadata(server: ServerHandle) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {server.config.admin_token_file.read_text().strip()}")]


def month_window(now: datetime) -> tuple[datetime, datetime]:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


async def test_set_get_list_delete_a_budget(server: ServerHandle, admin: AsyncAdminClient) -> None:
    before = datetime.now(UTC)
    budget = await admin.set_budget("tenant:acme", 10)
    start, end = month_window(datetime.now(UTC))
    assert budget == Budget(
        scope="tenant:acme",
        limit_micros=10_000_000,
        period="month",
        period_start=start,
        period_end=end,
        updated_at=budget.updated_at,
        updated_by="admin",
    )
    assert budget.updated_at is not None and budget.updated_at >= before - timedelta(seconds=1)
    assert await admin.get_budget("tenant:acme") == budget

    daily = await admin.set_budget("tenant:acme", 2.5, "day")
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert (daily.limit_micros, daily.period) == (2_500_000, "day")
    assert (daily.period_start, daily.period_end) == (today, today + timedelta(days=1))
    forever = await admin.set_budget("global", 0, "none")
    assert (forever.limit_micros, forever.period_start, forever.period_end) == (0, None, None)
    await admin.set_budget("pool:gpu", 100)
    assert [b.scope for b in await admin.list_budgets()] == ["global", "pool:gpu", "tenant:acme"]

    await admin.delete_budget("tenant:acme")
    with pytest.raises(NotFoundError, match="no budget for scope 'tenant:acme'") as info:
        await admin.get_budget("tenant:acme")
    assert status_of(info.value) is grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError) as info:
        await admin.delete_budget("tenant:acme")
    assert status_of(info.value) is grpc.StatusCode.NOT_FOUND
    assert [b.scope for b in await admin.list_budgets()] == ["global", "pool:gpu"]

    await server.flush_audit()
    sets = await admin.query_audit(action="budget.set", limit=10)
    assert [(e.target, e.actor, e.outcome) for e in reversed(sets)] == [
        ("tenant:acme", "admin", "ok"),
        ("tenant:acme", "admin", "ok"),
        ("global", "admin", "ok"),
        ("pool:gpu", "admin", "ok"),
    ]
    assert sets[-1].details_json() == {"limit_micros": 10_000_000, "period": "month"}
    assert sets[-2].details_json() == {
        "limit_micros": 2_500_000,
        "period": "day",
        "previous_limit_micros": 10_000_000,
        "previous_period": "month",
    }
    deletes = await admin.query_audit(action="budget.delete", limit=10)
    assert [(e.target, e.details_json()) for e in deletes] == [
        ("tenant:acme", {"limit_micros": 2_500_000, "period": "day"})
    ]


async def test_spent_and_reserved_come_from_the_quota_store(
    server: ServerHandle, admin: AsyncAdminClient
) -> None:
    budget = await admin.set_budget("pool:gpu", 1, "day")
    assert (budget.spent_micros, budget.reserved_micros, budget.left_micros) == (0, 0, 1_000_000)
    quotas = server._quotas
    hold = BudgetRule("pool:gpu", 1_000_000, "day").hold(datetime.now(UTC))
    assert (await quotas.reserve_budget("r-1", 400_000, [hold])).allowed
    assert (await quotas.reserve_budget("r-2", 250_000, [hold])).allowed
    held = await admin.get_budget("pool:gpu")
    assert (held.spent_micros, held.reserved_micros, held.left_micros) == (0, 650_000, 350_000)
    assert await quotas.settle_budget("r-1", 123_456)
    assert await quotas.release_budget("r-2")
    [listed] = await admin.list_budgets()
    assert (listed.spent_micros, listed.reserved_micros) == (123_456, 0)
    assert listed.left_usd == pytest.approx(0.876544)
    # Another period's key is another budget: a monthly rule starts from nothing.
    monthly = await admin.set_budget("pool:gpu", 1, "month")
    assert (monthly.spent_micros, monthly.reserved_micros) == (0, 0)


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("", "scope: "),
        ("everything", "scope: "),
        ("tenant:", "scope: "),
        ("tenant:Acme", "scope: "),
        ("team:acme", "scope: "),
        ("pool:gpu\x1b[2J", "scope: "),
        ("task:t-1", "scope: task budgets are per-task caps"),
    ],
)
async def test_bad_scopes_are_invalid_argument(
    admin: AsyncAdminClient, scope: str, message: str
) -> None:
    for call in (
        admin.set_budget(scope, 1),
        admin.get_budget(scope),
        admin.delete_budget(scope),
    ):
        with pytest.raises(InvalidArgumentError, match=f"^{message}") as info:
            await call
        assert status_of(info.value) is grpc.StatusCode.INVALID_ARGUMENT
    assert await admin.list_budgets() == []


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (admin_pb2.SetBudgetRequest(scope="global", limit_micros=-1), "limit_micros: "),
        (admin_pb2.SetBudgetRequest(scope="global", limit_micros=10**15 + 1), "limit_micros: "),
        (admin_pb2.SetBudgetRequest(scope="global", limit_micros=1, period="week"), "period: "),
        (admin_pb2.SetBudgetRequest(scope="global", limit_micros=1, period="Month"), "period: "),
    ],
)
async def test_bad_limits_and_periods_are_invalid_argument(
    server: ServerHandle,
    stub: admin_pb2_grpc.AdminServiceStub,
    request_: admin_pb2.SetBudgetRequest,
    message: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SetBudget(request_, metadata=admin_metadata(server))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(message)


async def test_budgets_and_pools_need_the_admin_role(
    server: ServerHandle, admin: AsyncAdminClient, stub: admin_pb2_grpc.AdminServiceStub
) -> None:
    _, secret = await admin.create_api_token("ci", "submitter")
    metadata = [("authorization", f"Bearer {secret}")]
    for call in (
        stub.SetBudget(
            admin_pb2.SetBudgetRequest(scope="global", limit_micros=1), metadata=metadata
        ),
        stub.ListBudgets(admin_pb2.ListBudgetsRequest(), metadata=metadata),
        stub.SetPoolSettings(admin_pb2.SetPoolSettingsRequest(pool="gpu"), metadata=metadata),
        stub.GetPoolSettings(admin_pb2.GetPoolSettingsRequest(pool="gpu"), metadata=metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await admin.list_budgets() == []


# Pool settings


async def test_pool_models(server: ServerHandle, admin: AsyncAdminClient) -> None:
    default = await admin.get_pool_settings("gpu")
    assert (default.pool, default.allowed_models, default.updated_at) == ("gpu", (), None)
    assert await admin.list_pool_settings() == []

    models = ["claude-sonnet-4-5", "claude-haiku-4-5-20251001", "llama3.1:8b", "claude-sonnet-4-5"]
    settings = await admin.set_pool_models("gpu", models)
    # Each once, in the order given; a dated alias and a local (Ollama) model are priced.
    assert settings.allowed_models == (
        "claude-sonnet-4-5",
        "claude-haiku-4-5-20251001",
        "llama3.1:8b",
    )
    assert settings.updated_by == "admin" and settings.updated_at is not None
    assert await admin.get_pool_settings("gpu") == settings
    await admin.set_pool_models("cpu", ["qwen2.5"])
    assert [p.pool for p in await admin.list_pool_settings()] == ["cpu", "gpu"]

    cleared = await admin.set_pool_models("gpu", [])
    assert cleared.allowed_models == ()
    assert (await admin.get_pool_settings("gpu")).allowed_models == ()

    await server.flush_audit()
    events = await admin.query_audit(action="pool.set", limit=10)
    assert [(e.target, e.details_json()["allowed_models"]) for e in reversed(events)] == [
        ("gpu", ["claude-sonnet-4-5", "claude-haiku-4-5-20251001", "llama3.1:8b"]),
        ("cpu", ["qwen2.5"]),
        ("gpu", []),
    ]


@pytest.mark.parametrize(
    ("pool", "models", "message"),
    [
        ("gpu", ["claude-sonet-4-5"], "allowed_models: 'claude-sonet-4-5' has no price"),
        ("gpu", ["claude-sonnet-4-5", "claude-9"], "allowed_models: 'claude-9' has no price"),
        ("gpu", [""], "allowed_models: '' is not a valid model name"),
        ("gpu", ["two words"], "allowed_models: 'two words' is not a valid model name"),
        ("gpu", ["m\x1b[2J"], "allowed_models: 'm\\x1b[2J' is not a valid model name"),
        ("gpu", [f"m{i}" for i in range(101)], "allowed_models: at most 100 models"),
        ("GPU", ["claude-sonnet-4-5"], "pool: 'GPU' is not valid"),
        ("", [], "pool: '' is not valid"),
    ],
)
async def test_bad_pool_settings_are_invalid_argument(
    admin: AsyncAdminClient, pool: str, models: list[str], message: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await admin.set_pool_models(pool, models)
    assert status_of(info.value) is grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value).startswith(message)
    assert await admin.list_pool_settings() == []


def test_the_models_these_tests_name_are_priced() -> None:
    priced = PriceTable.load().models("anthropic")
    assert "claude-sonnet-4-5" in priced  # the model the tests above rely on


async def test_budget_figures_are_unavailable_without_the_quota_store(tmp_path: Path) -> None:
    """Spend fails closed: with Redis unreachable the figures are UNAVAILABLE, never a
    made-up zero, while the definition itself is still saved."""
    config = server_config(tmp_path / "data", redis_url="redis://127.0.0.1:1/0")
    handle = await start_server(config)
    try:
        async with AsyncAdminClient(client_config(handle)) as admin:
            with pytest.raises(MusterError, match="budget global was saved, but") as info:
                await admin.set_budget("global", 5)
            assert status_of(info.value) is grpc.StatusCode.UNAVAILABLE
            for call in (admin.get_budget("global"), admin.list_budgets()):
                with pytest.raises(MusterError, match="quota store is unreachable") as info:
                    await call
                assert status_of(info.value) is grpc.StatusCode.UNAVAILABLE
            await admin.delete_budget("global")  # the definition was there
    finally:
        await handle.stop(grace=0.5)


# The CLI against the real server (blocking, so it runs in a thread beside the server)


async def cli(server: ServerHandle, *args: str) -> int:
    conn = ["--addr", server.api_address, "--token-file", str(server.config.admin_token_file)]
    conn += ["--ca-file", str(server.config.ca_dir / "bundle.pem")]
    return await asyncio.to_thread(main, [*args, *conn])


async def test_the_cli_spellings_against_the_server(
    server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli(server, "budget", "set", "tenant:acme", "--limit-usd", "12.5") == 0
    out = capsys.readouterr().out
    assert "limit:    12.50 USD per month" in out and "left:     12.50 USD" in out
    assert await cli(server, "budget", "set", "global", "--limit-usd", "0", "--period", "none") == 0
    assert await cli(server, "budget", "get", "global") == 0
    assert "period:   none (all time)" in capsys.readouterr().out
    assert await cli(server, "budget", "list") == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()]
    assert [r[:6] for r in rows[1:]] == [
        ["global", "0.00", "0.00", "0.00", "0.00", "none"],
        ["tenant:acme", "12.50", "0.00", "0.00", "12.50", "month"],
    ]
    assert await cli(server, "budget", "delete", "global") == 0
    assert await cli(server, "budget", "get", "global") == 1
    assert await cli(server, "budget", "set", "task:t-1", "--limit-usd", "1") == 1
    err = capsys.readouterr().err
    assert "muster: error: no budget for scope 'global'" in err
    assert "muster: error: scope: task budgets are per-task caps" in err

    assert await cli(server, "pool", "set", "gpu", "--models", "claude-sonnet-4-5,llama3.1") == 0
    assert "models:  claude-sonnet-4-5,llama3.1" in capsys.readouterr().out
    assert await cli(server, "pool", "set", "gpu", "--models", "claude-nope") == 1
    assert "'claude-nope' has no price" in capsys.readouterr().err
    assert await cli(server, "pool", "set", "cpu", "--models", "") == 0
    assert await cli(server, "pool", "list") == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()]
    assert [r[:2] for r in rows[-2:]] == [["cpu", "any"], ["gpu", "claude-sonnet-4-5,llama3.1"]]

    assert (
        await cli(server, "api-token", "create", "ci", "--role", "submitter", "--tenant", "acme")
        == 0
    )
    assert (
        await cli(server, "api-token", "create", "ci", "--role", "submitter", "--tenant", "Acme!")
        == 1
    )
    assert "muster: error: tenant: 'Acme!' is not valid" in capsys.readouterr().err
    assert await cli(server, "tenant", "list") == 0
    rows = [r.split()[:2] for r in capsys.readouterr().out.splitlines()]
    assert ["acme", "1"] in rows and ["admin", "1"] in rows
    assert await cli(server, "api-token", "list") == 0
    assert any(
        r.split()[1:4] == ["ci", "submitter", "acme"] for r in capsys.readouterr().out.splitlines()
    )


HOSTILE = "ok\x1b]0;pwned\x07\x1b[2J\u202egnp.exe\x00\rfake prompt$ \x9b31m\u2066"
RAW = ("\x1b", "\x07", "\u202e", "\x00", "\r", "\x9b", "\u2066")


async def test_agent_text_reaches_the_terminal_neutralised(
    server: ServerHandle,
    enroller: Enroller,
    client: AsyncClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What an agent reports (output, error) is stored byte for byte and shown by the CLI
    with none of its control, escape or bidi characters live."""
    agent = SimAgent.of(await enroller.enroll("d1"))
    await agent.hello(max_concurrency=2)
    good = await client.submit("echo", b"x")
    bad = await client.submit("echo", b"y")
    assignments = {}
    for _ in range(2):
        assignment = await agent.expect("assignment")
        assignments[assignment.task_id] = assignment
        agent.send(accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=1))
    await agent.finish(assignments[good.task_id], output=f"line one\n{HOSTILE}".encode())
    # No NUL in the error: Postgres text columns cannot hold one (the output is bytes).
    error = "broke: " + HOSTILE.replace("\x00", "")
    await agent.finish(assignments[bad.task_id], outcome=agent_pb2.OUTCOME_FAILED, error=error)
    stored = await client.wait(good.task_id, timeout=10)
    assert stored.output == f"line one\n{HOSTILE}".encode()  # byte for byte
    assert (await client.wait(bad.task_id, timeout=10)).error.startswith("broke: ok\x1b]")
    await agent.close()

    capsys.readouterr()
    for args in (
        ("task", "get", good.task_id),
        ("task", "get", bad.task_id),
        ("task", "list"),
        ("task", "watch", bad.task_id),
        ("audit", "query"),
    ):
        await cli(server, *args)
        captured = capsys.readouterr()
        shown = captured.out + captured.err
        assert not [c for c in RAW if c in shown], (args, shown)
    assert await cli(server, "task", "get", good.task_id) == 0
    assert "ok\\x1b]0;pwned\\x07\\x1b[2J\\u202egnp.exe\\x00\\rfake prompt$ \\x9b31m\\u2066" in (
        capsys.readouterr().out
    )
    assert await cli(server, "task", "get", good.task_id, "--json") == 0
    assert json.loads(capsys.readouterr().out)["output"] == f"line one\n{HOSTILE}"


async def test_a_reader_that_leaves_early_is_not_an_error(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`muster budget list | head`: a closed pipe ends the command quietly, exit 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert await cli(server, "budget", "list") == 0
    stdout.close()  # flushes into /dev/null: the command pointed its stdout there
