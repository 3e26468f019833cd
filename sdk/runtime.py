"""The driver's runtime: its connection to a node daemon, and the head node it started
if it started one (``init()`` without an address). ``sdk.shutdown`` and interpreter exit
stop what it started; a driver connected to a running cluster only disconnects.

Also the accessors the SDK's modules share: the current client (a local cluster is
started on first use, as in Ray), and putting and getting objects by id. This module is
below api, object_ref, remote_function and actor: they import it, and it imports none
of them (tests/test_import_graph.py)."""

from __future__ import annotations

import atexit
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from controlplane.node_records import find_running
from dataplane import context
from dataplane import exceptions as exc
from dataplane import protocol as p
from dataplane.client import CoreClient, DaemonError, ObjectMissingError
from dataplane.serialization import Serialized

if TYPE_CHECKING:  # (imported when a private cluster starts: a driver that connects to a
    # running one need not load the GCS's server side)
    from controlplane.local_node import LocalNode, NodeConfig


class Runtime:
    def __init__(self, client: CoreClient, head: LocalNode | None) -> None:
        self.client = client
        self.head = head
        atexit.register(self.shutdown)

    @classmethod
    def start(
        cls,
        *,
        gcs_url: str | None,
        config: NodeConfig,
        namespace: str | None,
        log_to_driver: bool = True,
    ) -> Runtime:
        """Starts a private head node and connects to it."""
        from controlplane.local_node import LocalNode

        head = LocalNode.start(gcs_url=gcs_url, config=config)
        try:
            client = CoreClient(
                head.socket_path, "driver", namespace=namespace, log_to_driver=log_to_driver
            )
        except BaseException:
            head.stop()
            raise
        context.set_client(client)
        return cls(client, head)

    @classmethod
    def connect(
        cls, *, address: str | None, namespace: str | None, log_to_driver: bool = True
    ) -> Runtime:
        """Connects to a running cluster through its node on this machine: the one of
        the cluster whose head is at ``address``, or this machine's head."""
        session_dir = find_running(address)
        client = CoreClient(
            str(session_dir / "node.sock"),
            "driver",
            namespace=namespace,
            log_to_driver=log_to_driver,
        )
        context.set_client(client)
        return cls(client, None)

    def shutdown(self) -> None:
        atexit.unregister(self.shutdown)
        if context.current_client() is self.client:
            context.set_client(None)
        self.client.flush_output()
        self.client.close()
        if self.head is not None:
            self.head.stop()


# -- the runtime of this process -------------------------------------------------------

_runtime: Runtime | None = None
ADDRESS_ENV_VAR = "CAIRN_ADDRESS"  # as RAY_ADDRESS: the address init() uses when given none
_lock = threading.RLock()


def start(
    address: str | None = None,
    *,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    labels: dict[str, str] | None = None,
    object_store_memory: int | None = None,
    memory: int | None = None,
    namespace: str | None = None,
    ignore_reinit_error: bool = False,
    gcs_url: str | None = None,
    log_to_driver: bool = True,
    system_config: dict[str, Any] | None = None,
) -> None:
    """What ``sdk.init`` does once its arguments are checked: starts a private head
    node, or connects to a running cluster (see ``sdk.api.init``)."""
    global _runtime
    with _lock:
        if _runtime is not None or context.current_client() is not None:
            if ignore_reinit_error:
                return
            raise RuntimeError(
                "Maybe you called ray.init twice by accident? This error can be "
                "suppressed by passing in 'ignore_reinit_error=True'."
            )
        if address is None:
            address = os.environ.get(ADDRESS_ENV_VAR) or None
        if address is not None and "://" in address:
            raise ValueError(
                f"init(address={address!r}): Ray Client addresses ({address.split('://')[0]}://) "
                "are not supported; Cairn takes 'auto' (this machine's cluster), 'local' (a "
                "new private one) or the HOST:PORT of a cluster's head (`cairn start --head` "
                "prints it), and a driver runs on a machine of the cluster"
            )
        if address is None or address == "local":
            from controlplane.local_node import node_config

            config = node_config(num_cpus, num_gpus, resources, object_store_memory, memory, labels)
            _runtime = Runtime.start(
                gcs_url=gcs_url, config=config, namespace=namespace, log_to_driver=log_to_driver
            )
        elif address == "auto" or _is_host_port(address):
            given = {
                "num_cpus": num_cpus,
                "num_gpus": num_gpus,
                "resources": resources,
                "labels": labels,
                "object_store_memory": object_store_memory,
                "_memory": memory,
                "gcs_url": gcs_url,
                "_system_config": system_config,
            }
            if any(value is not None for value in given.values()):
                named = sorted(k for k, v in given.items() if v is not None)
                raise ValueError(
                    f"When connecting to an existing cluster, {', '.join(named)} must not "
                    "be provided: they are set by `cairn start`"
                )
            _runtime = Runtime.connect(
                address=None if address == "auto" else address,
                namespace=namespace,
                log_to_driver=log_to_driver,
            )
        else:
            raise ValueError(
                f"init(address={address!r}): the address must be 'auto' (this machine's "
                "cluster), 'local' (a new private one) or the HOST:PORT of a cluster's "
                "head (Ray Client's ray:// is not supported)"
            )


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit())


def shutdown() -> None:
    """Stops everything ``init`` started (node daemon, workers, embedded PostgreSQL)."""
    global _runtime
    from sdk.runtime_env import set_job_env

    with _lock:
        runtime, _runtime = _runtime, None
        set_job_env(None)
        if runtime is not None:
            runtime.shutdown()


def is_initialized() -> bool:
    return context.current_client() is not None


def client_or_auto_init() -> CoreClient:
    """The current client; like Ray, the first use of the API starts a local cluster."""
    client = context.current_client()
    if client is None:
        start(ignore_reinit_error=True)
        client = context.current_client()
    assert client is not None
    return client


def job_namespace(client: CoreClient) -> str | None:
    """The namespace of the caller's job: its driver's, or in a task (or actor) the one
    its spec carries (on any node); None where neither is known."""
    task = context.current_task()
    if task is not None and task.namespace is not None:
        return task.namespace
    return client.welcome.namespace or None


# -- objects, by id (sdk.object_ref's ObjectRef wraps them, above this module) ---------


def put_object(serialized: Serialized, contained: tuple[str, ...], *, durable: bool = False) -> str:
    """Puts a serialized value into the store; returns its object id, of which the
    caller holds the one reference (to wrap in ``ObjectRef._owned``)."""
    client = client_or_auto_init()
    object_id = uuid.uuid4().hex + "00000000"
    task = context.current_task()
    try:
        client.put(object_id, serialized, task.task_id if task else None, contained, durable)
    except DaemonError as error:
        raise daemon_error(error) from None
    return object_id


def get_values(object_ids: list[str], timeout: float | None) -> list[Any]:
    """The values of objects, waiting for them; raises a task's error if it failed."""
    client = client_or_auto_init()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        locations = client.get_locations(object_ids, timeout)
    except DaemonError as error:
        raise get_error(error, timeout) from None
    return [_value(client, location, timeout, deadline) for location in locations]


_READS_OF_A_LOST_OBJECT = 3


def _value(
    client: CoreClient, location: p.ObjectLocation, timeout: float | None, deadline: float | None
) -> Any:
    """The value at a location. One on another node is fetched by this node first;
    if its bytes are gone, the node was told (read_value reports it) and rebuilds it
    from its lineage when it can: ask again. ``deadline`` (monotonic): the get's."""
    losses = 0
    while True:
        if location.error is not None:
            raise error_of(location.error, location.object_id)
        if location.remote is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return client.read_value(location, timeout=left)
            except DaemonError as error:
                raise get_error(error, timeout) from None
            except ObjectMissingError as missing:
                losses += 1
                if losses >= _READS_OF_A_LOST_OBJECT:
                    raise exc.ObjectLostError(location.object_id, str(missing)) from None
        try:
            location = client.fetch_location(location.object_id, timeout)
        except DaemonError as error:
            raise get_error(error, timeout) from None


def error_of(info: p.ErrorInfo, object_id: str) -> exc.RayError:
    match info.kind:
        case "task_error":
            return exc.task_error_from(info.function_name, info.traceback, info.cause, info.message)
        case "cancelled":
            task_id = object_id[:-8]  # (named in the message, as Ray's names its TaskID)
            return exc.TaskCancelledError(task_id, f"{info.message} (task id {task_id})")
        case "worker_crashed":
            return exc.WorkerCrashedError(info.message)
        case "unschedulable":
            return exc.TaskUnschedulableError(info.message)
        case "actor_died":
            return exc.ActorDiedError(info.function_name or None, info.message)
        case "actor_unavailable":
            return exc.ActorUnavailableError(info.function_name or None, info.message)
        case "object_lost":
            return exc.ObjectLostError(object_id, info.message)
        case "runtime_env_setup":
            return exc.RuntimeEnvSetupError(info.message)
        case "reconstruction_failed":
            return exc.ObjectReconstructionFailedMaxAttemptsExceededError(object_id, info.message)
        case "generator_replay_inconsistent":
            return exc.StreamingGeneratorReplayInconsistentError(info.message)
        case _:
            return exc.RaySystemError(info.message)


def get_error(error: DaemonError, timeout: float | None) -> exc.RayError:
    if error.kind == "timeout":
        return exc.GetTimeoutError(
            f"Get timed out: some object(s) not ready after {timeout} seconds."
        )
    return daemon_error(error)


def daemon_error(error: DaemonError) -> exc.RayError:
    if error.kind == "store_full":
        return exc.ObjectStoreFullError(str(error))
    return exc.RaySystemError(f"{error.kind}: {error}")
