"""What a console page answers when it cannot show what was asked: a status and a
message for a person, never exception text or a traceback."""

from __future__ import annotations

import grpc

from muster.server.services.errors import ServiceError

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}


class ConsoleError(Exception):
    """End a request with ``status`` and a page saying ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ConsoleError:
    return ConsoleError(400, message)


def from_service(err: ServiceError) -> ConsoleError:
    """A service's refusal (its message names the field and the rule) as a page."""
    return ConsoleError(_HTTP_STATUS.get(err.code, 500), err.message)
