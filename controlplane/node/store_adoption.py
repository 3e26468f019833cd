"""A restarted node daemon adopts its predecessor's store (issue 17, crash safety).

When a node daemon dies and its node's process starts another (controlplane/
local_node.py), the objects in the dead daemon's store regions are still in memory:
the regions are files in /dev/shm, and the node's process no longer removes them. What
of them anyone still needs is what the old daemon kept for the nodes that own it --
the results of tasks it ran for another node, until that node pulls its copy
(``RemoteTasks.kept_for_owner``). Its own clients (workers, drivers) died with it, and
so did every reference they held.

The log says which objects those are and where they are: a kept object's ``created``
event carries its region and offset, and an object not ``freed``, ``lost`` or
``spilled`` by that node since is in the store as it was sealed (a range is written
before its ``created`` event, and never again). The new daemon

1. takes the regions over (renamed to its own prefix, same indices),
2. rebuilds its allocator from them: the adopted objects' ranges taken, the rest free
   (what a dead writer never sealed is free again),
3. keeps the objects for their owners, as the old daemon did, and logs a
   ``transferred`` event (reason "adopted", from_node: the old id) for each, so the log
   says where they are.

It does so only when its node's process declared the old id dead itself
(``membership.declare_restarted``): that ``dead`` event tells the owners to leave their
objects where they are (same address), rather than rebuild them. If the monitor
declared the death first, the owners rebuild what they need, and the new daemon starts
empty (the regions are removed)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from controlplane.eventlog import EntityKind, Event
from controlplane.eventlog.connection import connect
from controlplane.sql import queries
from dataplane import protocol as p
from dataplane import shm
from dataplane.arena import take_over_regions
from dataplane.object_table import ObjectTable
from dataplane.store_memory import StoreMemory

log = logging.getLogger("cairn.node")
ADOPTED = "adopted"


@dataclass(frozen=True)
class Adopted:
    """What a daemon took over: the objects, and the events that say so."""

    locations: list[p.ObjectLocation]
    events: list[Event]


async def objects_left(gcs_url: str, old_node_id: str) -> list[p.ObjectLocation]:
    """The objects the dead daemon kept for other nodes, where its store had them."""
    conn = await connect(gcs_url)
    try:
        rows = await conn.fetch(queries["store_objects_left"], old_node_id)
    finally:
        await conn.close()
    left = []
    for row in rows:
        payload: dict[str, Any] = row["payload"]
        if isinstance(payload, str):
            payload = json.loads(payload)
        kept = (row["event_type"] == "created" and "address" in payload) or (
            row["event_type"] == "transferred" and payload.get("reason") == ADOPTED
        )
        if kept and "region" in payload:
            left.append(
                p.ObjectLocation(
                    row["object_id"],
                    region=int(payload["region"]),
                    offset=int(payload["offset"]),
                    size=int(payload["size_bytes"]),
                )
            )
    return left


def adopt(
    node_id: str,
    old_node_id: str,
    left: list[p.ObjectLocation],
    memory: StoreMemory,
    objects: ObjectTable,
    kept_for_owner: set[str],
) -> Adopted:
    """Takes the old daemon's regions and the objects ``left`` in them (see the module's
    docstring), before this daemon hands out any range. An object whose region is gone
    is not adopted; if ranges do not fit (a log that does not match the regions),
    nothing is, and the regions go."""
    regions = take_over_regions(old_node_id, memory.prefix)
    found = [at for at in left if at.region in regions]
    try:
        memory.adopt(regions, found)
    except ValueError as exc:
        log.error("node %s: the store of %s cannot be adopted: %s", node_id, old_node_id, exc)
        shm.unlink_all(memory.prefix)
        memory.adopt({}, [])
        return Adopted([], [])
    for location in found:
        objects.expect(location.object_id)
        objects.hold(location.object_id)  # for its owner, until it releases it
        objects.ready(location)
        kept_for_owner.add(location.object_id)
    events = [
        Event(
            EntityKind.OBJECT,
            at.object_id,
            "transferred",
            {
                "size_bytes": at.size,
                "from_node": old_node_id,
                "reason": ADOPTED,
                "region": at.region,
                "offset": at.offset,
            },
            node_id=node_id,
        )
        for at in found
    ]
    return Adopted(found, events)
