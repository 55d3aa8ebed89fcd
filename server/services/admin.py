"""AdminService: bootstrap and API tokens, tenants, agents, revocation, spend budgets,
pool settings and the audit trail.

Every mutation commits together with its audit row. Revocation and disabling also close
the agent's open streams at once through the hub.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from sqlalchemy import select

from muster.server import tokens
from muster.server.ai.budgets import PERIODS, check_scope
from muster.server.ai.prices import PriceTable
from muster.server.audit import AuditRecord, record_in
from muster.server.dispatch.fanout import Fanout
from muster.server.dispatch.presence import Presence
from muster.server.metrics import MusterMetrics
from muster.server.principals import current_principal
from muster.server.quotas import Quotas, QuotaStoreUnavailable
from muster.server.services import convert
from muster.server.services.context import peer_address, request_id
from muster.server.services.errors import ServiceError, invalid, not_found
from muster.server.services.validation import (
    NAME_PATTERN,
    check_labels,
    check_name,
    check_text,
    duration,
    timestamp,
)
from muster.server.storage import budgets, identities, tenants
from muster.server.storage import presence as presence_store
from muster.server.storage.database import Database
from muster.server.storage.models import ApiToken, AuditEvent, BootstrapToken, Budget
from muster.server.storage.types import utcnow
from muster.server.token_cache import ApiTokenCache
from muster.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_BOOTSTRAP_TTL = timedelta(hours=1)
MAX_BOOTSTRAP_TTL = timedelta(days=30)
MAX_USES = 10_000
MAX_AUDIT_ROWS = 1000
MAX_POOL_MODELS = 100
MAX_LIMIT_MICROS = 10**15
"""A billion dollars: anything above is a typo, and stays far from int64 overflow in sums."""
PRICED_PROVIDERS = ("anthropic", "ollama")
"""Where a pool's allowed model must have a price (any one of them)."""
MAX_API_TOKEN_TTL = timedelta(days=3660)
"""About ten years: a longer-lived token is one that never expires (ttl 0)."""
MAX_ID = 128
"""Token ids, agent ids, serials given to look something up (opaque strings)."""
MAX_REASON = 500
MAX_AUDIT_FILTER = 200
MODEL = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:/@-]{0,99}\Z")


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        db: Database,
        fanout: Fanout,
        metrics: MusterMetrics,
        trust_domain: str,
        token_cache: ApiTokenCache,
        quotas: Quotas,
        prices: PriceTable,
        presence: Presence,
    ) -> None:
        self._db = db
        self._presence = presence
        self._quotas = quotas
        self._prices = prices
        self._token_cache = token_cache
        self._fanout = fanout
        self._hub = fanout.hub
        self._metrics = metrics
        self._trust_domain = trust_domain

    def _audit(
        self, context: grpc.aio.ServicerContext[Any, Any], action: str, target: str, **details: Any
    ) -> AuditRecord:
        return AuditRecord(
            actor=current_principal.get().name,
            action=action,
            target=target,
            peer=peer_address(context),
            request_id=request_id(context),
            details=details,
        )

    # Bootstrap tokens

    async def CreateBootstrapToken(
        self,
        request: admin_pb2.CreateBootstrapTokenRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.CreateBootstrapTokenRequest, admin_pb2.CreateBootstrapTokenResponse
        ],
    ) -> admin_pb2.CreateBootstrapTokenResponse:
        pool = check_name(request.pool or "default", "pool")
        labels = check_labels(dict(request.labels), "labels")
        pattern = check_name(request.name_pattern or "*", "name_pattern", NAME_PATTERN)
        max_uses = request.max_uses or 1
        if not 1 <= max_uses <= MAX_USES:
            raise invalid(f"max_uses: must be between 1 and {MAX_USES}")
        ttl = DEFAULT_BOOTSTRAP_TTL
        if request.HasField("ttl"):
            ttl = duration(request.ttl, "ttl", maximum=MAX_BOOTSTRAP_TTL, maximum_text="30 days")
        if not timedelta(seconds=1) <= ttl <= MAX_BOOTSTRAP_TTL:
            raise invalid("ttl: must be between 1s and 30 days")
        reenroll = check_text(request.reenroll_agent_id, "reenroll_agent_id", MAX_ID)
        minted = tokens.mint(tokens.BOOTSTRAP)
        now = utcnow()
        async with self._db.transaction() as session:
            details: dict[str, Any] = {}
            if reenroll:
                agent = await identities.agent(session, reenroll)
                if agent is None:
                    raise not_found(f"no agent {reenroll[:63]!r} to re-enroll")
                pool, labels, pattern = _reenrollment_scope(request, agent)
                max_uses = 1
                details["reenroll"] = agent.agent_id
            row = BootstrapToken(
                token_id=minted.token_id,
                secret_hash=minted.secret_hash,
                pool=pool,
                labels=labels,
                name_pattern=pattern,
                max_uses=max_uses,
                uses=0,
                expires_at=now + ttl,
                created_at=now,
                created_by=current_principal.get().name,
                agent_id=reenroll or None,
            )
            session.add(row)
            await record_in(
                session,
                self._audit(
                    context,
                    "token.create",
                    minted.token_id,
                    pool=pool,
                    labels=labels,
                    max_uses=max_uses,
                    expires_at=row.expires_at.isoformat(),
                    **details,
                ),
            )
        return admin_pb2.CreateBootstrapTokenResponse(
            token=convert.bootstrap_token(row), secret=minted.secret
        )

    async def ListBootstrapTokens(
        self,
        request: admin_pb2.ListBootstrapTokensRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListBootstrapTokensRequest, admin_pb2.ListBootstrapTokensResponse
        ],
    ) -> admin_pb2.ListBootstrapTokensResponse:
        async with self._db.transaction() as session:
            rows = (
                await session.execute(select(BootstrapToken).order_by(BootstrapToken.created_at))
            ).scalars()
            now = utcnow()
            return admin_pb2.ListBootstrapTokensResponse(
                tokens=[convert.bootstrap_token(r, now) for r in rows]
            )

    async def DeleteBootstrapToken(
        self,
        request: admin_pb2.DeleteBootstrapTokenRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.DeleteBootstrapTokenRequest, admin_pb2.DeleteBootstrapTokenResponse
        ],
    ) -> admin_pb2.DeleteBootstrapTokenResponse:
        async with self._db.transaction() as session:
            token_id = check_text(request.token_id, "token_id", MAX_ID)
            row = await identities.bootstrap_token(session, token_id)
            if row is None:
                raise not_found(f"no bootstrap token {request.token_id[:40]!r}")
            if row.deleted_at is None:
                row.deleted_at = utcnow()
                await record_in(session, self._audit(context, "token.delete", row.token_id))
        return admin_pb2.DeleteBootstrapTokenResponse()

    # API tokens

    async def CreateApiToken(
        self,
        request: admin_pb2.CreateApiTokenRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.CreateApiTokenRequest, admin_pb2.CreateApiTokenResponse
        ],
    ) -> admin_pb2.CreateApiTokenResponse:
        name = check_name(request.name, "name")
        role = convert.role_name(request.role)
        if role is None:
            raise invalid("role: must be ROLE_SUBMITTER, ROLE_ADMIN or ROLE_VIEWER")
        expires = None
        if request.HasField("ttl"):
            ttl = duration(request.ttl, "ttl", maximum=MAX_API_TOKEN_TTL, maximum_text="10 years")
            expires = utcnow() + ttl if ttl else None  # 0: never expires
        tenant = check_name(request.tenant, "tenant") if request.tenant else ""
        async with self._db.transaction() as session:
            row, secret = await create_api_token(
                session,
                name,
                role,
                tenant=tenant,
                created_by=current_principal.get().name,
                expires_at=expires,
            )
            await record_in(
                session,
                self._audit(
                    context,
                    "api_token.create",
                    row.token_id,
                    name=name,
                    role=role,
                    tenant=row.tenant,
                ),
            )
        return admin_pb2.CreateApiTokenResponse(token=convert.api_token(row), secret=secret)

    async def ListApiTokens(
        self,
        request: admin_pb2.ListApiTokensRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListApiTokensRequest, admin_pb2.ListApiTokensResponse
        ],
    ) -> admin_pb2.ListApiTokensResponse:
        async with self._db.transaction() as session:
            rows = (await session.execute(select(ApiToken).order_by(ApiToken.created_at))).scalars()
            now = utcnow()
            return admin_pb2.ListApiTokensResponse(tokens=[convert.api_token(r, now) for r in rows])

    async def DeleteApiToken(
        self,
        request: admin_pb2.DeleteApiTokenRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.DeleteApiTokenRequest, admin_pb2.DeleteApiTokenResponse
        ],
    ) -> admin_pb2.DeleteApiTokenResponse:
        async with self._db.transaction() as session:
            token_id = check_text(request.token_id, "token_id", MAX_ID)
            row = await identities.api_token(session, token_id)
            if row is None:
                raise not_found(f"no API token {request.token_id[:40]!r}")
            if row.deleted_at is None:
                row.deleted_at = utcnow()
                await record_in(
                    session, self._audit(context, "api_token.delete", row.token_id, name=row.name)
                )
        self._token_cache.forget(request.token_id)
        return admin_pb2.DeleteApiTokenResponse()

    # Tenants

    async def ListTenants(
        self,
        request: admin_pb2.ListTenantsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListTenantsRequest, admin_pb2.ListTenantsResponse
        ],
    ) -> admin_pb2.ListTenantsResponse:
        async with self._db.transaction() as session:
            rows = await tenants.list_with_token_counts(session)
        return admin_pb2.ListTenantsResponse(tenants=[convert.tenant(t, n) for t, n in rows])

    # Agents

    async def ListAgents(
        self,
        request: admin_pb2.ListAgentsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListAgentsRequest, admin_pb2.ListAgentsResponse
        ],
    ) -> admin_pb2.ListAgentsResponse:
        check_text(request.pool, "pool", MAX_ID)
        async with self._db.transaction() as session:
            rows = await identities.agents(session, request.pool)
            certs = await identities.certificates_of(session, [r.agent_id for r in rows])
            present = await self._presence_of(session, [r.agent_id for r in rows])
        return admin_pb2.ListAgentsResponse(
            agents=[
                self._described(
                    r, [c for c in certs if c.agent_id == r.agent_id], present[r.agent_id]
                )
                for r in rows
            ]
        )

    async def GetAgent(
        self,
        request: admin_pb2.GetAgentRequest,
        context: grpc.aio.ServicerContext[admin_pb2.GetAgentRequest, admin_pb2.Agent],
    ) -> admin_pb2.Agent:
        check_text(request.agent_id, "agent_id", MAX_ID)
        async with self._db.transaction() as session:
            row = await identities.agent(session, request.agent_id)
            if row is None:
                raise not_found(f"no agent {request.agent_id[:63]!r}")
            certs = await identities.certificates_of(session, [row.agent_id])
        return await self._agent(row, certs)

    async def SetAgentEnabled(
        self,
        request: admin_pb2.SetAgentEnabledRequest,
        context: grpc.aio.ServicerContext[admin_pb2.SetAgentEnabledRequest, admin_pb2.Agent],
    ) -> admin_pb2.Agent:
        check_text(request.agent_id, "agent_id", MAX_ID)
        async with self._db.transaction() as session:
            row = await identities.agent(session, request.agent_id)
            if row is None:
                raise not_found(f"no agent {request.agent_id[:63]!r}")
            certs = await identities.certificates_of(session, [row.agent_id])
            if request.enabled:
                _check_can_connect(row, certs)
            if row.enabled != request.enabled:
                row.enabled = request.enabled
                action = "agent.enable" if request.enabled else "agent.disable"
                await record_in(session, self._audit(context, action, row.agent_id))
        if not request.enabled:
            self._fanout.close_agent(
                row.agent_id, grpc.StatusCode.PERMISSION_DENIED, "agent disabled"
            )
        return await self._agent(row, certs)

    async def RevokeAgent(
        self,
        request: admin_pb2.RevokeAgentRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.RevokeAgentRequest, admin_pb2.RevokeAgentResponse
        ],
    ) -> admin_pb2.RevokeAgentResponse:
        check_text(request.agent_id, "agent_id", MAX_ID)
        reason = check_text(request.reason, "reason", MAX_REASON)[:200]
        reason = reason or "revoked by an administrator"
        async with self._db.transaction() as session:
            if await identities.lock_agent(session, request.agent_id) is None:
                raise not_found(f"no agent {request.agent_id[:63]!r}")
            serials = await identities.revoke_certificates(
                session, agent_id=request.agent_id, reason=reason
            )
            await record_in(
                session,
                self._audit(
                    context, "agent.revoke", request.agent_id, serials=serials, reason=reason
                ),
            )
        self._metrics.certificates_revoked.inc(len(serials))
        self._fanout.close_agent(
            request.agent_id, grpc.StatusCode.PERMISSION_DENIED, "certificate revoked"
        )
        return admin_pb2.RevokeAgentResponse(serials=serials)

    async def RevokeCertificate(
        self,
        request: admin_pb2.RevokeCertificateRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.RevokeCertificateRequest, admin_pb2.RevokeCertificateResponse
        ],
    ) -> admin_pb2.RevokeCertificateResponse:
        serial = check_text(request.serial, "serial", MAX_ID).lower().removeprefix("0x")
        reason = check_text(request.reason, "reason", MAX_REASON)[:200]
        reason = reason or "revoked by an administrator"
        async with self._db.transaction() as session:
            cert = await identities.certificate(session, serial)
            if cert is None:
                raise not_found(f"no certificate with serial {serial[:48]!r}")
            # Locked as Renew locks it: a renewal from this serial either committed
            # before (and its certificate is a descendant revoked here) or sees the
            # revocation and is refused.
            await identities.lock_agent(session, cert.agent_id)
            serials = await identities.revoke_certificates(session, serial=serial, reason=reason)
            descendants = [s for s in serials if s != serial]
            await record_in(
                session,
                self._audit(
                    context,
                    "cert.revoke",
                    serial,
                    agent=cert.agent_id,
                    reason=reason,
                    descendants=descendants,
                ),
            )
        self._metrics.certificates_revoked.inc(len(serials))
        self._fanout.close_agent(
            cert.agent_id,
            grpc.StatusCode.PERMISSION_DENIED,
            "certificate revoked",
            frozenset({serial, *serials}),
        )
        return admin_pb2.RevokeCertificateResponse(serials=serials)

    async def RemoveAgent(
        self,
        request: admin_pb2.RemoveAgentRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.RemoveAgentRequest, admin_pb2.RemoveAgentResponse
        ],
    ) -> admin_pb2.RemoveAgentResponse:
        check_text(request.agent_id, "agent_id", MAX_ID)
        reason = check_text(request.reason, "reason", MAX_REASON)[:200]
        reason = reason or "agent removed by an administrator"
        async with self._db.transaction() as session:
            row = await identities.lock_agent(session, request.agent_id)
            if row is None:
                raise not_found(f"no agent {request.agent_id[:63]!r}")
            if row.removed_at is not None:
                return admin_pb2.RemoveAgentResponse()  # removed already: nothing to do
            serials = await identities.revoke_certificates(
                session, agent_id=row.agent_id, reason=reason
            )
            now = utcnow()
            # A re-enrollment token made before the removal must not undo it.
            tokens_deleted = await identities.delete_reenrollment_tokens(session, row.agent_id, now)
            row.removed_at = now
            row.enabled = False
            await record_in(
                session,
                self._audit(
                    context,
                    "agent.remove",
                    row.agent_id,
                    serials=serials,
                    reason=reason,
                    tokens_deleted=tokens_deleted,
                ),
            )
        self._metrics.certificates_revoked.inc(len(serials))
        self._fanout.close_agent(row.agent_id, grpc.StatusCode.PERMISSION_DENIED, "agent removed")
        return admin_pb2.RemoveAgentResponse(serials=serials)

    async def RotateAgents(
        self,
        request: admin_pb2.RotateAgentsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.RotateAgentsRequest, admin_pb2.RotateAgentsResponse
        ],
    ) -> admin_pb2.RotateAgentsResponse:
        agent_id = check_text(request.agent_id, "agent_id", MAX_ID)
        if bool(agent_id) == request.all:
            raise invalid("give exactly one of agent_id and all")
        reason = check_text(request.reason, "reason", MAX_REASON)[:200]
        reason = reason or "certificate rotation requested by an administrator"
        now = utcnow()
        async with self._db.transaction() as session:
            if agent_id:
                row = await identities.agent(session, agent_id)
                if row is None:
                    raise not_found(f"no agent {agent_id[:63]!r}")
                if row.removed_at is not None:
                    raise ServiceError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"agent {agent_id} was removed; it has no certificate to rotate",
                    )
            count = await identities.request_rotation(session, agent_id or None, now)
            await record_in(
                session,
                self._audit(context, "agent.rotate", agent_id or "*", agents=count, reason=reason),
            )
        # Every replica sends Renew to the streams it holds (on certificates older than now).
        self._fanout.rotate_agents(agent_id or None, reason, now.timestamp())
        return admin_pb2.RotateAgentsResponse(agents=count)

    async def _agent(self, row: Any, certs: list[Any]) -> admin_pb2.Agent:
        async with self._db.transaction() as session:
            present = await self._presence_of(session, [row.agent_id])
        return self._described(row, certs, present[row.agent_id])

    async def _presence_of(
        self, session: Any, agent_ids: list[str]
    ) -> dict[str, convert.AgentPresence]:
        """Each agent's newest live stream on any replica, and what it holds: the same
        answer whichever replica is asked (storage/presence.py)."""
        live = await presence_store.live_sessions(
            session, self._presence.now(), agent_ids=agent_ids
        )
        newest: dict[str, presence_store.LiveSession] = {}
        for stream in live:  # newest first
            newest.setdefault(stream.agent_id, stream)
        held = await presence_store.in_flight(session, agent_ids)
        return {
            agent_id: convert.AgentPresence(newest.get(agent_id), held.get(agent_id, 0))
            for agent_id in agent_ids
        }

    def _described(
        self, row: Any, certs: list[Any], presence: convert.AgentPresence
    ) -> admin_pb2.Agent:
        return convert.agent(
            row,
            certs,
            spiffe_id=f"spiffe://{self._trust_domain}/agent/{row.agent_id}",
            presence=presence,
        )

    # Audit

    async def QueryAudit(
        self,
        request: admin_pb2.QueryAuditRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.QueryAuditRequest, admin_pb2.QueryAuditResponse
        ],
    ) -> admin_pb2.QueryAuditResponse:
        limit = request.limit or 100
        if not 1 <= limit <= MAX_AUDIT_ROWS:
            raise invalid(f"limit: must be between 1 and {MAX_AUDIT_ROWS}")
        check_text(request.actor, "actor", MAX_AUDIT_FILTER)
        check_text(request.action, "action", MAX_AUDIT_FILTER)
        query = select(AuditEvent)
        if request.actor:
            query = query.where(AuditEvent.actor == request.actor)
        if request.action:
            query = query.where(AuditEvent.action == request.action)
        if request.HasField("since"):
            query = query.where(AuditEvent.time >= timestamp(request.since, "since"))
        if request.HasField("until"):
            query = query.where(AuditEvent.time < timestamp(request.until, "until"))
        # Newest by when it happened: a replayed spool inserts old events after new ones.
        query = query.order_by(AuditEvent.time.desc(), AuditEvent.id.desc()).limit(limit)
        async with self._db.transaction() as session:
            rows = (await session.execute(query)).scalars()
            return admin_pb2.QueryAuditResponse(events=[convert.audit_event(r) for r in rows])

    # Budgets

    async def SetBudget(
        self,
        request: admin_pb2.SetBudgetRequest,
        context: grpc.aio.ServicerContext[admin_pb2.SetBudgetRequest, admin_pb2.Budget],
    ) -> admin_pb2.Budget:
        scope = _budget_scope(request.scope)
        if not 0 <= request.limit_micros <= MAX_LIMIT_MICROS:
            raise invalid(
                f"limit_micros: must be between 0 and {MAX_LIMIT_MICROS} "
                f"({MAX_LIMIT_MICROS // 10**6} USD)"
            )
        period = request.period or "month"
        if period not in PERIODS:
            raise invalid(f"period: {period[:20]!r} is not one of {', '.join(PERIODS)}")
        async with self._db.transaction() as session:
            before = await budgets.get_budget(session, scope)
            previous = (
                {"previous_limit_micros": before.limit_micros, "previous_period": before.period}
                if before is not None
                else {}
            )
            row = await budgets.set_budget(
                session, scope, request.limit_micros, period, by=current_principal.get().name
            )
            await record_in(
                session,
                self._audit(
                    context,
                    "budget.set",
                    scope,
                    limit_micros=row.limit_micros,
                    period=row.period,
                    **previous,
                ),
            )
        # Read after the commit: the change stands even when the figures cannot be read.
        return await self._budget(row, saved=True)

    async def GetBudget(
        self,
        request: admin_pb2.GetBudgetRequest,
        context: grpc.aio.ServicerContext[admin_pb2.GetBudgetRequest, admin_pb2.Budget],
    ) -> admin_pb2.Budget:
        scope = _budget_scope(request.scope)
        async with self._db.transaction() as session:
            row = await budgets.get_budget(session, scope)
        if row is None:
            raise not_found(f"no budget for scope {scope!r}")
        return await self._budget(row)

    async def ListBudgets(
        self,
        request: admin_pb2.ListBudgetsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListBudgetsRequest, admin_pb2.ListBudgetsResponse
        ],
    ) -> admin_pb2.ListBudgetsResponse:
        async with self._db.transaction() as session:
            rows = await budgets.list_budgets(session)
        return admin_pb2.ListBudgetsResponse(
            budgets=await asyncio.gather(*(self._budget(r) for r in rows))
        )

    async def DeleteBudget(
        self,
        request: admin_pb2.DeleteBudgetRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.DeleteBudgetRequest, admin_pb2.DeleteBudgetResponse
        ],
    ) -> admin_pb2.DeleteBudgetResponse:
        scope = _budget_scope(request.scope)
        async with self._db.transaction() as session:
            row = await budgets.get_budget(session, scope)
            if row is None:
                raise not_found(f"no budget for scope {scope!r}")
            details = {"limit_micros": row.limit_micros, "period": row.period}
            await budgets.delete_budget(session, scope)
            await record_in(session, self._audit(context, "budget.delete", scope, **details))
        return admin_pb2.DeleteBudgetResponse()

    async def _budget(self, row: Budget, *, saved: bool = False) -> admin_pb2.Budget:
        """The row with what is spent and reserved in its current period (from the quota
        store: UNAVAILABLE when it cannot answer, never a made-up zero)."""
        rule = budgets.rule(row)
        now = datetime.now(UTC)
        try:
            usage = await self._quotas.budget_usage(rule.key(now))
        except QuotaStoreUnavailable as err:
            done = f"budget {row.scope} was saved, but " if saved else ""
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"{done}its spent and reserved figures are unknown: the quota store is "
                f"unreachable ({err})",
            ) from err
        return convert.budget(row, usage, rule.window(now))

    # Pool settings

    async def SetPoolSettings(
        self,
        request: admin_pb2.SetPoolSettingsRequest,
        context: grpc.aio.ServicerContext[admin_pb2.SetPoolSettingsRequest, admin_pb2.PoolSettings],
    ) -> admin_pb2.PoolSettings:
        pool = check_name(request.pool, "pool")
        models = self._check_models(request.allowed_models)
        async with self._db.transaction() as session:
            row = await budgets.set_pool_settings(
                session, pool, models, by=current_principal.get().name
            )
            await record_in(session, self._audit(context, "pool.set", pool, allowed_models=models))
        return convert.pool_settings(row)

    async def GetPoolSettings(
        self,
        request: admin_pb2.GetPoolSettingsRequest,
        context: grpc.aio.ServicerContext[admin_pb2.GetPoolSettingsRequest, admin_pb2.PoolSettings],
    ) -> admin_pb2.PoolSettings:
        """A pool nobody configured has the defaults (any priced model), not NOT_FOUND:
        pools exist wherever agents and tasks name them."""
        pool = check_name(request.pool, "pool")
        async with self._db.transaction() as session:
            row = await budgets.pool_settings(session, pool)
        return convert.pool_settings(row) if row is not None else admin_pb2.PoolSettings(pool=pool)

    async def ListPoolSettings(
        self,
        request: admin_pb2.ListPoolSettingsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListPoolSettingsRequest, admin_pb2.ListPoolSettingsResponse
        ],
    ) -> admin_pb2.ListPoolSettingsResponse:
        async with self._db.transaction() as session:
            rows = await budgets.list_pool_settings(session)
        return admin_pb2.ListPoolSettingsResponse(pools=[convert.pool_settings(r) for r in rows])

    def _check_models(self, names: Any) -> list[str]:
        """Each model named once, in the order given, and each with a price: a model the
        server cannot price could never be budgeted."""
        models = list(dict.fromkeys(str(n) for n in names))
        if len(models) > MAX_POOL_MODELS:
            raise invalid(f"allowed_models: at most {MAX_POOL_MODELS} models")
        for model in models:
            if MODEL.fullmatch(model) is None:
                raise invalid(f"allowed_models: {model[:100]!a} is not a valid model name")
            if not self._priced(model):
                raise invalid(
                    f"allowed_models: {model!r} has no price in the server's price table "
                    f"(priced by name: {', '.join(self._priced_models())})"
                )
        return models

    def _priced(self, model: str) -> bool:
        """Priced by name (or dated alias) by some provider; or, through a provider's
        ``"*"`` entry (Ollama's local models), any other name except an Anthropic one
        (``claude...``): those go to the paid API, where a typo must not pass for a free
        local model."""
        for provider in PRICED_PROVIDERS:
            price = self._prices.price(provider, model)
            if price is not None and price is not self._prices.price(provider, "*"):
                return True
        if model.startswith("claude"):
            return False
        return any(self._prices.price(p, model) is not None for p in PRICED_PROVIDERS)

    def _priced_models(self) -> list[str]:
        return [m for p in PRICED_PROVIDERS for m in self._prices.models(p) if m != "*"]


async def create_api_token(
    session: Any,
    name: str,
    role: str,
    *,
    tenant: str = "",
    created_by: str = "server",
    expires_at: Any = None,
) -> tuple[ApiToken, str]:
    """Mint and store an API token; returns the row and the secret (shown once).

    The token joins ``tenant`` (created when new); without one it gets a new tenant of
    its own, so it never inherits what an earlier token of the same name owned."""
    minted = tokens.mint(tokens.API)
    if tenant:
        await tenants.ensure(session, tenant, created_by=created_by)
    else:
        tenant = await tenants.create_own(session, name, minted.token_id, created_by=created_by)
    row = ApiToken(
        token_id=minted.token_id,
        name=name,
        tenant=tenant,
        secret_hash=minted.secret_hash,
        role=role,
        created_at=utcnow(),
        expires_at=expires_at,
    )
    session.add(row)
    await session.flush()
    return row, minted.secret


def _budget_scope(scope: str) -> str:
    """A scope an administrator may limit: per-task caps come with the task, not from here."""
    try:
        checked = check_scope(scope)
    except ValueError as err:
        raise invalid(f"scope: {err}") from None
    if checked.startswith("task:"):
        raise invalid(
            "scope: task budgets are per-task caps: give one with the task "
            "(SubmitRequest.max_cost_usd, muster submit --max-cost-usd)"
        )
    return checked


def _reenrollment_scope(
    request: admin_pb2.CreateBootstrapTokenRequest, agent: Any
) -> tuple[str, dict[str, str], str]:
    """A re-enrollment token's pool, labels and name pattern: the agent's own. Anything
    else asked for is refused rather than silently dropped."""
    if request.pool and request.pool != agent.pool:
        raise invalid(
            f"pool: a re-enrollment token keeps agent {agent.agent_id}'s pool "
            f"({agent.pool!r}); leave it out"
        )
    if request.labels and dict(request.labels) != agent.labels:
        raise invalid(
            f"labels: a re-enrollment token keeps agent {agent.agent_id}'s labels; leave them out"
        )
    if request.name_pattern and request.name_pattern != agent.agent_id:
        raise invalid("name_pattern: a re-enrollment token enrolls only its agent; leave it out")
    if request.max_uses > 1:
        raise invalid("max_uses: a re-enrollment token is single-use")
    return agent.pool, dict(agent.labels), agent.agent_id


def _check_can_connect(row: Any, certs: list[Any]) -> None:
    """Enabling must not report success for an agent that still cannot connect."""
    hint = f"make a re-enrollment token for it: muster token create --reenroll {row.agent_id}"
    if row.removed_at is not None:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"agent {row.agent_id} was removed; enabling it would not let it connect: {hint}",
        )
    live = [c for c in certs if c.revoked_at is None]
    if not live:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"every certificate of agent {row.agent_id} is revoked, so enabling it would "
            f"not let it connect: {hint}",
        )
    now = utcnow()
    if all(c.not_after <= now for c in live):
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"every certificate of agent {row.agent_id} is revoked or expired, so enabling "
            f"it would not let it connect: {hint}",
        )
