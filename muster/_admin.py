"""Admin clients (sync and asyncio) for ``AdminService``: tokens, tenants, agents,
certificates, spend budgets, pool settings and the audit trail.

Kept apart from the task clients because every call here needs the ``admin`` role.
Secrets returned by the create calls are handed back once and never logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from muster import _requests
from muster._base import AsyncClientBase, SyncClientBase
from muster._convert import (
    Seconds,
    agent_from_proto,
    api_token_from_proto,
    audit_event_from_proto,
    bootstrap_token_from_proto,
    budget_from_proto,
    pool_settings_from_proto,
    tenant_from_proto,
)
from muster._types import (
    Agent,
    ApiToken,
    AuditEvent,
    BootstrapToken,
    Budget,
    PoolSettings,
    Role,
    Tenant,
)
from muster.v1 import admin_pb2, admin_pb2_grpc


class AdminClient(SyncClientBase[admin_pb2_grpc.AdminServiceStub]):
    """Blocking admin client; use ``with`` or call :meth:`close`."""

    _new_stub = admin_pb2_grpc.AdminServiceStub

    def create_bootstrap_token(
        self,
        pool: str,
        labels: Mapping[str, str] | None = None,
        ttl: Seconds | None = None,
        max_uses: int | None = None,
        name_pattern: str | None = None,
        *,
        reenroll: str | None = None,
    ) -> tuple[BootstrapToken, str]:
        """Create a token for enrolling agents into ``pool``; returns (record, secret).

        None leaves the server defaults: one use, one hour, any agent name.
        ``reenroll``: a single-use token that re-enrolls that existing agent (revoked,
        expired or removed) with a fresh certificate; pass ``pool=""``, it keeps its own.
        """
        request = _requests.create_bootstrap_token(
            pool, labels, ttl, max_uses, name_pattern, reenroll
        )
        response = self._transport.unary(self._stub.CreateBootstrapToken, request)
        return bootstrap_token_from_proto(response.token), response.secret

    def list_bootstrap_tokens(self) -> list[BootstrapToken]:
        request = admin_pb2.ListBootstrapTokensRequest()
        response = self._transport.unary(self._stub.ListBootstrapTokens, request)
        return [bootstrap_token_from_proto(t) for t in response.tokens]

    def delete_bootstrap_token(self, token_id: str) -> None:
        request = admin_pb2.DeleteBootstrapTokenRequest(token_id=token_id)
        self._transport.unary(self._stub.DeleteBootstrapToken, request)

    def create_api_token(
        self,
        name: str,
        role: Role | str,
        ttl: Seconds | None = None,
        *,
        tenant: str | None = None,
    ) -> tuple[ApiToken, str]:
        """Create a client token; returns (record, secret). No ttl: it never expires.

        ``tenant``: the tenant it joins (created if new); None gives it a new tenant of
        its own, which never holds anything an earlier token of the same name owned.
        """
        request = _requests.create_api_token(name, role, ttl, tenant)
        response = self._transport.unary(self._stub.CreateApiToken, request)
        return api_token_from_proto(response.token), response.secret

    def list_api_tokens(self) -> list[ApiToken]:
        response = self._transport.unary(self._stub.ListApiTokens, admin_pb2.ListApiTokensRequest())
        return [api_token_from_proto(t) for t in response.tokens]

    def delete_api_token(self, token_id: str) -> None:
        request = admin_pb2.DeleteApiTokenRequest(token_id=token_id)
        self._transport.unary(self._stub.DeleteApiToken, request)

    def list_agents(self, pool: str | None = None) -> list[Agent]:
        request = admin_pb2.ListAgentsRequest(pool=pool or "")
        response = self._transport.unary(self._stub.ListAgents, request)
        return [agent_from_proto(a) for a in response.agents]

    def get_agent(self, agent_id: str) -> Agent:
        request = admin_pb2.GetAgentRequest(agent_id=agent_id)
        return agent_from_proto(self._transport.unary(self._stub.GetAgent, request))

    def set_agent_enabled(self, agent_id: str, enabled: bool) -> Agent:
        """Disable (closing its streams at once) or re-enable an agent."""
        request = admin_pb2.SetAgentEnabledRequest(agent_id=agent_id, enabled=enabled)
        return agent_from_proto(self._transport.unary(self._stub.SetAgentEnabled, request))

    def revoke_agent(self, agent_id: str, reason: str = "") -> list[str]:
        """Revoke every certificate of the agent; returns the serials revoked now."""
        request = admin_pb2.RevokeAgentRequest(agent_id=agent_id, reason=reason)
        return list(self._transport.unary(self._stub.RevokeAgent, request).serials)

    def revoke_certificate(self, serial: str, reason: str = "") -> list[str]:
        """Revoke a certificate and those renewed from it; returns the serials revoked now."""
        request = admin_pb2.RevokeCertificateRequest(serial=serial, reason=reason)
        return list(self._transport.unary(self._stub.RevokeCertificate, request).serials)

    def remove_agent(self, agent_id: str, reason: str = "") -> list[str]:
        """Retire an agent (certificates revoked, streams closed); only a re-enrollment
        token brings its id back. Returns the serials revoked now."""
        request = admin_pb2.RemoveAgentRequest(agent_id=agent_id, reason=reason)
        return list(self._transport.unary(self._stub.RemoveAgent, request).serials)

    def rotate_agents(self, agent_id: str | None = None, *, reason: str = "") -> int:
        """Make one agent (or, with None, every agent) renew its certificate now, or when
        it next connects; returns how many agents were asked."""
        request = admin_pb2.RotateAgentsRequest(
            agent_id=agent_id or "", all=agent_id is None, reason=reason
        )
        return self._transport.unary(self._stub.RotateAgents, request).agents

    def query_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        """Audit events newest first; None leaves a filter off (limit: server default)."""
        request = _requests.query_audit(actor, action, since, until, limit)
        response = self._transport.unary(self._stub.QueryAudit, request)
        return [audit_event_from_proto(e) for e in response.events]

    # Tenants, budgets and pool settings

    def list_tenants(self) -> list[Tenant]:
        response = self._transport.unary(self._stub.ListTenants, admin_pb2.ListTenantsRequest())
        return [tenant_from_proto(t) for t in response.tenants]

    def set_budget(self, scope: str, limit_usd: float, period: str | None = None) -> Budget:
        """Limit ``scope`` (``global``, ``tenant:<name>``, ``pool:<name>``) to ``limit_usd``
        per ``period`` (``day``, ``month`` or ``none``; None: the server default, month).

        The limit is kept in whole micro-dollars; 0 stops all AI work of the scope.
        """
        request = _requests.set_budget(scope, limit_usd, period)
        return budget_from_proto(self._transport.unary(self._stub.SetBudget, request))

    def get_budget(self, scope: str) -> Budget:
        """The budget with its current period's spent and reserved; NotFoundError if none."""
        request = admin_pb2.GetBudgetRequest(scope=scope)
        return budget_from_proto(self._transport.unary(self._stub.GetBudget, request))

    def list_budgets(self) -> list[Budget]:
        response = self._transport.unary(self._stub.ListBudgets, admin_pb2.ListBudgetsRequest())
        return [budget_from_proto(b) for b in response.budgets]

    def delete_budget(self, scope: str) -> None:
        """Stop limiting ``scope``; NotFoundError if it had no budget."""
        request = admin_pb2.DeleteBudgetRequest(scope=scope)
        self._transport.unary(self._stub.DeleteBudget, request)

    def set_pool_models(self, pool: str, models: Iterable[str]) -> PoolSettings:
        """Allow AI tasks in ``pool`` only these models (each needs a price on the
        server); an empty list allows any priced model again."""
        request = admin_pb2.SetPoolSettingsRequest(pool=pool, allowed_models=list(models))
        return pool_settings_from_proto(self._transport.unary(self._stub.SetPoolSettings, request))

    def get_pool_settings(self, pool: str) -> PoolSettings:
        """The pool's settings (the defaults for a pool nobody configured)."""
        request = admin_pb2.GetPoolSettingsRequest(pool=pool)
        return pool_settings_from_proto(self._transport.unary(self._stub.GetPoolSettings, request))

    def list_pool_settings(self) -> list[PoolSettings]:
        request = admin_pb2.ListPoolSettingsRequest()
        response = self._transport.unary(self._stub.ListPoolSettings, request)
        return [pool_settings_from_proto(p) for p in response.pools]


class AsyncAdminClient(AsyncClientBase["admin_pb2_grpc.AdminServiceAsyncStub"]):
    """Asyncio admin client; the same API as :class:`AdminClient`, awaited."""

    _new_stub = admin_pb2_grpc.AdminServiceStub

    async def create_bootstrap_token(
        self,
        pool: str,
        labels: Mapping[str, str] | None = None,
        ttl: Seconds | None = None,
        max_uses: int | None = None,
        name_pattern: str | None = None,
        *,
        reenroll: str | None = None,
    ) -> tuple[BootstrapToken, str]:
        request = _requests.create_bootstrap_token(
            pool, labels, ttl, max_uses, name_pattern, reenroll
        )
        response = await self._transport.unary(self._stub.CreateBootstrapToken, request)
        return bootstrap_token_from_proto(response.token), response.secret

    async def list_bootstrap_tokens(self) -> list[BootstrapToken]:
        request = admin_pb2.ListBootstrapTokensRequest()
        response = await self._transport.unary(self._stub.ListBootstrapTokens, request)
        return [bootstrap_token_from_proto(t) for t in response.tokens]

    async def delete_bootstrap_token(self, token_id: str) -> None:
        request = admin_pb2.DeleteBootstrapTokenRequest(token_id=token_id)
        await self._transport.unary(self._stub.DeleteBootstrapToken, request)

    async def create_api_token(
        self,
        name: str,
        role: Role | str,
        ttl: Seconds | None = None,
        *,
        tenant: str | None = None,
    ) -> tuple[ApiToken, str]:
        request = _requests.create_api_token(name, role, ttl, tenant)
        response = await self._transport.unary(self._stub.CreateApiToken, request)
        return api_token_from_proto(response.token), response.secret

    async def list_api_tokens(self) -> list[ApiToken]:
        request = admin_pb2.ListApiTokensRequest()
        response = await self._transport.unary(self._stub.ListApiTokens, request)
        return [api_token_from_proto(t) for t in response.tokens]

    async def delete_api_token(self, token_id: str) -> None:
        request = admin_pb2.DeleteApiTokenRequest(token_id=token_id)
        await self._transport.unary(self._stub.DeleteApiToken, request)

    async def list_agents(self, pool: str | None = None) -> list[Agent]:
        request = admin_pb2.ListAgentsRequest(pool=pool or "")
        response = await self._transport.unary(self._stub.ListAgents, request)
        return [agent_from_proto(a) for a in response.agents]

    async def get_agent(self, agent_id: str) -> Agent:
        request = admin_pb2.GetAgentRequest(agent_id=agent_id)
        return agent_from_proto(await self._transport.unary(self._stub.GetAgent, request))

    async def set_agent_enabled(self, agent_id: str, enabled: bool) -> Agent:
        request = admin_pb2.SetAgentEnabledRequest(agent_id=agent_id, enabled=enabled)
        return agent_from_proto(await self._transport.unary(self._stub.SetAgentEnabled, request))

    async def revoke_agent(self, agent_id: str, reason: str = "") -> list[str]:
        request = admin_pb2.RevokeAgentRequest(agent_id=agent_id, reason=reason)
        return list((await self._transport.unary(self._stub.RevokeAgent, request)).serials)

    async def revoke_certificate(self, serial: str, reason: str = "") -> list[str]:
        request = admin_pb2.RevokeCertificateRequest(serial=serial, reason=reason)
        return list((await self._transport.unary(self._stub.RevokeCertificate, request)).serials)

    async def remove_agent(self, agent_id: str, reason: str = "") -> list[str]:
        request = admin_pb2.RemoveAgentRequest(agent_id=agent_id, reason=reason)
        return list((await self._transport.unary(self._stub.RemoveAgent, request)).serials)

    async def rotate_agents(self, agent_id: str | None = None, *, reason: str = "") -> int:
        request = admin_pb2.RotateAgentsRequest(
            agent_id=agent_id or "", all=agent_id is None, reason=reason
        )
        return (await self._transport.unary(self._stub.RotateAgents, request)).agents

    async def query_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        request = _requests.query_audit(actor, action, since, until, limit)
        response = await self._transport.unary(self._stub.QueryAudit, request)
        return [audit_event_from_proto(e) for e in response.events]

    async def list_tenants(self) -> list[Tenant]:
        request = admin_pb2.ListTenantsRequest()
        response = await self._transport.unary(self._stub.ListTenants, request)
        return [tenant_from_proto(t) for t in response.tenants]

    async def set_budget(self, scope: str, limit_usd: float, period: str | None = None) -> Budget:
        request = _requests.set_budget(scope, limit_usd, period)
        return budget_from_proto(await self._transport.unary(self._stub.SetBudget, request))

    async def get_budget(self, scope: str) -> Budget:
        request = admin_pb2.GetBudgetRequest(scope=scope)
        return budget_from_proto(await self._transport.unary(self._stub.GetBudget, request))

    async def list_budgets(self) -> list[Budget]:
        request = admin_pb2.ListBudgetsRequest()
        response = await self._transport.unary(self._stub.ListBudgets, request)
        return [budget_from_proto(b) for b in response.budgets]

    async def delete_budget(self, scope: str) -> None:
        request = admin_pb2.DeleteBudgetRequest(scope=scope)
        await self._transport.unary(self._stub.DeleteBudget, request)

    async def set_pool_models(self, pool: str, models: Iterable[str]) -> PoolSettings:
        request = admin_pb2.SetPoolSettingsRequest(pool=pool, allowed_models=list(models))
        response = await self._transport.unary(self._stub.SetPoolSettings, request)
        return pool_settings_from_proto(response)

    async def get_pool_settings(self, pool: str) -> PoolSettings:
        request = admin_pb2.GetPoolSettingsRequest(pool=pool)
        response = await self._transport.unary(self._stub.GetPoolSettings, request)
        return pool_settings_from_proto(response)

    async def list_pool_settings(self) -> list[PoolSettings]:
        request = admin_pb2.ListPoolSettingsRequest()
        response = await self._transport.unary(self._stub.ListPoolSettings, request)
        return [pool_settings_from_proto(p) for p in response.pools]
