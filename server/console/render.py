"""Jinja2 templates, autoescaped: every value a template prints is HTML-escaped unless
a template says otherwise, and none does. Undefined names fail loudly (in tests), not
as empty text."""

from __future__ import annotations

from typing import Any

import jinja2
from aiohttp import web

from muster.server.principals import Principal

PRINCIPAL = web.RequestKey("principal", Principal)
"""The signed-in principal of a request (set by the session check)."""


class Renderer:
    def __init__(self) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("muster.server.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def page(
        self, request: web.Request, template: str, *, status: int = 200, **values: Any
    ) -> web.Response:
        html = self._env.get_template(template).render(
            principal=request.get(PRINCIPAL), path=request.path, **values
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    def error(self, request: web.Request, status: int, message: str) -> web.Response:
        title = _TITLES.get(status, "Error")
        return self.page(request, "error.html", status=status, title=title, message=message)


_TITLES = {
    400: "Bad request",
    401: "Not signed in",
    403: "Refused",
    404: "Not found",
    405: "Not allowed",
    409: "Not possible now",
    413: "Too large",
    429: "Too many requests",
    500: "Server error",
    503: "Unavailable",
}
