"""The dashboard: one page (``/``, its files in ``static/``, shipped in the package and
nothing loaded from elsewhere) and the JSON it reads under ``/api/cairn/``.

Every answer comes from the log -- the state API's queries (controlplane/state_api.py),
the timeline, the lineage, the logs' reader, the read-only SQL of ``cairn sql`` -- so
the same page serves a running cluster and, through ``cairn dashboard --gcs-url``, one
that is gone. The page asks again every few seconds while a view is open: that is
what "live" means here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from controlplane import lineage_tree, logs, state_api, timeline
from controlplane.membership import cluster_nodes
from controlplane.readonly_sql import WriteRefusedError, run_readonly
from controlplane.web.app import TOKEN_COOKIE, context_of, same_token

STATIC = Path(__file__).with_name("static")
_PAGE_FILES = {"dashboard.js", "dashboard.css", "login.html", "login.js"}
_SQL_ROWS = 1000  # the console shows this many rows at most (the rest are not read)


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/", _page)
    router.add_get("/static/{name}", _static)
    router.add_get("/login", _login_page)
    router.add_post("/api/cairn/login", _login)
    router.add_get("/api/cairn/state/{kind}", _list)
    router.add_get("/api/cairn/state/{kind}/{entity_id}", _get)
    router.add_get("/api/cairn/summary/{kind}", _summary)
    router.add_get("/api/cairn/nodes", _nodes)
    router.add_get("/api/cairn/tasks/{task_id}/output", _task_output)
    router.add_get("/api/cairn/actors/{actor_id}/output", _actor_output)
    router.add_get("/api/cairn/timeline/{job_id}", _timeline)
    router.add_get("/api/cairn/lineage/{object_id}", _lineage)
    router.add_post("/api/cairn/sql", _sql)


async def _page(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers=_NO_STORE)


async def _login_page(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "login.html", headers=_NO_STORE)


async def _static(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in _PAGE_FILES:  # (names checked: nothing else of the package is served)
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers=_NO_STORE)


_NO_STORE = {"Cache-Control": "no-store"}


async def _login(request: web.Request) -> web.Response:
    """Sets the token cookie if the token given is the cluster's."""
    token = context_of(request).auth_token
    given = str((await _body(request)).get("token", ""))
    if token is not None and not same_token(given, token):
        return _error(401, "that is not the cluster's token")
    answer = web.json_response({"ok": True})
    if token is not None:
        answer.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="Strict")
    return answer


async def _list(request: web.Request) -> web.Response:
    """``?filter=column=value`` (or ``column!=value``, repeated), ``limit``, ``detail``."""
    kind = request.match_info["kind"]
    query = request.query
    try:
        filters = [_filter(text) for text in query.getall("filter", [])]
        limit = int(query["limit"]) if query.get("limit") else state_api.DEFAULT_LIMIT
        rows = await state_api.list_states(
            _url(request), kind, filters, limit=limit, detail=query.get("detail") == "1"
        )
    except ValueError as exc:
        return _error(400, str(exc))
    return _json({"rows": [row.asdict() for row in rows], "limit": limit})


async def _get(request: web.Request) -> web.Response:
    try:
        rows = await state_api.get_states(
            _url(request), request.match_info["kind"], request.match_info["entity_id"]
        )
    except ValueError as exc:
        return _error(400, str(exc))
    if not rows:
        return _error(404, f"no {request.match_info['kind']} {request.match_info['entity_id']}")
    return _json({"rows": [row.asdict() for row in rows]})


async def _summary(request: web.Request) -> web.Response:
    try:
        return _json(await state_api.summarize(_url(request), request.match_info["kind"]))
    except ValueError as exc:
        return _error(400, str(exc))


async def _nodes(request: web.Request) -> web.Response:
    """Each node with its resources (total and available) and its last reported load."""
    return _json({"rows": await cluster_nodes(_url(request))})


async def _task_output(request: web.Request) -> web.Response:
    try:
        attempt = int(request.query.get("attempt", "-1"))
    except ValueError:
        return _error(400, "attempt is an attempt number (0 for the first; -1: the last)")
    try:
        found = await logs.task_output(_url(request), request.match_info["task_id"], attempt)
    except logs.LogsError as exc:
        return _json({"lines": [], "notes": [str(exc)]})
    return _json({"lines": found.lines, "notes": found.notes})


async def _actor_output(request: web.Request) -> web.Response:
    try:
        found = await logs.actor_output(_url(request), request.match_info["actor_id"])
    except logs.LogsError as exc:
        return _json({"lines": [], "notes": [str(exc)]})
    return _json({"lines": found.lines, "notes": found.notes})


async def _timeline(request: web.Request) -> web.Response:
    try:
        return _json(await timeline.job_trace(_url(request), request.match_info["job_id"]))
    except timeline.UnknownJobError as exc:
        return _error(404, str(exc))


async def _lineage(request: web.Request) -> web.Response:
    object_id = request.match_info["object_id"]
    tree = await lineage_tree.object_lineage(_url(request), object_id)
    if tree is None:
        return _error(404, f"no object {object_id} in the log")
    return _json(tree)


async def _sql(request: web.Request) -> web.Response:
    """One read-only statement, as ``cairn sql`` runs it; a write is refused."""
    statement = str((await _body(request)).get("statement", ""))
    try:
        columns, rows = await run_readonly(_url(request), statement, limit=_SQL_ROWS)
    except WriteRefusedError as exc:
        return _error(403, str(exc))
    except Exception as exc:  # (PostgreSQL's own message is the answer: a typo, ...)
        return _error(400, f"{type(exc).__name__}: {exc}")
    return _json({"columns": columns, "rows": rows[:_SQL_ROWS], "more": len(rows) > _SQL_ROWS})


def _filter(text: str) -> state_api.Filter:
    column, predicate, value = text.partition("!=") if "!=" in text else text.partition("=")
    if not predicate:
        raise ValueError(f"a filter is column=value or column!=value, not {text!r}")
    return (column.strip(), predicate, value.strip())


def _url(request: web.Request) -> str:
    return context_of(request).gcs_url


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body is not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body is not a JSON object")
    return body


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _json(value: Any) -> web.Response:
    """As ``cairn sql --output json`` writes values: what JSON lacks, as text."""
    return web.json_response(value, dumps=lambda v: json.dumps(v, default=str))
