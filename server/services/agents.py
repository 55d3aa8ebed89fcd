"""AgentService on the mTLS listener: the Connect stream and certificate renewal.

The identity interceptor has already resolved the caller from its certificate
(``current_agent``); nothing here reads identity from a message.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from cryptography import x509

from muster.server.audit import AuditRecord, record_in
from muster.server.ca import (
    CsrError,
    public_key_fingerprint,
    public_key_from_csr,
)
from muster.server.ca.reload import CAReloader
from muster.server.ca.state import authority_key_id
from muster.server.dispatch.dispatcher import Dispatcher
from muster.server.dispatch.session import AgentSession, StreamClosed
from muster.server.principals import current_agent
from muster.server.quotas import Quotas
from muster.server.services import convert
from muster.server.services.context import peer_address, request_id
from muster.server.services.errors import ServiceError, invalid
from muster.server.services.issuing import issue_agent_certificate
from muster.server.storage import identities
from muster.server.storage.models import Certificate
from muster.server.storage.types import utcnow
from muster.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

HELLO_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
"""How a stream ends when its Hello is refused (a bad or missing Hello, labels outside the
enrolled scope); repeated, the agent is suspicious (``hello_refused``)."""


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, dispatcher: Dispatcher, reloader: CAReloader, quotas: Quotas) -> None:
        self._dispatcher = dispatcher
        self._reloader = reloader
        self._quotas = quotas

    # The generated stub types only the iterator style of a streaming handler (fed a sync or
    # async iterator); grpc.aio also runs a coroutine that sends with context.write, as here.
    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.ServerMessage],
    ) -> None:
        if self._dispatcher.hub.closing:
            # Sent to another replica, or back here after a restart, the agent loses nothing.
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down; reconnect")
        identity = current_agent.get()
        session = AgentSession(
            self._dispatcher,
            agent_id=identity.agent_id,
            spiffe_id=identity.spiffe_id,
            serial=identity.serial,
            pool=identity.pool,
            labels=identity.labels,
            not_before=identity.not_before,
            not_after=identity.not_after,
            peer=peer_address(context),
        )
        session.rotation_requested_at = identity.rotate_requested_at
        session.trust = self._reloader.ca
        session.issuer_key_id = _issuer_key_id(context)
        if identity.issued_at is not None:
            session.cert_issued_at = identity.issued_at.timestamp()
        try:
            await session.run(request_iterator, context)
        except StreamClosed as closed:
            if not session.welcomed and closed.code in HELLO_REFUSALS:
                self._dispatcher.suspicion.hello_refused(
                    identity.agent_id,
                    actor=identity.spiffe_id,
                    peer=session.peer,
                    reason=closed.message,
                )
            raise ServiceError(closed.code, closed.message) from None

    async def Renew(
        self,
        request: agent_pb2.RenewRequest,
        context: grpc.aio.ServicerContext[agent_pb2.RenewRequest, agent_pb2.RenewResponse],
    ) -> agent_pb2.RenewResponse:
        """A fresh certificate for a fresh key, remembering the serial it was renewed from.

        Refused, changing nothing: a CSR that does not parse or is for a key this agent
        already holds a certificate for (INVALID_ARGUMENT), more renewals than the
        per-agent rate (RESOURCE_EXHAUSTED with RetryInfo), a certificate revoked or an
        agent disabled or removed meanwhile (PERMISSION_DENIED).
        """
        identity = current_agent.get()
        dispatcher = self._dispatcher
        peer = peer_address(context)
        # Counted first, whatever follows: a flood of bad CSRs costs the caller too.
        decision = await self._quotas.check_renewal(identity.agent_id)
        if not decision.allowed:
            await context.abort_with_status(decision.status())
        try:
            public_key = public_key_from_csr(request.csr_pem)
        except CsrError as err:
            raise invalid(f"csr_pem: {err}") from None
        fingerprint = public_key_fingerprint(public_key)
        issued_at = utcnow()
        async with dispatcher.db.transaction() as session:
            # The agent's row is locked first, as revocation locks it, so a certificate
            # renewed from a serial being revoked is either seen and revoked with it or
            # refused here.
            agent = await identities.lock_agent(session, identity.agent_id)
            current = await identities.certificate(session, identity.serial)
            if agent is None or current is None or current.revoked_at is not None:
                raise ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED, "client certificate has been revoked"
                )
            if not agent.enabled or agent.removed_at is not None:
                raise ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED, f"agent {identity.agent_id} is disabled"
                )
            if current.public_key_fingerprint == fingerprint:
                raise invalid(
                    "csr_pem: the CSR is for the key of the certificate this call is made "
                    "with; renewal needs a freshly generated key"
                )
            if await identities.key_used_by(session, identity.agent_id, fingerprint):
                raise invalid(
                    "csr_pem: the CSR is for a key this agent already had certified; "
                    "renewal needs a freshly generated key"
                )
            issued = await issue_agent_certificate(
                self._reloader,
                session,
                public_key,
                identity.agent_id,
                dispatcher.config.cert_lifetime,
            )
            session.add(
                Certificate(
                    serial=issued.serial,
                    agent_id=identity.agent_id,
                    public_key_fingerprint=fingerprint,
                    token_id=None,
                    reason="renew",
                    chain_pem=issued.chain_pem,
                    not_before=issued.not_before,
                    not_after=issued.not_after,
                    renewed_from=identity.serial,
                    issued_at=issued_at,
                    issuer_id=issued.issuer_id,
                )
            )
            await record_in(
                session,
                AuditRecord(
                    actor=identity.spiffe_id,
                    action="cert.renew",
                    target=issued.serial,
                    peer=peer,
                    request_id=request_id(context),
                    details={
                        "agent": identity.agent_id,
                        "previous": identity.serial,
                        "renewed_from": identity.serial,
                        "not_after": issued.not_after.isoformat(),
                        "key": fingerprint,
                    },
                ),
            )
        dispatcher.metrics.certificates_issued.labels(reason="renew").inc()
        await dispatcher.suspicion.renewed(identity.agent_id, actor=identity.spiffe_id, peer=peer)
        log.info(
            "renewed the certificate of agent %s (serial %s, from %s)",
            identity.agent_id,
            issued.serial,
            identity.serial,
        )
        ca = self._reloader.ca
        return agent_pb2.RenewResponse(
            certificate_chain_pem=issued.chain_pem,
            trust_bundle_pem=ca.bundle_pem,
            not_after=convert.timestamp(issued.not_after),
            trust_bundle_version=ca.bundle_version,
        )


def _issuer_key_id(context: grpc.aio.ServicerContext[Any, Any]) -> bytes | None:
    """The Authority Key Identifier of the caller's verified certificate: which
    intermediate issued it, so the stream knows whether it chains to the issuing root."""
    pem = next(iter(context.auth_context().get("x509_pem_cert", ())), b"")
    return authority_key_id(x509.load_pem_x509_certificate(pem)) if pem else None
