"""Ray's ``ray.job_config.JobConfig``: a job's settings given to ``init(job_config=...)``.
What applies here: ``runtime_env`` and ``ray_namespace`` (as init's own arguments, which
win when both are given), ``code_search_path`` (folders put on the workers' ``sys.path``
with the driver's own, dataplane/code_paths.py) and ``default_actor_lifetime`` (of the
actors this driver makes). ``metadata`` is kept on the object; ``jvm_options`` and the
logging config are accepted and mean nothing to Python workers."""

from __future__ import annotations

import json
import os
from typing import Any

_LIFETIMES = ("detached", "non_detached")


class JobConfig:
    def __init__(
        self,
        jvm_options: list[str] | None = None,
        code_search_path: list[str] | None = None,
        runtime_env: dict[str, Any] | None = None,
        _client_job: bool = False,
        metadata: dict[str, str] | None = None,
        ray_namespace: str | None = None,
        default_actor_lifetime: str = "non_detached",
        _py_driver_sys_path: list[str] | None = None,
    ) -> None:
        self.jvm_options = list(jvm_options or [])
        self.code_search_path = [os.path.abspath(path) for path in code_search_path or []]
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None
        self.metadata = dict(metadata or {})
        self.ray_namespace = ray_namespace
        self.set_default_actor_lifetime(default_actor_lifetime)
        self.py_driver_sys_path = list(_py_driver_sys_path or [])
        self.py_logging_config: Any = None

    def set_metadata(self, key: str, value: str) -> None:
        self.metadata[key] = value

    def set_ray_namespace(self, ray_namespace: str) -> None:
        self.ray_namespace = ray_namespace

    def set_runtime_env(self, runtime_env: dict[str, Any] | None, validate: bool = False) -> None:
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None

    def set_default_actor_lifetime(self, default_actor_lifetime: str) -> None:
        if default_actor_lifetime not in _LIFETIMES:
            raise ValueError(
                "Default actor lifetime must be one of `detached`, `non_detached`, "
                f"not {default_actor_lifetime!r}"
            )
        self.default_actor_lifetime = default_actor_lifetime

    def set_py_logging_config(self, logging_config: Any = None) -> None:
        self.py_logging_config = logging_config

    @classmethod
    def from_json(cls, job_config_json: dict[str, Any] | str) -> JobConfig:
        """Ray's: a JobConfig from its JSON form (a dict or its text)."""
        fields = job_config_json
        if isinstance(fields, str):
            fields = json.loads(fields)
        return cls(
            jvm_options=fields.get("jvm_options"),
            code_search_path=fields.get("code_search_path"),
            runtime_env=fields.get("runtime_env"),
            metadata=fields.get("metadata"),
            ray_namespace=fields.get("ray_namespace"),
            default_actor_lifetime=fields.get("default_actor_lifetime", "non_detached"),
        )

    def __repr__(self) -> str:
        return (
            f"JobConfig(code_search_path={self.code_search_path!r}, runtime_env="
            f"{self.runtime_env!r}, metadata={self.metadata!r}, ray_namespace="
            f"{self.ray_namespace!r}, default_actor_lifetime={self.default_actor_lifetime!r})"
        )


_current: JobConfig | None = None  # this driver's, set by init()


def check(job_config: object) -> None:
    if job_config is not None and not isinstance(job_config, JobConfig):
        raise TypeError(
            "init(): job_config must be a ray.job_config.JobConfig, not "
            f"{type(job_config).__name__}"
        )


def set_current(job_config: JobConfig | None) -> None:
    global _current
    _current = job_config


def code_search_path() -> list[str]:
    return list(_current.code_search_path) if _current is not None else []


def default_actor_lifetime() -> str:
    return _current.default_actor_lifetime if _current is not None else "non_detached"
