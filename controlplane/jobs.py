"""Job submissions (Ray's Jobs API): a job's entrypoint, a shell command, runs as a
driver process on the head, watched by a supervisor in the head's HTTP service.

Why the supervisor lives in the HTTP service (controlplane/web), not in a process of
its own per job: the service is the head's one long-lived process that answers for
jobs already, and a driver is a plain child process of it, bound to it as Ray binds
jobs to their cluster: the kernel ends a driver whose supervisor died
(PR_SET_PDEATHSIG; what it started is found by its environment), the head starts
another service, and that one marks every job a previous incarnation left unfinished
FAILED; the membership monitor marks FAILED the jobs whose driver's node it declares
dead (controlplane/membership.py). So no job is left RUNNING without a process.

A submission's life is in the log, as events of kind ``submission`` (its id the
entity id): ``submitted`` (entrypoint, runtime_env, metadata), ``running`` (the
driver's pid), ``driver_started`` (written by the node the driver connected to: its
job id), then ``succeeded``, ``failed`` (the error) or ``stopped``, and ``deleted``.
Every answer about submissions is a fold of those events (``fold``), so it survives
the service restarting and is given by ``cairn dashboard --gcs-url`` over the log
alone. The driver's output (stdout and stderr) goes to
``<session>/logs/job-driver-<submission_id>.log``, as Ray names it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from controlplane import auth, pip_envs
from controlplane import runtime_env_packages as packages
from controlplane.eventlog import EntityKind, Event, EventAppender, LogAppender, open_appender
from controlplane.eventlog.connection import connect
from controlplane.gcs_url import ENV_VAR as GCS_URL_ENV
from controlplane.node_records import local_nodes
from controlplane.parent_death import die_with_parent
from controlplane.sql import queries
from dataplane.client import JOB_RUNTIME_ENV_ENV, SUBMISSION_ID_ENV

K = EntityKind.SUBMISSION
LOGS_DIR = "logs"
WORKING_DIRS = "job_working_dirs"
# Ray's: SIGTERM, then SIGKILL after this long (RAY_JOB_STOP_WAIT_TIME_S)
STOP_WAIT_S = 3.0
_LAST_LOG_CHARS = 20_000  # of a failed job's output, in its message (Ray's)
_ID_CHARS = string.ascii_letters + string.digits
_VALID_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
# what sdk/runtime_env.py honours (local folders uploaded by the client: excludes spent)
_RUNTIME_ENV_FIELDS = ("env_vars", "working_dir", "py_modules", "pip", "config")
_NOT_HONOURED = (
    "entrypoint_num_cpus",
    "entrypoint_num_gpus",
    "entrypoint_memory",
    "entrypoint_resources",
    "entrypoint_label_selector",
)


class JobStatus(StrEnum):
    """Ray's ``JobStatus``."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def is_terminal(self) -> bool:
        return self in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)


class JobRequestError(ValueError):
    """A request the service refuses; the message says what was wrong."""


class JobNotFound(LookupError):
    pass


_MESSAGES = {
    JobStatus.PENDING: "Job has not started yet.",
    JobStatus.RUNNING: "Job is currently running.",
    JobStatus.SUCCEEDED: "Job finished successfully.",
    JobStatus.STOPPED: "Job was intentionally stopped.",
}


@dataclass
class Submission:
    """A submission as its events say (Ray's ``JobDetails`` fields)."""

    submission_id: str
    entrypoint: str = ""
    status: JobStatus = JobStatus.PENDING
    message: str | None = None
    error_type: str | None = None
    start_time: int | None = None  # Unix ms, as Ray's
    end_time: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    driver_exit_code: int | None = None
    driver_node_id: str | None = None
    job_id: str | None = None  # the driver's job (its node's driver_started event)
    driver_pid: int | None = None
    supervisor: str | None = None
    deleted: bool = False

    def to_json(self) -> dict[str, Any]:
        driver = None
        if self.job_id is not None:
            driver = {"id": self.job_id, "node_ip_address": "", "pid": str(self.driver_pid or "")}
        return {
            "type": "SUBMISSION",
            "job_id": self.job_id,
            "submission_id": self.submission_id,
            "driver_info": driver,
            "status": self.status.value,
            "entrypoint": self.entrypoint,
            "message": self.message or _MESSAGES.get(self.status),
            "error_type": self.error_type,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "metadata": self.metadata,
            "runtime_env": self.runtime_env,
            "driver_agent_http_address": None,
            "driver_node_id": self.driver_node_id,
            "driver_exit_code": self.driver_exit_code,
        }


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def fold(rows: list[Mapping[str, Any]]) -> dict[str, Submission]:
    """The submissions (deleted ones left out) of their events, in log order."""
    found: dict[str, Submission] = {}
    for row in rows:
        sub_id, kind = row["entity_id"], row["event_type"]
        payload = row["payload"]
        payload = json.loads(payload) if isinstance(payload, str) else dict(payload)
        sub = found.setdefault(sub_id, Submission(sub_id))
        at = _ms(row["recorded_at"])
        if kind == "submitted":
            sub.entrypoint = payload["entrypoint"]
            sub.runtime_env = payload.get("runtime_env") or {}
            sub.metadata = payload.get("metadata") or {}
            sub.supervisor = payload.get("supervisor")
            sub.start_time = at
        elif kind == "running":
            sub.status = JobStatus.RUNNING
            sub.driver_pid = payload["pid"]
            sub.driver_node_id = payload.get("driver_node_id")
            sub.supervisor = payload.get("supervisor", sub.supervisor)
        elif kind == "driver_started":
            sub.job_id = payload["job_id"]
        elif kind in ("succeeded", "failed", "stopped") and not sub.status.is_terminal():
            sub.status = JobStatus(kind.upper())
            sub.end_time = at
            sub.driver_exit_code = payload.get("driver_exit_code")
            sub.message = payload.get("error")
            sub.error_type = payload.get("error_type")
        elif kind == "deleted":
            sub.deleted = True
    return {k: v for k, v in found.items() if not v.deleted}


async def read_submissions(gcs_url: str, submission_id: str | None = None) -> dict[str, Submission]:
    conn = await connect(gcs_url, fence=False)
    try:
        rows = await conn.fetch(queries["job_submission_events"], submission_id)
    finally:
        await conn.close()
    return fold(rows)


async def read_submission(gcs_url: str, submission_id: str) -> Submission:
    """The submission of that id (or of the driver job of that id, as Ray's API takes
    either)."""
    found = (await read_submissions(gcs_url, submission_id)).get(submission_id)
    if found is None:
        found = next(
            (s for s in (await read_submissions(gcs_url)).values() if s.job_id == submission_id),
            None,
        )
    if found is None:
        raise JobNotFound(f"Job {submission_id} does not exist")
    return found


def log_name(submission_id: str) -> str:
    return f"job-driver-{submission_id}.log"


def log_path(session_dir: Path, submission_id: str) -> Path:
    return session_dir / LOGS_DIR / log_name(submission_id)


def new_submission_id() -> str:
    """Ray's shape: ``raysubmit_`` and 16 random letters and digits."""
    return "raysubmit_" + "".join(secrets.choice(_ID_CHARS) for _ in range(16))


def check_request(body: Any) -> tuple[str | None, str, dict[str, Any], dict[str, str]]:
    """(submission_id, entrypoint, runtime_env, metadata) of a submit request's JSON
    body; JobRequestError naming what is wrong or what Cairn does not honour."""
    if not isinstance(body, dict):
        raise JobRequestError("the request body must be a JSON object")
    known = {"entrypoint", "submission_id", "job_id", "runtime_env", "metadata", *_NOT_HONOURED}
    unknown = sorted(set(body) - known)
    if unknown:
        raise JobRequestError(f"unknown fields in the job submission: {unknown}")
    for name in _NOT_HONOURED:
        if body.get(name):
            raise JobRequestError(
                f"{name} is not supported by Cairn: the entrypoint runs on the head without "
                "reserving resources (its tasks and actors reserve theirs)"
            )
    entrypoint = body.get("entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        raise JobRequestError("entrypoint must be a non-empty string (a shell command)")
    submission_id = body.get("submission_id") or body.get("job_id")
    if submission_id is not None and (
        not isinstance(submission_id, str) or not _VALID_ID.match(submission_id)
    ):
        raise JobRequestError(
            f"submission_id {submission_id!r:.200} must be 1 to 128 letters, digits, '_', "
            "'-' or '.'"
        )
    runtime_env = body.get("runtime_env") or {}
    if not isinstance(runtime_env, dict):
        raise JobRequestError("runtime_env must be a JSON object")
    unknown = sorted(set(runtime_env) - set(_RUNTIME_ENV_FIELDS))
    if unknown:  # (the driver's init() checks the values of these)
        raise JobRequestError(
            f"runtime_env fields {unknown} are not supported by Cairn (it honours "
            f"{', '.join(_RUNTIME_ENV_FIELDS)})"
        )
    for name in ("working_dir", "py_modules"):
        values = runtime_env.get(name)
        values = values if isinstance(values, list) else [] if values is None else [values]
        for value in values:
            if not packages.is_package_uri(value):
                raise JobRequestError(
                    f"runtime_env[{name!r}] names {value!r:.200}: the service takes uploaded "
                    f"packages ({packages.URI_PREFIX}<sha256>{packages.URI_SUFFIX}); "
                    "JobSubmissionClient and `cairn job submit` upload local folders"
                )
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise JobRequestError("metadata must be a JSON object of strings")
    return submission_id, entrypoint, runtime_env, metadata


_SUPERVISOR_DIED = {
    "error": "Job supervisor (the head's HTTP service) exited while the job ran; its driver "
    "ended with it.",
    "error_type": "JOB_SUPERVISOR_ACTOR_DIED",
}
_SUPERVISOR_STOPPED = {
    "error": "The head's HTTP service stopped (the cluster stops) while the job ran; its "
    "driver ended with it.",
    "error_type": "JOB_SUPERVISOR_ACTOR_DIED",
}


class Supervisor:
    """Runs the submissions' drivers on the head and records their lives."""

    def __init__(self, gcs_url: str, session_dir: Path) -> None:
        self.gcs_url = gcs_url
        self.session_dir = session_dir
        self.incarnation = uuid.uuid4().hex
        self._appender: LogAppender = EventAppender(gcs_url)  # (the log's own, from start())
        self._running: dict[str, asyncio.subprocess.Process] = {}
        self._stopping: set[str] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._submitting = asyncio.Lock()
        self._closing = False

    async def start(self) -> None:
        self._appender = await open_appender(self.gcs_url)
        await self._appender.start()
        await self.fail_orphans()

    async def close(self) -> None:
        """Ends the drivers (jobs are bound to the cluster's life) and records it."""
        self._closing = True
        for process in list(self._running.values()):
            _signal(process, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._watchers), 10)
        await self._appender.close()

    async def fail_orphans(self) -> None:
        """Marks FAILED the jobs that an earlier incarnation of this service left
        unfinished: their drivers died with it."""
        orphans = [
            sub.submission_id
            for sub in (await read_submissions(self.gcs_url)).values()
            if not sub.status.is_terminal() and sub.supervisor != self.incarnation
        ]
        for submission_id in orphans:
            await asyncio.to_thread(_kill_leftovers, submission_id)
        if orphans:
            await self._appender.append_many(
                [Event(K, sub_id, "failed", _SUPERVISOR_DIED) for sub_id in orphans]
            )

    async def submit(self, body: Any) -> str:
        submission_id, entrypoint, runtime_env, metadata = check_request(body)
        async with self._submitting:
            submission_id = submission_id or new_submission_id()
            conn = await connect(self.gcs_url, fence=False)
            try:
                seen = await conn.fetch(queries["job_submission_events"], submission_id)
            finally:
                await conn.close()
            if seen:
                raise JobRequestError(
                    f"Job with submission_id {submission_id} already exists. "
                    "Please use a different submission_id."
                )
            submitted = {
                "entrypoint": entrypoint,
                "runtime_env": runtime_env,
                "metadata": metadata,
                "supervisor": self.incarnation,
            }
            await self._appender.append(Event(K, submission_id, "submitted", submitted))
        watcher = asyncio.create_task(self._run(submission_id, entrypoint, runtime_env))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return submission_id

    async def stop(self, submission_id: str) -> bool:
        """Ray's stop_job: True if the job was running (it ends STOPPED), False if it
        had ended already."""
        sub = await read_submission(self.gcs_url, submission_id)
        if sub.status.is_terminal():
            return False
        submission_id = sub.submission_id
        process = self._running.get(submission_id)
        self._stopping.add(submission_id)
        if process is None:  # pending: its watcher sees the stop before starting it
            return True
        _signal(process, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), STOP_WAIT_S)
        except TimeoutError:
            _signal(process, signal.SIGKILL)
        return True

    async def delete(self, submission_id: str) -> bool:
        sub = await read_submission(self.gcs_url, submission_id)
        if not sub.status.is_terminal():
            raise JobRequestError(
                f"Attempted to delete job with submission_id {submission_id}, but it is in "
                f"a non-terminal state {sub.status.value}. Stop it first."
            )
        await self._appender.append(Event(K, sub.submission_id, "deleted", {}))
        return True

    async def _run(self, sub_id: str, entrypoint: str, runtime_env: dict[str, Any]) -> None:
        try:
            path = log_path(self.session_dir, sub_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                cwd = await self._working_dir(sub_id, runtime_env)
                modules = await self._py_modules(sub_id, runtime_env)
                venv = await self._venv(runtime_env, path)
            except Exception as exc:  # (whatever it is, the job is told)
                await self._end(
                    sub_id,
                    "failed",
                    error=f"runtime_env setup failed: {exc}",
                    error_type="RUNTIME_ENV_SETUP_FAILURE",
                )
                return
            if sub_id in self._stopping:
                await self._end(sub_id, "stopped")
                return
            try:
                with path.open("ab") as out:
                    process = await asyncio.create_subprocess_shell(
                        entrypoint,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=cwd,
                        env=self._environment(sub_id, runtime_env, modules, venv),
                        start_new_session=True,  # its own group: stop ends all of it
                        preexec_fn=die_with_parent,
                    )
            except OSError as exc:
                await self._end(
                    sub_id,
                    "failed",
                    error=f"the entrypoint did not start: {exc}",
                    error_type="JOB_ENTRYPOINT_COMMAND_START_ERROR",
                )
                return
            self._running[sub_id] = process
            if sub_id in self._stopping:  # stopped while it was being started
                _signal(process, signal.SIGTERM)
            running = {"pid": process.pid, "supervisor": self.incarnation}
            if node_id := self._node_id():
                running["driver_node_id"] = node_id
            await self._appender.append(Event(K, sub_id, "running", running))
            code = await process.wait()
            self._running.pop(sub_id, None)
            if self._closing:
                await self._end(sub_id, "failed", code=code, **_SUPERVISOR_STOPPED)
            elif sub_id in self._stopping:
                await self._end(sub_id, "stopped", code=code)
            elif code == 0:
                await self._end(sub_id, "succeeded", code=code)
            else:
                tail = _tail(path)
                await self._end(
                    sub_id,
                    "failed",
                    code=code,
                    error=f"Job entrypoint command failed with exit code {code}, last "
                    f"available logs (truncated to {_LAST_LOG_CHARS:,} chars):\n{tail}",
                    error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
                )
        finally:
            self._running.pop(sub_id, None)
            self._stopping.discard(sub_id)

    async def _end(
        self,
        sub_id: str,
        how: str,
        *,
        code: int | None = None,
        error: str | None = None,
        error_type: str | None = None,
    ) -> None:
        payload: dict[str, Any] = {}
        if code is not None:
            payload["driver_exit_code"] = code
        if error is not None:
            payload["error"] = error
        if error_type is not None:
            payload["error_type"] = error_type
        await self._appender.append(Event(K, sub_id, how, payload))

    async def _working_dir(self, sub_id: str, runtime_env: dict[str, Any]) -> str | None:
        """The job's own copy of its working_dir (None: none given)."""
        uri = runtime_env.get("working_dir")
        if uri is None:
            return None
        data = await packages.fetch(self.gcs_url, uri)
        dest = self.session_dir / WORKING_DIRS / sub_id
        if dest.exists():
            shutil.rmtree(dest)
        await asyncio.to_thread(packages.unpack, data, dest, unwrap=True)
        return str(dest)

    async def _py_modules(self, sub_id: str, runtime_env: dict[str, Any]) -> list[str]:
        """The folders of the job's py_modules, for the driver's path (as its tasks')."""
        folders = []
        for index, uri in enumerate(runtime_env.get("py_modules") or ()):
            data = await packages.fetch(self.gcs_url, uri)
            dest = self.session_dir / WORKING_DIRS / f"{sub_id}-module-{index}"
            if dest.exists():
                shutil.rmtree(dest)
            await asyncio.to_thread(packages.unpack, data, dest, unwrap=False)
            folders.append(str(dest))
        return folders

    async def _venv(self, runtime_env: dict[str, Any], log: Path) -> Path | None:
        """The virtual environment of the job's ``pip`` (None: none given), built in
        the head's cache, where its tasks' workers on the head find it; pip's output
        goes first in the job's log, as Ray's runtime env setup logs."""
        if "pip" not in runtime_env:
            return None
        spec = pip_envs.pip_spec(runtime_env["pip"])
        cache = self.session_dir / pip_envs.RUNTIME_RESOURCES / "pip"
        try:
            venv, output = await pip_envs.build_venv(cache, spec)
        except pip_envs.SetupFailed as exc:
            with log.open("a") as file:
                file.write(f"{exc}\n")
            raise
        with log.open("a") as file:
            file.write(output)
        return venv

    def _environment(
        self, sub_id: str, runtime_env: dict[str, Any], modules: list[str], venv: Path | None
    ) -> dict[str, str]:
        """The driver's: this service's, without its secrets, with the cluster's
        address (so that ``init()`` joins it), the submission and its runtime_env
        (``python`` is its pip env's, else the head's own)."""
        env = {k: v for k, v in os.environ.items() if k not in (auth.TOKEN_ENV, GCS_URL_ENV)}
        env.update(runtime_env.get("env_vars") or {})
        if modules:
            env["PYTHONPATH"] = os.pathsep.join([*modules, env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            )
        address = self._cluster_address()
        if address is not None:
            env["CAIRN_ADDRESS"] = env["RAY_ADDRESS"] = address
        env[SUBMISSION_ID_ENV] = env["RAY_JOB_SUBMISSION_ID"] = sub_id
        env[JOB_RUNTIME_ENV_ENV] = json.dumps(runtime_env)
        # `python` is the head's own (the one Cairn runs in), as in Ray's cluster env
        python_dir = str(venv / "bin") if venv is not None else os.path.dirname(sys.executable)
        env["PATH"] = os.pathsep.join([python_dir, env.get("PATH", "")])
        env["PYTHONUNBUFFERED"] = env.get("PYTHONUNBUFFERED", "1")  # logs as they come
        return env

    def _cluster_address(self) -> str | None:
        for node in local_nodes():
            if node.session_dir == self.session_dir:
                return node.cluster or node.address
        return None

    def _node_id(self) -> str | None:
        try:
            return (self.session_dir / "node.ready").read_text().strip() or None
        except OSError:
            return None


def _signal(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _kill_leftovers(submission_id: str) -> None:
    """Ends what is left of a driver whose supervisor died: the kernel ended the
    entrypoint's first process (PR_SET_PDEATHSIG), not what it started. They are found
    by the submission id in their environment, which nothing else carries."""
    wanted = f"{SUBMISSION_ID_ENV}={submission_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in environ:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - _LAST_LOG_CHARS))
            return file.read().decode(errors="replace")
    except OSError:
        return ""
