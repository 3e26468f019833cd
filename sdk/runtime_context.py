"""``get_runtime_context()``: what a driver, task or actor call is, as Ray's
``ray.runtime_context.RuntimeContext`` tells it (its methods and properties, by Ray's
names). A task's facts come from the worker that runs it (dataplane/context.py)."""

from __future__ import annotations

import inspect
import json
import platform
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataplane import context
from sdk.ids import ActorID, JobID, NodeID, PlacementGroupID, TaskID
from sdk.runtime import client_or_auto_init

if TYPE_CHECKING:
    from sdk.actor import ActorHandle

_DRIVER_WORKER_ID = uuid.uuid4().hex  # a driver's worker id (workers have the daemon's)


class RuntimeContext:
    def __init__(self) -> None:
        self._client = client_or_auto_init()
        self._task = context.current_task()

    # -- the process and its cluster -----------------------------------------------

    @property
    def job_id(self) -> JobID:
        """Ray's deprecated form: an ID object (``get_job_id()`` is its hex)."""
        _deprecated("job_id")
        return JobID(self.get_job_id())

    def get_job_id(self) -> str:
        return self._task.job_id if self._task else self._client.welcome.job_id

    @property
    def node_id(self) -> NodeID:
        _deprecated("node_id")
        return NodeID(self.get_node_id())

    def get_node_id(self) -> str:
        return self._client.welcome.node_id

    def get_worker_id(self) -> str:
        return self._client.worker_id or _DRIVER_WORKER_ID

    @property
    def namespace(self) -> str | None:
        """Its job's, as Ray's: the driver's, in a task or actor too."""
        if self._task is not None and self._task.namespace is not None:
            return self._task.namespace
        return self._client.welcome.namespace or None

    @property
    def gcs_address(self) -> str:
        return self._client.welcome.gcs_url

    def get_session_name(self) -> str:
        return Path(self._client.welcome.session_dir).name

    def get_temp_dir(self) -> str:
        return self._client.welcome.session_dir

    @property
    def runtime_env(self) -> dict[str, Any]:
        """The runtime_env of the running task or actor (the job's in a driver)."""
        from sdk import runtime_env

        if self._task is not None:
            return dict(self._task.runtime_env or {})
        return runtime_env.for_submission(None) or {}

    def get_runtime_env_string(self) -> str:
        return json.dumps(self.runtime_env)

    def get_node_labels(self) -> dict[str, str]:
        """The labels of this process's node (``ray.io/node-id`` among them)."""
        return dict(self._client.welcome.labels)

    def get(self) -> dict[str, Any]:
        """Ray's deprecated dict of the context, with ID objects as in Ray."""
        found: dict[str, Any] = {
            "job_id": JobID(self.get_job_id()),
            "node_id": NodeID(self.get_node_id()),
            "namespace": self.namespace,
        }
        if (task_id := self.get_task_id()) is not None:
            found["task_id"] = TaskID(task_id)
        if (actor_id := self.get_actor_id()) is not None:
            found["actor_id"] = ActorID(actor_id)
        return found

    # -- the running task ------------------------------------------------------------

    @property
    def task_id(self) -> TaskID | None:
        _deprecated("task_id")
        task_id = self.get_task_id()
        return TaskID(task_id) if task_id is not None else None

    def get_task_id(self) -> str | None:
        return self._task.task_id if self._task else None

    def get_task_name(self) -> str | None:
        """Ray's: the name given in options, else the function's own ``__name__`` (an
        actor call's "Class.method", by the class's ``__name__``, nested or not)."""
        if self._task is None:
            return None
        function = getattr(self._task.function, "__func__", self._task.function)
        if getattr(function, "__qualname__", None) is None:
            return self._task.name
        if self._task.actor_id is not None and not isinstance(function, type):
            options = self._task.actor_options  # a call: named in .options(), or not
            from sdk.actor import call_name

            default = call_name(options.class_name if options else "", function.__name__)
            shown = f"{self._actor_class_name()}.{function.__name__}"
            return shown if self._task.name == default else self._task.name
        if self._task.actor_id is not None or self._task.name == _qualified(function):
            return str(function.__name__)
        return self._task.name

    def get_task_function_name(self) -> str | None:
        """Ray's function descriptor: module, the class's and the function's
        ``__name__`` (not the qualified names of nested definitions)."""
        if self._task is None or self._task.function is None:
            return None
        function = getattr(self._task.function, "__func__", self._task.function)
        module = getattr(function, "__module__", None) or "?"
        name = getattr(function, "__name__", type(function).__name__)
        if self._task.actor_id is not None and not isinstance(function, type):
            if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
                return f"{module}.{function.__qualname__}"  # (Ray's, for async methods)
            return f"{module}.{self._actor_class_name()}.{name}"
        return f"{module}.{name}"

    def _actor_class_name(self) -> str:
        assert self._task is not None
        actor = getattr(self._task.function, "__self__", None)
        if actor is not None:
            return type(actor).__name__
        options = self._task.actor_options
        return (options.class_name if options else "").rsplit(".", 1)[-1]

    def get_assigned_resources(self) -> dict[str, float]:
        """What the running task (or its actor) was given; {} in a driver."""
        if self._task is None or not self._task.resources:
            return {}
        return {k: v for k, v in self._task.resources.items() if v > 0}

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        return {"GPU": list(self._task.gpu_ids) if self._task is not None else []}

    def get_placement_group_id(self) -> str | None:
        return self._task.placement_group_id if self._task else None

    @property
    def current_placement_group_id(self) -> PlacementGroupID | None:
        """Ray's deprecated form: the group's ID object."""
        _deprecated("placement_group_id")
        pg_id = self.get_placement_group_id()
        return PlacementGroupID(pg_id) if pg_id is not None else None

    def get_dashboard_url(self) -> str:
        """The head's dashboard (its HTTP service's address), "" where none serves:
        a private cluster (``init()``) serves none."""
        path = Path(self._client.welcome.session_dir) / "dashboard.address"
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    @property
    def should_capture_child_tasks_in_placement_group(self) -> bool:
        return self._task is not None and self._task.captured_placement is not None

    def is_canceled(self) -> bool:
        """Whether ray.cancel reached the running task or actor call (a sync actor's
        call runs on after it: it may poll this). RuntimeError in an async actor, whose
        calls are cancelled as coroutines, as in Ray; RuntimeError outside a task."""
        if self._task is None:
            raise RuntimeError("is_canceled() is only available inside a task or actor call")
        if self._task.in_async_actor:
            raise RuntimeError(
                "This method is not supported in an async actor. is_canceled(): an async "
                "actor's calls are cancelled "
                "as coroutines (asyncio.CancelledError)"
            )
        return self._task.cancelled

    # -- the running actor -----------------------------------------------------------

    @property
    def actor_id(self) -> ActorID | None:
        _deprecated("actor_id")
        actor_id = self.get_actor_id()
        return ActorID(actor_id) if actor_id is not None else None

    def get_actor_id(self) -> str | None:
        return self._task.actor_id if self._task else None

    def get_actor_name(self) -> str | None:
        """The actor's name: "" for an actor without one, None outside an actor."""
        if self._task is None or self._task.actor_id is None:
            return None
        options = self._task.actor_options
        return (options.name or "") if options is not None else ""

    @property
    def current_actor(self) -> ActorHandle:
        """A handle of the actor running this call (RuntimeError outside an actor)."""
        from sdk.actor import handle_of

        if self._task is None or self._task.actor_id is None:
            raise RuntimeError("current_actor is only available inside an actor")
        return handle_of(self._task.actor_id, self._task.actor_options)

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """Whether this actor's constructor ran again after its process died."""
        return self._task is not None and self._task.actor_restarted


def _deprecated(name: str) -> None:
    warnings.warn(
        f"Use get_{name}() instead: RuntimeContext.{name} is deprecated (as in Ray)",
        DeprecationWarning,
        stacklevel=3,
    )


def _qualified(function: Any) -> str:
    module = getattr(function, "__module__", None) or "?"
    return f"{module}.{getattr(function, '__qualname__', type(function).__qualname__)}"


def get_runtime_context() -> RuntimeContext:
    return RuntimeContext()


class RayContext:
    """What ``init()`` returns, as Ray's: ``address_info`` (also read by key), the
    dashboard's URL and versions; used as a context manager, the runtime is shut down
    at its end. Attributes it does not have are the runtime context's (``job_id``)."""

    def __init__(self, runtime_context: RuntimeContext, address: str | None) -> None:
        from controlplane.gcs_url import redact

        welcome = runtime_context._client.welcome
        self._context = runtime_context
        # the head's HTTP service ("": a private cluster serves none; `cairn start --head` does)
        self.dashboard_url = runtime_context.get_dashboard_url()
        self.python_version = platform.python_version()
        self.ray_version = "2.60.0"  # the Ray API this SDK follows (docs/compatibility.md)
        self.ray_commit = ""
        self.address_info: dict[str, Any] = {
            "node_id": welcome.node_id,
            "node_ip_address": welcome.labels.get("ray.io/node-ip", "127.0.0.1"),
            "session_dir": welcome.session_dir,
            "gcs_address": redact(welcome.gcs_url),
            "address": address,
            "webui_url": self.dashboard_url,
            "dashboard_url": self.dashboard_url,
            "metrics_export_port": None,
        }

    def __getitem__(self, key: str) -> Any:
        return self.address_info[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.address_info.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.address_info

    def __len__(self) -> int:
        return len(self.address_info)

    def __iter__(self) -> Any:
        return iter(self.address_info)

    def __enter__(self) -> RayContext:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.disconnect()

    def disconnect(self) -> None:
        from sdk.runtime import shutdown

        shutdown()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._context, name)

    def __repr__(self) -> str:
        return f"RayContext({self.address_info!r})"
