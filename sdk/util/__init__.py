"""Utilities with Ray's names (``ray.util``)."""

from collections.abc import Callable
from typing import Any

from dataplane import serialization
from sdk.util import queue, scheduling_strategies
from sdk.util.actor_pool import ActorPool
from sdk.util.check_serialize import inspect_serializability
from sdk.util.completion import as_completed, map_unordered
from sdk.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)


def register_serializer(
    cls: type, *, serializer: Callable[[Any], Any], deserializer: Callable[[Any], Any]
) -> None:
    """Serializes instances of ``cls`` (here, in this process) as ``serializer(obj)``,
    read back with ``deserializer``, which travels with each value: other processes
    need not register it."""
    if not isinstance(cls, type):
        raise TypeError(f"register_serializer() needs a class, got {cls!r:.80}")
    if not callable(serializer) or not callable(deserializer):
        raise TypeError("register_serializer(): serializer and deserializer must be callable")
    serialization.register_reducer(cls, serializer, deserializer)


def deregister_serializer(cls: type) -> None:
    """Undoes ``register_serializer`` for ``cls`` in this process (nothing if none)."""
    serialization.unregister_reducer(cls)


def list_named_actors(all_namespaces: bool = False) -> list[str] | list[dict[str, str]]:
    """The names of the live named actors in this job's namespace; with
    ``all_namespaces``, every one as {"name", "namespace"} (as Ray)."""
    from dataplane import context
    from dataplane import protocol as p
    from sdk.runtime import client_or_auto_init, job_namespace

    client = client_or_auto_init()
    task = context.current_task()
    job_id = task.job_id if task else client.welcome.job_id
    namespace = job_namespace(client)
    named = client.request(lambda rid: p.ListNamedActors(rid, job_id, all_namespaces, namespace))
    if all_namespaces:
        return [{"name": name, "namespace": namespace} for namespace, name in named]
    return [name for _namespace, name in named]


def get_node_ip_address(address: str | None = None) -> str:
    """The IP address of the node this process runs on (``address`` is Ray's, unused:
    the node says which address it serves at)."""
    from sdk.api import get_runtime_context, nodes

    node_id = get_runtime_context().get_node_id()
    for node in nodes():
        if node["NodeID"] == node_id:
            return str(node["NodeManagerAddress"])
    raise RuntimeError(f"this process's node {node_id} is not among the cluster's nodes")


__all__ = [
    "ActorPool",
    "PlacementGroup",
    "as_completed",
    "deregister_serializer",
    "get_current_placement_group",
    "get_node_ip_address",
    "get_placement_group",
    "inspect_serializability",
    "list_named_actors",
    "map_unordered",
    "placement_group",
    "placement_group_table",
    "queue",
    "register_serializer",
    "remove_placement_group",
    "scheduling_strategies",
]
