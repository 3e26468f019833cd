"""Utilities with Ray's names (``ray.util``)."""

from sdk.util import queue, scheduling_strategies
from sdk.util.actor_pool import ActorPool
from sdk.util.placement_group import (
    PlacementGroup,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

__all__ = [
    "ActorPool",
    "PlacementGroup",
    "get_placement_group",
    "placement_group",
    "placement_group_table",
    "queue",
    "remove_placement_group",
    "scheduling_strategies",
]
