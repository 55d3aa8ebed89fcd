"""Certificate issuance as the services call it: a CA that cannot issue is the
operator's problem to fix, so the caller gets FAILED_PRECONDITION, not a crash."""

from __future__ import annotations

import logging
from datetime import timedelta

import grpc
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from sqlalchemy.ext.asyncio import AsyncSession

from muster.server.audit import AuditRecord
from muster.server.ca import CAError, IssuedCertificate
from muster.server.ca.reload import CAReloader
from muster.server.services.errors import ServiceError

log = logging.getLogger(__name__)


async def issue_agent_certificate(
    reloader: CAReloader,
    session: AsyncSession,
    public_key: CertificatePublicKeyTypes,
    agent_id: str,
    lifetime: timedelta,
) -> IssuedCertificate:
    """Issue from the intermediate the CA's shared record names active in ``session``'s
    transaction (reloading it first if it changed): a rotation applies at once."""
    await reloader.sync(session)
    try:
        return reloader.ca.issue_agent_certificate(public_key, agent_id, lifetime=lifetime)
    except CAError as err:
        log.error("cannot issue a certificate for agent %s: %s", agent_id, err)
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION, f"the CA cannot issue certificates: {err}"
        ) from None


def issue_record(
    issued: IssuedCertificate,
    agent_id: str,
    *,
    actor: str,
    key: str,
    reason: str,
    peer: str,
    request_id: str,
) -> AuditRecord:
    """The ``cert.issue`` audit row of a certificate issued to ``agent_id`` (``key`` is
    the public key's fingerprint, ``reason`` why it was issued: enroll, reenroll, ...)."""
    return AuditRecord(
        actor=actor,
        action="cert.issue",
        target=issued.serial,
        peer=peer,
        request_id=request_id,
        details={
            "agent": agent_id,
            "not_after": issued.not_after.isoformat(),
            "key": key,
            "reason": reason,
        },
    )
