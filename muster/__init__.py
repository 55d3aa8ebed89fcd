"""Muster: the client SDK and the protocol code shared by server and agent.

import muster

with muster.Client() as client:  # settings from MUSTER_* / .env / .muster/
    task = client.submit("echo", {"msg": "hi"})
    print(client.wait(task.task_id, timeout=60).output_text)
"""

from muster._admin import AdminClient, AsyncAdminClient
from muster._client import AsyncClient
from muster._sync_client import Client
from muster._types import (
    Agent,
    ApiToken,
    AttemptUsage,
    AuditEvent,
    BootstrapToken,
    Budget,
    Certificate,
    PoolSettings,
    Role,
    SubmitOutcome,
    Task,
    TaskSpec,
    TaskState,
    Tenant,
    TokenStatus,
    Usage,
    WaitingReason,
)
from muster.config import ClientConfig
from muster.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    InvalidArgumentError,
    MusterError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
    WaitTimeoutError,
)
from muster.signing import TaskSigner

# Grouped by audience rather than sorted, so the facade reads as a table of contents.
__all__ = [  # noqa: RUF022
    # Clients
    "AdminClient",
    "AsyncAdminClient",
    "AsyncClient",
    "Client",
    # Configuration
    "ClientConfig",
    # Signed tasks
    "TaskSigner",
    # Types
    "Agent",
    "ApiToken",
    "AttemptUsage",
    "AuditEvent",
    "BootstrapToken",
    "Budget",
    "Certificate",
    "PoolSettings",
    "Role",
    "SubmitOutcome",
    "Task",
    "TaskSpec",
    "TaskState",
    "Tenant",
    "TokenStatus",
    "Usage",
    "WaitingReason",
    # Errors
    "AuthenticationError",
    "ConfigError",
    "ConflictError",
    "InvalidArgumentError",
    "MusterError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "UnavailableError",
    "WaitTimeoutError",
]
