"""Tasks this node hands to the cluster: which may or must go to another node (the
spill policy), the ``spilled`` event that hands one to the global schedulers, and the
tasks spilled and not back yet, each until its results are here (or it is lost with
its node, or fails).

``SpilledTasks`` owns that set. The remote tasks (remote_tasks.py) follow the log for
them and take them back; the local scheduler spills; the actors made here that live
elsewhere (actors_elsewhere.py) follow their forwarded calls here as spilled tasks.
"""

from __future__ import annotations

from typing import Any

from controlplane import labels
from controlplane.eventlog import EntityKind, Event
from controlplane.node.cluster_link import ClusterLink
from controlplane.node.recorder import EventRecorder
from controlplane.node.resources import ResourcePool
from controlplane.node.task_table import TaskRecord, TaskTable
from dataplane import protocol as p
from dataplane.object_table import ObjectTable

K = EntityKind


class SpilledTasks:
    def __init__(
        self,
        node_id: str,
        recorder: EventRecorder,
        objects: ObjectTable,
        tasks: TaskTable,
        resources: ResourcePool,
        labels: dict[str, str],
        link: ClusterLink | None,
    ) -> None:
        """``link``: None for a private cluster (``sdk.init()``), where nothing spills."""
        self.node_id = node_id
        self.recorder = recorder
        self.objects = objects
        self.tasks = tasks
        self.resources = resources
        self.labels = labels  # the node's (controlplane/labels.py)
        self.link = link
        self._spilled: dict[str, TaskRecord] = {}  # task id -> a task this node spilled

    @property
    def address(self) -> str:
        """host:port of the node's gRPC service ("" outside a cluster, or before)."""
        return self.link.address if self.link is not None else ""

    # -- the policy ------------------------------------------------------------------

    def can_spill(self, record: TaskRecord) -> bool:
        """Whether a task that does not fit here now may go to another node."""
        strategy = record.spec.strategy
        if strategy is not None and strategy[0] == "NODE_AFFINITY" and strategy[1] == self.node_id:
            return (
                strategy[2] == "soft"
                and self._spillable(record)
                and not self.resources.fits_total(record.spec.resources)
            )
        return self._spillable(record)

    def must_spill(self, record: TaskRecord) -> bool:
        """Whether a task goes to the global scheduler even if it fits here: SPREAD, an
        affinity to another node, or labels this node lacks (those it must have, or
        those it prefers: another node may have them)."""
        strategy = record.spec.strategy
        selector = getattr(record.spec, "label_selector", None)
        if (strategy is None and selector is None) or not self._spillable(record):
            return False
        if selector is not None and not self.labels_preferred(selector):
            return True
        return strategy is not None and (
            strategy[0] == "SPREAD"
            or (strategy[0] == "NODE_AFFINITY" and strategy[1] != self.node_id)
        )

    def labels_preferred(self, selector: dict[str, Any]) -> bool:
        """Whether this node has the labels ``selector`` needs and those it prefers."""
        return labels.hard_match(self.labels, selector) and labels.soft_match(self.labels, selector)

    def labels_missing(self, spec: p.TaskSpec) -> str | None:
        """Why this node cannot run ``spec`` for its labels, or None if it can."""
        selector = getattr(spec, "label_selector", None)
        if labels.hard_match(self.labels, selector):
            return None
        assert selector is not None  # (no selector matches every node)
        why = f"its label_selector ({labels.describe(selector)}) matches no node"
        if self.link is not None and self.link.has_peers() and spec.streaming:
            why += " it can run on: a streaming generator runs on its caller's node"
        return why + f" (this node's labels: {self.labels})"

    def actor_goes_elsewhere(self, creation: TaskRecord) -> bool:
        """An actor is made on another node when this one can never fit it, a node
        affinity names another node, or it lacks the labels the actor needs or
        prefers."""
        if self.link is None or not self.link.has_peers():
            return False
        strategy = creation.spec.strategy
        if strategy is not None and strategy[0] == "NODE_AFFINITY":
            return strategy[1] != self.node_id
        selector = getattr(creation.spec, "label_selector", None)
        if selector is not None and not self.labels_preferred(selector):
            return True
        return not self.resources.fits_total(creation.spec.resources)

    def _spillable(self, record: TaskRecord) -> bool:
        return (
            self.link is not None
            and self.link.has_peers()
            and record.spec.actor_id is None
            and _placeable_anywhere(record.spec)
            and not (record.spec.strategy and record.spec.strategy[0] == "PLACEMENT_GROUP")
            and record.placed_from is None
            and not record.placed_back
        )

    def unschedulable_here(self, record: TaskRecord) -> str | None:
        """Why a task cannot run in a cluster of this one node, if it cannot."""
        strategy = record.spec.strategy
        if strategy is None or strategy[0] != "NODE_AFFINITY" or strategy[2] == "soft":
            return None
        if strategy[1] != self.node_id and not _placeable_anywhere(record.spec):
            return (
                f"its hard node affinity names node {strategy[1]}, but a streaming generator "
                "with _generator_backpressure_num_objects runs on its "
                "caller's node (Cairn does not move those between nodes yet)"
            )
        if strategy[1] != self.node_id and not self._spillable(record):
            return f"its hard node affinity names node {strategy[1]}, which is not in the cluster"
        return None

    # -- the tasks spilled -----------------------------------------------------------

    def spill(self, record: TaskRecord) -> None:
        """Hands the task to the global schedulers: a ``spilled`` event with its spec,
        its code and where its arguments are."""
        spec = record.spec
        record.state, record.owner_node = "SPILLED", self.node_id
        self.remember(record)
        args = {
            object_id: {"address": self.address, "size": self.objects.location(object_id).size}
            for object_id in spec.dependencies()
        }
        blob = self.tasks.code_of(spec.function_id)
        self.recorder.log(
            [
                Event(
                    K.TASK,
                    spec.task_id,
                    "spilled",
                    {
                        "attempt": record.attempt,
                        "resources": spec.resources,
                        "args": args,
                        "from_node": self.node_id,
                        "strategy": list(spec.strategy) if spec.strategy else None,
                        "label_selector": getattr(spec, "label_selector", None),
                    },
                    job_id=spec.job_id,
                    node_id=self.node_id,
                    data=p.encode((spec, blob, self.address)),
                )
            ]
        )

    def remember(self, record: TaskRecord) -> None:
        """Follows ``record`` until its results are back (a spill, or a call forwarded
        to the node of its actor)."""
        self._spilled[record.spec.task_id] = record

    def forget(self, task_id: str) -> TaskRecord | None:
        return self._spilled.pop(task_id, None)

    def get(self, task_id: str) -> TaskRecord | None:
        return self._spilled.get(task_id)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._spilled

    def placed_on(self, node_id: str) -> list[TaskRecord]:
        """The tasks spilled that were placed on ``node_id``."""
        return [r for r in self._spilled.values() if r.placed_on == node_id]

    def calls_of(self, actor_id: str) -> list[TaskRecord]:
        """The calls of an actor living elsewhere that were forwarded and not done."""
        return [
            r
            for r in self._spilled.values()
            if r.spec.actor_id == actor_id and r.spec.method != "__init__"
        ]


def _placeable_anywhere(spec: p.TaskSpec) -> bool:
    """Whether a task may run on another node than its caller's: not a streaming
    generator with backpressure (what the caller took is followed where the caller
    is)."""
    return getattr(spec, "generator_backpressure", -1) <= 0
