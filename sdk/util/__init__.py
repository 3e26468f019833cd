"""Utilities with Ray's names (``ray.util``)."""

from sdk.util import queue, scheduling_strategies
from sdk.util.actor_pool import ActorPool

__all__ = ["ActorPool", "queue", "scheduling_strategies"]
