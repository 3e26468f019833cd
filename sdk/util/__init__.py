"""Utilities with Ray's names (``ray.util``)."""

from sdk.util import queue
from sdk.util.actor_pool import ActorPool

__all__ = ["ActorPool", "queue"]
