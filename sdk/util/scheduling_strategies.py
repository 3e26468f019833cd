"""Scheduling strategies with Ray's names (``ray.util.scheduling_strategies``)."""

from __future__ import annotations

from dataclasses import dataclass


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


def to_wire(strategy: object) -> tuple[str, ...] | None:
    """The strategy as the task spec carries it; ValueError for one we do not know."""
    if strategy is None or strategy == "DEFAULT":
        return None
    if strategy == "SPREAD":
        return ("SPREAD",)
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return ("NODE_AFFINITY", strategy.node_id, "soft" if strategy.soft else "hard")
    raise ValueError(
        f"scheduling_strategy must be 'DEFAULT', 'SPREAD' or a "
        f"NodeAffinitySchedulingStrategy, got {strategy!r}"
    )
