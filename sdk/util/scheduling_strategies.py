"""Scheduling strategies with Ray's names (``ray.util.scheduling_strategies``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane import labels


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


class _LabelOperator:
    """One operator of a NodeLabelSchedulingStrategy's expression (``values``: those it
    names, none for Exists and DoesNotExist)."""

    op = ""

    def __init__(self, *values: str) -> None:
        if self.op in ("in", "!in"):
            name = type(self).__name__
            if not values:
                raise ValueError(
                    f"The variadic parameter of the {name} operator must be a non-empty "
                    f'tuple: e.g. {name}("value1", "value2").'
                )
            for index, value in enumerate(values):
                if not isinstance(value, str):
                    raise ValueError(
                        f"Type of value in position {index} for the {name} operator must be "
                        f"str, but got {value!r} of type {type(value).__name__}."
                    )
        self.values = list(values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.values))})"


class In(_LabelOperator):
    """The node has the label, with one of these values."""

    op = "in"


class NotIn(_LabelOperator):
    """The node lacks the label, or has it with none of these values."""

    op = "!in"


class Exists(_LabelOperator):
    """The node has the label (any value)."""

    op = "exists"

    def __init__(self) -> None:
        super().__init__()


class DoesNotExist(_LabelOperator):
    """The node lacks the label."""

    op = "!exists"

    def __init__(self) -> None:
        super().__init__()


class NodeLabelSchedulingStrategy:
    """Run on a node whose labels match every ``hard`` expression, preferring those
    that also match every ``soft`` one: {"region": In("us"), "gpu": Exists()}. A task
    no node matches waits, reported infeasible, as one asking for resources none has."""

    def __init__(
        self,
        hard: dict[str, _LabelOperator] | None,
        *,
        soft: dict[str, _LabelOperator] | None = None,
    ) -> None:
        self.hard = _expressions(hard, "hard")
        self.soft = _expressions(soft, "soft")
        if not (self.hard or self.soft):
            raise ValueError(
                "The `hard` and `soft` parameter of NodeLabelSchedulingStrategy cannot both "
                "be empty."
            )

    def __repr__(self) -> str:
        return f"NodeLabelSchedulingStrategy(hard={self.hard!r}, soft={self.soft!r})"

    def selector(self) -> dict[str, dict[str, list[Any]]] | None:
        """As the task spec carries it (controlplane/labels.py)."""
        return labels.selector(self.hard, self.soft)


def _expressions(given: object, param: str) -> dict[str, list[Any]]:
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ValueError(
            f'The {param} parameter must be a map (e.g. {{"key1": In("value1")}}) but got '
            f"type {type(given).__name__}."
        )
    expressions = {}
    for key, operator in given.items():
        if not isinstance(key, str):
            raise ValueError(
                f"The map key of the {param} parameter must be of type str, got {key!r}."
            )
        if not isinstance(operator, _LabelOperator):
            raise ValueError(
                f"The map value for key {key} of the {param} parameter must be one of the "
                f"`In`, `NotIn`, `Exists` or `DoesNotExist` operator, got {operator!r}."
            )
        where = f"NodeLabelSchedulingStrategy {param}"
        expressions[key] = labels.expression(key, operator.op, operator.values, where)
    return expressions


def placement(
    strategy: object, label_selector: dict[str, str] | None
) -> tuple[tuple[str, ...] | None, dict[str, dict[str, list[Any]]] | None]:
    """The strategy and the label selector as the task spec carries them (see
    ``to_wire``); ValueError for a label selector beside a strategy that places the
    task on a given node or bundle."""
    hard = labels.from_ray_selector(label_selector) if label_selector else None
    if isinstance(strategy, NodeLabelSchedulingStrategy):
        if hard:
            raise ValueError(
                "label_selector cannot be combined with a NodeLabelSchedulingStrategy: give "
                "every label in one of them"
            )
        return to_wire(strategy), strategy.selector()
    wire = to_wire(strategy)
    if hard and wire is not None and wire[0] != "SPREAD":
        what = (
            "its placement group (captured from the task that submits it)"
            if strategy is None
            else f"scheduling_strategy={strategy!r}"
        )
        raise ValueError(
            f"label_selector cannot be combined with {what}: labels choose among all "
            "nodes, with the default strategy or SPREAD"
        )
    return wire, labels.selector(hard)


def to_wire(strategy: object) -> tuple[str, ...] | None:
    """The strategy as the task spec carries it; ValueError for one we do not know.
    Inside a task running in a placement group that captures child tasks, the default
    is that group."""
    if strategy is None:
        from dataplane import context

        task = context.current_task()
        return task.captured_placement if task is not None else None
    if strategy == "DEFAULT" or isinstance(strategy, NodeLabelSchedulingStrategy):
        return None  # (a node label strategy places by default, among nodes with the labels)
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
        f"scheduling_strategy must be 'DEFAULT', 'SPREAD', a NodeAffinitySchedulingStrategy, "
        f"a PlacementGroupSchedulingStrategy or a NodeLabelSchedulingStrategy, got {strategy!r}"
    )
