"""Cairn's user-facing API, compatible with Ray Core: ``import sdk as ray``."""

from sdk import actor, cloudpickle, exceptions, util
from sdk.actor import method
from sdk.api import (
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_actor,
    get_gpu_ids,
    get_runtime_context,
    init,
    is_initialized,
    kill,
    nodes,
    put,
    remote,
    shutdown,
    timeline,
    wait,
)
from sdk.generator import DynamicObjectRefGenerator, ObjectRefGenerator
from sdk.ids import (
    ActorClassID,
    ActorID,
    FunctionID,
    JobID,
    NodeID,
    TaskID,
    UniqueID,
    WorkerID,
)
from sdk.object_ref import ObjectRef

__all__ = [
    "ActorClassID",
    "ActorID",
    "DynamicObjectRefGenerator",
    "FunctionID",
    "JobID",
    "NodeID",
    "ObjectRef",
    "ObjectRefGenerator",
    "TaskID",
    "UniqueID",
    "WorkerID",
    "actor",
    "available_resources",
    "cancel",
    "cloudpickle",
    "cluster_resources",
    "exceptions",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "timeline",
    "util",
    "wait",
]
