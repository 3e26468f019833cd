"""The node's runtime environments: what a task's ``working_dir``, ``py_modules`` and
``pip`` need before a worker can run it, set up once per distinct env on this node and
kept for its life (under the session's ``runtime_resources``). Packages are fetched
from the GCS by digest and unpacked once; a ``pip`` spec gets one virtual environment,
built with pip once, that sees this node's own packages after its own. A worker of
such an env starts in it (``Launch``): its Python, its working directory first on
``sys.path``, its modules' folders next. ``env_vars`` need none of this: the worker sets
them per task.

Each setup ends in a node event, ``runtime_env_ready`` (with pip's output) or
``runtime_env_failed`` (the error the tasks get as RuntimeEnvSetupError). A failure is
remembered for ``_FAILURE_KEPT_S``, so the tasks queued behind it fail at once; a task
submitted later tries again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane import pip_envs
from controlplane import runtime_env_packages as packages
from controlplane.eventlog.events import EntityKind as K
from controlplane.eventlog.events import Event
from controlplane.node.recorder import EventRecorder
from controlplane.pip_envs import SetupFailed
from dataplane import protocol as p

if TYPE_CHECKING:
    from controlplane.node.task_table import Connection

log = logging.getLogger(__name__)

PROCESS_FIELDS = ("working_dir", "py_modules", "pip")  # what a worker must start in
DEFAULT_SETUP_TIMEOUT_S = 600  # Ray's default setup_timeout_seconds
_FAILURE_KEPT_S = 30.0
_OUTPUT_KEPT = pip_envs.OUTPUT_KEPT


@dataclass(frozen=True)
class Launch:
    """How a worker of one runtime env starts."""

    key: str
    python: str
    cwd: str | None
    path: tuple[str, ...]  # first on sys.path, in order


def env_key(runtime_env: dict[str, Any] | None) -> str | None:
    """The identity of what a worker must start in (None: a plain worker will do)."""
    if not runtime_env:
        return None
    fields = {k: runtime_env[k] for k in PROCESS_FIELDS if k in runtime_env}
    return _digest(fields)[:16] if fields else None


def env_hash(runtime_env: dict[str, Any]) -> str:
    """The content hash of a whole (resolved) runtime_env, as the log records it."""
    return _digest(runtime_env)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class RuntimeEnvs:
    def __init__(
        self,
        node_id: str,
        gcs_url: str,
        cache_dir: Path,
        recorder: EventRecorder,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        on_change: Callable[[], None],
    ) -> None:
        self.node_id = node_id
        self.gcs_url = gcs_url
        self.cache_dir = cache_dir
        self.recorder = recorder
        self._spawn = spawn
        self._on_change = on_change
        self._ready: dict[str, Launch] = {}
        self._failed: dict[str, tuple[str, float]] = {}
        self._building: dict[str, list[Connection]] = {}  # key -> the drivers to tell
        self._packages: dict[str, asyncio.Future[Path]] = {}
        self._venvs: dict[str, asyncio.Future[tuple[Path, str]]] = {}

    def launch_for(
        self, runtime_env: dict[str, Any], tell: Connection | None = None
    ) -> Launch | str | None:
        """How a worker of this env starts; a str: why it cannot be set up; None while
        it is set up (begun now if it was not: ``on_change`` is called when it ends,
        and the client ``tell`` is sent what the setup did, pip's output included)."""
        key = env_key(runtime_env)
        assert key is not None, "a runtime_env without working_dir, py_modules or pip"
        launch = self._ready.get(key)
        if launch is not None:
            return launch
        failed = self._failed.get(key)
        if failed is not None:
            if time.monotonic() - failed[1] < _FAILURE_KEPT_S:
                return failed[0]
            del self._failed[key]
        waiting = self._building.get(key)
        if waiting is None:
            waiting = self._building[key] = []
            self._spawn(self._setup(key, runtime_env))
        if tell is not None and not any(conn is tell for conn in waiting):
            waiting.append(tell)
        return None

    async def _setup(self, key: str, runtime_env: dict[str, Any]) -> None:
        config = runtime_env.get("config") or {}
        timeout = config.get("setup_timeout_seconds", DEFAULT_SETUP_TIMEOUT_S)
        started = time.monotonic()
        output = ""
        try:
            launch, output = await asyncio.wait_for(
                self._build(key, runtime_env), None if timeout == -1 else timeout
            )
        except TimeoutError:
            why = (
                f"the runtime_env was not set up within {timeout} s "
                "(config['setup_timeout_seconds'])"
            )
        except (SetupFailed, packages.PackageError) as exc:
            why = str(exc)
        except Exception as exc:  # anything else a setup meets is the task's error too
            log.exception("setting up runtime_env %s", key)
            why = f"{type(exc).__name__}: {exc}"
        else:
            took = round(time.monotonic() - started, 3)
            self._ready[key] = launch
            self._log("runtime_env_ready", key, {"took_s": took, "output": output[-_OUTPUT_KEPT:]})
            self._tell(
                key, f"runtime_env {key} is set up on node {self.node_id} ({took} s)", output
            )
            self._on_change()
            return
        why = f"the runtime_env could not be set up on node {self.node_id}: {why}"
        self._failed[key] = (why, time.monotonic())
        self._log("runtime_env_failed", key, {"error": why[-_OUTPUT_KEPT:]})
        self._tell(key, why, "")
        self._on_change()

    def _tell(self, key: str, line: str, output: str) -> None:
        text = f"{line}:\n{output[-_OUTPUT_KEPT:]}" if output.strip() else line
        for conn in self._building.pop(key, []):
            if not conn.closed:
                conn.send(p.Notice(text))

    def _log(self, event_type: str, key: str, payload: dict[str, Any]) -> None:
        self.recorder.log(
            [
                Event(
                    K.NODE,
                    self.node_id,
                    event_type,
                    {"env_key": key, **payload},
                    node_id=self.node_id,
                )
            ]
        )

    async def _build(self, key: str, runtime_env: dict[str, Any]) -> tuple[Launch, str]:
        cwd = None
        if "working_dir" in runtime_env:
            cwd = str(await self._package(runtime_env["working_dir"], unwrap=True))
        modules = [
            str(await self._package(uri, unwrap=False))
            for uri in runtime_env.get("py_modules") or ()
        ]
        python, output = sys.executable, ""
        if "pip" in runtime_env:
            venv, output = await self._venv(runtime_env["pip"])
            python = str(venv / "bin" / "python")
        path = tuple(p for p in (cwd, *modules) if p is not None)
        return Launch(key, python, cwd, path), output

    # -- packages --------------------------------------------------------------------

    async def _package(self, uri: str, *, unwrap: bool) -> Path:
        """The folder the package ``uri`` unpacks to on this node (fetched once)."""
        digest = packages.digest_in(uri)
        name = f"{digest}{'-top' if unwrap else ''}"
        future = self._packages.get(name)
        if future is None or (future.done() and future.exception() is not None):
            future = self._packages[name] = asyncio.ensure_future(self._unpacked(uri, name, unwrap))
        return await asyncio.shield(future)

    async def _unpacked(self, uri: str, name: str, unwrap: bool) -> Path:
        dest = self.cache_dir / "packages" / name
        if not dest.exists():
            data = await packages.fetch(self.gcs_url, uri)
            await asyncio.to_thread(packages.unpack, data, dest, unwrap=unwrap)
        return dest

    # -- pip -------------------------------------------------------------------------

    async def _venv(self, spec: dict[str, Any]) -> tuple[Path, str]:
        """The virtual environment of a pip spec on this node, and the output of its
        build (empty when it was built before)."""
        name = pip_envs.venv_name(spec)
        future = self._venvs.get(name)
        if future is None or (future.done() and future.exception() is not None):
            future = self._venvs[name] = asyncio.ensure_future(
                pip_envs.build_venv(self.cache_dir / "pip", spec)
            )
        venv, output = await asyncio.shield(future)
        return venv, output
