"""Ray's Jobs REST API (``/api/jobs/``, ``/api/packages/``, ``/api/version``) on the
head's HTTP service: submissions run and watched by controlplane/jobs.py's Supervisor.
Run standalone (``cairn dashboard --gcs-url``, no session), the service answers what
the log says and refuses what needs the head (submit, stop, delete, uploads, logs)."""

from __future__ import annotations

import asyncio
import codecs
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from aiohttp import web

from controlplane import jobs, state_api
from controlplane import runtime_env_packages as packages
from controlplane.eventlog.connection import connect
from controlplane.sql import queries
from controlplane.web.app import CONTEXT, context_of


@dataclass
class _Jobs:
    supervisor: jobs.Supervisor | None = None  # set once the application starts


JOBS = web.AppKey("jobs", _Jobs)
API_VERSION = "3"  # the Jobs API version Ray's clients check for (their CURRENT_VERSION)
PACKAGE_PROTOCOL = "cairn"  # /api/packages/cairn/<sha256>.zip is cairn://pkg/<sha256>.zip
_TAIL_POLL_S = 0.2
_STATUS_POLL_S = 1.0


def add_routes(app: web.Application) -> None:
    app[JOBS] = _Jobs()
    app.cleanup_ctx.append(_supervisor)
    router = app.router
    router.add_get("/api/version", _version)
    router.add_get("/api/packages/{protocol}/{name}", _package_exists)
    router.add_put("/api/packages/{protocol}/{name}", _upload_package)
    for path in ("/api/jobs/", "/api/jobs"):
        router.add_post(path, _submit)
        router.add_get(path, _list)
    router.add_get("/api/jobs/{job_id}", _get)
    router.add_delete("/api/jobs/{job_id}", _delete)
    router.add_get("/api/jobs/{job_id}/logs", _logs)
    router.add_get("/api/jobs/{job_id}/logs/tail", _tail)
    router.add_post("/api/jobs/{job_id}/stop", _stop)


async def _supervisor(app: web.Application) -> AsyncIterator[None]:
    """The head's service supervises jobs; a standalone one (no session) does not."""
    context = app[CONTEXT]
    supervisor = None
    if context.session_dir is not None:
        supervisor = jobs.Supervisor(context.gcs_url, context.session_dir)
        await supervisor.start()
        app[JOBS].supervisor = supervisor
    yield
    if supervisor is not None:
        await supervisor.close()


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json")


def _supervisor_of(request: web.Request) -> jobs.Supervisor:
    supervisor = request.app[JOBS].supervisor
    if supervisor is None:
        raise _error(
            web.HTTPServiceUnavailable,
            "this service reads the log only (cairn dashboard --gcs-url): submit, stop and "
            "delete jobs through the head's (cairn start --head)",
        )
    return supervisor


async def _version(request: web.Request) -> web.Response:
    try:
        version = metadata.version("cairn")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return web.json_response({"version": API_VERSION, "ray_version": version, "ray_commit": ""})


def _package_uri(request: web.Request) -> str:
    protocol, name = request.match_info["protocol"], request.match_info["name"]
    uri = f"{packages.URI_PREFIX}{name}"
    if protocol != PACKAGE_PROTOCOL or not packages.is_package_uri(uri):
        raise _error(
            web.HTTPBadRequest,
            f"packages are named /api/packages/{PACKAGE_PROTOCOL}/<sha256>.zip, not "
            f"/api/packages/{protocol}/{name}",
        )
    try:
        packages.digest_in(uri)
    except packages.PackageError as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None
    return uri


async def _package_exists(request: web.Request) -> web.Response:
    digest = packages.digest_in(_package_uri(request))
    conn = await connect(context_of(request).gcs_url, fence=False)
    try:
        found = await conn.fetchval(queries["runtime_env_package_exists"], digest)
    finally:
        await conn.close()
    if found is None:
        raise _error(web.HTTPNotFound, f"no package {digest}")
    return web.json_response({"exists": True})


async def _upload_package(request: web.Request) -> web.Response:
    _supervisor_of(request)
    uri = _package_uri(request)
    data = await request.read()
    if len(data) > packages.MAX_PACKAGE_BYTES:
        raise _error(web.HTTPRequestEntityTooLarge, "the package is too big")
    if packages.digest_of(data) != packages.digest_in(uri):
        raise _error(web.HTTPBadRequest, "the package's bytes do not match its name's digest")
    await packages.store(context_of(request).gcs_url, data)
    return web.json_response({"uri": uri})


async def _submit(request: web.Request) -> web.Response:
    supervisor = _supervisor_of(request)
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise _error(web.HTTPBadRequest, f"the request body is not JSON: {exc}") from None
    try:
        submission_id = await supervisor.submit(body)
    except jobs.JobRequestError as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None
    return web.json_response({"job_id": submission_id, "submission_id": submission_id})


async def _list(request: web.Request) -> web.Response:
    """Every job, as Ray's: the submissions, then the drivers no submission started."""
    url = context_of(request).gcs_url
    found = await jobs.read_submissions(url)
    drivers = await state_api.list_states(url, "jobs", [("type", "=", "DRIVER")], limit=None)
    return web.json_response(
        [sub.to_json() for sub in found.values()] + [d.asdict() for d in drivers]
    )


async def _find(request: web.Request) -> jobs.Submission:
    try:
        return await jobs.read_submission(context_of(request).gcs_url, request.match_info["job_id"])
    except jobs.JobNotFound as exc:
        raise _error(web.HTTPNotFound, str(exc)) from None


async def _get(request: web.Request) -> web.Response:
    return web.json_response((await _find(request)).to_json())


async def _stop(request: web.Request) -> web.Response:
    supervisor = _supervisor_of(request)
    sub = await _find(request)
    return web.json_response({"stopped": await supervisor.stop(sub.submission_id)})


async def _delete(request: web.Request) -> web.Response:
    supervisor = _supervisor_of(request)
    sub = await _find(request)
    try:
        return web.json_response({"deleted": await supervisor.delete(sub.submission_id)})
    except jobs.JobRequestError as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None


def _log_file(request: web.Request, sub: jobs.Submission) -> Path:
    session_dir = context_of(request).session_dir
    if session_dir is None:
        raise _error(
            web.HTTPNotFound,
            "a job's logs are on the head: this service reads the log only "
            "(cairn dashboard --gcs-url)",
        )
    return jobs.log_path(session_dir, sub.submission_id)


async def _logs(request: web.Request) -> web.Response:
    path = _log_file(request, await _find(request))
    try:
        text = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        text = b""
    return web.json_response({"logs": text.decode(errors="replace")})


async def _tail(request: web.Request) -> web.WebSocketResponse:
    """The job's output as it comes, over a websocket (Ray's), closed once the job
    ended and all of it was sent."""
    sub = await _find(request)
    path = _log_file(request, sub)
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    gcs_url = context_of(request).gcs_url
    offset = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ended = sub.status.is_terminal()
    checked = asyncio.get_running_loop().time()
    while not socket.closed:
        chunk = await asyncio.to_thread(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            await socket.send_str(decoder.decode(chunk))
            continue
        if ended:
            break
        await asyncio.sleep(_TAIL_POLL_S)
        now = asyncio.get_running_loop().time()
        if now - checked >= _STATUS_POLL_S:
            checked = now
            # ended: one more read takes what it wrote last
            ended = (await jobs.read_submission(gcs_url, sub.submission_id)).status.is_terminal()
    await socket.close()
    return socket


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read(1024 * 1024)
    except FileNotFoundError:
        return b""
