"""docs/compatibility.md says, for every public name of Ray Core 2.60, whether Cairn
has it (works, differs) or not (absent). This test keeps it true: every name of Ray's
is on the page, and what the page says matches what ``sdk`` has. Ray's names are
written out here (read from ``ray`` 2.60.0), so the test needs no Ray installed."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import sdk
import sdk.runtime_context
from sdk import options as opts

PAGE = Path(__file__).resolve().parent.parent / "docs" / "compatibility.md"

# Ray 2.60's public names, by section of the page
RAY = [
    "ActorClassID",
    "ActorID",
    "ClientBuilder",
    "DynamicObjectRefGenerator",
    "FunctionID",
    "JobID",
    "Language",
    "LoggingConfig",
    "NodeID",
    "ObjectID",
    "ObjectRef",
    "ObjectRefGenerator",
    "PlacementGroupID",
    "SCRIPT_MODE",
    "TaskID",
    "UniqueID",
    "WORKER_MODE",
    "WorkerID",
    "actor",
    "autoscaler",
    "available_resources",
    "cancel",
    "client",
    "cluster_resources",
    "cpp_function",
    "data",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "internal",
    "is_initialized",
    "java_actor_class",
    "java_function",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "timeline",
    "util",
    "wait",
    "widgets",
    "workflow",
]
RAY_UTIL = [
    "ActorPool",
    "accelerators",
    "as_completed",
    "collective",
    "connect",
    "deregister_serializer",
    "disable_log_once_globally",
    "disconnect",
    "enable_periodic_logging",
    "get_current_placement_group",
    "get_node_instance_id",
    "get_node_ip_address",
    "get_placement_group",
    "inspect_serializability",
    "iter",
    "list_named_actors",
    "log_once",
    "map_unordered",
    "pdb",
    "placement_group",
    "placement_group_table",
    "ray_debugpy",
    "register_serializer",
    "remove_placement_group",
    "multiprocessing",
    "queue",
    "scheduling_strategies",
]
RAY_EXCEPTIONS = [
    "ActorAlreadyExistsError",
    "ActorDiedError",
    "ActorHandleNotFoundError",
    "ActorPlacementGroupRemoved",
    "ActorUnavailableError",
    "ActorUnschedulableError",
    "AsyncioActorExit",
    "AuthenticationError",
    "CrossLanguageError",
    "GetTimeoutError",
    "LocalRayletDiedError",
    "NodeDiedError",
    "ObjectFetchTimedOutError",
    "ObjectFreedError",
    "ObjectLostError",
    "ObjectReconstructionFailedError",
    "ObjectRefStreamEndOfStreamError",
    "ObjectStoreFullError",
    "OufOfBandObjectRefSerializationException",
    "OutOfDiskError",
    "OutOfMemoryError",
    "OwnerDiedError",
    "PendingCallsLimitExceeded",
    "PlasmaObjectNotAvailable",
    "RayActorError",
    "RayCgraphCapacityExceeded",
    "RayChannelError",
    "RayChannelTimeoutError",
    "RayDirectTransportError",
    "RayError",
    "RaySystemError",
    "RayTaskError",
    "ReferenceCountingAssertionError",
    "RpcError",
    "RuntimeEnvSetupError",
    "StreamingGeneratorReplayInconsistentError",
    "TaskCancelledError",
    "TaskPlacementGroupRemoved",
    "TaskUnschedulableError",
    "UnserializableException",
    "UserCodeException",
    "WorkerCrashedError",
]
RUNTIME_CONTEXT = [
    "actor_id",
    "current_actor",
    "current_placement_group_id",
    "gcs_address",
    "get",
    "get_accelerator_ids",
    "get_actor_id",
    "get_actor_name",
    "get_assigned_resources",
    "get_job_id",
    "get_node_id",
    "get_node_labels",
    "get_placement_group_id",
    "get_resource_ids",
    "get_runtime_env_string",
    "get_session_name",
    "get_task_function_name",
    "get_task_id",
    "get_task_name",
    "get_temp_dir",
    "get_worker_id",
    "is_canceled",
    "job_id",
    "namespace",
    "node_id",
    "runtime_env",
    "should_capture_child_tasks_in_placement_group",
    "task_id",
    "was_current_actor_reconstructed",
]
TASK_OPTIONS = [
    "_generator_backpressure_num_objects",
    "_labels",
    "_num_objects_per_yield",
    "accelerator_type",
    "enable_task_events",
    "fallback_strategy",
    "label_selector",
    "max_calls",
    "max_retries",
    "memory",
    "name",
    "num_cpus",
    "num_gpus",
    "num_returns",
    "object_store_memory",
    "placement_group",
    "placement_group_bundle_index",
    "placement_group_capture_child_tasks",
    "resources",
    "retry_exceptions",
    "runtime_env",
    "scheduling_strategy",
]
ACTOR_OPTIONS = [
    "_actor_generator_backpressure_num_objects",
    "_labels",
    "accelerator_type",
    "allow_out_of_order_execution",
    "concurrency_groups",
    "enable_task_events",
    "enable_tensor_transport",
    "fallback_strategy",
    "get_if_exists",
    "label_selector",
    "lifetime",
    "max_concurrency",
    "max_pending_calls",
    "max_restarts",
    "max_task_retries",
    "memory",
    "name",
    "namespace",
    "num_cpus",
    "num_gpus",
    "object_store_memory",
    "placement_group",
    "placement_group_bundle_index",
    "placement_group_capture_child_tasks",
    "resources",
    "runtime_env",
    "scheduling_strategy",
]


def _page() -> dict[str, dict[str, str]]:
    """{section title: {name: status}} of the page's tables."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in PAGE.read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip("` "), {})
        elif match := re.match(r"\| `([^`]+)` \| (works|differs|absent) \|", line):
            current[match.group(1)] = match.group(2)
    return sections


def _has_attribute(module: object, name: str) -> bool:
    if hasattr(module, name):
        return True
    try:
        importlib.import_module(f"{module.__name__}.{name}")  # type: ignore[attr-defined]
    except ImportError:
        return False
    return True


def _check(section: str, ray_names: list[str], present: object) -> None:
    listed = _page()[section]
    assert sorted(set(ray_names) - set(listed)) == [], f"names of {section} not on the page"
    for name, status in listed.items():
        here = present(name) if callable(present) else name in present
        if status == "absent":
            assert not here, f"{section}.{name} is marked absent but Cairn has it: update the page"
        else:
            assert here, f"{section}.{name} is marked {status} but Cairn lacks it"


def test_the_ray_module() -> None:
    _check("ray", RAY, lambda name: _has_attribute(sdk, name))


def test_ray_util() -> None:
    _check("ray.util", RAY_UTIL, lambda name: _has_attribute(sdk.util, name))


def test_ray_exceptions() -> None:
    _check("ray.exceptions", RAY_EXCEPTIONS, lambda name: hasattr(sdk.exceptions, name))


def test_the_runtime_context() -> None:
    context = sdk.runtime_context.RuntimeContext
    _check("ray.runtime_context.RuntimeContext", RUNTIME_CONTEXT, lambda n: hasattr(context, n))


def test_the_options_of_remote_functions_and_actors() -> None:
    _check("Options of remote functions", TASK_OPTIONS, set(opts.TASK_OPTIONS))
    _check("Options of actors", ACTOR_OPTIONS, set(opts.ACTOR_OPTIONS))
