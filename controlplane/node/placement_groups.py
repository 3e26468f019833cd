"""Placement groups on a node: bundles of resources reserved out of the node's pool,
each then a pool of its own that the group's tasks and actors draw from.

In a private single-node cluster a group is reserved whole as soon as the node has all
its bundles free; STRICT_SPREAD with more than one bundle is never ready there (it is
reported ``infeasible`` once). In a cluster the global schedulers place the bundles
(``placed``), each node reserves its own (``bundle_reserved``) and the node of the
driver that made the group marks it ready once all are; a task in a bundle of another
node is spilled to it (controlplane/README.md, "Placement groups").

Its life is in the log: ``created`` (bundles, strategy, name, cluster), ``placed``,
``bundle_reserved``, ``ready`` (the node of each bundle), ``infeasible``, ``removed``.
Removing a group fails its queued tasks; its running ones finish, and its resources go
back when the last one does. A group dies with its job unless ``lifetime="detached"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controlplane.eventlog import EVERY_NODE, EntityKind, Event, RecordedEvent
from controlplane.node.recorder import EventRecorder
from controlplane.node.resources import ResourcePool
from dataplane import protocol as p
from dataplane.object_table import ObjectTable
from dataplane.serialization import serialize_with_refs

if TYPE_CHECKING:
    from controlplane.node.task_table import Connection, TaskRecord

# (locations, the events that make them ready once durable, who is sent them)
Publish = Callable[[list[p.ObjectLocation], list[Event], "Connection | None"], None]

log = logging.getLogger("cairn.node")
K = EntityKind


@dataclass
class Bundle:
    request: dict[str, float]
    node_id: str | None = None  # where it is (to be) reserved; None: not placed yet
    reserved: bool = False  # (owner's view) reserved on its node
    pool: ResourcePool | None = None  # once reserved, if on this node
    gpu_ids: list[str] = field(default_factory=list)  # the node's GPUs given to it
    in_use: int = 0  # tasks and actors running in it


@dataclass
class PlacementGroupRecord:
    pg_id: str
    bundles: list[Bundle]
    strategy: str
    name: str
    job_id: str
    ready_object_id: str
    owner: Connection | None
    detached: bool
    state: str = "PENDING"  # PENDING, CREATED, REMOVED
    reported_infeasible: bool = False
    cluster: bool = False  # its bundles are placed by the global schedulers
    owned: bool = True  # made by a driver of this node (else: some bundles are here)

    def entry(self, node_id: str) -> dict[str, Any]:
        """The group as Ray's placement_group_table shows it."""
        reserved = self.state == "CREATED"
        return {
            "placement_group_id": self.pg_id,
            "name": self.name,
            "bundles": {i: dict(b.request) for i, b in enumerate(self.bundles)},
            "bundles_to_node_id": {i: b.node_id or node_id for i, b in enumerate(self.bundles)}
            if reserved
            else {},
            "strategy": self.strategy,
            "state": self.state,
            "stats": {"scheduling_state": self.scheduling_state()},
            "ready_object_id": self.ready_object_id,
        }

    def scheduling_state(self) -> str:
        """Ray's PlacementGroupStats.SchedulingState: INFEASIBLE for a group that no
        node could ever hold (it stays pending, as in Ray), else where it stands."""
        if self.state == "CREATED":
            return "FINISHED"
        if self.state == "REMOVED":
            return "REMOVED"
        return "INFEASIBLE" if self.reported_infeasible else "QUEUED"


class PlacementGroups:
    """The node's placement groups and their bundles: reserved out of the node's pool
    (``resources``), drawn from by the group's tasks (``take``, ``give_back``)."""

    def __init__(
        self,
        node_id: str,
        resources: ResourcePool,
        objects: ObjectTable,
        recorder: EventRecorder,
        *,
        in_cluster: Callable[[], bool],
        publish: Publish,
        created_event: Callable[[p.ObjectLocation, str | None, str | None], Event],
        schedule: Callable[[], None],
    ) -> None:
        """``in_cluster()``: whether the global schedulers place bundles (other nodes
        are there); ``publish``: makes objects ready once their events are durable;
        ``schedule``: tasks may run now (resources came back, a group is ready)."""
        self.node_id = node_id
        self.resources = resources
        self.objects = objects
        self.recorder = recorder
        self._in_cluster = in_cluster
        self._publish = publish
        self._created_event = created_event
        self.schedule = schedule
        self.placement_groups: dict[str, PlacementGroupRecord] = {}

    def create(self, conn: Connection, msg: p.CreatePlacementGroup) -> None:
        record = PlacementGroupRecord(
            msg.pg_id,
            [Bundle(dict(b)) for b in msg.bundles],
            msg.strategy,
            msg.name,
            msg.job_id,
            msg.ready_object_id,
            conn,
            msg.detached,
        )
        record.cluster = self._in_cluster()
        self.placement_groups[msg.pg_id] = record
        self.objects.expect(msg.ready_object_id)
        payload: dict[str, Any] = {
            "bundles": msg.bundles,
            "strategy": msg.strategy,
            "cluster": record.cluster,
        }
        if msg.name:
            payload["name"] = msg.name
        self.recorder.log(
            [
                Event(
                    K.PLACEMENT_GROUP,
                    msg.pg_id,
                    "created",
                    payload,
                    job_id=msg.job_id,
                    node_id=self.node_id,
                )
            ]
        )
        self.schedule()

    def reserve(self) -> None:
        """Reserves every pending group that fits now (the local scheduler's first
        step)."""
        for record in list(self.placement_groups.values()):
            if record.cluster:
                self._reserve_bundles_placed_here(record)
                continue
            if record.state != "PENDING":
                continue
            why_not = self._never_fits(record)
            if why_not is not None:
                if not record.reported_infeasible:
                    record.reported_infeasible = True
                    log.warning("placement group %s cannot be placed: %s", record.pg_id, why_not)
                    infeasible = Event(
                        K.PLACEMENT_GROUP,
                        record.pg_id,
                        "infeasible",
                        {"reason": why_not},
                        job_id=record.job_id or None,
                    )
                    self.recorder.log([infeasible])
                continue
            total: dict[str, float] = {}
            for bundle in record.bundles:
                for key, amount in bundle.request.items():
                    total[key] = total.get(key, 0.0) + amount
            if not self.resources.available_for(total):
                continue
            for bundle in record.bundles:
                bundle.gpu_ids = self.resources.acquire(bundle.request)
                bundle.pool = ResourcePool(bundle.request)
                bundle.pool.gpu_names = list(bundle.gpu_ids) or bundle.pool.gpu_names
                bundle.node_id, bundle.reserved = self.node_id, True
            self._group_ready(record)

    def _group_ready(self, record: PlacementGroupRecord) -> None:
        """Every bundle is reserved: the group is ready (its ready object with it)."""
        record.state = "CREATED"
        serialized, _ = serialize_with_refs(True)
        location = p.ObjectLocation(
            record.ready_object_id, inline=serialized.to_bytes(), size=serialized.total_size
        )
        self.objects.charge(location.size, force=True)
        ready = Event(
            K.PLACEMENT_GROUP,
            record.pg_id,
            "ready",
            {"bundle_nodes": [b.node_id for b in record.bundles]},
            job_id=record.job_id,
            node_id=self.node_id,
        )
        created = self._created_event(location, None, record.job_id)
        self._publish([location], [ready, created], record.owner)

    # -- bundles on several nodes (placed by the global schedulers) -------------------

    def _reserve_bundles_placed_here(self, record: PlacementGroupRecord) -> None:
        """Reserves this node's bundles of a group placed across the cluster, all
        together once they fit, and says so in the log (``bundle_reserved``)."""
        if record.state == "REMOVED":
            return
        here = [
            (i, b) for i, b in enumerate(record.bundles) if b.node_id == self.node_id and not b.pool
        ]
        if not here:
            return
        total: dict[str, float] = {}
        for _, bundle in here:
            for key, amount in bundle.request.items():
                total[key] = total.get(key, 0.0) + amount
        if not self.resources.available_for(total):
            return
        for index, bundle in here:
            bundle.gpu_ids = self.resources.acquire(bundle.request)
            bundle.pool = ResourcePool(bundle.request)
            bundle.pool.gpu_names = list(bundle.gpu_ids) or bundle.pool.gpu_names
            self.recorder.log(
                [
                    Event(
                        K.PLACEMENT_GROUP,
                        record.pg_id,
                        "bundle_reserved",
                        {"index": index, "to_node": EVERY_NODE},
                        job_id=record.job_id or None,
                        node_id=self.node_id,
                    )
                ]
            )

    def on_log_event(self, event: RecordedEvent) -> None:
        """Placement group events of other nodes and schedulers (from the log)."""
        pg_id, kind = event.entity_id, event.event_type
        group = self.placement_groups.get(pg_id)
        if kind == "placed":
            nodes = event.payload["bundle_nodes"]
            if group is None:
                if self.node_id not in nodes:
                    return
                bundles = [Bundle(dict(b)) for b in event.payload["bundles"]]
                group = PlacementGroupRecord(
                    pg_id,
                    bundles,
                    event.payload["strategy"],
                    "",
                    event.job_id or "",
                    "",
                    None,
                    True,
                    cluster=True,
                    owned=False,
                )
                self.placement_groups[pg_id] = group
            for bundle, node_id in zip(group.bundles, nodes, strict=True):
                bundle.node_id = node_id
            self.schedule()
        elif group is None:
            return
        elif kind == "bundle_reserved" and group.owned and group.state == "PENDING":
            group.bundles[int(event.payload["index"])].reserved = True
            if all(b.reserved for b in group.bundles):
                self._group_ready(group)
        elif kind == "removed" and not group.owned:
            self.remove(pg_id, log_event=False)
        elif kind == "infeasible" and group.state == "PENDING":  # (the global schedulers')
            group.reported_infeasible = True

    def _never_fits(self, record: PlacementGroupRecord) -> str | None:
        if record.strategy == "STRICT_SPREAD" and len(record.bundles) > 1:
            return (
                f"STRICT_SPREAD needs {len(record.bundles)} nodes, one per bundle, and this "
                "cluster has one"
            )
        total: dict[str, float] = {}
        for bundle in record.bundles:
            for key, amount in bundle.request.items():
                total[key] = total.get(key, 0.0) + amount
        if not self.resources.fits_total(total):
            return f"this node has {self.resources.total}, the group needs {total}"
        return None

    def bundle_for(self, record: TaskRecord) -> tuple[Bundle | None, str | None]:
        """For a task in a placement group: the bundle of this node to run it in now
        (None: wait, or go to the bundle's node: see bundle_elsewhere), or why it can
        never run."""
        assert record.spec.strategy is not None  # a placement group's task
        _, pg_id, index, _ = record.spec.strategy
        group = self.placement_groups.get(pg_id)
        if group is None or group.state == "REMOVED":
            return None, f"its placement group {pg_id} was removed (or never existed here)"
        if group.owned and group.state != "CREATED":
            return None, None
        chosen = group.bundles if int(index) < 0 else [group.bundles[int(index)]]
        request = record.spec.resources
        if not any(
            all(b.request.get(k, 0.0) >= v for k, v in request.items() if v > 0) for b in chosen
        ):
            return None, (
                f"it needs {request}, more than bundle(s) {index} of placement group "
                f"{pg_id} reserve"
            )
        for bundle in chosen:
            if bundle.pool is not None and bundle.pool.available_for(request):
                return bundle, None
        return None, None

    def bundle_elsewhere(self, record: TaskRecord) -> bool:
        """Whether a task of a group made here must run on another node (its bundle,
        or every bundle for index -1, is there): it is spilled to it."""
        assert record.spec.strategy is not None  # a placement group's task
        _, pg_id, index, _ = record.spec.strategy
        group = self.placement_groups.get(pg_id)
        if group is None or not group.owned or not group.cluster or group.state != "CREATED":
            return False
        chosen = group.bundles if int(index) < 0 else [group.bundles[int(index)]]
        return all(b.node_id != self.node_id for b in chosen)

    def take(self, bundle: Bundle, request: dict[str, float]) -> list[str]:
        """A task or actor of the group starts in ``bundle``: its resources (GPU ids)."""
        assert bundle.pool is not None
        bundle.in_use += 1
        return bundle.pool.acquire(request)

    def give_back(self, bundle: Bundle, request: dict[str, float], gpu_ids: list[str]) -> None:
        assert bundle.pool is not None
        bundle.pool.release(request, gpu_ids)
        bundle.in_use -= 1
        self._maybe_return_bundles()

    def remove(self, pg_id: str, reason: str = "removed", *, log_event: bool = True) -> None:
        group = self.placement_groups.get(pg_id)
        if group is None or group.state == "REMOVED":
            return
        was_created, group.state = group.state == "CREATED", "REMOVED"
        removed = Event(
            K.PLACEMENT_GROUP,
            pg_id,
            "removed",
            {"to_node": EVERY_NODE},
            job_id=group.job_id or None,
            node_id=self.node_id,
        )
        if log_event and was_created:
            self.recorder.log([removed])
        elif log_event:  # whoever waits for it to be ready learns it never will be
            error = p.ErrorInfo("system", f"placement group {pg_id} was {reason} before ready")
            self._publish(
                [p.ObjectLocation(group.ready_object_id, error=error)], [removed], group.owner
            )
        self._maybe_return_bundles()
        self.schedule()  # its queued tasks fail there

    def _maybe_return_bundles(self) -> None:
        """Gives the resources of removed groups back once nothing runs in them."""
        for group in list(self.placement_groups.values()):
            if group.state != "REMOVED" or any(b.in_use for b in group.bundles):
                continue
            for bundle in group.bundles:
                if bundle.pool is not None:
                    self.resources.release(bundle.request, bundle.gpu_ids)
                    bundle.pool = None
            del self.placement_groups[group.pg_id]

    def table(self, conn: Connection, msg: p.PlacementGroupTable) -> None:
        if msg.name is not None:
            found = next(
                (
                    g.entry(self.node_id)
                    for g in self.placement_groups.values()
                    if g.name == msg.name and g.state != "REMOVED"
                ),
                None,
            )
            conn.send(p.Reply(msg.request_id, found))
            return
        table = {
            g.pg_id: g.entry(self.node_id)
            for g in self.placement_groups.values()
            if msg.pg_id is None or g.pg_id == msg.pg_id
        }
        conn.send(p.Reply(msg.request_id, table))

    def owner_gone(self, conn: Connection) -> None:
        for group in list(self.placement_groups.values()):
            if group.owned and group.owner is conn:
                group.owner = None
                if not group.detached:
                    self.remove(group.pg_id, "removed with its job")
