"""A real server with its console on (port 0), and a cookie-keeping HTTPS client that
trusts Muster's CA: the console's tests talk to the real listener over real TLS."""

from __future__ import annotations

import html
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from muster.server.app import ServerHandle, start_server
from muster.server.console.signin import COOKIE
from tests.conftest import server_config


@pytest.fixture
async def console_server(tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[ServerHandle]:
    handle = await start_server(
        server_config(tmp_path / "data", console_addr="127.0.0.1:0", **backend)
    )
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


def admin_token(server: ServerHandle) -> str:
    return server.config.admin_token_file.read_text().strip()


class Console:
    """A browser without a browser: HTTPS to the console, cookies kept, no redirects
    followed (tests look at each answer), and the console's own Origin on POSTs."""

    def __init__(self, server: ServerHandle) -> None:
        assert server.console_url is not None
        self.url = server.console_url.rstrip("/")
        self.tls = ssl.create_default_context(cafile=server.config.ca_dir / "bundle.pem")
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, str]:
        return await self.request("GET", path, **kwargs)

    async def request(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[aiohttp.ClientResponse, str]:
        headers = kwargs.pop("headers", {})
        if method not in ("GET", "HEAD"):
            headers.setdefault("Origin", self.url)  # as a browser sends it from a console page
        async with self.session.request(
            method, self.url + path, ssl=self.tls, allow_redirects=False, headers=headers, **kwargs
        ) as response:
            return response, await response.text()

    async def login(self, token: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, str]:
        return await self.request("POST", "/login", data={"token": token}, **kwargs)

    def session_id(self) -> str | None:
        cookie = self.session.cookie_jar.filter_cookies(URL(self.url)).get(COOKIE)
        return cookie.value if cookie is not None else None


@pytest.fixture
async def console(console_server: ServerHandle) -> AsyncIterator[Console]:
    c = Console(console_server)
    try:
        yield c
    finally:
        await c.close()


def message(page: str) -> str:
    """The sentence an error or login page shows (#message), as a person reads it."""
    found = re.search(r'id="message">(.*?)</p>', page, re.S)
    return html.unescape(found.group(1).strip()) if found else ""
