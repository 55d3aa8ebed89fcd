"""gRPC channels to the two listeners: server-authenticated TLS to enroll, mTLS for the stream."""

from __future__ import annotations

import grpc
from grpc import aio

from muster.agent.state import Credentials

# Reconnects are paced by our own backoff; keep grpc's from adding a second, slower layer.
_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


def _options(tls_server_name: str | None) -> list[tuple[str, str | int]]:
    options = list(_OPTIONS)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


def enrollment_channel(
    target: str, ca_bundle_pem: bytes, tls_server_name: str | None = None
) -> aio.Channel:
    """TLS to the api listener: we verify the server; the token proves us."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_bundle_pem)
    return aio.secure_channel(target, creds, options=_options(tls_server_name))


def agent_channel(
    target: str, credentials: Credentials, tls_server_name: str | None = None
) -> aio.Channel:
    """mTLS to the agent listener: our certificate is our identity."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=credentials.bundle_pem,
        private_key=credentials.key_pem,
        certificate_chain=credentials.chain_pem,
    )
    return aio.secure_channel(target, creds, options=_options(tls_server_name))


def describe_rpc_error(err: grpc.aio.AioRpcError) -> str:
    """``CODE: details`` for logs; grpc details never carry our secrets."""
    details = (err.details() or "").strip()
    return f"{err.code().name}: {details}" if details else err.code().name
