"""The console's pages: each reads (``ConsoleReads``), shapes (``views``) and renders.
Every route here is a GET; the router answers anything else with 405."""

from __future__ import annotations

from urllib.parse import urlencode

import grpc
from aiohttp import web

from muster.server.clock import Clock
from muster.server.console import filters, views
from muster.server.console.chain import ChainVerifier
from muster.server.console.errors import ConsoleError
from muster.server.console.reads import ConsoleReads, pools_of, reason_name
from muster.server.console.render import Renderer
from muster.server.services.errors import ServiceError
from muster.states import State
from muster.v1 import common_pb2


class Pages:
    def __init__(
        self, reads: ConsoleReads, chains: ChainVerifier, renderer: Renderer, clock: Clock
    ) -> None:
        self._reads = reads
        self._chains = chains
        self._renderer = renderer
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.overview),
            web.get("/agents", self.agents),
            web.get("/agents/{agent_id}", self.agent),
            web.get("/tasks", self.tasks),
            web.get("/tasks/{task_id}", self.task),
            web.get("/budgets", self.budgets),
            web.get("/audit", self.audit),
        ]

    async def overview(self, request: web.Request) -> web.StreamResponse:
        _no_filters(request)
        agents = await self._reads.agents()
        queues = await self._reads.queues()
        settings = {s.pool: list(s.allowed_models) for s in await self._reads.pool_settings()}
        now = self._clock.now()
        pools = pools_of(agents)
        for queue in queues:
            pools.setdefault(queue.pool, dict.fromkeys(_POOL_COLUMNS, 0))
        return self._renderer.page(
            request,
            "overview.html",
            title="Pools and queues",
            pools=[
                {
                    "pool": name,
                    **counts,
                    "models": ", ".join(settings.get(name, [])) or "any priced",
                }
                for name, counts in sorted(pools.items())
            ],
            queues=[
                {
                    "pool": q.pool,
                    "kind": q.kind,
                    "queued": q.queued,
                    "oldest": views.age(q.oldest, now),
                    "link": "/tasks?"
                    + urlencode({"state": "queued", "pool": q.pool, "kind": q.kind}),
                    "reasons": [
                        {"code": code, "count": count, "example": views.line(q.examples[code])}
                        for code, count in q.reasons.most_common()
                    ],
                }
                for q in queues
            ],
        )

    async def agents(self, request: web.Request) -> web.StreamResponse:
        pool = filters.pool_filter(request.query)
        agents = await self._reads.agents(pool)
        rows = [views.agent_row(a) for a in agents]
        return self._renderer.page(
            request,
            "agents.html",
            title="Agents",
            pool=pool,
            agents=rows,
            connected=sum(1 for a in agents if a.connected),
        )

    async def agent(self, request: web.Request) -> web.StreamResponse:
        _no_filters(request)
        agent = await self._reads.agent(request.match_info["agent_id"])
        return self._renderer.page(
            request,
            "agent.html",
            title=f"Agent {agent.agent_id}",
            agent=views.agent_row(agent),
            certificates=[views.certificate_row(c) for c in agent.certificates],
        )

    async def tasks(self, request: web.Request) -> web.StreamResponse:
        wanted = filters.task_filter(request.query)
        page = await self._reads.tasks(wanted)
        next_link = ""
        if page.next_before is not None:
            query = [(k, v) for k, v in request.query.items() if k != "before"]
            query.append(("before", filters.encode_cursor(*page.next_before)))
            next_link = "/tasks?" + urlencode(query)
        return self._renderer.page(
            request,
            "tasks.html",
            title="Tasks",
            tasks=[views.task_row(t) for t in page.tasks],
            states=[s.value.lower() for s in State],
            chosen={s.value.lower() for s in wanted.states},
            wanted=wanted,
            paged=wanted.before is not None,
            next_link=next_link,
        )

    async def task(self, request: web.Request) -> web.StreamResponse:
        _no_filters(request)
        task_id = filters.task_id(request.match_info["task_id"])
        history = await self._reads.task(task_id)
        task = history.task
        return self._renderer.page(
            request,
            "task.html",
            title=f"Task {task.task_id}",
            task=views.task_row(task),
            fields=views.task_fields(task),
            attempts=views.attempt_rows(task),
            events=[views.audit_row(e) for e in history.events],
            payload=views.content(task.payload),
            output=views.content(task.output),
            error=views.text(task.error),
            finished=task.state
            in (
                common_pb2.TASK_STATE_SUCCEEDED,
                common_pb2.TASK_STATE_FAILED,
                common_pb2.TASK_STATE_CANCELLED,
                common_pb2.TASK_STATE_TIMED_OUT,
            ),
            waiting_code=reason_name(task.waiting_reason_code),
        )

    async def budgets(self, request: web.Request) -> web.StreamResponse:
        _no_filters(request)
        try:
            budgets = await self._reads.budgets()
        except ServiceError as err:
            if err.code != grpc.StatusCode.UNAVAILABLE:
                raise
            return self._renderer.page(
                request,
                "budgets.html",
                status=503,
                title="Budgets",
                budgets=[],
                problem=err.message,
            )
        return self._renderer.page(
            request,
            "budgets.html",
            title="Budgets",
            budgets=[views.budget_row(b) for b in budgets],
            problem="",
        )

    async def audit(self, request: web.Request) -> web.StreamResponse:
        wanted = filters.audit_filter(request.query, self._clock.now())
        events = await self._reads.audit(wanted)
        status = await self._chains.status()
        return self._renderer.page(
            request,
            "audit.html",
            title="Audit trail",
            events=[views.audit_row(e) for e in events],
            query={
                k: request.query.get(k, "") for k in ("actor", "action", "since", "until", "limit")
            },
            chain=status,
            checked_at=views.moment(status.checked_at),
        )


_POOL_COLUMNS = ("enrolled", "enabled", "connected", "slots", "in_flight")


def _no_filters(request: web.Request) -> None:
    """A page that takes no filter refuses any, rather than ignore what was meant."""
    if request.query:
        raise ConsoleError(
            400, f"unknown filter {next(iter(request.query))[:40]!r} (this page takes none)"
        )
