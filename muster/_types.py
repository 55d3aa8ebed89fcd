"""Typed, immutable views of what the server returns, so callers never touch protobuf."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from muster.money import usd
from muster.states import State

if TYPE_CHECKING:
    from muster._convert import Payload, Seconds
    from muster.errors import MusterError
    from muster.signing import TaskSigner


class TaskState(enum.IntEnum):
    """A task's lifecycle state; values match ``muster.v1.TaskState`` on the wire (both
    derived from :class:`muster.states.State`, the one list of states)."""

    QUEUED = State.QUEUED.number
    ASSIGNED = State.ASSIGNED.number
    RUNNING = State.RUNNING.number
    SUCCEEDED = State.SUCCEEDED.number
    FAILED = State.FAILED.number
    CANCELLED = State.CANCELLED.number
    TIMED_OUT = State.TIMED_OUT.number

    @property
    def state(self) -> State:
        """The state by name, as the server stores it."""
        return State[self.name]

    @property
    def is_terminal(self) -> bool:
        """True once the task can no longer change state."""
        return self.state.is_terminal

    @classmethod
    def parse(cls, value: str | int | TaskState) -> TaskState:
        """Accept ``"running"``, ``"RUNNING"``, ``"TASK_STATE_RUNNING"`` or the number."""
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper().replace("-", "_").removeprefix("TASK_STATE_")
        try:
            return cls[name]
        except KeyError:
            choices = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown task state {value[:40]!r} (one of: {choices})") from None

    def __str__(self) -> str:
        return self.name


class Role(enum.IntEnum):
    """What an API token may do; values match ``muster.v1.Role``."""

    SUBMITTER = 1
    """Submit, read and cancel tasks."""
    ADMIN = 2
    """Everything, including AdminService."""
    VIEWER = 3
    """Read-only, for the web console only: reads everything the console shows, calls
    no TaskService or AdminService method."""

    @classmethod
    def parse(cls, value: str | int | Role) -> Role:
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper().removeprefix("ROLE_")
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"unknown role {value[:40]!r} (submitter, viewer or admin)") from None

    def __str__(self) -> str:
        return self.name.lower()


class WaitingReason(enum.IntEnum):
    """Why a QUEUED task is not running yet; values match ``muster.v1.WaitingReason``.

    The server works it out when the task is read; ``Task.waiting_reason`` says it in
    words."""

    NONE = 0
    """Not QUEUED, or nothing holds it back: an agent is about to take it."""
    NO_AGENT_IN_POOL = 1
    NO_AGENT_FOR_KIND = 2
    NO_AGENT_MATCHES_SELECTOR = 3
    CONCURRENCY_LIMIT = 4
    """Its tenant or pool has as many attempts in flight as allowed."""
    BUDGET = 5
    PROVIDER_BACKOFF = 6
    QUOTA_STORE = 7
    RETRY_BACKOFF = 8
    AGENTS_BUSY = 9

    @classmethod
    def of(cls, value: int) -> WaitingReason:
        """The reason for a wire value; NONE for one this SDK does not know yet."""
        try:
            return cls(value)
        except ValueError:
            return cls.NONE

    def __str__(self) -> str:
        return self.name.lower()


class TokenStatus(enum.IntEnum):
    """Whether a bootstrap or API token can still be used; values match
    ``muster.v1.TokenStatus``."""

    ACTIVE = 1
    EXPIRED = 2
    USED_UP = 3
    """A bootstrap token redeemed as often as it allows."""
    DELETED = 4

    @classmethod
    def of(cls, value: int) -> TokenStatus | None:
        """The status for a wire value; None when unset or unknown to this SDK."""
        try:
            return cls(value)
        except ValueError:
            return None

    def __str__(self) -> str:
        return self.name.lower().replace("_", " ")


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class Usage:
    """What AI work consumed: tokens as the agent reported them, and their cost as the
    server computed it from its price table (never a figure taken from the agent)."""

    input_tokens: int = 0
    """Uncached input tokens."""
    output_tokens: int = 0
    cost_micros: int = 0
    """Spend in millionths of a dollar."""
    model: str = ""
    """The model that did the work."""
    cache_creation_input_tokens: int = 0
    """Input tokens written to the prompt cache (every TTL)."""
    cache_read_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    """Of the cache writes, those with the 1-hour TTL."""
    reported_cost_micros: int = 0
    """The tool's own figure (claude-code), recorded for comparison, never charged."""

    @property
    def cost_usd(self) -> float:
        return usd(self.cost_micros)

    @property
    def reported_cost_usd(self) -> float:
        return usd(self.reported_cost_micros)

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )


@dataclass(frozen=True, slots=True)
class AttemptUsage:
    """What one attempt of a task consumed."""

    attempt: int
    agent_id: str = ""
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True)
class Task:
    """One task as the server last reported it."""

    task_id: str
    kind: str
    state: TaskState
    payload: bytes = b""
    pool: str = ""
    selector: Mapping[str, str] = field(default_factory=dict, hash=False)
    priority: int = 0
    attempt: int = 0
    max_attempts: int = 0
    owner: str = ""
    idempotency_key: str = ""
    agent_id: str = ""
    output: bytes = b""
    error: str = ""
    cancel_requested: bool = False
    schedule_to_start_timeout: timedelta | None = None
    start_to_close_timeout: timedelta | None = None
    deadline: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    usage: Usage | None = None
    """Every attempt together (see ``attempt_usage`` for each one)."""
    waiting_reason: str = ""
    """Why a QUEUED task is held back (a budget, a provider back-off); empty otherwise."""
    submitted_by: str = ""
    """The API token name that submitted it (``owner`` is its tenant)."""
    max_cost_micros: int = 0
    """The task's own spend cap over all its attempts; 0: none."""
    attempt_usage: tuple[AttemptUsage, ...] = ()
    """Each attempt that reported usage, oldest first."""
    output_schema: str = ""
    """The JSON Schema (as text) the output must satisfy, if one was given."""
    waiting_reason_code: WaitingReason = WaitingReason.NONE
    """``waiting_reason`` for programs."""
    waiting_until: datetime | None = None
    """When the wait ends, if the server knows (a retry's backoff, a hold)."""
    submit_warning: str = ""
    """Only on what ``submit()`` returns: why no enrolled agent could run the task as
    things stand (no agent in its pool, none with its labels or kind); empty if one could."""
    signed_by: str = ""
    """The key id (RFC 7638 thumbprint) of the key that signed the task; empty if unsigned."""
    trace_id: str = ""
    """The W3C trace id (32 hex digits) of the trace its spans belong to, when it was
    submitted inside a trace (``docs/tracing.md``); empty otherwise."""

    @property
    def signed(self) -> bool:
        """Whether the task was submitted signed (see ``submit(signer=...)``)."""
        return bool(self.signed_by)

    @property
    def max_cost_usd(self) -> float | None:
        """The task's spend cap in US dollars; None when it has none."""
        return usd(self.max_cost_micros) if self.max_cost_micros else None

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    @property
    def succeeded(self) -> bool:
        return self.state is TaskState.SUCCEEDED

    @property
    def output_text(self) -> str:
        """The output decoded as UTF-8 (invalid bytes replaced)."""
        return _text(self.output)

    def output_json(self) -> Any:
        """The output parsed as JSON; ValueError if it is not JSON."""
        return json.loads(self.output)

    @property
    def payload_text(self) -> str:
        return _text(self.payload)

    def payload_json(self) -> Any:
        return json.loads(self.payload)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task to submit with ``submit_many``: exactly the arguments of ``submit``.

    ``payload``: bytes as is, str as UTF-8, dict/list as compact JSON; timeouts are
    timedeltas or seconds (None: the server default); ``deadline`` must be aware.
    """

    kind: str
    payload: Payload = None
    pool: str = "default"
    selector: Mapping[str, str] | None = None
    priority: int = 0
    max_attempts: int | None = None
    idempotency_key: str | None = None
    schedule_to_start_timeout: Seconds | None = None
    start_to_close_timeout: Seconds | None = None
    deadline: datetime | None = None
    max_cost_usd: float | None = None
    output_schema: str | Mapping[str, Any] | None = None
    signer: TaskSigner | None = None


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """What ``submit_many`` made of one item: its ``task``, or the ``error`` (a
    :class:`muster.MusterError`, e.g. InvalidArgumentError) that refused it alone."""

    task: Task | None = None
    """As ``submit`` returns it (``submit_warning`` included); None when refused."""
    error: MusterError | None = None
    """Why this item was refused; None when it was accepted."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class BootstrapToken:
    """A bootstrap token's public record; its secret is returned only once, at creation."""

    token_id: str
    pool: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    name_pattern: str = "*"
    max_uses: int = 1
    uses: int = 0
    expires_at: datetime | None = None
    created_at: datetime | None = None
    created_by: str = ""
    deleted: bool = False
    status: TokenStatus | None = None
    """Active, expired, used up or deleted, as the server judged it when listing."""
    reenroll_agent_id: str = ""
    """A re-enrollment token's agent: it enrolls that existing agent id only."""


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An API token's public record; its secret is returned only once, at creation."""

    token_id: str
    name: str
    role: Role | None
    """None when the server sent a role this SDK does not know."""
    created_at: datetime | None = None
    expires_at: datetime | None = None
    deleted: bool = False
    tenant: str = ""
    """The tenant it belongs to: its tasks, idempotency keys and budgets are the tenant's."""
    status: TokenStatus | None = None
    """Active, expired or deleted, as the server judged it when listing."""


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who owns tasks, idempotency keys and budgets; API tokens belong to one."""

    name: str
    created_at: datetime | None = None
    tokens: int = 0
    """Live (not deleted) API tokens that belong to it."""


@dataclass(frozen=True, slots=True)
class Budget:
    """A spend limit on one scope and what its current period has used.

    Amounts are exact whole micro-dollars; the ``*_usd`` properties are for display.
    """

    scope: str
    """``global``, ``tenant:<name>`` or ``pool:<name>``."""
    limit_micros: int
    period: str = "month"
    """``day`` or ``month`` (UTC calendar periods) or ``none`` (one period forever)."""
    spent_micros: int = 0
    """Settled spend in the current period."""
    reserved_micros: int = 0
    """Held by attempts in flight (their worst case)."""
    period_start: datetime | None = None
    period_end: datetime | None = None
    """When the current period started and ends; None for period ``none``."""
    updated_at: datetime | None = None
    updated_by: str = ""

    @property
    def left_micros(self) -> int:
        """What further work may still reserve in this period (never negative)."""
        return max(0, self.limit_micros - self.spent_micros - self.reserved_micros)

    @property
    def limit_usd(self) -> float:
        return usd(self.limit_micros)

    @property
    def spent_usd(self) -> float:
        return usd(self.spent_micros)

    @property
    def reserved_usd(self) -> float:
        return usd(self.reserved_micros)

    @property
    def left_usd(self) -> float:
        return usd(self.left_micros)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """A pool's settings: the models its AI tasks may name (empty: any with a price)."""

    pool: str
    allowed_models: tuple[str, ...] = ()
    updated_at: datetime | None = None
    """None for a pool nobody has configured (it has the defaults)."""
    updated_by: str = ""


@dataclass(frozen=True, slots=True)
class Certificate:
    """An agent certificate the server issued."""

    serial: str
    agent_id: str
    not_before: datetime | None = None
    not_after: datetime | None = None
    revoked: bool = False
    revoked_at: datetime | None = None
    renewed_from: str = ""
    """The serial it was renewed from; revoking that serial revokes this one too."""
    reason: str = ""
    """How it was issued: enroll, reenroll or renew."""


@dataclass(frozen=True, slots=True)
class Agent:
    """An enrolled agent and its certificates."""

    agent_id: str
    spiffe_id: str = ""
    pool: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    enabled: bool = True
    connected: bool = False
    enrolled_at: datetime | None = None
    last_seen_at: datetime | None = None
    token_id: str = ""
    certificates: tuple[Certificate, ...] = ()
    replica: str = ""
    """The replica holding its live stream (whichever replica answered); empty if none."""
    capabilities: tuple[str, ...] = ()
    """Task kinds it runs (those of its last Hello when not connected)."""
    max_concurrency: int = 0
    in_flight: int = 0
    """Attempts it holds now (assigned or running)."""
    certificate_expires_at: datetime | None = None
    connected_at: datetime | None = None
    removed: bool = False
    """Retired (``muster agents remove``); only a re-enrollment token brings it back."""
    removed_at: datetime | None = None
    rotate_requested_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One row of the audit trail."""

    id: int
    time: datetime | None
    actor: str
    action: str
    target: str = ""
    outcome: str = ""
    peer: str = ""
    request_id: str = ""
    details: str = ""
    """A JSON object as text; never contains secrets."""

    def details_json(self) -> Any:
        """The details parsed; an empty dict when there are none."""
        return json.loads(self.details) if self.details else {}
