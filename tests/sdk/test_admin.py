"""AdminClient and AsyncAdminClient: what they send and how they read the replies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from muster import (
    AdminClient,
    AsyncAdminClient,
    Budget,
    ClientConfig,
    InvalidArgumentError,
    NotFoundError,
    Role,
)
from muster.v1 import admin_pb2

from .fakes import (
    API_SECRET,
    BOOTSTRAP_SECRET,
    EXPIRES,
    PERIOD_END,
    PERIOD_START,
    RESERVED,
    SPENT,
    State,
)


def test_bootstrap_tokens(config: ClientConfig, fake: State) -> None:
    with AdminClient(config) as admin:
        token, secret = admin.create_bootstrap_token(
            "gpu", {"zone": "a"}, ttl=timedelta(minutes=10), max_uses=3, name_pattern="gpu-*"
        )
        listed = admin.list_bootstrap_tokens()
        admin.delete_bootstrap_token("bt-1")
    sent: admin_pb2.CreateBootstrapTokenRequest = fake.requests[0]
    assert (sent.pool, dict(sent.labels), sent.max_uses, sent.name_pattern) == (
        "gpu",
        {"zone": "a"},
        3,
        "gpu-*",
    )
    assert sent.ttl.ToTimedelta() == timedelta(minutes=10)
    assert secret == BOOTSTRAP_SECRET
    assert secret not in repr(token)
    assert (token.token_id, token.pool, token.labels, token.max_uses) == (
        "bt-1",
        "gpu",
        {"zone": "a"},
        3,
    )
    assert token.expires_at == EXPIRES
    assert [(t.token_id, t.uses, t.max_uses) for t in listed] == [("bt-1", 1, 2)]
    assert fake.requests[2].token_id == "bt-1"


def test_bootstrap_token_defaults_are_left_to_the_server(config: ClientConfig, fake: State) -> None:
    with AdminClient(config) as admin:
        admin.create_bootstrap_token("default")
    sent: admin_pb2.CreateBootstrapTokenRequest = fake.requests[0]
    assert (sent.max_uses, sent.name_pattern, sent.HasField("ttl")) == (0, "", False)


def test_api_tokens(config: ClientConfig, fake: State) -> None:
    with AdminClient(config) as admin:
        token, secret = admin.create_api_token("ci", "submitter", ttl=3600)
        listed = admin.list_api_tokens()
        admin.delete_api_token("at-1")
        with pytest.raises(InvalidArgumentError, match=r"^role: unknown role"):
            admin.create_api_token("x", "root")
    sent: admin_pb2.CreateApiTokenRequest = fake.requests[0]
    assert (sent.name, sent.role) == ("ci", admin_pb2.ROLE_SUBMITTER)
    assert sent.ttl.ToTimedelta() == timedelta(hours=1)
    assert secret == API_SECRET
    assert (token.token_id, token.name, token.role) == ("at-1", "ci", Role.SUBMITTER)
    assert sent.tenant == ""  # the server gives the token a tenant of its own
    assert [(t.role, t.tenant) for t in listed] == [(Role.SUBMITTER, "acme")]
    assert len(fake.requests) == 3  # the bad role never left the client


def test_api_token_of_a_named_tenant_and_tenants(config: ClientConfig, fake: State) -> None:
    with AdminClient(config) as admin:
        token, _ = admin.create_api_token("ci-2", Role.SUBMITTER, tenant="acme")
        tenants = admin.list_tenants()
    assert fake.requests[0].tenant == "acme"
    assert token.tenant == "acme"
    assert [(t.name, t.tokens, t.created_at) for t in tenants] == [
        ("acme", 2, PERIOD_START),
        ("ci", 0, PERIOD_START),
    ]


def test_budgets(config: ClientConfig, fake: State) -> None:
    with AdminClient(config) as admin:
        set_ = admin.set_budget("tenant:acme", 10.5, "day")
        admin.set_budget("global", 0.1)
        got = admin.get_budget("tenant:acme")
        listed = admin.list_budgets()
        admin.delete_budget("global")
        with pytest.raises(NotFoundError, match="no budget"):
            admin.get_budget("global")
        with pytest.raises(InvalidArgumentError, match=r"^limit_usd: must be at least 0"):
            admin.set_budget("global", -1)
        with pytest.raises(InvalidArgumentError, match=r"^limit_usd: must be a finite"):
            admin.set_budget("global", float("nan"))
    sent: admin_pb2.SetBudgetRequest = fake.requests[0]
    assert (sent.scope, sent.limit_micros, sent.period) == ("tenant:acme", 10_500_000, "day")
    assert (fake.requests[1].limit_micros, fake.requests[1].period) == (100_000, "")
    assert set_ == got
    assert got == Budget(
        scope="tenant:acme",
        limit_micros=10_500_000,
        period="day",
        spent_micros=SPENT,
        reserved_micros=RESERVED,
        period_start=PERIOD_START,
        period_end=PERIOD_END,
        updated_at=PERIOD_START,
        updated_by="admin",
    )
    assert (got.limit_usd, got.spent_usd, got.reserved_usd) == (10.5, 1.25, 0.4)
    assert got.left_micros == 10_500_000 - SPENT - RESERVED
    assert got.left_usd == pytest.approx(8.85)
    assert [b.scope for b in listed] == ["global", "tenant:acme"]
    assert fake.requests[4].scope == "global"
    assert len(fake.requests) == 6  # the bad limits never left the client


def test_left_is_never_negative() -> None:
    over = Budget(scope="global", limit_micros=10, spent_micros=8, reserved_micros=5)
    assert (over.left_micros, over.left_usd) == (0, 0.0)


def test_pool_settings(config: ClientConfig, fake: State) -> None:
    with AdminClient(config) as admin:
        default = admin.get_pool_settings("gpu")
        set_ = admin.set_pool_models("gpu", ["claude-sonnet-4-5", "llama3"])
        admin.set_pool_models("cpu", [])
        got = admin.get_pool_settings("gpu")
        listed = admin.list_pool_settings()
    assert (default.pool, default.allowed_models, default.updated_at) == ("gpu", (), None)
    assert list(fake.requests[1].allowed_models) == ["claude-sonnet-4-5", "llama3"]
    assert set_ == got
    assert got.allowed_models == ("claude-sonnet-4-5", "llama3")
    assert (got.updated_at, got.updated_by) == (PERIOD_START, "admin")
    assert [(p.pool, p.allowed_models) for p in listed] == [
        ("cpu", ()),
        ("gpu", ("claude-sonnet-4-5", "llama3")),
    ]


def test_agents_and_certificates(config: ClientConfig, fake: State) -> None:
    with AdminClient(config) as admin:
        agents = admin.list_agents(pool="gpu")
        agent = admin.get_agent("build-02")
        disabled = admin.set_agent_enabled("build-02", False)
        serials = admin.revoke_agent("build-02", reason="lost laptop")
        admin.revoke_certificate("0abc", reason="key leak")
    assert fake.requests[0].pool == "gpu"
    assert [a.agent_id for a in agents] == ["build-01"]
    assert agent.spiffe_id == "spiffe://example.org/agent/build-02"
    assert agent.labels == {"zone": "a"}
    assert agent.certificates[0].serial == "0abc"
    assert agent.certificates[0].not_after == EXPIRES
    assert agent.certificates[0].revoked_at is None
    assert disabled.enabled is False
    assert serials == ["0abc", "0def"]
    assert fake.requests[3].reason == "lost laptop"
    assert (fake.requests[4].serial, fake.requests[4].reason) == ("0abc", "key leak")


def test_query_audit(config: ClientConfig, fake: State) -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    with AdminClient(config) as admin:
        events = admin.query_audit(actor="admin", action="token.create", since=since, limit=10)
    sent: admin_pb2.QueryAuditRequest = fake.requests[0]
    assert (sent.actor, sent.action, sent.limit) == ("admin", "token.create", 10)
    assert sent.since.ToDatetime(tzinfo=UTC) == since
    assert not sent.HasField("until")
    assert events[0].id == 7
    assert events[0].details_json() == {"pool": "gpu"}
    assert events[0].time == since


async def test_async_admin_client(config: ClientConfig, fake: State) -> None:
    async with AsyncAdminClient(config) as admin:
        token, secret = await admin.create_bootstrap_token("gpu", max_uses=2)
        assert (token.token_id, secret) == ("bt-1", BOOTSTRAP_SECRET)
        assert len(await admin.list_bootstrap_tokens()) == 1
        await admin.delete_bootstrap_token("bt-1")
        api, api_secret = await admin.create_api_token("ops", Role.ADMIN)
        assert (api.role, api_secret) == (Role.ADMIN, API_SECRET)
        assert len(await admin.list_api_tokens()) == 1
        await admin.delete_api_token("at-1")
        assert (await admin.list_agents())[0].agent_id == "build-01"
        assert (await admin.get_agent("a-1")).agent_id == "a-1"
        assert (await admin.set_agent_enabled("a-1", True)).enabled
        assert await admin.revoke_agent("a-1") == ["0abc", "0def"]
        await admin.revoke_certificate("0abc")
        assert (await admin.query_audit())[0].action == "token.create"
        tenant_token, _ = await admin.create_api_token("ops-2", "admin", tenant="ops")
        assert tenant_token.tenant == "ops"
        assert [t.name for t in await admin.list_tenants()] == ["acme", "ci"]
        budget = await admin.set_budget("pool:gpu", 3, "none")
        assert (budget.limit_micros, budget.period, budget.period_end) == (3_000_000, "none", None)
        assert await admin.get_budget("pool:gpu") == budget
        assert await admin.list_budgets() == [budget]
        await admin.delete_budget("pool:gpu")
        assert (await admin.set_pool_models("gpu", ("m",))).allowed_models == ("m",)
        assert (await admin.get_pool_settings("gpu")).allowed_models == ("m",)
        assert len(await admin.list_pool_settings()) == 1
    assert len(fake.requests) == 21
