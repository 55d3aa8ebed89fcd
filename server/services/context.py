"""What every handler needs from a call: who is on the other end and which request this is."""

from __future__ import annotations

import secrets
from typing import Any

import grpc
import grpc.aio


def peer_address(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's IP address without the port (``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _port = rest.rpartition(":")
        return host.strip("[]").replace("%5B", "").replace("%5D", "")
    return peer


def request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's ``x-request-id`` (trimmed) or a fresh one, for correlating audit rows."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value:
            return value[:64]
    return secrets.token_hex(8)
