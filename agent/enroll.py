"""First-run enrollment: trade a bootstrap token and a CSR for a certificate, once.

The key is written to the state dir before the call, so a retry after a lost
response sends the same public key and gets the same certificate back.
"""

from __future__ import annotations

import logging

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio

from muster.agent import keys
from muster.agent.channel import describe_rpc_error, enrollment_channel
from muster.agent.config import AgentConfig
from muster.agent.state import Identity, StateDir
from muster.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    InvalidArgumentError,
    MusterError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)
from muster.spiffe import SpiffeId
from muster.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)


def build_request(
    token: str,
    csr_pem: bytes,
    *,
    name: str | None = None,
    pool: str = "",
    labels: dict[str, str] | None = None,
) -> enrollment_pb2.EnrollRequest:
    return enrollment_pb2.EnrollRequest(
        token=token, csr_pem=csr_pem, name=name or "", pool=pool, labels=labels or {}
    )


async def enroll(config: AgentConfig, state: StateDir) -> Identity:
    """Enroll this agent and store its identity; raise a MusterError that says what to fix."""
    if not config.server:
        raise ConfigError(
            f"{state.path} holds no agent identity yet: enroll with --server HOST:PORT "
            "and a bootstrap token (--token, --token-file or MUSTER_BOOTSTRAP_TOKEN)"
        )
    if not config.token:
        raise ConfigError(
            "enrollment needs a bootstrap token: pass --token or --token-file, "
            "or set MUSTER_BOOTSTRAP_TOKEN"
        )
    ca_pem = config.resolved_ca_file().read_bytes()
    state.ensure()
    key = state.enrollment_key()
    request = build_request(
        config.token,
        keys.build_csr(key),
        name=config.name,
        pool=config.pool,
        labels=dict(config.labels),
    )
    log.info("enrolling with %s", config.server)
    async with enrollment_channel(config.server, ca_pem, config.tls_server_name) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        try:
            response = await stub.Enroll(request, timeout=config.rpc_timeout)
        except aio.AioRpcError as err:
            raise _enroll_error(err, config.server, config.token) from err
    identity = _identity_from(response, key, config)
    state.save_enrollment(response.certificate_chain_pem, response.trust_bundle_pem, identity)
    log.info(
        "enrolled as %s (pool %r), certificate valid until %s",
        identity.spiffe_id,
        identity.pool,
        identity.not_after,
    )
    return identity


async def reenroll(config: AgentConfig, state: StateDir, current: Identity) -> Identity:
    """Re-enroll this agent as the same id with a re-enrollment token (an operator's
    ``muster token create --reenroll ID``), after its certificate was revoked or expired.

    The current key and certificate stay in place until the new ones are complete
    (:meth:`StateDir.save_reenrollment`): a refusal or a crash leaves them as they were.
    Raises a MusterError that says what to fix."""
    if not (config.server and config.token):
        raise ConfigError(
            "re-enrollment needs the server's api address (--server) and a re-enrollment "
            f"token (muster token create --reenroll {current.agent_id})"
        )
    ca_pem = config.resolved_ca_file().read_bytes()
    key = state.reenrollment_key()
    # No pool or labels: a re-enrollment keeps the agent's own, as the server has them.
    request = build_request(config.token, keys.build_csr(key), name=current.agent_id)
    log.info("re-enrolling agent %s with %s", current.agent_id, config.server)
    async with enrollment_channel(config.server, ca_pem, config.tls_server_name) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        try:
            response = await stub.Enroll(request, timeout=config.rpc_timeout)
        except aio.AioRpcError as err:
            raise _reenroll_error(err, config, current.agent_id) from err
    identity = _identity_from(response, key, config)
    if identity.agent_id != current.agent_id:
        raise MusterError(
            f"the server re-enrolled this agent as {identity.agent_id!r}, not "
            f"{current.agent_id!r}; keeping the current identity"
        )
    state.save_reenrollment(response.certificate_chain_pem, response.trust_bundle_pem, identity)
    log.info(
        "re-enrolled as %s, certificate valid until %s", identity.spiffe_id, identity.not_after
    )
    return identity


def _reenroll_error(err: aio.AioRpcError, config: AgentConfig, agent_id: str) -> MusterError:
    hint = f"ask an operator for 'muster token create --reenroll {agent_id}'"
    if err.code() == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(
            f"the server rejected the token for re-enrollment (unknown, expired or already "
            f"used); {hint}"
        )
    if err.code() == grpc.StatusCode.ALREADY_EXISTS:
        return ConflictError(
            f"that token enrolls new agents only, and cannot re-enroll {agent_id}; {hint}"
        )
    return _enroll_error(err, config.server or "", config.token or "")


def _identity_from(
    response: enrollment_pb2.EnrollResponse,
    key: ec.EllipticCurvePrivateKey,
    config: AgentConfig,
) -> Identity:
    """Check the response before storing it: a bad one must not replace nothing with junk."""
    if not response.certificate_chain_pem or not response.trust_bundle_pem:
        raise MusterError("the server's enrollment response lacks a certificate or trust bundle")
    if not keys.cert_matches_key(response.certificate_chain_pem, key):
        raise MusterError("the server issued a certificate for a different key")
    try:
        spiffe = SpiffeId.parse(response.spiffe_id)
    except ValueError as err:
        raise MusterError(f"the server returned an invalid SPIFFE ID: {err}") from err
    endpoint = response.agent_endpoint or config.agent_server or ""
    if not endpoint:
        raise MusterError(
            "the server did not say where its agent listener is; pass --agent-server HOST:PORT"
        )
    leaf = keys.leaf_info(response.certificate_chain_pem)
    return Identity(
        agent_id=response.agent_id or spiffe.agent_id or "",
        spiffe_id=str(spiffe),
        agent_endpoint=endpoint,
        pool=response.pool,
        labels=dict(response.labels),
        not_after=leaf.not_after.isoformat(),
    )


def _enroll_error(err: aio.AioRpcError, server: str, token: str) -> MusterError:
    """Translate the status into the SDK's error types, with the token scrubbed out."""
    code = err.code()
    details = (err.details() or "").replace(token, "<token>") if token else err.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(
            "the server rejected the bootstrap token (unknown, expired or already used); "
            "ask an operator for a new one"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(f"enrollment not allowed: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgumentError(f"enrollment refused: {details}")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return ConflictError(
            f"enrollment refused: {details}; pass --name with another agent id, "
            "or ask an operator to remove the old agent"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return QuotaExceededError(f"enrollment rate-limited: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(f"cannot reach {server} to enroll: {details or code.name}")
    return MusterError(f"enrollment failed: {describe_rpc_error(err).replace(token, '<token>')}")
