"""Scripted TaskService/AdminService doubles served over real TLS on loopback.

They stand in for the control plane (written in parallel) so the SDK is tested
against a real grpc.aio server and socket. The server runs on its own event loop
in a thread, so the blocking Client and the CLI can call it from the test thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from muster.v1 import admin_pb2, admin_pb2_grpc, common_pb2, task_pb2, task_pb2_grpc

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

TOKEN = "mst_test_0123456789abcdef"
"""The only bearer token the doubles accept."""

S = common_pb2.TaskState


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(datetime.now(UTC))
    return ts


@dataclass
class Failure:
    """Make every call fail with this status (and RetryInfo when retry_after is set)."""

    code: grpc.StatusCode
    details: str
    retry_after: float | None = None


@dataclass
class Step:
    """One scripted change a Watch stream applies and sends, after a short pause."""

    state: int
    output: bytes = b""
    error: str = ""
    delay: float = 0.02


END_STREAM = None
"""In a watch script: end the stream here without a terminal state (a replica draining)."""


@dataclass
class State:
    """Everything the doubles remember; reset between tests."""

    tasks: dict[str, common_pb2.Task] = field(default_factory=dict)
    scripts: dict[str, list[Step | None]] = field(default_factory=dict)
    auto_echo: bool = True
    """Watching an ``echo`` task runs it: RUNNING, then SUCCEEDED with output = payload."""
    kind_scripts: dict[str, list[Step | None]] = field(default_factory=dict)
    """Scripts every new task of that kind gets (set before submitting through the CLI)."""
    failure: Failure | None = None
    watch_failures: list[Failure] = field(default_factory=list)
    """Each Watch call pops one and fails with it (after counting the call)."""
    metadata: list[dict[str, str]] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    watch_calls: int = 0
    budgets: dict[str, admin_pb2.Budget] = field(default_factory=dict)
    pools: dict[str, admin_pb2.PoolSettings] = field(default_factory=dict)


def seed(state: State, count: int, kind: str = "echo") -> list[str]:
    """Queue ``count`` tasks directly, faster than submitting them; returns their ids."""
    ids = []
    for _ in range(count):
        task_id = f"t-{len(state.tasks) + 1:04d}"
        state.tasks[task_id] = common_pb2.Task(
            task_id=task_id, kind=kind, pool="default", state=S.TASK_STATE_QUEUED, attempt=1
        )
        ids.append(task_id)
    return ids


async def _authorize(state: State, request: Any, context: Ctx) -> None:
    md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    state.metadata.append(md)
    state.requests.append(request)
    if md.get("authorization") != f"Bearer {TOKEN}":
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing API token")
    failure = state.failure
    if failure is not None:
        status = status_pb2.Status(code=failure.code.value[0], message=failure.details)
        if failure.retry_after is not None:
            info = error_details_pb2.RetryInfo()
            info.retry_delay.FromTimedelta(timedelta(seconds=failure.retry_after))
            status.details.add().Pack(info)
        await context.abort_with_status(rpc_status.to_status(status))


class FakeTasks(task_pb2_grpc.TaskServiceServicer):
    def __init__(self, state: State) -> None:
        self.state = state

    async def Submit(
        self, request: task_pb2.SubmitRequest, context: Ctx
    ) -> task_pb2.SubmitResponse:
        await _authorize(self.state, request, context)
        if not request.kind:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "kind is required")
        task_id = f"t-{len(self.state.tasks) + 1:04d}"
        task = common_pb2.Task(
            task_id=task_id,
            kind=request.kind,
            payload=request.payload,
            pool=request.pool or "default",
            selector=request.selector,
            priority=request.priority,
            state=S.TASK_STATE_QUEUED,
            attempt=1,
            max_attempts=request.max_attempts or 3,
            owner="tester",
            idempotency_key=request.idempotency_key,
            created_at=_now(),
            updated_at=_now(),
            submitted_by="tester",
            max_cost_micros=round(request.max_cost_usd * 1_000_000),
            output_schema=request.output_schema,
        )
        self.state.tasks[task_id] = task
        if request.kind in self.state.kind_scripts:
            self.state.scripts[task_id] = list(self.state.kind_scripts[request.kind])
        elif request.kind == "echo" and self.state.auto_echo:
            self.state.scripts[task_id] = [
                Step(S.TASK_STATE_RUNNING),
                Step(S.TASK_STATE_SUCCEEDED, output=request.payload),
            ]
        return task_pb2.SubmitResponse(task=task, created=True)

    async def _find(self, task_id: str, context: Ctx) -> common_pb2.Task:
        task = self.state.tasks.get(task_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
        assert task is not None
        return task

    async def Get(self, request: task_pb2.GetTaskRequest, context: Ctx) -> common_pb2.Task:
        await _authorize(self.state, request, context)
        return await self._find(request.task_id, context)

    async def List(
        self, request: task_pb2.ListTasksRequest, context: Ctx
    ) -> task_pb2.ListTasksResponse:
        await _authorize(self.state, request, context)
        matching = [
            t
            for t in reversed(self.state.tasks.values())
            if (not request.states or t.state in request.states)
            and (not request.pool or t.pool == request.pool)
            and (not request.kind or t.kind == request.kind)
        ]
        start = int(request.page_token or 0)
        size = request.page_size or 50
        page = matching[start : start + size]
        more = start + size < len(matching)
        return task_pb2.ListTasksResponse(
            tasks=page, next_page_token=str(start + size) if more else ""
        )

    async def Cancel(self, request: task_pb2.CancelTaskRequest, context: Ctx) -> common_pb2.Task:
        await _authorize(self.state, request, context)
        task = await self._find(request.task_id, context)
        if task.state >= S.TASK_STATE_SUCCEEDED:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "task already finished")
        task.state = S.TASK_STATE_CANCELLED
        task.error = request.reason or "cancelled"
        task.finished_at.CopyFrom(_now())
        return task

    async def Watch(
        self, request: task_pb2.WatchTaskRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.Task]:
        await _authorize(self.state, request, context)
        self.state.watch_calls += 1
        if self.state.watch_failures:
            failure = self.state.watch_failures.pop(0)
            await context.abort(failure.code, failure.details)
        task = await self._find(request.task_id, context)
        yield task
        script = self.state.scripts.setdefault(task.task_id, [])
        while task.state < S.TASK_STATE_SUCCEEDED:
            if not script:
                await asyncio.sleep(3600)  # never changes: the client's timeout must end it
            step = script.pop(0)
            if step is END_STREAM:
                return
            await asyncio.sleep(step.delay)
            task.state = step.state  # type: ignore[assignment]
            task.output = step.output
            task.error = step.error
            task.updated_at.CopyFrom(_now())
            if step.state == S.TASK_STATE_RUNNING:
                task.agent_id = "agent-1"
                task.started_at.CopyFrom(_now())
            yield task


def _ts(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


EXPIRES = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

PERIOD_START = datetime(2026, 12, 1, tzinfo=UTC)
PERIOD_END = datetime(2027, 1, 1, tzinfo=UTC)
SPENT = 1_250_000
"""What every budget the doubles hold has spent (1.25 USD) and reserved (0.40 USD)."""
RESERVED = 400_000

BOOTSTRAP_SECRET = "mbt_secret_value_abc"
API_SECRET = "mst_new_api_secret_xyz"


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    """Canned answers; tests check what the SDK sent and how it read the reply."""

    def __init__(self, state: State) -> None:
        self.state = state

    async def CreateBootstrapToken(
        self, request: admin_pb2.CreateBootstrapTokenRequest, context: Ctx
    ) -> admin_pb2.CreateBootstrapTokenResponse:
        await _authorize(self.state, request, context)
        token = admin_pb2.BootstrapToken(
            token_id="bt-1",
            pool=request.pool,
            labels=request.labels,
            name_pattern=request.name_pattern or "*",
            max_uses=request.max_uses or 1,
            expires_at=_ts(EXPIRES),
            created_at=_now(),
            created_by="tester",
        )
        return admin_pb2.CreateBootstrapTokenResponse(token=token, secret=BOOTSTRAP_SECRET)

    async def ListBootstrapTokens(
        self, request: admin_pb2.ListBootstrapTokensRequest, context: Ctx
    ) -> admin_pb2.ListBootstrapTokensResponse:
        await _authorize(self.state, request, context)
        return admin_pb2.ListBootstrapTokensResponse(
            tokens=[
                admin_pb2.BootstrapToken(
                    token_id="bt-1", pool="gpu", max_uses=2, uses=1, expires_at=_ts(EXPIRES)
                )
            ]
        )

    async def DeleteBootstrapToken(
        self, request: admin_pb2.DeleteBootstrapTokenRequest, context: Ctx
    ) -> admin_pb2.DeleteBootstrapTokenResponse:
        await _authorize(self.state, request, context)
        if request.token_id != "bt-1":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no bootstrap token {request.token_id}")
        return admin_pb2.DeleteBootstrapTokenResponse()

    async def CreateApiToken(
        self, request: admin_pb2.CreateApiTokenRequest, context: Ctx
    ) -> admin_pb2.CreateApiTokenResponse:
        await _authorize(self.state, request, context)
        token = admin_pb2.ApiToken(
            token_id="at-1", name=request.name, role=request.role, tenant=request.tenant or "own"
        )
        return admin_pb2.CreateApiTokenResponse(token=token, secret=API_SECRET)

    async def ListApiTokens(
        self, request: admin_pb2.ListApiTokensRequest, context: Ctx
    ) -> admin_pb2.ListApiTokensResponse:
        await _authorize(self.state, request, context)
        return admin_pb2.ListApiTokensResponse(
            tokens=[
                admin_pb2.ApiToken(
                    token_id="at-1", name="ci", role=admin_pb2.ROLE_SUBMITTER, tenant="acme"
                )
            ]
        )

    async def DeleteApiToken(
        self, request: admin_pb2.DeleteApiTokenRequest, context: Ctx
    ) -> admin_pb2.DeleteApiTokenResponse:
        await _authorize(self.state, request, context)
        return admin_pb2.DeleteApiTokenResponse()

    def _agent(self, agent_id: str, enabled: bool = True) -> admin_pb2.Agent:
        return admin_pb2.Agent(
            agent_id=agent_id,
            spiffe_id=f"spiffe://example.org/agent/{agent_id}",
            pool="gpu",
            labels={"zone": "a"},
            enabled=enabled,
            connected=True,
            certificates=[
                admin_pb2.Certificate(
                    serial="0abc", agent_id=agent_id, not_after=_ts(EXPIRES), revoked=False
                )
            ],
        )

    async def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, context: Ctx
    ) -> admin_pb2.ListAgentsResponse:
        await _authorize(self.state, request, context)
        return admin_pb2.ListAgentsResponse(agents=[self._agent("build-01")])

    async def GetAgent(self, request: admin_pb2.GetAgentRequest, context: Ctx) -> admin_pb2.Agent:
        await _authorize(self.state, request, context)
        return self._agent(request.agent_id)

    async def SetAgentEnabled(
        self, request: admin_pb2.SetAgentEnabledRequest, context: Ctx
    ) -> admin_pb2.Agent:
        await _authorize(self.state, request, context)
        return self._agent(request.agent_id, enabled=request.enabled)

    async def RevokeAgent(
        self, request: admin_pb2.RevokeAgentRequest, context: Ctx
    ) -> admin_pb2.RevokeAgentResponse:
        await _authorize(self.state, request, context)
        return admin_pb2.RevokeAgentResponse(serials=["0abc", "0def"])

    async def RevokeCertificate(
        self, request: admin_pb2.RevokeCertificateRequest, context: Ctx
    ) -> admin_pb2.RevokeCertificateResponse:
        await _authorize(self.state, request, context)
        return admin_pb2.RevokeCertificateResponse()

    async def QueryAudit(
        self, request: admin_pb2.QueryAuditRequest, context: Ctx
    ) -> admin_pb2.QueryAuditResponse:
        await _authorize(self.state, request, context)
        event = admin_pb2.AuditEvent(
            id=7,
            time=_ts(datetime(2026, 1, 1, tzinfo=UTC)),
            actor="admin",
            action="token.create",
            target="bt-1",
            outcome="ok",
            details='{"pool": "gpu"}',
        )
        return admin_pb2.QueryAuditResponse(events=[event])

    # Tenants, budgets, pool settings: kept in the state, so set-then-get round-trips.

    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: Ctx
    ) -> admin_pb2.ListTenantsResponse:
        await _authorize(self.state, request, context)
        return admin_pb2.ListTenantsResponse(
            tenants=[
                admin_pb2.Tenant(name="acme", created_at=_ts(PERIOD_START), tokens=2),
                admin_pb2.Tenant(name="ci", created_at=_ts(PERIOD_START), tokens=0),
            ]
        )

    async def SetBudget(
        self, request: admin_pb2.SetBudgetRequest, context: Ctx
    ) -> admin_pb2.Budget:
        await _authorize(self.state, request, context)
        if request.limit_micros < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit_micros: must be >= 0")
        period = request.period or "month"
        budget = admin_pb2.Budget(
            scope=request.scope,
            limit_micros=request.limit_micros,
            period=period,
            spent_micros=SPENT,
            reserved_micros=RESERVED,
            updated_at=_ts(PERIOD_START),
            updated_by="admin",
        )
        if period != "none":
            budget.period_start.CopyFrom(_ts(PERIOD_START))
            budget.period_end.CopyFrom(_ts(PERIOD_END))
        self.state.budgets[request.scope] = budget
        return budget

    async def GetBudget(
        self, request: admin_pb2.GetBudgetRequest, context: Ctx
    ) -> admin_pb2.Budget:
        await _authorize(self.state, request, context)
        budget = self.state.budgets.get(request.scope)
        if budget is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no budget for scope {request.scope!r}")
        assert budget is not None
        return budget

    async def ListBudgets(
        self, request: admin_pb2.ListBudgetsRequest, context: Ctx
    ) -> admin_pb2.ListBudgetsResponse:
        await _authorize(self.state, request, context)
        return admin_pb2.ListBudgetsResponse(
            budgets=[self.state.budgets[k] for k in sorted(self.state.budgets)]
        )

    async def DeleteBudget(
        self, request: admin_pb2.DeleteBudgetRequest, context: Ctx
    ) -> admin_pb2.DeleteBudgetResponse:
        await _authorize(self.state, request, context)
        if self.state.budgets.pop(request.scope, None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no budget for scope {request.scope!r}")
        return admin_pb2.DeleteBudgetResponse()

    async def SetPoolSettings(
        self, request: admin_pb2.SetPoolSettingsRequest, context: Ctx
    ) -> admin_pb2.PoolSettings:
        await _authorize(self.state, request, context)
        settings = admin_pb2.PoolSettings(
            pool=request.pool,
            allowed_models=request.allowed_models,
            updated_at=_ts(PERIOD_START),
            updated_by="admin",
        )
        self.state.pools[request.pool] = settings
        return settings

    async def GetPoolSettings(
        self, request: admin_pb2.GetPoolSettingsRequest, context: Ctx
    ) -> admin_pb2.PoolSettings:
        await _authorize(self.state, request, context)
        return self.state.pools.get(request.pool) or admin_pb2.PoolSettings(pool=request.pool)

    async def ListPoolSettings(
        self, request: admin_pb2.ListPoolSettingsRequest, context: Ctx
    ) -> admin_pb2.ListPoolSettingsResponse:
        await _authorize(self.state, request, context)
        return admin_pb2.ListPoolSettingsResponse(
            pools=[self.state.pools[k] for k in sorted(self.state.pools)]
        )


class ServerThread:
    """A grpc.aio server on 127.0.0.1:0 with TLS, running its own loop in a thread."""

    def __init__(self, chain_pem: bytes, key_pem: bytes) -> None:
        self.state = State()
        self._creds = grpc.ssl_server_credentials([(key_pem, chain_pem)])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> int:
        server = grpc.aio.server()
        task_pb2_grpc.add_TaskServiceServicer_to_server(FakeTasks(self.state), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(FakeAdmin(self.state), server)
        port = server.add_secure_port("127.0.0.1:0", self._creds)
        await server.start()
        self._server = server
        return port

    def reset(self) -> State:
        """Forget everything (a fresh State object the servicers share)."""
        fresh = State()
        for name in fresh.__dataclass_fields__:
            setattr(self.state, name, getattr(fresh, name))
        return self.state

    def stop(self) -> None:
        try:
            if self._server is not None:
                asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
