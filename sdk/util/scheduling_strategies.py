"""Scheduling strategies with Ray's names (``ray.util.scheduling_strategies``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NodeAffinitySchedulingStrategy:
    """Run on the node ``node_id``; if it is dead or cannot ever fit the task, a
    ``soft`` affinity lets the task run elsewhere, a hard one fails it."""

    node_id: str
    soft: bool

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"node_id must be a node id string, got {self.node_id!r}")
        if not isinstance(self.soft, bool):
            raise ValueError(f"soft must be True or False, got {self.soft!r}")


@dataclass(frozen=True)
class PlacementGroupSchedulingStrategy:
    """Run in a bundle of ``placement_group`` (index -1: any bundle), using the
    resources reserved for it; with ``placement_group_capture_child_tasks``, tasks
    this one submits run in the group too."""

    placement_group: Any
    placement_group_bundle_index: int = -1
    placement_group_capture_child_tasks: bool | None = None

    def __post_init__(self) -> None:
        count = len(getattr(self.placement_group, "bundle_specs", ()))
        index = self.placement_group_bundle_index
        if not hasattr(self.placement_group, "id"):
            raise ValueError(
                f"placement_group must be a PlacementGroup, got {self.placement_group!r}"
            )
        if not isinstance(index, int) or not -1 <= index < count:
            raise ValueError(
                f"placement_group_bundle_index must be -1 or in [0, {count}), got {index!r}"
            )


def to_wire(strategy: object) -> tuple[str, ...] | None:
    """The strategy as the task spec carries it; ValueError for one we do not know.
    Inside a task running in a placement group that captures child tasks, the default
    is that group."""
    if strategy is None:
        from dataplane import context

        task = context.current_task()
        return task.captured_placement if task is not None else None
    if strategy == "DEFAULT":
        return None
    if isinstance(strategy, PlacementGroupSchedulingStrategy):
        capture = "capture" if strategy.placement_group_capture_child_tasks else ""
        return (
            "PLACEMENT_GROUP",
            strategy.placement_group.id.hex(),
            str(strategy.placement_group_bundle_index),
            capture,
        )
    if strategy == "SPREAD":
        return ("SPREAD",)
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return ("NODE_AFFINITY", strategy.node_id, "soft" if strategy.soft else "hard")
    raise ValueError(
        f"scheduling_strategy must be 'DEFAULT', 'SPREAD', a "
        f"NodeAffinitySchedulingStrategy or a PlacementGroupSchedulingStrategy, got {strategy!r}"
    )
