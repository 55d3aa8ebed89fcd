"""What the pages answer: the data, bad input as a 400 or 404 page that says why (never
a traceback), and no way to change anything."""

from __future__ import annotations

import re

import pytest

from muster import AsyncClient
from muster.server.app import ServerHandle
from muster.server.console import security
from tests.conftest import client_config
from tests.console.conftest import Console, admin_token, message
from tests.server.test_trace_id import TRACE_ID, inside_remote_trace


@pytest.fixture
async def signed_in(console_server: ServerHandle, console: Console) -> Console:
    response, _ = await console.login(admin_token(console_server))
    assert response.status == 303
    return console


BAD_INPUT = [
    ("/tasks/no-such-task", 404, "no task 'no-such-task'"),
    ("/agents/nobody", 404, "no agent 'nobody'"),
    ("/tasks?state=bogus", 400, "state: 'bogus' is not a task state (one of: queued, "),
    ("/tasks?state=running&state=", 200, ""),
    ("/tasks?colour=red", 400, "unknown filter 'colour' (this page takes: state, kind, "),
    ("/tasks?limit=0", 400, "limit: '0' is not a number from 1 to 500"),
    ("/tasks?limit=x", 400, "limit: 'x' is not a number from 1 to 500"),
    ("/tasks?pool=Not%20A%20Pool", 400, "pool: 'Not A Pool' is not valid (1-63 lower-case"),
    ("/tasks?kind=echo&kind=sleep", 400, "kind: give it once"),
    ("/tasks?before=garbage", 400, "before: not a page link from this console"),
    ("/tasks?tenant=%00", 400, "tenant: "),
    ("/audit?since=yesterday", 400, "since: invalid time 'yesterday'"),
    ("/audit?limit=5000", 400, "limit: '5000' is not a number from 1 to 1000"),
    ("/audit?actor=%1b%5b2J", 400, "actor: "),
    ("/budgets?x=1", 400, "unknown filter 'x' (this page takes none)"),
    ("/nowhere", 404, "There is no such page."),
    ("/tasks/%3Cscript%3Ealert(1)%3C%2Fscript%3E", 404, "no task '<script>alert(1)</script>'"),
]
"""(path, status, what the page says): the helpful message of each refusal."""


async def test_bad_input_gets_a_page_saying_why(signed_in: Console) -> None:
    for path, status, says in BAD_INPUT:
        response, page = await signed_in.get(path)
        assert response.status == status, (path, page)
        assert message(page).startswith(says), (path, message(page))
        assert "Traceback" not in page and "Error:" not in page and "<script" not in page
        assert response.headers["Content-Security-Policy"] == security.CSP


async def test_the_console_is_read_only(console_server: ServerHandle, signed_in: Console) -> None:
    assert console_server.console is not None
    writes = {
        (route.method, route.resource.canonical)
        for route in console_server.console.app.router.routes()
        if route.method not in ("GET", "HEAD") and route.resource is not None
    }
    assert writes == {("POST", "/login"), ("POST", "/logout")}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("/", "/agents", "/tasks", "/tasks/x", "/budgets", "/audit"):
            response, page = await signed_in.request(method, path)
            assert response.status == 405, (method, path)
            assert f"read-only: {method} is not allowed" in message(page)
    assert (await signed_in.request("HEAD", "/tasks"))[0].status == 200


async def test_a_queued_task_shows_why_it_waits(
    console_server: ServerHandle, signed_in: Console
) -> None:
    async with AsyncClient(client_config(console_server)) as client:
        with inside_remote_trace():
            task = await client.submit("render", b'{"scene": 1}', pool="gpu")
    response, page = await signed_in.get("/")
    assert response.status == 200
    assert re.search(r"<td>gpu</td><td><a [^>]*>render</a></td><td>1</td>", page), page
    assert "NO_AGENT_IN_POOL" in page

    response, page = await signed_in.get("/tasks?state=queued&pool=gpu&tenant=admin")
    assert response.status == 200 and task.task_id in page
    response, page = await signed_in.get("/tasks?state=succeeded")
    assert task.task_id not in page
    response, page = await signed_in.get("/tasks?tenant=nobody")
    assert task.task_id not in page and "No task matches." in page

    response, page = await signed_in.get(f"/tasks/{task.task_id}")
    assert response.status == 200
    assert "QUEUED" in page and "no enabled agent" in page
    assert "task.submit" in page  # its history, from the audit trail
    assert "&#34;scene&#34;: 1" in page  # the payload, as indented JSON, escaped
    assert f"<td>{TRACE_ID}</td>" in page  # the trace it was submitted in


async def test_the_task_list_pages(console_server: ServerHandle, signed_in: Console) -> None:
    async with AsyncClient(client_config(console_server)) as client:
        ids = [(await client.submit("echo", b"x", pool="none")).task_id for _ in range(5)]
    pages: list[list[str]] = []
    link: str | None = "/tasks?limit=2&pool=none"
    while link is not None:
        response, page = await signed_in.get(link)
        assert response.status == 200
        pages.append(re.findall(r'href="/tasks/([^"]+)"', page))
        found = re.search(r'href="(/tasks\?[^"]*)" id="next"', page)
        link = found.group(1).replace("&amp;", "&") if found else None
    assert [len(p) for p in pages] == [2, 2, 1]  # two a page, each task once, newest first
    assert sorted(t for p in pages for t in p) == sorted(ids) and pages[0][0] == ids[-1]


async def test_the_audit_page_shows_the_chain_status(signed_in: Console) -> None:
    response, page = await signed_in.get("/audit?action=console.login&since=-1h")
    assert response.status == 200
    assert re.search(r'id="chain-status">Chains verified: OK: \d+ rows in 1 chains', page), page
    response, page = await signed_in.get("/budgets")
    assert response.status == 200 and "No budget is set" in page
