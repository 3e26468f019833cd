"""Event shapes: what a writer hands to the log (:class:`Event`) and what a reader gets
back (:class:`RecordedEvent`, with its position and time)."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class EntityKind(StrEnum):
    JOB = "job"
    TASK = "task"
    OBJECT = "object"
    ACTOR = "actor"
    NODE = "node"
    PLACEMENT_GROUP = "placement_group"
    WORKER = "worker"
    SUBMISSION = "submission"  # a job submitted through the Jobs API (controlplane/jobs.py)


_KINDS = {kind.value: kind for kind in EntityKind}
_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62
_COUNTER_BITS = 42


class _EventIds:
    """UUIDv7s without a system call each: 48 bits of Unix milliseconds, then 74 bits
    made of a random 32-bit prefix drawn once per process (again after a fork) and a
    42-bit counter that starts at a random value. Ids are time-ordered (the event_id
    index grows at its right edge), increasing within a process, and distinct across
    processes unless two draw the same prefix and counter in the same millisecond."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        seed = int.from_bytes(os.urandom(10), "big")
        prefix = (seed >> _COUNTER_BITS) & (2**32 - 1)
        # the prefix's top 12 bits are rand_a (after the version), the other 20 the top
        # of rand_b (after the variant); the counter is the low 42 bits of rand_b
        self.fixed = (
            _VERSION_7
            | ((prefix >> 20) << 64)
            | _VARIANT
            | ((prefix & (2**20 - 1)) << _COUNTER_BITS)
        )
        self.counter = seed & (2**_COUNTER_BITS - 1)

    def next(self) -> uuid.UUID:
        self.counter = (self.counter + 1) & (2**_COUNTER_BITS - 1)
        value = ((time.time_ns() // 1_000_000) << 80) | self.fixed | self.counter
        # what uuid.UUID(int=value) does, without re-checking a value built valid here
        event_id = object.__new__(uuid.UUID)
        object.__setattr__(event_id, "int", value)
        object.__setattr__(event_id, "is_safe", uuid.SafeUUID.unknown)
        return event_id


_ids = _EventIds()


def new_event_id() -> uuid.UUID:
    """A fresh event id (a UUIDv7; see _EventIds)."""
    return _ids.next()


def uuid7_at(made_ms: int, bits: int) -> uuid.UUID:
    """A UUIDv7 of the Unix milliseconds ``made_ms``, its other 74 bits taken from
    ``bits`` (an id every writer derives alike, e.g. from a hash)."""
    rest = bits & ((1 << 80) - 1) & ~((0xF << 76) | (0x3 << 62))
    return uuid.UUID(int=(made_ms << 80) | _VERSION_7 | _VARIANT | rest)


# The ``to_node`` of an event every node daemon follows (membership, placement groups):
# events are addressed to their readers, who read only theirs (migration 0017,
# controlplane/README.md "Reading only what concerns a reader").
EVERY_NODE = "*"
SCHEDULER = "scheduler"  # the global scheduler, as a reader
_SCHEDULER_KINDS = frozenset({"node", "placement_group"})
_NOTICE_LIMIT = 4000  # bytes of a notification's payload (PostgreSQL's limit is 8000)


def readers_of(events: Iterable[Event]) -> str:
    """The readers to wake for a batch (the payload of its ``cairn_events_for_v1``
    notification): the nodes its events are addressed to, ``*`` if some are for every
    node, and the scheduler if some are of its kinds (the same rule as
    read_events_for_scheduler's). Too many to list: every reader."""
    readers: set[str] = set()
    for event in events:
        payload = event.payload
        to_node, owner_node = payload.get("to_node"), payload.get("owner_node")
        if to_node is not None:
            readers.add(str(to_node))
        if owner_node is not None:
            readers.add(str(owner_node))
        if (
            owner_node is not None
            or str(event.entity_kind) in _SCHEDULER_KINDS
            or (str(event.entity_kind) == "task" and event.event_type in ("spilled", "placed"))
        ):
            readers.add(SCHEDULER)
    notice = ",".join(sorted(readers))
    return notice if len(notice) <= _NOTICE_LIMIT else f"{EVERY_NODE},{SCHEDULER}"


# kinds whose every event belongs to one job (migrations/sql/0020_entity_jobs.up.sql)
JOB_KINDS = frozenset(
    {EntityKind.TASK, EntityKind.OBJECT, EntityKind.ACTOR, EntityKind.PLACEMENT_GROUP}
)


@dataclass(frozen=True, slots=True)
class Event:
    """One state transition of one entity, as a writer submits it.

    ``event_id`` is the idempotency key: appending the same id again stores nothing new
    and returns the position the event already has. ``payload`` is a JSON object of
    queryable fields; ``data`` is an optional opaque blob (pickled code or values)."""

    entity_kind: EntityKind
    entity_id: str
    event_type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    node_id: str | None = None
    data: bytes | None = None
    event_id: uuid.UUID = field(default_factory=new_event_id)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored: its position (unique in the log; in position order causes come
    before effects) and the time it was recorded."""

    position: int
    event_id: uuid.UUID
    recorded_at: datetime
    job_id: str | None
    entity_kind: EntityKind
    entity_id: str
    event_type: str
    node_id: str | None
    payload: dict[str, Any]
    data: bytes | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RecordedEvent:
        payload = row["payload"]
        return cls(
            position=row["position"],
            event_id=row["event_id"],
            recorded_at=row["recorded_at"],
            job_id=row["job_id"],
            entity_kind=_KINDS[row["entity_kind"]],
            entity_id=row["entity_id"],
            event_type=row["event_type"],
            node_id=row["node_id"],
            payload=json.loads(payload) if isinstance(payload, str) else dict(payload),
            data=row["data"],
        )
