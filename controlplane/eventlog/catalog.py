"""The catalog of event types: which types each entity kind has and which payload
fields they require. Every event is checked here before it is appended, so a bad event
is refused with a clear error and never reaches the database half-written.

Payloads may carry fields beyond those listed (later versions add fields); listed
fields must have the listed JSON type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.errors import InvalidEventError
from controlplane.eventlog.events import EntityKind, Event

JsonType = type | tuple[type, ...]
_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _not_json(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# _JSON.encode builds a new C encoder for every call; every event's payload is encoded
# on the appending path, so one is built once (no cycle check: a cyclic payload is a
# RecursionError, refused like any other invalid payload)
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # (not in typeshed)
_C_ENCODER = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(
        None, _not_json, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False
    )
)


def _encode_json(payload: object) -> str:
    if _C_ENCODER is None:
        return _JSON.encode(payload)
    return "".join(_C_ENCODER(payload, 0))


@dataclass(frozen=True)
class EventType:
    kind: EntityKind
    name: str
    required: Mapping[str, JsonType] = field(default_factory=dict)
    optional: Mapping[str, JsonType] = field(default_factory=dict)

    @property
    def fields(self) -> dict[str, tuple[type, ...]]:
        """Every listed field with its allowed types (a tuple), required ones first."""
        return {
            name: t if isinstance(t, tuple) else (t,)
            for name, t in {**self.required, **self.optional}.items()
        }


def _types(kind: EntityKind, *specs: tuple[str, dict[str, JsonType], dict[str, JsonType]]) -> dict:
    return {(kind, name): EventType(kind, name, req, opt) for name, req, opt in specs}


_K = EntityKind
CATALOG: dict[tuple[EntityKind, str], EventType] = {
    **_types(
        _K.JOB,
        (
            "submitted",
            {"entrypoint": str},
            # replay_of: the recorded job that `cairn replay` re-runs in this one;
            # submission_id: the job submission whose entrypoint runs this driver
            {"namespace": str, "driver_node_id": str, "replay_of": str, "submission_id": str},
        ),
        ("started", {}, {}),
        ("finished", {}, {}),
        ("failed", {"error": str}, {}),
    ),
    **_types(
        _K.TASK,
        (
            "submitted",
            {"name": str},
            {
                "function": str,
                "num_returns": int,
                "max_retries": int,
                "resources": dict,
                "dependencies": list,
                "options": dict,
                "actor_id": str,
                "method": str,
                "sequence": int,
                "label_selector": dict,  # the labels its node must have (or prefers)
                "labels": dict,  # its own (Ray's _labels)
                "function_name": str,  # its function's, where the name option replaced it
                "parent_task_id": str,
                "placement_group_id": str,
            },
        ),
        ("waiting_for_dependencies", {"dependencies": list}, {}),
        ("scheduled", {}, {"attempt": int}),
        # *_offset: where the worker's output files stood (controlplane/node/worker_output.py);
        # *_inode: which file that was, to find it once rotated (controlplane/logs.py);
        # output_at: when, by the node's clock
        (
            "running",
            {"worker_id": str},
            {
                "attempt": int,
                "stdout_offset": int,
                "stderr_offset": int,
                "stdout_inode": int,
                "stderr_inode": int,
                "output_at": float,
                # scheduled: true when it also stands for the task's scheduling (one
                # commit); older logs have a `scheduled` event before it instead
                "scheduled": bool,
            },
        ),
        ("finished", {}, {"attempt": int, "output_digest": str}),
        ("failed", {"error": str}, {"attempt": int}),
        ("retried", {"attempt": int}, {"reason": str}),
        # lineage reconstruction: re-run (as that attempt) to rebuild a lost object
        ("reconstructing", {"object_id": str, "attempt": int}, {"reason": str}),
        ("cancelled", {}, {"force": bool}),
        # spill-over (issue 5): a node hands a task it cannot run now to the global
        # schedulers; one of them places it on a node (once per attempt)
        (
            "spilled",
            {"attempt": int, "resources": dict},
            {"args": dict, "from_node": str, "strategy": list, "label_selector": dict},
        ),
        ("placed", {"node_id": str, "attempt": int}, {}),
        ("infeasible", {"resources": dict}, {"reason": str, "final": bool, "attempt": int}),
        # a call of an actor that lives on another node, handed to it (spec in data)
        ("forwarded", {"actor_id": str, "to_node": str}, {}),
    ),
    **_types(
        _K.OBJECT,
        (
            "created",
            {"size_bytes": int},
            # region, offset: where in its node's store (kept for another node's task:
            # what a restarted daemon of that node adopts, controlplane/node/store_adoption.py);
            # contained: (kept for another node's task) the refs inside the value
            {
                "task_id": str,
                "inline": bool,
                "address": str,
                "durable_path": str,
                "region": int,
                "offset": int,
                "contained": list,
            },
        ),
        # a copy on this node: pulled from the node at from_node's address, or (reason
        # "adopted") left in the store by this node's previous daemon, from_node's id
        (
            "transferred",
            {"size_bytes": int},
            {"from_node": str, "reason": str, "region": int, "offset": int},
        ),
        ("freed", {}, {}),
        ("lost", {}, {"reason": str}),
        # the store was full: its bytes went to the node's spill directory, and back
        ("spilled", {"size_bytes": int}, {"path": str}),
        ("restored", {"size_bytes": int}, {}),
    ),
    **_types(
        _K.ACTOR,
        (
            "creation_requested",
            {"class_name": str},
            {"name": str, "namespace": str, "max_restarts": int, "detached": bool},
        ),
        # its name claimed in the cluster, before its creation is submitted
        ("name_reserved", {"name": str, "namespace": str}, {}),
        ("scheduled", {}, {}),
        ("alive", {"worker_id": str}, {}),
        ("restarting", {"attempt": int}, {"cause": str}),
        # replay_calls_on_restart: the earlier calls re-run on the new instance
        (
            "replaying",
            {"calls": list},
            {"attempt": int, "stopped_at": str, "reason": str, "from_checkpoint": int},
        ),
        ("checkpointed", {"calls": int}, {}),  # data: its __cairn_save__() state
        ("infeasible", {"reason": str}, {"resources": dict}),
        ("kill_requested", {"no_restart": bool}, {"cause": str}),
        ("dead", {"cause": str}, {}),
    ),
    **_types(
        _K.NODE,
        ("registered", {"address": str, "resources": dict}, {"labels": dict}),
        ("heartbeat", {}, {"available": dict, "load": dict}),
        # a gRPC call without the cluster token was refused (at most one per peer per
        # few seconds); the only trace such a call leaves
        ("auth_refused", {"method": str, "peer": str}, {}),
        # something of a node declared dead (its old incarnation, back from a partition)
        # was refused: appends (written by the log itself, node_id NULL) or a gRPC call
        # to a peer; the only trace it leaves
        (
            "stale_refused",
            {"reason": str},
            {
                "events": int,
                "event_types": list,
                "entity_ids": list,
                "method": str,
                "peer": str,
                "from_node": str,
            },
        ),
        # a runtime_env (working_dir, py_modules, pip) set up on the node for its
        # workers, once (controlplane/node/runtime_envs.py): pip's output, or the error
        ("runtime_env_ready", {"env_key": str}, {"took_s": float, "output": str}),
        ("runtime_env_failed", {"env_key": str, "error": str}, {}),
        # fence_owed_on: the log's servers it could not be fenced on yet (away): its
        # appends there stay below its bound, which this event is past (membership.py)
        ("dead", {"cause": str}, {"fence_owed_on": list}),
    ),
    **_types(
        _K.PLACEMENT_GROUP,
        ("created", {"bundles": list, "strategy": str}, {"name": str, "cluster": bool}),
        ("placed", {"bundle_nodes": list}, {"bundles": list, "strategy": str}),
        ("bundle_reserved", {"index": int}, {}),
        ("ready", {}, {"bundle_nodes": list}),
        ("infeasible", {"reason": str}, {}),
        ("removed", {}, {}),
    ),
    **_types(
        # a job submitted through the Jobs API (controlplane/jobs.py): its entrypoint runs
        # as a driver process on the head, watched by the head's HTTP service
        # (``supervisor``: that service's incarnation)
        _K.SUBMISSION,
        (
            "submitted",
            {"entrypoint": str},
            {
                "runtime_env": dict,
                "metadata": dict,
                "entrypoint_num_cpus": float,
                "entrypoint_num_gpus": float,
                "entrypoint_memory": int,
                "entrypoint_resources": dict,
                "supervisor": str,
            },
        ),
        ("running", {"pid": int}, {"driver_node_id": str, "supervisor": str}),
        # written by the node its entrypoint's driver connected to: that driver's job
        ("driver_started", {"job_id": str}, {"driver_node_id": str, "pid": int}),
        ("succeeded", {"driver_exit_code": int}, {}),
        # error_type: Ray's (None for an entrypoint that failed on its own)
        ("failed", {"error": str}, {"driver_exit_code": int, "error_type": str}),
        ("stopped", {}, {"driver_exit_code": int}),
        ("deleted", {}, {}),
    ),
    **_types(
        _K.WORKER,
        ("started", {"pid": int}, {}),
        ("died", {"cause": str}, {"exit_code": int}),
    ),
}


def event_type_of(kind: Any, name: str) -> EventType:
    """The catalog entry for (kind, name), or :class:`InvalidEventError` naming both."""
    try:
        entity_kind = EntityKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in EntityKind)
        raise InvalidEventError(f"unknown entity kind {kind!r} (known: {known})") from None
    spec = CATALOG.get((entity_kind, name))
    if spec is None:
        known = ", ".join(sorted(n for k, n in CATALOG if k is entity_kind))
        raise InvalidEventError(
            f"unknown event type {name!r} for entity kind {entity_kind.value!r} (known: {known})"
        )
    return spec


def encode_payload(event: Event) -> str:
    """Validates ``event`` against the catalog and returns its payload as JSON text.

    Raises :class:`InvalidEventError` naming the event and what is wrong with it."""
    checks = _FIELDS.get((event.entity_kind, event.event_type))
    if checks is None:
        event_type_of(event.entity_kind, event.event_type)  # raises, naming what is unknown
        raise AssertionError("unreachable")
    _check_text(event, "entity_id", event.entity_id, required=True)
    _check_text(event, "job_id", event.job_id)
    _check_text(event, "node_id", event.node_id)
    if event.data is not None and not isinstance(event.data, bytes | bytearray | memoryview):
        raise _invalid(event, f"data must be bytes, not {type(event.data).__name__}")
    payload = event.payload
    if not isinstance(payload, dict | Mapping):
        raise _invalid(
            event, f"payload must be a JSON object (a mapping), not {type(payload).__name__}"
        )
    required, fields = checks
    for name in required:
        if name not in payload:
            raise _invalid(event, f"payload is missing required field {name!r}")
    for name, allowed in fields:
        value = payload.get(name)
        if value is not None and (type(value) not in allowed):
            _check_type(event, name, value, allowed)
    try:
        text = _encode_json(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _invalid(event, f"payload is not valid JSON: {exc}") from None
    if "\\u0000" in text:
        raise _invalid(
            event, "payload contains a NUL character, which PostgreSQL's jsonb cannot store"
        )
    return text


def _invalid(event: Event, problem: str) -> InvalidEventError:
    return InvalidEventError(
        f"{event.entity_kind}.{event.event_type} event for {event.entity_id!r}: {problem}"
    )


def _check_text(event: Event, name: str, value: Any, *, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value:
        raise _invalid(event, f"{name} must be a non-empty string, got {value!r:.80}")
    if "\x00" in value:
        raise _invalid(event, f"{name} contains a NUL character")


def _check_type(event: Event, name: str, value: Any, allowed: tuple[type, ...]) -> None:
    """The slow path, for values whose exact type is not listed (subclasses, ints
    where floats are allowed, non-finite floats)."""
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, float):
        ok = float in allowed and math.isfinite(value)
    else:
        ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
    if not ok:
        names = " or ".join(t.__name__ for t in allowed)
        raise _invalid(event, f"payload field {name!r} must be {names}, got {type(value).__name__}")


# (kind, type) -> (required field names, [(field, allowed types)]), for the fast path;
# keyed by the plain strings too, as EntityKind is a StrEnum.
_FIELDS: dict[tuple[str, str], tuple[tuple[str, ...], list[tuple[str, tuple[type, ...]]]]] = {
    (kind, name): (tuple(spec.required), list(spec.fields.items()))
    for (kind, name), spec in CATALOG.items()
}
