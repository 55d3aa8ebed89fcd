"""AdminService: bootstrap and API tokens, agents, revocation and the audit trail.

Every mutation commits together with its audit row. Revocation and disabling also close
the agent's open streams at once through the hub.
"""

from __future__ import annotations

import fnmatch
from datetime import UTC, timedelta
from typing import Any

import grpc
from sqlalchemy import select

from muster.v1 import admin_pb2, admin_pb2_grpc
from server import tokens
from server.audit import AuditRecord, record_in
from server.dispatch.fanout import Fanout
from server.metrics import MusterMetrics
from server.principals import current_principal
from server.services import convert
from server.services.context import peer_address, request_id
from server.services.errors import invalid, not_found
from server.services.validation import check_labels, check_name
from server.storage import identities, tenants
from server.storage.database import Database
from server.storage.models import ApiToken, AuditEvent, BootstrapToken
from server.storage.types import utcnow
from server.token_cache import ApiTokenCache

DEFAULT_BOOTSTRAP_TTL = timedelta(hours=1)
MAX_BOOTSTRAP_TTL = timedelta(days=30)
MAX_USES = 10_000
MAX_AUDIT_ROWS = 1000


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        db: Database,
        fanout: Fanout,
        metrics: MusterMetrics,
        trust_domain: str,
        token_cache: ApiTokenCache,
    ) -> None:
        self._db = db
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
        pattern = request.name_pattern or "*"
        if len(pattern) > 100 or not fnmatch.translate(pattern):
            raise invalid("name_pattern: at most 100 characters")
        max_uses = request.max_uses or 1
        if not 1 <= max_uses <= MAX_USES:
            raise invalid(f"max_uses: must be between 1 and {MAX_USES}")
        ttl = request.ttl.ToTimedelta() if request.HasField("ttl") else DEFAULT_BOOTSTRAP_TTL
        if not timedelta(seconds=1) <= ttl <= MAX_BOOTSTRAP_TTL:
            raise invalid("ttl: must be between 1s and 30 days")
        minted = tokens.mint(tokens.BOOTSTRAP)
        now = utcnow()
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
        )
        async with self._db.transaction() as session:
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
            return admin_pb2.ListBootstrapTokensResponse(
                tokens=[convert.bootstrap_token(r) for r in rows]
            )

    async def DeleteBootstrapToken(
        self,
        request: admin_pb2.DeleteBootstrapTokenRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.DeleteBootstrapTokenRequest, admin_pb2.DeleteBootstrapTokenResponse
        ],
    ) -> admin_pb2.DeleteBootstrapTokenResponse:
        async with self._db.transaction() as session:
            row = await identities.bootstrap_token(session, request.token_id)
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
            raise invalid("role: must be ROLE_SUBMITTER or ROLE_ADMIN")
        expires = None
        if request.HasField("ttl") and request.ttl.ToTimedelta() > timedelta(0):
            expires = utcnow() + request.ttl.ToTimedelta()
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
            return admin_pb2.ListApiTokensResponse(tokens=[convert.api_token(r) for r in rows])

    async def DeleteApiToken(
        self,
        request: admin_pb2.DeleteApiTokenRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.DeleteApiTokenRequest, admin_pb2.DeleteApiTokenResponse
        ],
    ) -> admin_pb2.DeleteApiTokenResponse:
        async with self._db.transaction() as session:
            row = await identities.api_token(session, request.token_id)
            if row is None:
                raise not_found(f"no API token {request.token_id[:40]!r}")
            if row.deleted_at is None:
                row.deleted_at = utcnow()
                await record_in(
                    session, self._audit(context, "api_token.delete", row.token_id, name=row.name)
                )
        self._token_cache.forget(request.token_id)
        return admin_pb2.DeleteApiTokenResponse()

    # Agents

    async def ListAgents(
        self,
        request: admin_pb2.ListAgentsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListAgentsRequest, admin_pb2.ListAgentsResponse
        ],
    ) -> admin_pb2.ListAgentsResponse:
        async with self._db.transaction() as session:
            rows = await identities.agents(session, request.pool)
            certs = await identities.certificates_of(session, [r.agent_id for r in rows])
        return admin_pb2.ListAgentsResponse(
            agents=[self._agent(r, [c for c in certs if c.agent_id == r.agent_id]) for r in rows]
        )

    async def GetAgent(
        self,
        request: admin_pb2.GetAgentRequest,
        context: grpc.aio.ServicerContext[admin_pb2.GetAgentRequest, admin_pb2.Agent],
    ) -> admin_pb2.Agent:
        async with self._db.transaction() as session:
            row = await identities.agent(session, request.agent_id)
            if row is None:
                raise not_found(f"no agent {request.agent_id[:63]!r}")
            certs = await identities.certificates_of(session, [row.agent_id])
        return self._agent(row, certs)

    async def SetAgentEnabled(
        self,
        request: admin_pb2.SetAgentEnabledRequest,
        context: grpc.aio.ServicerContext[admin_pb2.SetAgentEnabledRequest, admin_pb2.Agent],
    ) -> admin_pb2.Agent:
        async with self._db.transaction() as session:
            row = await identities.agent(session, request.agent_id)
            if row is None:
                raise not_found(f"no agent {request.agent_id[:63]!r}")
            if row.enabled != request.enabled:
                row.enabled = request.enabled
                action = "agent.enable" if request.enabled else "agent.disable"
                await record_in(session, self._audit(context, action, row.agent_id))
            certs = await identities.certificates_of(session, [row.agent_id])
        if not request.enabled:
            self._fanout.close_agent(
                row.agent_id, grpc.StatusCode.PERMISSION_DENIED, "agent disabled"
            )
        return self._agent(row, certs)

    async def RevokeAgent(
        self,
        request: admin_pb2.RevokeAgentRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.RevokeAgentRequest, admin_pb2.RevokeAgentResponse
        ],
    ) -> admin_pb2.RevokeAgentResponse:
        reason = request.reason[:200] or "revoked by an administrator"
        async with self._db.transaction() as session:
            if await identities.agent(session, request.agent_id) is None:
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
        serial = request.serial.lower().removeprefix("0x")
        reason = request.reason[:200] or "revoked by an administrator"
        async with self._db.transaction() as session:
            cert = await identities.certificate(session, serial)
            if cert is None:
                raise not_found(f"no certificate with serial {serial[:48]!r}")
            serials = await identities.revoke_certificates(session, serial=serial, reason=reason)
            await record_in(
                session,
                self._audit(context, "cert.revoke", serial, agent=cert.agent_id, reason=reason),
            )
        self._metrics.certificates_revoked.inc(len(serials))
        self._fanout.close_agent(
            cert.agent_id,
            grpc.StatusCode.PERMISSION_DENIED,
            "certificate revoked",
            frozenset({serial}),
        )
        return admin_pb2.RevokeCertificateResponse()

    def _agent(self, row: Any, certs: list[Any]) -> admin_pb2.Agent:
        return convert.agent(
            row,
            certs,
            spiffe_id=f"spiffe://{self._trust_domain}/agent/{row.agent_id}",
            connected=self._hub.is_connected(row.agent_id),
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
        query = select(AuditEvent)
        if request.actor:
            query = query.where(AuditEvent.actor == request.actor)
        if request.action:
            query = query.where(AuditEvent.action == request.action)
        if request.HasField("since"):
            query = query.where(AuditEvent.time >= request.since.ToDatetime(tzinfo=UTC))
        if request.HasField("until"):
            query = query.where(AuditEvent.time < request.until.ToDatetime(tzinfo=UTC))
        # Newest by when it happened: a replayed spool inserts old events after new ones.
        query = query.order_by(AuditEvent.time.desc(), AuditEvent.id.desc()).limit(limit)
        async with self._db.transaction() as session:
            rows = (await session.execute(query)).scalars()
            return admin_pb2.QueryAuditResponse(events=[convert.audit_event(r) for r in rows])


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
