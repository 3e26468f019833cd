"""The module-level API (``ray.init``, ``ray.get``, ...). Each function delegates to the
current process's core client: the driver's runtime after ``init``, or the worker's
connection inside a task."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

from controlplane.labels import node_labels
from dataplane import context
from dataplane import protocol as p
from dataplane.client import JOB_RUNTIME_ENV_ENV, CoreClient, DaemonError
from dataplane.exceptions import RaySystemError
from dataplane.serialization import Serialized, serialize_with_refs
from sdk import job_config as job_configs
from sdk import options as opts
from sdk import runtime_env as runtime_env_of_job
from sdk.actor import ActorClass, ActorHandle, handle_of
from sdk.generator import ObjectRefGenerator
from sdk.job_config import JobConfig
from sdk.object_ref import ObjectRef
from sdk.remote_function import RemoteFunction
from sdk.runtime import client_or_auto_init, get_values, job_namespace, put_object, start
from sdk.runtime import is_initialized as is_initialized
from sdk.runtime import shutdown as shutdown
from sdk.runtime_context import RayContext, get_runtime_context

# Arguments of ray.init that change nothing here (logging, dashboard, ...): accepted so
# that Ray programs run unchanged, with a warning naming them (never silently).
IGNORED_INIT_ARGS = frozenset(
    {
        "local_mode",
        "include_dashboard",
        "dashboard_host",
        "dashboard_port",
        "configure_logging",
        "logging_level",
        "logging_format",
        "logging_config",
        "storage",
        "_system_config",
        "_temp_dir",
        "_node_ip_address",
        "_metrics_export_port",
        "_redis_password",
        "_plasma_directory",
        "_enable_object_reconstruction",
    }
)


def init(
    address: str | None = None,
    *,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    labels: dict[str, str] | None = None,
    object_store_memory: int | None = None,
    namespace: str | None = None,
    ignore_reinit_error: bool = False,
    gcs_url: str | None = None,
    _memory: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    log_to_driver: bool = True,
    job_config: JobConfig | None = None,
    **unsupported: Any,
) -> RayContext:
    """Connects this driver to a cluster. Without an address (and no
    ``$CAIRN_ADDRESS``), or with "local": starts a private head node (embedded
    PostgreSQL unless ``gcs_url`` or ``$CAIRN_GCS_URL`` names one) that ``shutdown``
    stops. With "auto": connects to this machine's running cluster (``cairn start
    --head``), which outlives this driver. ``labels``: the private head node's, as
    Ray's (a cluster's nodes have those given to ``cairn start --labels``)."""
    unknown = sorted(set(unsupported) - IGNORED_INIT_ARGS)
    if unknown:
        raise TypeError(f"init() got unexpected keyword arguments: {unknown}")
    given = sorted(name for name, value in unsupported.items() if value is not None)
    if given:
        warnings.warn(
            f"init(): {', '.join(given)} have no effect in Cairn (accepted so that Ray "
            "programs run unchanged; see docs/compatibility.md)",
            stacklevel=2,
        )
    job_configs.check(job_config)
    if job_config is not None:  # (init's own arguments win, as in Ray)
        runtime_env = runtime_env if runtime_env is not None else job_config.runtime_env
        namespace = namespace if namespace is not None else job_config.ray_namespace
    if runtime_env is None and os.environ.get(JOB_RUNTIME_ENV_ENV):
        # a driver a job submission started: the submission's runtime_env is the job's
        runtime_env = json.loads(os.environ[JOB_RUNTIME_ENV_ENV]) or None
    if runtime_env is not None:
        runtime_env_of_job.check(runtime_env, "init()")
    if namespace is not None:
        opts.check_text("init(): namespace", namespace)
    for key in resources or {}:
        opts.check_text(f"init(): the resource name {key!r:.80}", key, allow_empty=False)
    start(
        address,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        labels=labels,
        object_store_memory=object_store_memory,
        memory=_memory,
        namespace=namespace,
        ignore_reinit_error=ignore_reinit_error,
        gcs_url=gcs_url,
        log_to_driver=log_to_driver,
        system_config=unsupported.get("_system_config"),
    )
    job_configs.set_current(job_config)
    eager = runtime_env_of_job.set_job_env(runtime_env, get_runtime_context().gcs_address)
    if eager is not None:  # (its node sets it up now, as Ray installs it at init)
        client_or_auto_init().send(p.PrepareRuntimeEnv(eager))
    return RayContext(get_runtime_context(), address)


def remote(*args: Any, **options: Any) -> Any:
    """``@remote`` or ``@remote(num_cpus=..., ...)`` on a function."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("The @remote decorator takes either a function or only keyword options")
    return lambda target: _make_remote(target, options)


def _make_remote(target: Any, options: dict[str, Any]) -> RemoteFunction | ActorClass:
    if inspect.isclass(target):
        return ActorClass(target, options)
    if not callable(target):
        raise TypeError(f"@remote applies to functions, not {type(target).__name__}")
    if inspect.iscoroutinefunction(target):  # Ray's refusal, word for word
        raise ValueError(
            "'async def' should not be used for remote tasks. You can wrap the async "
            "function with `asyncio.run(f())`. See more at: "
            "https://docs.ray.io/en/latest/ray-core/actors/async_api.html"
        )
    return RemoteFunction(target, options)


# -- objects ---------------------------------------------------------------------------


def put(value: Any, *, _owner: Any = None, durable: bool | None = None) -> ObjectRef:
    """Stores ``value`` in the object store; returns its ref. Small values are kept in
    the log too; ``durable=True`` (default: ``$CAIRN_DURABLE_PUTS``) also keeps a large
    one on disk, so that the object can be recovered if its bytes are lost (a put has
    no task to re-run)."""
    if _owner is not None:
        raise ValueError("put(_owner=...) is not supported by Cairn: the caller owns it")
    if isinstance(value, ObjectRef):
        raise TypeError(
            "Calling 'put' on an ray.ObjectRef is not allowed. If you really want "
            "to do this, you can wrap the ray.ObjectRef in a list and call 'put' "
            "on it."
        )
    if durable is None:
        durable = os.environ.get("CAIRN_DURABLE_PUTS", "") not in ("", "0")
    serialized, contained = serialize_with_refs(value)
    return put_serialized(serialized, contained, durable=durable)


def put_serialized(
    serialized: Serialized, contained: tuple[str, ...], *, durable: bool = False
) -> ObjectRef:
    return ObjectRef._owned(put_object(serialized, contained, durable=durable))


def get(object_refs: ObjectRef | Sequence[ObjectRef], *, timeout: float | None = None) -> Any:
    """The value(s) of ref(s), waiting for them; raises the task's error if it failed."""
    single = isinstance(object_refs, ObjectRef)
    refs: list[ObjectRef] = []
    if isinstance(object_refs, ObjectRef):
        refs = [object_refs]
    elif isinstance(object_refs, list | tuple) and all(
        isinstance(r, ObjectRef) for r in object_refs
    ):
        refs = list(object_refs)
    else:
        raise ValueError("'object_refs' must either be an ObjectRef or a list of ObjectRefs.")
    if timeout is not None and timeout < 0:
        raise ValueError(f"'timeout' must be a non-negative number or None, got {timeout}")
    if not refs:
        return []
    values = get_values([r.hex() for r in refs], timeout)
    return values[0] if single else values


def wait(
    object_refs: Sequence[ObjectRef | ObjectRefGenerator],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
    fetch_local: bool = True,
) -> tuple[list[Any], list[Any]]:
    """Splits refs into (ready, not ready) once ``num_returns`` are ready or after
    ``timeout`` seconds; ready ones come in the order they became ready. A generator
    (ObjectRefGenerator) is ready when its next ref is (or it has no more), as in Ray."""
    if isinstance(object_refs, ObjectRef) or not isinstance(object_refs, list | tuple):
        raise TypeError(f"wait() expected a list of ray.ObjectRef, got {type(object_refs)}")
    if not all(isinstance(r, ObjectRef | ObjectRefGenerator) for r in object_refs):
        raise TypeError("wait() expected a list of ray.ObjectRef or ray.ObjectRefGenerator")
    if not object_refs:
        return [], []  # (as Ray: nothing to wait for, whatever num_returns says)
    if len(set(object_refs)) != len(object_refs):
        raise ValueError("Wait requires a list of unique object refs.")
    if num_returns <= 0 or num_returns > len(object_refs):
        raise ValueError(
            "Invalid number of objects to return "
            f"{num_returns}: it must be between 1 and {len(object_refs)}"
        )
    if timeout is not None and timeout < 0:
        raise ValueError(f"'timeout' must be a non-negative number or None, got {timeout}")
    client = client_or_auto_init()
    ids = [_waited_id(r) for r in object_refs]
    ready_ids = client.wait(ids, num_returns, timeout, fetch_local)
    by_id = dict(zip(ids, object_refs, strict=True))
    ready = [by_id[i] for i in ready_ids]
    chosen = set(ready_ids)
    return ready, [r for i, r in zip(ids, object_refs, strict=True) if i not in chosen]


def _waited_id(waitable: ObjectRef | ObjectRefGenerator) -> str:
    if isinstance(waitable, ObjectRefGenerator):
        return waitable.next_object_id()
    return waitable.hex()


def cancel(
    object_ref: ObjectRef | ObjectRefGenerator, *, force: bool = False, recursive: bool = True
) -> None:
    """Cancels the task that makes ``object_ref``, as Ray does: a queued one never
    runs; a running one gets KeyboardInterrupt (with ``force``, its worker is killed);
    ``recursive``: the tasks it submitted too. An actor's call: dropped if it has not
    begun; a running coroutine of an async actor is cancelled (the actor lives on); a
    running sync call runs on, ``is_canceled()`` telling it; ``force`` is refused."""
    if not isinstance(object_ref, ObjectRef | ObjectRefGenerator):
        raise TypeError(f"cancel() expected a ray.ObjectRef, got {type(object_ref).__name__}")
    client = client_or_auto_init()
    object_id = _waited_id(object_ref)  # (a generator: any of its values names its task)
    try:
        client.request(lambda rid: p.CancelTask(rid, object_id, force, recursive))
    except DaemonError as error:
        raise ValueError(str(error)) from None


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor named ``name`` (in the caller's namespace unless
    ``namespace`` is given); ValueError if there is none."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"get_actor() needs a non-empty name, got {name!r:.80}")
    opts.check_text("get_actor(): name", name)
    if namespace is not None:
        opts.check_text("get_actor(): namespace", namespace)
    client = client_or_auto_init()
    task = context.current_task()
    job_id = task.job_id if task else client.welcome.job_id
    if namespace is None:  # (its job's, which a task on any node knows)
        namespace = job_namespace(client)
    try:
        found = client.request(lambda rid: p.GetActor(rid, name, namespace, job_id))
    except DaemonError as error:
        raise ValueError(str(error)) from None
    return handle_of(*found)


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Kills the actor's process at once; pending and later calls raise ActorDiedError."""
    if not isinstance(actor, ActorHandle):
        raise ValueError(
            f"ray.kill() only supported for actors. For tasks, try ray.cancel(). "
            f"Got: {type(actor).__name__}."
        )
    client_or_auto_init().kill_actor(actor._actor_id, no_restart)


# -- cluster ---------------------------------------------------------------------------


def timeline(filename: str | None = None) -> list[dict[str, Any]] | None:
    """This job's tasks as Chrome trace events (chrome://tracing, Perfetto), read from
    the log, as ``ray.timeline``: written to ``filename`` as JSON if given, else
    returned. (Events written behind, a few ms old, may not be in it yet.)"""
    import asyncio
    import json

    from controlplane.timeline import job_trace

    client = context.current_client()
    if client is None:  # (as Ray: the state calls do not start a cluster)
        raise RuntimeError(
            "Ray has not been started yet. Timeline requires Ray to be initialized first."
        )
    task = context.current_task()
    job_id = task.job_id if task else client.welcome.job_id
    events: list[dict[str, Any]] = asyncio.run(job_trace(client.welcome.gcs_url, job_id))[
        "traceEvents"
    ]
    if filename is None:
        return events
    with open(filename, "w") as out:
        json.dump(events, out, default=str)
    return None


def get_gpu_ids() -> list[int | str]:
    """The ids of the GPUs given to the current task or actor (as in its
    ``CUDA_VISIBLE_DEVICES``; ints, as Ray, unless they are not numbers); [] in a
    driver or a task without GPUs."""
    task = context.current_task()
    ids = task.gpu_ids if task is not None else ()
    return [int(i) if i.isdigit() else i for i in ids]


# Ray's NodeDeathInfo.Reason, as ray.nodes() gives it
_ALIVE, _EXPECTED_TERMINATION, _UNEXPECTED_TERMINATION = 0, 1, 2


def nodes() -> list[dict[str, Any]]:
    """Every node of the cluster, alive or dead, in Ray's shape (its node daemon reads
    them from the log; in a private cluster, the one node). As in Ray, a dead node's
    ``Resources`` is empty."""
    return [_ray_node(node) for node in _state_client().cluster_nodes()]


def _state_client() -> CoreClient:
    """As Ray: nodes() and the resource sums do not start a cluster, they refuse."""
    client = context.current_client()
    if client is None:
        raise RaySystemError(
            "Ray has not been started yet. Trying to use state API before ray.init() "
            "has been called."
        )
    return client


def _ray_node(node: p.NodeSummary) -> dict[str, Any]:
    if node.alive:
        reason = _ALIVE
    else:
        reason = _EXPECTED_TERMINATION if node.death_expected else _UNEXPECTED_TERMINATION
    return {
        "NodeID": node.node_id,
        "Alive": node.alive,
        "NodeManagerAddress": node.ip,
        "NodeManagerHostname": node.hostname,
        "NodeManagerPort": node.port,
        "ObjectManagerPort": node.port,  # objects move between nodes over that service
        "ObjectStoreSocketName": node.socket,  # the store is reached through the daemon
        "RayletSocketName": node.socket,
        "MetricsExportPort": 0,  # Cairn exports no metrics endpoint
        "NodeName": node.ip,
        "DeathReason": reason,
        "DeathReasonMessage": node.death_cause,
        "alive": node.alive,
        "Resources": dict(node.resources) if node.alive else {},
        "Labels": node_labels(node.node_id, node.labels),
    }


def cluster_resources() -> dict[str, float]:
    """The total resources of the alive nodes, summed."""
    alive = [node.resources for node in _state_client().cluster_nodes() if node.alive]
    return _summed(alive)


def available_resources() -> dict[str, float]:
    """What the alive nodes have free now, summed; as Ray, without the resources of
    which none is free. Another node's share is as of its latest heartbeat (at most
    about a second old)."""
    alive = [node.available for node in _state_client().cluster_nodes() if node.alive]
    return {name: amount for name, amount in _summed(alive).items() if amount > 0}


def _summed(amounts: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for resources in amounts:
        for name, amount in resources.items():
            total[name] = total.get(name, 0.0) + amount
    return {name: round(amount, 4) for name, amount in total.items()}
