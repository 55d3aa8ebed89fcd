"""Certificate rotation: a fresh key, a CSR over the current mTLS channel, an atomic swap."""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable

import grpc
from grpc import aio

from muster._errors_map import translate
from muster.agent import keys
from muster.agent.state import Credentials, StateDir
from muster.errors import QuotaExceededError
from muster.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

RENEW_WINDOW = (1 / 2, 2 / 3)
"""Where in the certificate's lifetime to renew when the server gives no time."""


async def renew_certificate(
    channel: aio.Channel, state: StateDir, *, rpc_timeout: float
) -> Credentials:
    """Call AgentService.Renew with a new key and store the result; AioRpcError on refusal."""
    key = keys.generate_key()
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    response = await stub.Renew(
        agent_pb2.RenewRequest(csr_pem=keys.build_csr(key)), timeout=rpc_timeout
    )
    if response.trust_bundle_pem:
        state.save_trust_bundle(response.trust_bundle_pem, response.trust_bundle_version)
    # b"": keep the bundle stored (by version) above.
    credentials = state.save_renewal(key, response.certificate_chain_pem, b"")
    log.info("certificate renewed; valid until %s", credentials.leaf.not_after.isoformat())
    return credentials


def refused_retry_after(err: aio.AioRpcError) -> float | None:
    """The server's retry time when it refused a renewal for its per-agent rate
    (RESOURCE_EXHAUSTED with RetryInfo); None for any other refusal."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    translated = translate(err)
    return translated.retry_after if isinstance(translated, QuotaExceededError) else None


def renewal_time(
    leaf: keys.LeafInfo,
    renew_after: dt.datetime | None = None,
    *,
    rand: Callable[[float, float], float] = random.uniform,
) -> dt.datetime:
    """The server's ``renew_after`` when given, else a jittered point in RENEW_WINDOW."""
    if renew_after is not None:
        return min(renew_after, leaf.not_after)
    fraction = rand(*RENEW_WINDOW)
    return leaf.not_before + leaf.lifetime * fraction
