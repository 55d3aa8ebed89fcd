"""Who is calling. The auth interceptors set these; handlers read them and nothing else.

Identity never comes from a message field: an agent is whoever its verified client
certificate says, a client is whoever its API token belongs to.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Principal:
    """A client authenticated by an API token."""

    name: str
    """The token's name: the audit actor and a task's ``submitted_by``."""
    role: str
    token_id: str
    tenant: str
    """Owns the tasks, idempotency keys and budgets this token touches."""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """An agent authenticated by a client certificate from our CA, checked against the database."""

    agent_id: str
    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    pool: str
    labels: dict[str, str]
    rotate_requested_at: datetime | None = None
    """An operator asked this agent to rotate (``muster agents rotate``) at this time."""
    issued_at: datetime | None = None
    """When the certificate was issued (None: not recorded, before migration 0004)."""


current_principal: ContextVar[Principal] = ContextVar("current_principal")
current_agent: ContextVar[AgentIdentity] = ContextVar("current_agent")
