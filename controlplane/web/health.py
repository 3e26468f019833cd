"""``/api/cairn/health``: whether the service answers and reaches its log."""

from __future__ import annotations

from aiohttp import web

from controlplane.eventlog.connection import connect
from controlplane.web.app import context_of


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/cairn/health", _health)


async def _health(request: web.Request) -> web.Response:
    try:
        conn = await connect(context_of(request).gcs_url, fence=False)
        await conn.close()
    except Exception as exc:  # (the answer says what is wrong, whatever it is)
        return web.json_response({"ok": False, "gcs": str(exc)}, status=503)
    return web.json_response({"ok": True})
