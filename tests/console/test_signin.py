"""Signing in to the console over its real HTTPS listener: which tokens get a session,
what the cookie looks like, what refusals look like, and that a token never comes back."""

from __future__ import annotations

import pytest

from muster import AsyncAdminClient, AsyncClient
from muster.errors import PermissionDeniedError
from muster.server.app import ServerHandle
from muster.server.console.security import CSP
from muster.server.console.signin import COOKIE
from tests.conftest import client_config
from tests.console.conftest import Console, admin_token, message

PAGES = ("/", "/agents", "/tasks", "/budgets", "/audit", "/tasks?state=queued")


async def audit_actions(server: ServerHandle, action: str) -> list[dict[str, object]]:
    await server.flush_audit()
    async with AsyncAdminClient(client_config(server)) as admin:
        events = await admin.query_audit(action=action)
    return [{"actor": e.actor, "target": e.target, "details": e.details} for e in events]


async def test_an_admin_token_signs_in_to_a_strict_session_cookie(
    console_server: ServerHandle, console: Console
) -> None:
    token = admin_token(console_server)
    response, page = await console.get("/")
    assert (response.status, response.headers["Location"]) == (303, "/login")

    response, _ = await console.login(token)
    assert (response.status, response.headers["Location"]) == (303, "/")
    (set_cookie,) = response.headers.getall("Set-Cookie")
    attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")[1:]}
    assert set_cookie.startswith(f"{COOKIE}=")
    assert {"httponly", "secure", "samesite", "path"} <= attributes
    assert "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
    assert "domain" not in attributes and "max-age" not in attributes  # gone with the browser
    session_id = console.session_id()
    assert session_id and token not in set_cookie and session_id not in token

    for path in PAGES:
        response, page = await console.get(path)
        assert response.status == 200, (path, page)
        assert token not in page and token.split(".")[1] not in page
        assert all(token not in value for value in response.headers.values())
        assert response.headers["Content-Security-Policy"] == CSP
        assert "script-src" not in CSP and "default-src 'none'" in CSP
        assert "frame-ancestors 'none'" in CSP and "form-action 'self'" in CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Cache-Control"] == "no-store"
        assert "<script" not in page and " style=" not in page  # nothing inline

    (login,) = await audit_actions(console_server, "console.login")
    assert login["actor"] == "admin" and '"role": "admin"' in str(login["details"])
    assert token not in str(login) and token.split(".")[1] not in str(login)


async def test_a_viewer_signs_in_but_cannot_call_the_api(
    console_server: ServerHandle, console: Console
) -> None:
    async with AsyncAdminClient(client_config(console_server)) as admin:
        created, secret = await admin.create_api_token("watcher", "viewer")
    assert str(created.role) == "viewer"
    response, _ = await console.login(secret)
    assert response.status == 303
    response, page = await console.get("/agents")
    assert response.status == 200 and "watcher (viewer)" in page

    async with AsyncClient(client_config(console_server, secret)) as client:
        with pytest.raises(PermissionDeniedError, match="needs the 'submitter' role"):
            await client.submit("echo", b"x")
        with pytest.raises(PermissionDeniedError):
            await client.list()
    async with AsyncAdminClient(client_config(console_server, secret)) as viewer:
        with pytest.raises(PermissionDeniedError, match="needs the 'admin' role"):
            await viewer.list_agents()


async def test_a_bad_token_is_refused_and_never_echoed(
    console_server: ServerHandle, console: Console
) -> None:
    tried = ["", "not-a-token", "mat_0123456789abcdef." + "A" * 43, "<script>alert(1)</script>"]
    for presented in tried:
        response, page = await console.login(presented)
        assert response.status == 401
        assert message(page) == "That API token was not accepted."
        assert console.session_id() is None
        if presented:
            assert presented not in page
        assert "value=" not in page.split('id="token"')[1].split(">")[0]  # comes back empty
    failures = await audit_actions(console_server, "auth.failure")
    assert [f["target"] for f in failures] == ["console:login"] * len(tried)


async def test_a_wrong_secret_a_deleted_token_and_a_submitter_are_refused(
    console_server: ServerHandle, console: Console
) -> None:
    token = admin_token(console_server)
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    response, page = await console.login(wrong)
    assert response.status == 401 and wrong not in page

    async with AsyncAdminClient(client_config(console_server)) as admin:
        _, secret = await admin.create_api_token("ci", "submitter")
        response, page = await console.login(secret)
        assert response.status == 403
        assert "'submitter' token cannot sign in" in message(page) and secret not in page
        gone, gone_secret = await admin.create_api_token("gone", "viewer")
        await admin.delete_api_token(gone.token_id)
    response, page = await console.login(gone_secret)
    assert response.status == 401
    denied = await audit_actions(console_server, "auth.denied")
    assert [(d["actor"], d["target"]) for d in denied] == [("ci", "console:login")]


async def test_guessing_locks_the_address_out(
    console_server: ServerHandle, console: Console
) -> None:
    """The api listener's lockout, shared: guessing a token's secret locks out that
    token at this address, garbage locks out the address's allowance for garbage."""
    token = admin_token(console_server)
    guess = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    statuses = [(await console.login(guess))[0].status for _ in range(10)]
    assert statuses == [401] * 10
    response, page = await console.login(token)
    assert response.status == 429, page
    assert int(response.headers["Retry-After"]) >= 1
    assert "Too many failed sign-ins" in message(page) and token not in page
    assert console.session_id() is None

    statuses = [(await console.login("garbage"))[0].status for _ in range(11)]
    assert statuses == [401] * 10 + [429]


async def test_a_post_from_another_origin_is_refused(
    console_server: ServerHandle, console: Console
) -> None:
    token = admin_token(console_server)
    refused = [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},  # a sandboxed frame, a data: URL
        {"Origin": console.url.replace("https", "http")},
        {"Origin": console.url, "Sec-Fetch-Site": "cross-site"},
        {"Origin": console.url, "Sec-Fetch-Site": "same-site"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"},
    ]
    for headers in refused:
        response, page = await console.login(token, headers=headers)
        assert response.status == 403, headers
        assert "did not come from a console page" in message(page)
    async with console.session.post(
        console.url + "/login", data={"token": token}, ssl=console.tls, allow_redirects=False
    ) as response:  # no Origin at all
        assert response.status == 403
    assert console.session_id() is None
    # What Chromium sends from the console's own form (no-referrer makes Origin null).
    response, _ = await console.login(
        token, headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"}
    )
    assert response.status == 303 and console.session_id() is not None


async def test_sign_out_ends_the_session(console_server: ServerHandle, console: Console) -> None:
    await console.login(admin_token(console_server))
    session_id = console.session_id()
    assert session_id is not None and len(console_server.console.sessions) == 1  # type: ignore[union-attr]
    response, _ = await console.request("POST", "/logout")
    assert (response.status, response.headers["Location"]) == (303, "/login")
    assert "Max-Age=0" in response.headers["Set-Cookie"]
    assert len(console_server.console.sessions) == 0  # type: ignore[union-attr]
    # The old id, replayed, is nobody.
    console.session.cookie_jar.update_cookies({COOKIE: session_id})
    response, _ = await console.get("/tasks")
    assert (response.status, response.headers["Location"]) == (303, "/login")
    (logout,) = await audit_actions(console_server, "console.logout")
    assert logout["actor"] == "admin"
