"""Bearer API tokens for TaskService and AdminService on the api listener.

Missing or wrong token: UNAUTHENTICATED (audited, counted against the peer). A valid
token without the role a method needs: PERMISSION_DENIED. Enrollment, health and
reflection need no API token.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from server import tokens
from server.audit import AuditRecord, AuditWriter
from server.interceptors._wrap import RpcInfo, guard_handler
from server.lockout import count_auth_failure
from server.metrics import MusterMetrics
from server.principals import Principal, current_principal
from server.quotas import Quotas
from server.services.context import peer_address, request_id
from server.storage import identities
from server.storage.database import Database
from server.storage.types import utcnow
from server.token_cache import ApiTokenCache, CachedToken

log = logging.getLogger(__name__)

ROLE_FOR_SERVICE = {"muster.v1.TaskService": "submitter", "muster.v1.AdminService": "admin"}
"""The least role each protected service needs; admins may call everything."""


class ApiTokenAuth(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        db: Database,
        quotas: Quotas,
        audit: AuditWriter,
        metrics: MusterMetrics,
        cache: ApiTokenCache,
    ) -> None:
        self._db = db
        self._cache = cache
        self._quotas = quotas
        self._audit = audit
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if service not in ROLE_FOR_SERVICE:
            return handler
        return guard_handler(handler, handler_call_details.method, self._check)

    async def _check(self, info: RpcInfo, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        peer = peer_address(context)
        lockout = await self._quotas.check_lockout(peer)
        if not lockout.allowed:
            await context.abort_with_status(lockout.status())
        principal = await self._authenticate(context)
        if principal is None:
            await self._refuse(info, context, peer)
            return
        needed = ROLE_FOR_SERVICE[info.service]
        if needed == "admin" and not principal.is_admin:
            await self._audit.submit(
                AuditRecord(
                    actor=principal.name,
                    action="auth.denied",
                    target=info.method,
                    outcome="denied",
                    peer=peer,
                    request_id=request_id(context),
                    details={"role": principal.role, "needed": needed},
                )
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{info.name} needs the {needed!r} role; this token has {principal.role!r}",
            )
        current_principal.set(principal)

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal | None:
        header = next(
            (v for k, v in context.invocation_metadata() or () if k == "authorization"), None
        )
        if not isinstance(header, str) or not header.lower().startswith("bearer "):
            return None
        presented = tokens.parse(header[7:].strip(), tokens.API)
        if presented is None:
            return None
        row = await self._cache.get(presented.token_id, self._load)
        if row is None or row.deleted or not presented.matches(row.secret_hash):
            return None
        if row.expires_at is not None and row.expires_at <= utcnow():
            return None
        return Principal(name=row.name, role=row.role, token_id=row.token_id, tenant=row.tenant)

    async def _load(self, token_id: str) -> CachedToken | None:
        async with self._db.transaction() as session:
            row = await identities.api_token(session, token_id)
        if row is None:
            return None
        return CachedToken(
            token_id=row.token_id,
            name=row.name,
            tenant=row.tenant,
            role=row.role,
            secret_hash=row.secret_hash,
            expires_at=row.expires_at,
            deleted=row.deleted_at is not None,
        )

    async def _refuse(
        self, info: RpcInfo, context: grpc.aio.ServicerContext[Any, Any], peer: str
    ) -> None:
        await count_auth_failure(
            self._quotas,
            self._audit,
            self._metrics,
            peer=peer,
            credential="api_token",
            request_id=request_id(context),
        )
        await self._audit.submit(
            AuditRecord(
                actor="anonymous",
                action="auth.failure",
                target=info.method,
                outcome="denied",
                peer=peer,
                request_id=request_id(context),
                details={"credential": "api_token"},
            )
        )
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid API token (send 'authorization: Bearer <token>')",
        )
