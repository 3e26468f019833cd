"""``runtime_env``, as far as Cairn honours it: ``env_vars`` (set in the worker while the
task runs, for an actor's whole life) and ``config``. Every other field Ray knows is
refused with an error that names it, rather than accepted and ignored; an unknown
field is refused too.

As in Ray, a job's runtime_env (``init(runtime_env=...)``) is the base of every task
and actor it submits, a task's is the base of the tasks it submits, and one given in
``options`` overrides the base field by field, ``env_vars`` key by key."""

from __future__ import annotations

import copy
from typing import Any

from dataplane import context

# Ray's fields that Cairn does not build yet: refused by name
_NOT_YET = (
    "working_dir",
    "py_modules",
    "py_executable",
    "excludes",
    "pip",
    "uv",
    "conda",
    "container",
    "image_uri",
    "nsight",
    "java_jars",
    "worker_process_setup_hook",
)
_CONFIG_KEYS = ("setup_timeout_seconds", "eager_install")

_job_env: dict[str, Any] | None = None  # this driver's init(runtime_env=...)


def check(runtime_env: Any, where: str) -> dict[str, Any]:
    """``runtime_env`` as Cairn takes it; ValueError naming what it cannot honour."""
    if not isinstance(runtime_env, dict):
        raise TypeError(f"{where}: runtime_env must be a dict, got {type(runtime_env).__name__}")
    for field, value in runtime_env.items():
        if field in _NOT_YET:
            raise ValueError(
                f"{where}: runtime_env field {field!r} is not supported by Cairn yet (it "
                "honours env_vars and config); install what the code needs where the "
                "cluster runs"
            )
        if field == "env_vars":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise TypeError(f"{where}: runtime_env['env_vars'] must be a dict of str to str")
        elif field == "config":
            unknown = sorted(set(value) - set(_CONFIG_KEYS)) if isinstance(value, dict) else None
            if unknown is None or unknown:
                raise ValueError(
                    f"{where}: runtime_env['config'] takes {list(_CONFIG_KEYS)}, got {value!r:.200}"
                )
        else:
            raise ValueError(f"{where}: unknown runtime_env field {field!r}")
    return copy.deepcopy(runtime_env)


def set_job_env(runtime_env: dict[str, Any] | None) -> None:
    global _job_env
    _job_env = check(runtime_env, "init()") if runtime_env is not None else None


def for_submission(given: dict[str, Any] | None) -> dict[str, Any] | None:
    """The runtime_env of a task or actor submitted here: the parent's (the running
    task's, else the job's) with ``given`` over it."""
    task = context.current_task()
    base = task.runtime_env if task is not None else _job_env
    if not given:
        return copy.deepcopy(base) if base else None
    merged = {**(base or {}), **given}
    if base and "env_vars" in base and "env_vars" in given:
        merged["env_vars"] = {**base["env_vars"], **given["env_vars"]}
    return merged
