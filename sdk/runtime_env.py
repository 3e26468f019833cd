"""``runtime_env``, as Cairn honours it: ``env_vars`` (set in the worker while the task
runs, for an actor's whole life), ``working_dir`` and ``py_modules`` (local folders,
``.py`` files or zips, packed and stored in the GCS by content digest; ``excludes``
leaves files out), ``pip`` (a virtual environment per distinct spec per node) and
``config`` (``setup_timeout_seconds``, ``eager_install``). Every other field Ray knows is
refused with an error that names it; an unknown field is refused too.

As in Ray, a job's runtime_env (``init(runtime_env=...)``) is the base of every task
and actor it submits, a task's is the base of the tasks it submits, and one given in
``options`` overrides the base field by field, ``env_vars`` key by key. Local paths are
packed when the env is first used (at ``init`` for the job's) and replaced by the
package's URI, so that what a task's submitted event logs names the exact files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import types
from pathlib import Path
from typing import Any

from controlplane import pip_envs
from controlplane import runtime_env_packages as packages
from dataplane import context
from dataplane.code_paths import driver_code_paths
from sdk import job_config

# Ray's fields that Cairn does not build: refused by name
_NOT_HONOURED = (
    "py_executable",
    "uv",
    "conda",
    "container",
    "image_uri",
    "nsight",
    "java_jars",
    "worker_process_setup_hook",
)
_CONFIG_KEYS = ("setup_timeout_seconds", "eager_install")
_PIP_KEYS = ("packages", "pip_check", "pip_install_options")
_PACKED = ("working_dir", "py_modules")

_job_env: dict[str, Any] | None = None  # this driver's init(runtime_env=...), resolved
_resolved: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}  # id(given) -> both


def check(runtime_env: Any, where: str) -> dict[str, Any]:
    """``runtime_env`` as Cairn takes it; TypeError/ValueError naming what it cannot
    honour (paths are checked when they are packed)."""
    if not isinstance(runtime_env, dict):
        raise TypeError(f"{where}: runtime_env must be a dict, got {type(runtime_env).__name__}")
    for field, value in runtime_env.items():
        if field in _NOT_HONOURED:
            raise ValueError(
                f"{where}: runtime_env field {field!r} is not supported by Cairn (it honours "
                "env_vars, working_dir, py_modules, excludes, pip and config)"
            )
        checker = _CHECKS.get(field)
        if checker is None:
            raise ValueError(f"{where}: unknown runtime_env field {field!r}")
        problem = checker(value)
        if problem:
            raise (TypeError if problem.startswith("must") else ValueError)(
                f"{where}: runtime_env[{field!r}] {problem}"
            )
    return {  # a copy (modules in py_modules are kept as they are: not copyable)
        k: list(v) if k == "py_modules" else copy.deepcopy(v) for k, v in runtime_env.items()
    }


def _check_env_vars(value: Any) -> str | None:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return "must be a dict of str to str"
    return None


def _check_working_dir(value: Any) -> str | None:
    if not isinstance(value, str | Path):
        return f"must be a local folder or .zip file (a str), got {type(value).__name__}"
    if packages.is_package_uri(str(value)):
        return None
    if "://" in str(value):
        return (
            f"names {str(value)!r:.200}: Cairn takes a local folder or .zip file (remote "
            "URIs are not fetched)"
        )
    return None


def _check_py_modules(value: Any) -> str | None:
    if not isinstance(value, list | tuple):
        return (
            f"must be a list of folders, .py or .zip files or modules, got {type(value).__name__}"
        )
    for item in value:
        if isinstance(item, types.ModuleType):
            continue
        problem = _check_working_dir(item)
        if problem:
            return problem
        if str(item).endswith(".whl"):
            return f"names the wheel {str(item)!r:.200}: give wheels to 'pip' instead"
    return None


def _check_excludes(value: Any) -> str | None:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        return "must be a list of str (gitignore-style patterns)"
    return None


def _check_pip(value: Any) -> str | None:
    if isinstance(value, str | Path):
        return None  # a requirements file: read when the env is resolved
    if isinstance(value, list | tuple):
        return None if all(isinstance(v, str) for v in value) else "must list str requirements"
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_PIP_KEYS))
        if unknown:
            return f"takes {list(_PIP_KEYS)}, not {unknown} (Cairn builds with the node's pip)"
        if "packages" not in value:
            return "needs 'packages' (a list of requirements or a requirements file)"
        return _check_pip(value["packages"])
    return (
        f"must be a list of requirements, a requirements file or a dict, got {type(value).__name__}"
    )


def _check_config(value: Any) -> str | None:
    unknown = sorted(set(value) - set(_CONFIG_KEYS)) if isinstance(value, dict) else None
    if unknown is None or unknown:
        return f"takes {list(_CONFIG_KEYS)}, got {value!r:.200}"
    timeout = value.get("setup_timeout_seconds")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int)
        or (timeout <= 0 and timeout != -1)
    ):
        return f"setup_timeout_seconds must be a positive int or -1 (no limit), got {timeout!r}"
    return None


_CHECKS = {
    "env_vars": _check_env_vars,
    "working_dir": _check_working_dir,
    "py_modules": _check_py_modules,
    "excludes": _check_excludes,
    "pip": _check_pip,
    "config": _check_config,
}


def set_job_env(runtime_env: dict[str, Any] | None, gcs_url: str = "") -> dict[str, Any] | None:
    """The job's env, resolved now (its folders packed and stored in the GCS at
    ``gcs_url``, as Ray uploads a job's working_dir at ``init``); returned when it is to
    be set up at once (``config["eager_install"]``, True unless said otherwise)."""
    global _job_env
    _job_env = None if runtime_env is None else resolve(check(runtime_env, "init()"), gcs_url)
    _resolved.clear()
    if _job_env is None or not (_job_env.get("config") or {}).get("eager_install", True):
        return None
    return _job_env


def code_paths() -> list[str]:
    """The folders a driver's functions carry to the workers (dataplane/code_paths.py);
    none from a worker, whose own came with the code it runs."""
    client = context.current_client()
    if context.current_task() is not None or (client is not None and client.worker_id):
        return []
    paths = driver_code_paths(has_working_dir=bool(_job_env and "working_dir" in _job_env))
    return list(dict.fromkeys([*paths, *job_config.code_search_path()]))


def for_submission(given: dict[str, Any] | None, gcs_url: str = "") -> dict[str, Any] | None:
    """The runtime_env of a task or actor submitted here: the parent's (the running
    task's, else the job's) with ``given`` over it (resolved: its folders stored in the
    GCS at ``gcs_url``)."""
    task = context.current_task()
    base = task.runtime_env if task is not None else _job_env
    if not given:
        return copy.deepcopy(base) if base else None
    cached = _resolved.get(id(given))
    if cached is None or cached[0] is not given:
        cached = _resolved[id(given)] = (given, resolve(given, gcs_url))
    own = cached[1]
    merged = {**(base or {}), **own}
    if base and "env_vars" in base and "env_vars" in own:
        merged["env_vars"] = {**base["env_vars"], **own["env_vars"]}
    return copy.deepcopy(merged)


def resolve(runtime_env: dict[str, Any], gcs_url: str) -> dict[str, Any]:
    """``runtime_env`` with its local folders and files packed and stored in the GCS
    (their URIs instead, ``excludes`` spent) and ``pip`` in one form
    (``{"packages": [...], "pip_check": ..., "pip_install_options": [...]}``)."""
    if not any(field in runtime_env for field in (*_PACKED, "pip")):
        return runtime_env
    resolved = dict(runtime_env)
    excludes = resolved.pop("excludes", None) or ()
    try:
        if "working_dir" in resolved:
            resolved["working_dir"] = _stored(
                resolved["working_dir"], excludes, gcs_url, as_module=False
            )
        if "py_modules" in resolved:
            resolved["py_modules"] = [
                _stored(_module_path(m), excludes, gcs_url, as_module=True)
                for m in resolved["py_modules"]
            ]
    except packages.PackageError as exc:
        raise ValueError(f"runtime_env: {exc}") from None
    if "pip" in resolved:
        resolved["pip"] = pip_envs.pip_spec(resolved["pip"])
    return resolved


def _module_path(module: Any) -> str:
    if not isinstance(module, types.ModuleType):
        return str(module)
    file = getattr(module, "__file__", None)
    if file is None:
        raise packages.PackageError(f"the module {module.__name__} has no file to pack")
    path = Path(file)
    return str(path.parent if path.name == "__init__.py" else path)


def _stored(path: Any, excludes: Any, gcs_url: str, *, as_module: bool) -> str:
    if packages.is_package_uri(str(path)):
        return str(path)
    data = packages.pack(path, excludes, as_module=as_module)
    return _run(packages.store(gcs_url, data))


def _run(coroutine: Any) -> Any:
    """Runs a coroutine to its end from sync code, in a thread of its own (the caller
    may be inside an event loop: an async actor submitting a task)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
