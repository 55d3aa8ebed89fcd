"""Agent identity on the agent listener, from the verified client certificate only.

TLS has already checked the chain. Here: exactly one URI SAN, a SPIFFE ID naming an
agent in our trust domain (else UNAUTHENTICATED); a serial we issued to that agent, not
revoked, and the agent enabled (else PERMISSION_DENIED). Nothing in any message can
change the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from cryptography import x509

from muster.server.audit import AuditRecord, AuditWriter
from muster.server.interceptors._wrap import RpcInfo, guard_handler
from muster.server.metrics import MusterMetrics
from muster.server.principals import AgentIdentity, current_agent
from muster.server.services.context import peer_address, request_id
from muster.server.storage import identities
from muster.server.storage.database import Database
from muster.server.storage.types import utcnow
from muster.spiffe import SpiffeId

log = logging.getLogger(__name__)


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


def spiffe_id_of(certificate: x509.Certificate, trust_domain: str) -> SpiffeId:
    """The one SPIFFE ID of an agent certificate, or Refused(UNAUTHENTICATED)."""
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise Refused(
            unauthenticated, "client certificate must carry exactly one URI SAN", "uri san count"
        )
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except ValueError:
        raise Refused(
            unauthenticated, "client certificate URI SAN is not a SPIFFE ID", "not spiffe"
        ) from None
    if spiffe_id.trust_domain != trust_domain:
        raise Refused(
            unauthenticated, "client certificate is from another trust domain", "trust domain"
        )
    if spiffe_id.agent_id is None:
        raise Refused(unauthenticated, "client certificate does not name an agent", "not an agent")
    return spiffe_id


class AgentIdentityAuth(grpc.aio.ServerInterceptor):
    def __init__(
        self, db: Database, trust_domain: str, audit: AuditWriter, metrics: MusterMetrics
    ) -> None:
        self._db = db
        self._trust_domain = trust_domain
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
        return guard_handler(handler, handler_call_details.method, self._check)

    async def _check(self, info: RpcInfo, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            identity = await self.resolve(context)
        except Refused as refused:
            self._metrics.auth_failures.labels(listener="agent", reason=refused.reason).inc()
            await self._audit.submit(
                AuditRecord(
                    actor="anonymous",
                    action="auth.failure",
                    target=info.method,
                    outcome="denied",
                    peer=peer_address(context),
                    request_id=request_id(context),
                    details={"credential": "client_certificate", "reason": refused.reason},
                )
            )
            await context.abort(refused.code, refused.message)
            return
        current_agent.set(identity)

    async def resolve(self, context: grpc.aio.ServicerContext[Any, Any]) -> AgentIdentity:
        pem = next(iter(context.auth_context().get("x509_pem_cert", ())), b"")
        if not pem:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "a client certificate is required",
                "no certificate",
            )
        certificate = x509.load_pem_x509_certificate(pem)
        spiffe_id = spiffe_id_of(certificate, self._trust_domain)
        agent_id = spiffe_id.agent_id
        assert agent_id is not None
        serial = format(certificate.serial_number, "x")
        denied = grpc.StatusCode.PERMISSION_DENIED
        # Shared with the other connections arriving meanwhile: a reconnecting fleet is
        # checked a batch at a time, not a transaction per agent.
        issued = await self._db.group.run_many("presented", identities.presented_many, serial)
        if issued is None or issued.agent_id != agent_id:
            raise Refused(
                denied,
                "client certificate is not one this server issued to that agent",
                "unknown serial",
            )
        if issued.revoked_at is not None:
            raise Refused(denied, "client certificate has been revoked", "revoked")
        if not issued.enabled:
            raise Refused(denied, f"agent {agent_id} is disabled", "disabled")
        if certificate.not_valid_after_utc <= utcnow():
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "client certificate expired", "expired")
        return AgentIdentity(
            agent_id=agent_id,
            spiffe_id=str(spiffe_id),
            serial=serial,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            pool=issued.pool,
            labels=dict(issued.labels),
            rotate_requested_at=issued.rotate_requested_at,
            issued_at=issued.issued_at,
        )
