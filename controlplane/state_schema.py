"""Ray's state dataclasses (``ray.util.state.common``): what each state-API row is, by
Ray's field names, with which fields are filterable and which come only with
``detail``. The SQL of controlplane/sql/state_queries.sql gives a column of each name;
``sdk.util.state`` hands these out. As Ray's, a row reads as attributes or as a dict
(``task.state``, ``task["state"]``, ``task.get("state")``).

Fields after Ray's are Cairn's own (the log knows them: an object's state and
holders, a placement group's strategy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

_FILTERABLE = "filterable"
_DETAIL = "detail"


def state_column(*, filterable: bool, detail: bool = False) -> Any:
    """A field with the two marks Ray's schema gives each column; a detail column is
    None unless asked for (``detail=True``, or a get)."""
    metadata = {_FILTERABLE: filterable, _DETAIL: detail}
    return field(default=None, metadata=metadata)


class StateSchema:
    """A row of the state API: attribute and dict access, as Ray's."""

    KIND: ClassVar[str]  # the SQL query's name: state_<KIND>
    ID: ClassVar[str]  # the column a get matches

    @classmethod
    def list_columns(cls, detail: bool = True) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if detail or not f.metadata[_DETAIL]]  # type: ignore[arg-type]

    @classmethod
    def columns(cls) -> set[str]:
        return set(cls.list_columns())

    @classmethod
    def base_columns(cls) -> set[str]:
        return set(cls.list_columns(detail=False))

    @classmethod
    def detail_columns(cls) -> set[str]:
        return cls.columns()

    @classmethod
    def filterable_columns(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.metadata[_FILTERABLE]}  # type: ignore[arg-type]

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    def __getitem__(self, key: str) -> Any:
        if key not in self.columns():
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.columns()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def keys(self) -> list[str]:
        return self.list_columns()


@dataclass
class TaskState(StateSchema):
    """A task attempt (Ray's states: PENDING_ARGS_AVAIL, PENDING_NODE_ASSIGNMENT,
    SUBMITTED_TO_WORKER, RUNNING, FINISHED, FAILED, and an actor call's
    PENDING_ACTOR_TASK_ARGS_FETCH and PENDING_ACTOR_TASK_ORDERING_OR_CONCURRENCY; a
    cancelled task is FAILED with error_type TASK_CANCELLED)."""

    KIND: ClassVar[str] = "tasks"
    ID: ClassVar[str] = "task_id"

    task_id: str = state_column(filterable=True)
    attempt_number: int = state_column(filterable=True)
    name: str = state_column(filterable=True)
    state: str = state_column(filterable=True)
    job_id: str = state_column(filterable=True)
    actor_id: str | None = state_column(filterable=True)
    type: str = state_column(filterable=True)
    func_or_class_name: str = state_column(filterable=True)
    parent_task_id: str | None = state_column(filterable=True)
    node_id: str | None = state_column(filterable=True)
    worker_id: str | None = state_column(filterable=True)
    worker_pid: int | None = state_column(filterable=True)
    error_type: str | None = state_column(filterable=True)
    language: str | None = state_column(filterable=True, detail=True)
    required_resources: dict[str, float] | None = state_column(filterable=False, detail=True)
    runtime_env_info: dict[str, Any] | None = state_column(filterable=False, detail=True)
    placement_group_id: str | None = state_column(filterable=True, detail=True)
    events: list[dict[str, Any]] | None = state_column(filterable=False, detail=True)
    profiling_data: dict[str, Any] | None = state_column(filterable=False, detail=True)
    creation_time_ms: int | None = state_column(filterable=False, detail=True)
    start_time_ms: int | None = state_column(filterable=False, detail=True)
    end_time_ms: int | None = state_column(filterable=False, detail=True)
    task_log_info: dict[str, Any] | None = state_column(filterable=False, detail=True)
    error_message: str | None = state_column(filterable=False, detail=True)
    is_debugger_paused: bool | None = state_column(filterable=True, detail=True)
    call_site: str | None = state_column(filterable=False, detail=True)
    label_selector: dict[str, Any] | None = state_column(filterable=False, detail=True)


@dataclass
class ActorState(StateSchema):
    """An actor (PENDING_CREATION, ALIVE, RESTARTING, DEAD)."""

    KIND: ClassVar[str] = "actors"
    ID: ClassVar[str] = "actor_id"

    actor_id: str = state_column(filterable=True)
    class_name: str = state_column(filterable=True)
    state: str = state_column(filterable=True)
    job_id: str = state_column(filterable=True)
    name: str | None = state_column(filterable=True)
    node_id: str | None = state_column(filterable=True)
    pid: int | None = state_column(filterable=True)
    ray_namespace: str | None = state_column(filterable=True)
    serialized_runtime_env: str | None = state_column(filterable=False, detail=True)
    required_resources: dict[str, float] | None = state_column(filterable=False, detail=True)
    death_cause: dict[str, Any] | None = state_column(filterable=False, detail=True)
    is_detached: bool | None = state_column(filterable=False, detail=True)
    placement_group_id: str | None = state_column(filterable=True, detail=True)
    repr_name: str | None = state_column(filterable=True, detail=True)
    num_restarts: int | None = state_column(filterable=False, detail=True)
    num_restarts_due_to_lineage_reconstruction: int | None = state_column(
        filterable=False, detail=True
    )


@dataclass
class ObjectState(StateSchema):
    """An object: Ray's fields (reference types and call sites are not recorded:
    UNKNOWN_STATUS, "disabled"), then the log's (state CREATED, SPILLED, FREED, LOST;
    the nodes holding a copy)."""

    KIND: ClassVar[str] = "objects"
    ID: ClassVar[str] = "object_id"

    object_id: str = state_column(filterable=True)
    object_size: int | None = state_column(filterable=True)
    task_status: str = state_column(filterable=True)
    reference_type: str = state_column(filterable=True)
    call_site: str = state_column(filterable=True)
    type: str | None = state_column(filterable=True)
    pid: int | None = state_column(filterable=True)
    ip: str | None = state_column(filterable=True)
    state: str | None = state_column(filterable=True)
    job_id: str | None = state_column(filterable=True)
    task_id: str | None = state_column(filterable=True)
    node_id: str | None = state_column(filterable=True)
    locations: list[str] | None = state_column(filterable=False, detail=True)
    created_time_ms: int | None = state_column(filterable=False, detail=True)


@dataclass
class NodeState(StateSchema):
    """A node (ALIVE, DEAD)."""

    KIND: ClassVar[str] = "nodes"
    ID: ClassVar[str] = "node_id"

    node_id: str = state_column(filterable=True)
    node_ip: str = state_column(filterable=True)
    is_head_node: bool = state_column(filterable=True)
    state: str = state_column(filterable=True)
    state_message: str | None = state_column(filterable=False)
    node_name: str = state_column(filterable=True)
    resources_total: dict[str, float] = state_column(filterable=False)
    labels: dict[str, str] = state_column(filterable=False)
    start_time_ms: int | None = state_column(filterable=False, detail=True)
    end_time_ms: int | None = state_column(filterable=False, detail=True)


@dataclass
class JobState(StateSchema):
    """A job (Ray's JobDetails fields; every job is a driver's: type DRIVER)."""

    KIND: ClassVar[str] = "jobs"
    ID: ClassVar[str] = "job_id"

    job_id: str = state_column(filterable=True)
    submission_id: str | None = state_column(filterable=True)
    entrypoint: str | None = state_column(filterable=False)
    type: str = state_column(filterable=True)
    status: str = state_column(filterable=True)
    message: str | None = state_column(filterable=False)
    error_type: str | None = state_column(filterable=False)
    driver_info: dict[str, Any] | None = state_column(filterable=False)
    start_time: int | None = state_column(filterable=False, detail=True)
    end_time: int | None = state_column(filterable=False, detail=True)
    metadata: dict[str, str] | None = state_column(filterable=False, detail=True)
    runtime_env: dict[str, Any] | None = state_column(filterable=False, detail=True)
    driver_agent_http_address: str | None = state_column(filterable=False, detail=True)
    driver_node_id: str | None = state_column(filterable=False, detail=True)
    driver_exit_code: int | None = state_column(filterable=False, detail=True)


@dataclass
class PlacementGroupState(StateSchema):
    """A placement group (PENDING, CREATED, REMOVED)."""

    KIND: ClassVar[str] = "placement_groups"
    ID: ClassVar[str] = "placement_group_id"

    placement_group_id: str = state_column(filterable=True)
    name: str = state_column(filterable=True)
    creator_job_id: str = state_column(filterable=True)
    state: str = state_column(filterable=True)
    bundles: list[dict[str, Any]] | None = state_column(filterable=False, detail=True)
    is_detached: bool | None = state_column(filterable=True, detail=True)
    stats: dict[str, Any] | None = state_column(filterable=False, detail=True)
    strategy: str | None = state_column(filterable=True, detail=True)


@dataclass
class WorkerState(StateSchema):
    """A worker process (drivers are not listed)."""

    KIND: ClassVar[str] = "workers"
    ID: ClassVar[str] = "worker_id"

    worker_id: str = state_column(filterable=True)
    is_alive: bool = state_column(filterable=True)
    worker_type: str = state_column(filterable=True)
    exit_type: str | None = state_column(filterable=True)
    node_id: str = state_column(filterable=True)
    ip: str = state_column(filterable=True)
    pid: int = state_column(filterable=True)
    exit_detail: str | None = state_column(filterable=False, detail=True)
    worker_launch_time_ms: int | None = state_column(filterable=False, detail=True)
    worker_launched_time_ms: int | None = state_column(filterable=False, detail=True)
    start_time_ms: int | None = state_column(filterable=False, detail=True)
    end_time_ms: int | None = state_column(filterable=False, detail=True)
    debugger_port: int | None = state_column(filterable=True, detail=True)
    num_paused_threads: int | None = state_column(filterable=True, detail=True)


SCHEMAS: dict[str, type[StateSchema]] = {
    schema.KIND: schema
    for schema in (
        TaskState,
        ActorState,
        ObjectState,
        NodeState,
        JobState,
        PlacementGroupState,
        WorkerState,
    )
}
