"""The application: its context (what every route may use), the token check, and the
routes of each part."""

from __future__ import annotations

import hmac
import importlib
import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

# Each module has ``add_routes(app: web.Application) -> None``; the order is the
# order their routes are matched in.
ROUTE_MODULES = (
    "controlplane.web.health",
    "controlplane.web.metrics",
    "controlplane.web.jobs",
    "controlplane.web.dashboard",
)
TOKEN_COOKIE = "cairn_token"
# What a browser without the token may load: the login page and what it needs.
PUBLIC_PATHS = frozenset(
    {"/login", "/static/login.js", "/static/dashboard.css", "/api/cairn/login"}
)


@dataclass(frozen=True)
class WebContext:
    gcs_url: str
    auth_token: str | None  # None: none asked (a loopback-only service)
    session_dir: Path | None  # the head's session (None: standalone, the log only)


CONTEXT = web.AppKey("context", WebContext)


def make_app(context: WebContext) -> web.Application:
    app = web.Application(
        middlewares=[_same_origin_check, _token_check], client_max_size=512 * 1024**2
    )
    app[CONTEXT] = context
    for name in ROUTE_MODULES:
        importlib.import_module(name).add_routes(app)
    return app


def context_of(request: web.Request) -> WebContext:
    return request.app[CONTEXT]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _same_origin_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request that may change something (not GET or HEAD) sent by a browser from
    another site's page is refused: loopback needs no token, so any page open in a
    browser on the head could otherwise submit a job (a command) to it. Browsers name
    the page's origin in ``Origin``; clients that are not browsers send none."""
    origin = request.headers.get("Origin")
    cross_site = origin is not None and urlsplit(origin).netloc != request.host
    if cross_site and request.method not in ("GET", "HEAD"):
        raise web.HTTPForbidden(
            text=json.dumps(
                {"error": f"refused a request from a page of another site ({origin:.200})"}
            ),
            content_type="application/json",
        )
    return await handler(request)


@web.middleware
async def _token_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request from another machine carries the cluster token (``Authorization:
    Bearer TOKEN``, or the cookie the dashboard's login sets); one from this machine's
    loopback needs none, as the node's own socket."""
    token = context_of(request).auth_token
    if (
        token is None
        or _is_loopback(request.remote)
        or request.path in PUBLIC_PATHS
        or same_token(_request_token(request), token)
    ):
        return await handler(request)
    if request.method == "GET" and not request.path.startswith("/api/"):
        raise web.HTTPFound("/login")  # (a person at a browser: the token is asked for)
    raise web.HTTPUnauthorized(
        text='{"error": "this service needs the cluster token (Authorization: Bearer TOKEN)"}',
        content_type="application/json",
    )


def _request_token(request: web.Request) -> str:
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return given or request.cookies.get(TOKEN_COOKIE, "")


def same_token(given: str, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False
