"""What each event does to the current-state projections, as data, and the pure fold
that applies it. The projector (projector.py) feeds the fold from the log and stores
its result; tests fold the whole log afresh and compare.

Columns are documented in controlplane/README.md ("Projections").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.eventlog.events import EntityKind, RecordedEvent

Row = dict[str, Any]


@dataclass(frozen=True)
class Table:
    name: str
    key: str
    columns: tuple[str, ...]
    json_columns: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Transition:
    """The effect of one event type: the state it sets (None: unchanged), payload
    fields copied into columns, and columns stamped with the event's time (``stamp_if``:
    column -> the payload flag that says the event also stands for that moment)."""

    state: str | None = None
    copy: Mapping[str, str] = field(default_factory=dict)  # payload field -> column
    stamp: tuple[str, ...] = ()
    stamp_if: Mapping[str, str] = field(default_factory=dict)


_COMMON = ("last_position", "updated_at")
TABLES: dict[EntityKind, Table] = {
    EntityKind.JOB: Table(
        "jobs",
        "job_id",
        (
            "job_id",
            "state",
            "entrypoint",
            "driver_node_id",
            "namespace",
            "submitted_at",
            "started_at",
            "ended_at",
            "error",
            *_COMMON,
        ),
    ),
    EntityKind.TASK: Table(
        "tasks",
        "task_id",
        (
            "task_id",
            "job_id",
            "name",
            "state",
            "node_id",
            "worker_id",
            "attempt",
            "submitted_at",
            "scheduled_at",
            "started_at",
            "ended_at",
            "error",
            *_COMMON,
        ),
    ),
    EntityKind.OBJECT: Table(
        "objects",
        "object_id",
        (
            "object_id",
            "job_id",
            "state",
            "size_bytes",
            "node_id",
            "task_id",
            "created_at",
            "freed_at",
            *_COMMON,
        ),
    ),
    EntityKind.ACTOR: Table(
        "actors",
        "actor_id",
        (
            "actor_id",
            "job_id",
            "name",
            "namespace",
            "class_name",
            "state",
            "node_id",
            "worker_id",
            "num_restarts",
            "death_cause",
            "created_at",
            "ended_at",
            *_COMMON,
        ),
    ),
    EntityKind.NODE: Table(
        "nodes",
        "node_id",
        (
            "node_id",
            "state",
            "address",
            "resources",
            "available",
            "load",
            "registered_at",
            "last_heartbeat_at",
            "dead_at",
            "death_cause",
            *_COMMON,
        ),
        json_columns=frozenset({"resources", "available", "load"}),
    ),
}

_DEFAULTS: dict[str, Any] = {"attempt": 0, "num_restarts": 0}

TRANSITIONS: dict[tuple[EntityKind, str], Transition] = {
    (EntityKind.JOB, "submitted"): Transition(
        "PENDING",
        {"entrypoint": "entrypoint", "namespace": "namespace", "driver_node_id": "driver_node_id"},
        ("submitted_at",),
    ),
    (EntityKind.JOB, "started"): Transition("RUNNING", stamp=("started_at",)),
    (EntityKind.JOB, "finished"): Transition("SUCCEEDED", stamp=("ended_at",)),
    (EntityKind.JOB, "failed"): Transition("FAILED", {"error": "error"}, ("ended_at",)),
    (EntityKind.TASK, "submitted"): Transition("SUBMITTED", {"name": "name"}, ("submitted_at",)),
    (EntityKind.TASK, "waiting_for_dependencies"): Transition("WAITING_FOR_DEPENDENCIES"),
    (EntityKind.TASK, "scheduled"): Transition(
        "SCHEDULED", {"attempt": "attempt"}, ("scheduled_at",)
    ),
    # a task scheduled and run in one commit has one event, `running` with
    # "scheduled": true (before, a `scheduled` event came with it)
    (EntityKind.TASK, "running"): Transition(
        "RUNNING",
        {"worker_id": "worker_id", "attempt": "attempt"},
        ("started_at",),
        {"scheduled_at": "scheduled"},
    ),
    (EntityKind.TASK, "finished"): Transition("FINISHED", {"attempt": "attempt"}, ("ended_at",)),
    (EntityKind.TASK, "failed"): Transition(
        "FAILED", {"error": "error", "attempt": "attempt"}, ("ended_at",)
    ),
    (EntityKind.TASK, "retried"): Transition("RETRYING", {"attempt": "attempt"}),
    (EntityKind.TASK, "reconstructing"): Transition("RECONSTRUCTING", {"attempt": "attempt"}),
    (EntityKind.TASK, "cancelled"): Transition("CANCELLED", stamp=("ended_at",)),
    (EntityKind.TASK, "spilled"): Transition("PENDING_NODE_ASSIGNMENT", {"attempt": "attempt"}),
    (EntityKind.TASK, "placed"): Transition("SCHEDULED", {"attempt": "attempt"}, ("scheduled_at",)),
    (EntityKind.TASK, "infeasible"): Transition("INFEASIBLE"),
    (EntityKind.OBJECT, "created"): Transition(
        "CREATED", {"size_bytes": "size_bytes", "task_id": "task_id"}, ("created_at",)
    ),
    (EntityKind.OBJECT, "freed"): Transition("FREED", stamp=("freed_at",)),
    (EntityKind.OBJECT, "lost"): Transition("LOST"),
    (EntityKind.OBJECT, "spilled"): Transition("SPILLED"),
    (EntityKind.OBJECT, "restored"): Transition("CREATED"),
    (EntityKind.ACTOR, "creation_requested"): Transition(
        "PENDING_CREATION",
        {"class_name": "class_name", "name": "name", "namespace": "namespace"},
        ("created_at",),
    ),
    (EntityKind.ACTOR, "scheduled"): Transition("PENDING_CREATION"),
    (EntityKind.ACTOR, "alive"): Transition("ALIVE", {"worker_id": "worker_id"}),
    (EntityKind.ACTOR, "restarting"): Transition("RESTARTING", {"attempt": "num_restarts"}),
    (EntityKind.ACTOR, "dead"): Transition("DEAD", {"cause": "death_cause"}, ("ended_at",)),
    (EntityKind.NODE, "registered"): Transition(
        "ALIVE",
        {"address": "address", "resources": "resources"},
        ("registered_at", "last_heartbeat_at"),
    ),
    (EntityKind.NODE, "heartbeat"): Transition(
        copy={"available": "available", "load": "load"}, stamp=("last_heartbeat_at",)
    ),
    (EntityKind.NODE, "dead"): Transition("DEAD", {"cause": "death_cause"}, ("dead_at",)),
}


def apply(row: Row | None, event: RecordedEvent) -> Row | None:
    """The row after ``event``; None if the event does not touch a projection."""
    table = TABLES.get(event.entity_kind)
    transition = TRANSITIONS.get((event.entity_kind, event.event_type))
    if table is None or transition is None:
        return row
    new = (
        dict(row)
        if row is not None
        else {column: _DEFAULTS.get(column) for column in table.columns}
    )
    new[table.key] = event.entity_id
    if "job_id" in new and event.job_id is not None:
        new["job_id"] = event.job_id
    if "node_id" in new and event.node_id is not None:
        new["node_id"] = event.node_id
    if transition.state is not None:
        new["state"] = transition.state
    for source, column in transition.copy.items():
        if event.payload.get(source) is not None:
            new[column] = event.payload[source]
    for column in transition.stamp:
        new[column] = event.recorded_at
    for column, flag in transition.stamp_if.items():
        if event.payload.get(flag):
            new[column] = event.recorded_at
    new["last_position"] = event.position
    new["updated_at"] = event.recorded_at
    if new.get("state") is None:  # e.g. a heartbeat before registration: keep the row valid
        new["state"] = "UNKNOWN"
    return new


def fold(
    events: Iterable[RecordedEvent], rows: Mapping[tuple[str, str], Row] | None = None
) -> dict[tuple[str, str], Row]:
    """Folds events into rows keyed by (table name, key); ``rows`` are the rows before."""
    state: dict[tuple[str, str], Row] = dict(rows or {})
    for event in events:
        table = TABLES.get(event.entity_kind)
        if table is None:
            continue
        key = (table.name, event.entity_id)
        new = apply(state.get(key), event)
        if new is not None:
            state[key] = new
    return state
