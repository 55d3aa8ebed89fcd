"""Headers every console response carries, the cross-site check of every POST, and the
error pages (a status and a sentence; a traceback goes only to the log).

The Content-Security-Policy allows the console's own stylesheet and nothing else: no
script at all (the console needs none), no inline style, no frames, forms posting only
back to the console. So even text that escaped escaping could not run.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from muster.server.console.errors import ConsoleError, from_service
from muster.server.console.render import Renderer
from muster.server.services.errors import ServiceError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    "Server": "Muster",
}
STATIC_CACHE = "private, max-age=300"
SAFE_METHODS = frozenset({"GET", "HEAD"})


@web.middleware
async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: whatever answers (a page, an error page, a redirect, the stylesheet)
    goes out with the security headers; only the stylesheet may be cached."""
    response = await handler(request)
    response.headers.update(HEADERS)
    static = request.path.startswith("/static/") and response.status == 200
    response.headers["Cache-Control"] = STATIC_CACHE if static else "no-store"
    return response


def error_pages(renderer: Renderer) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConsoleError as err:
            return renderer.error(request, err.status, err.message)
        except ServiceError as err:
            refused = from_service(err)
            return renderer.error(request, refused.status, refused.message)
        except web.HTTPException as err:
            if err.status < 400:
                raise  # aiohttp's own redirects (a path without its slash)
            page = renderer.error(request, err.status, _explain(request, err))
            for name in ("Allow", "Retry-After"):
                if name in err.headers:
                    page.headers[name] = err.headers[name]
            return page
        except Exception:
            incident = secrets.token_hex(6)
            log.exception(
                "console: %s %s failed (incident %s)", request.method, request.path, incident
            )
            return renderer.error(
                request, 500, f"Something went wrong on the server (incident {incident})."
            )

    return errors


@web.middleware
async def same_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A POST must come from a console page. Browsers say where a request comes from in
    two headers a page cannot forge: ``Origin`` and ``Sec-Fetch-Site``. Because every
    page is ``Referrer-Policy: no-referrer``, a browser sends ``Origin: null`` with a
    form the console's own page posts (the Fetch standard's rule), so ``null`` is taken
    only together with ``Sec-Fetch-Site: same-origin``; a browser that sends no
    ``Sec-Fetch-Site`` must send this console's exact origin. A missing ``Origin`` is
    refused. With the SameSite=Strict cookie, no other site can sign anyone in or out."""
    if request.method not in SAFE_METHODS and not _same_origin(request):
        raise ConsoleError(403, "This request did not come from a console page; it was refused.")
    return await handler(request)


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        return False
    if origin == f"https://{request.host}":
        return True
    return origin == "null" and site == "same-origin"


def _explain(request: web.Request, err: web.HTTPException) -> str:
    if err.status == 404:
        return "There is no such page."
    if err.status == 405:
        return f"The console is read-only: {request.method} is not allowed here."
    if err.status == 413:
        return "That request is too large."
    return err.reason
