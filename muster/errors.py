"""The SDK's exception hierarchy. Every error a caller can handle is a MusterError."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from muster._types import Task


class MusterError(Exception):
    """Root of every error the SDK raises; ``__cause__`` keeps the grpc error."""


class ConfigError(MusterError):
    """Configuration is missing or invalid (bad address, unreadable CA file, ...)."""


class AuthenticationError(MusterError):
    """The server did not accept our credentials (UNAUTHENTICATED)."""


class PermissionDeniedError(MusterError):
    """Authenticated, but not allowed to do this (PERMISSION_DENIED)."""


class InvalidArgumentError(MusterError):
    """The request was malformed or out of range (INVALID_ARGUMENT)."""


class NotFoundError(MusterError):
    """The task, agent or token does not exist (NOT_FOUND)."""


class ConflictError(MusterError):
    """The request conflicts with the current state (ALREADY_EXISTS, FAILED_PRECONDITION)."""


class QuotaExceededError(MusterError):
    """A rate limit, quota or budget refused the call (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds the server asked us to wait before retrying; None if it is terminal."""


class UnavailableError(MusterError):
    """The server could not be reached or is shutting down (UNAVAILABLE, DEADLINE_EXCEEDED)."""


class WaitTimeoutError(MusterError, TimeoutError):
    """``wait()`` gave up before the task reached a terminal state; the task goes on.

    Also a builtin ``TimeoutError``, so ``except TimeoutError`` works as expected.
    """

    def __init__(self, message: str, task: Task | None = None) -> None:
        super().__init__(message)
        self.task = task
        """The last state seen, or None if none arrived."""
