"""Translate grpc errors into the SDK's MusterError hierarchy at the client boundary.

Works for both ``grpc.RpcError`` (sync) and ``grpc.aio.AioRpcError``: both expose
``code()``, ``details()`` and ``trailing_metadata()`` once the call has failed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from muster.errors import (
    AuthenticationError,
    ConflictError,
    InvalidArgumentError,
    MusterError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)

logger = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"

_BY_CODE: dict[grpc.StatusCode, type[MusterError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


def error_code(err: grpc.RpcError) -> grpc.StatusCode | None:
    """The status code of a failed call, or None if the error carries none."""
    code = getattr(err, "code", None)
    if code is None:
        return None
    value = code()
    return value if isinstance(value, grpc.StatusCode) else None


def translate(err: grpc.RpcError) -> MusterError:
    """The MusterError for a failed call; the caller raises it ``from err``."""
    code = error_code(err)
    details_fn = getattr(err, "details", None)
    message = (details_fn() if details_fn is not None else None) or (
        code.name if code is not None else "RPC failed"
    )
    cls = _BY_CODE.get(code, MusterError) if code is not None else MusterError
    if cls is QuotaExceededError:
        return QuotaExceededError(message, retry_after=_retry_after(err))
    return cls(message)


def _retry_after(err: grpc.RpcError) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` in the rich status, if the server sent one."""
    trailing = getattr(err, "trailing_metadata", None)
    metadata: Iterable[Any] | None = trailing() if trailing is not None else None
    for key, value in metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            logger.debug("ignoring an undecodable %s trailer", STATUS_DETAILS_KEY)
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return float(info.retry_delay.ToTimedelta().total_seconds())
    return None
