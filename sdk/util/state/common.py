"""The state dataclasses with Ray's names (``ray.util.state.common``); defined by the
control plane, which answers with them (controlplane/state_schema.py)."""

from controlplane.state_api import DEFAULT_LIMIT, DEFAULT_TIMEOUT
from controlplane.state_schema import (
    ActorState,
    JobState,
    NodeState,
    ObjectState,
    PlacementGroupState,
    StateSchema,
    TaskState,
    WorkerState,
)

DEFAULT_RPC_TIMEOUT = DEFAULT_TIMEOUT

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_RPC_TIMEOUT",
    "ActorState",
    "JobState",
    "NodeState",
    "ObjectState",
    "PlacementGroupState",
    "StateSchema",
    "TaskState",
    "WorkerState",
]
