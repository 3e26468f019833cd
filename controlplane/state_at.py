"""The state of jobs, tasks, actors and nodes as they were at a past point of the log
(``cairn state --at``), computed in SQL instead of folding the log in Python.

An entity's state at position P is the state set by its last state-setting event at or
before P, and each other field is the value carried by the last event that sets it:
exactly what ``projections.spec.fold`` gives for the log up to P. The SQL takes its
mapping (kind, event type) -> state and fields from ``spec.TRANSITIONS``, so the fold
stays the one source of truth. Two passes, so the terminal's answer for a log of 10^6
events takes one integer-only scan: pass 1 (``state_at_summary``) counts entities per
(kind, job, state) and names the ones worth listing; pass 2 (``state_at_entities``)
reads only those entities' events through the per-entity index for their fields. With
``all_tasks`` pass 2 reads every entity instead (one heavier scan; ``--json``).
"""

from __future__ import annotations

import asyncio
import operator
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from controlplane.errors import GcsError
from controlplane.eventlog.connection import connect
from controlplane.eventlog.events import EntityKind
from controlplane.projections.spec import TRANSITIONS
from controlplane.readonly_sql import WHOLE_LOG, leave_out_servers
from controlplane.sql import queries

# The fields shown per kind, as slots of the state_at_entities query: two text fields
# and a counter copied from payloads, and a start and an end time stamped by events.
FIELDS: dict[EntityKind, dict[str, str]] = {
    EntityKind.JOB: {
        "text1": "entrypoint",
        "text2": "error",
        "stamp1": "submitted_at",
        "stamp2": "ended_at",
    },
    EntityKind.TASK: {"text1": "name", "int1": "attempt"},
    EntityKind.ACTOR: {"text1": "class_name", "text2": "name", "int1": "num_restarts"},
    EntityKind.NODE: {"text1": "address"},
}
PLURAL = {
    EntityKind.JOB: "jobs",
    EntityKind.TASK: "tasks",
    EntityKind.ACTOR: "actors",
    EntityKind.NODE: "nodes",
}
TASK_ENDED = ("FINISHED", "FAILED", "CANCELLED")
DEFAULTS = {"attempt": 0, "num_restarts": 0}  # as in spec.apply
UNKNOWN = "UNKNOWN"  # spec.apply's state for a row no event gave a state yet
MAX_LISTED = 50
_WORK_MEM = "256MB"  # one hash table of every entity; the default 4MB spills to disk
STATES: tuple[str, ...] = tuple(sorted({t.state for t in TRANSITIONS.values() if t.state}))
assert len(STATES) <= 64, "state_at_* queries keep a state's index in 6 bits"


class OutOfRangeError(GcsError):
    """The point asked for is not in the retained log (or the log is empty)."""


@dataclass(frozen=True)
class TransitionArrays:
    """TRANSITIONS as the arrays the queries take (one element per (kind, event type))."""

    kinds: list[str]
    types: list[str]
    states: list[int | None]
    text1: list[str | None]
    text2: list[str | None]
    int1: list[str | None]
    stamp1: list[bool]
    stamp2: list[bool]


def _source(copy: Mapping[str, str], column: str | None) -> str | None:
    """The payload key that an event type copies into ``column``, if any."""
    return next((src for src, col in copy.items() if col == column), None)


def transition_arrays(*, fields_only: bool = False) -> TransitionArrays:
    """The mapping for the kinds shown. ``fields_only`` leaves out event types that
    set neither a state nor a shown field (a node's heartbeats): pass 2 then reads
    only the events that matter through the (entity_id, event_type) index."""
    rows: list[tuple[Any, ...]] = []
    for (kind, event_type), transition in TRANSITIONS.items():
        slots = FIELDS.get(kind)
        if slots is None:
            continue
        stamps = (slots.get("stamp1") in transition.stamp, slots.get("stamp2") in transition.stamp)
        sources = [_source(transition.copy, slots.get(s)) for s in ("text1", "text2", "int1")]
        state = STATES.index(transition.state) if transition.state else None
        if fields_only and state is None and not any(sources) and not any(stamps):
            continue
        rows.append((kind.value, event_type, state, *sources, *stamps))
    columns = list(zip(*rows, strict=True))
    return TransitionArrays(*(list(c) for c in columns))


@dataclass(frozen=True)
class Retained:
    first_position: int
    first_recorded_at: datetime
    last_position: int
    last_recorded_at: datetime

    def describe(self) -> str:
        return (
            f"positions {self.first_position}..{self.last_position}, recorded "
            f"{self.first_recorded_at.isoformat()} to {self.last_recorded_at.isoformat()}"
        )


def parse_point(text: str) -> int | datetime:
    """A plain integer is a position; anything else an ISO 8601 time (UTC if it names
    no zone). ValueError says what is accepted."""
    stripped = text.strip()
    if stripped.lstrip("+-").isdigit():
        return int(stripped)
    try:
        when = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a position (an integer) nor an ISO 8601 time "
            "(e.g. 2024-05-01T12:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def _retained(conn: asyncpg.Connection) -> tuple[Retained, datetime]:
    row = await conn.fetchrow(queries["retained_range"])
    if row is None:
        raise OutOfRangeError("the log is empty: there is no state to show yet")
    retained = Retained(
        row["first_position"],
        row["first_recorded_at"],
        row["last_position"],
        row["last_recorded_at"],
    )
    return retained, row["now"]


async def _position_at(conn: asyncpg.Connection, when: datetime, retained: Retained) -> int:
    """The last position recorded at or before ``when``, by binary search over
    positions: recorded_at is taken while the appender holds its shards' head rows, so it
    grows with position within a shard (as long as the server's clock does not step
    back), and across shards up to the appends in flight together (milliseconds apart:
    neither caused the other). Any position is a consistent cut (controlplane/README.md,
    "The sharded log")."""
    lo, hi = retained.first_position, retained.last_position  # recorded_at(lo) <= when
    while lo < hi:
        mid = (lo + hi + 1) // 2
        row = await conn.fetchrow(queries["recorded_at_or_after"], mid)
        if row is not None and row["recorded_at"] <= when:
            lo = max(mid, row["position"])
        else:
            hi = mid - 1
    return lo


async def _resolve(
    conn: asyncpg.Connection, position: int | None, timestamp: datetime | None
) -> tuple[int, Retained]:
    if (position is None) == (timestamp is None):
        raise ValueError("give exactly one of position and timestamp")
    retained, now = await _retained(conn)
    if position is not None:
        if not retained.first_position <= position <= retained.last_position:
            raise OutOfRangeError(
                f"position {position} is outside the retained log ({retained.describe()})"
            )
        return position, retained
    assert timestamp is not None
    when = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
    if when < retained.first_recorded_at or when > now:
        raise OutOfRangeError(
            f"time {when.isoformat()} is outside the retained log ({retained.describe()}; "
            f"now is {now.isoformat()})"
        )
    return await _position_at(conn, when, retained), retained


def _value(row: Mapping[str, Any] | None, column: str) -> Any:
    pair = row[column] if row is not None else None  # (position, value) or None
    return pair[1] if pair is not None else None


def _entity(
    kind_name: str, entity_id: str, row: Mapping[str, Any] | None, state: int | None
) -> dict[str, Any]:
    """One entity as the fold's row shows it (its shown columns only); ``row`` is
    None for an entity none of whose events sets a shown field (heartbeats only)."""
    kind = EntityKind(kind_name)
    slots = FIELDS[kind]
    out: dict[str, Any] = {
        f"{kind.value}_id": entity_id,
        "state": STATES[state] if state is not None else UNKNOWN,
    }
    if kind is not EntityKind.NODE:
        out["job_id"] = _value(row, "job_id")
    if kind in (EntityKind.TASK, EntityKind.ACTOR):
        out["node_id"] = _value(row, "node_id")
    for slot in ("text1", "text2", "int1", "stamp1", "stamp2"):
        column = slots.get(slot)
        if column is None:
            continue
        value = _value(row, slot)
        if slot == "int1":
            value = int(value) if value is not None else DEFAULTS.get(column)
        out[column] = value
    return out


async def _entities(
    conn: asyncpg.Connection, position: int, ids: Sequence[str] | None
) -> dict[tuple[str, str], asyncpg.Record]:
    m = transition_arrays(fields_only=ids is not None)
    rows = await conn.fetch(
        queries["state_at_entities"],
        position,
        m.kinds,
        m.types,
        m.states,
        m.text1,
        m.text2,
        m.int1,
        m.stamp1,
        m.stamp2,
        None if ids is None else list(ids),
    )
    return {(row["kind"], row["entity_id"]): row for row in rows}


def _by_kind(entities: list[tuple[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Entities under "jobs", "tasks", "actors", "nodes", each list sorted by id."""
    grouped: dict[str, list[dict[str, Any]]] = {PLURAL[k]: [] for k in FIELDS}
    for kind, entity in entities:
        grouped[PLURAL[EntityKind(kind)]].append(entity)
    for kind, items in zip(FIELDS, grouped.values(), strict=True):
        items.sort(key=operator.itemgetter(f"{kind.value}_id"))
    return grouped


async def state_at_async(
    url: str,
    *,
    position: int | None = None,
    timestamp: datetime | None = None,
    all_tasks: bool = False,
    max_listed: int = MAX_LISTED,
    without: Sequence[int] = (),
) -> dict[str, Any]:
    """See :func:`state_at`."""
    conn = await connect(url)
    try:
        await leave_out_servers(conn, without)
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            await conn.execute(f"SET LOCAL work_mem = '{_WORK_MEM}'")
            await conn.execute(WHOLE_LOG)
            point, retained = await _resolve(conn, position, timestamp)
            recorded = await conn.fetchval(
                "SELECT recorded_at FROM events WHERE position = $1", point
            )
            if all_tasks:
                result = await _everything(conn, point)
            else:
                result = await _summary(conn, point, max_listed)
    finally:
        await conn.close()
    return {
        "position": point,
        "recorded_at": recorded,
        "retained": {
            "first_position": retained.first_position,
            "first_recorded_at": retained.first_recorded_at,
            "last_position": retained.last_position,
            "last_recorded_at": retained.last_recorded_at,
        },
        **result,
    }


async def _everything(conn: asyncpg.Connection, point: int) -> dict[str, Any]:
    rows = await _entities(conn, point, None)
    grouped = _by_kind(
        [(kind, _entity(kind, eid, row, row["state"])) for (kind, eid), row in rows.items()]
    )
    tasks = grouped["tasks"]
    counts: Counter[tuple[str | None, str]] = Counter((t["job_id"], t["state"]) for t in tasks)
    unfinished = [t for t in tasks if t["state"] not in TASK_ENDED]
    return {
        **grouped,
        "task_counts": _nest(counts),
        "unfinished_tasks": unfinished,
        "unfinished_total": len(unfinished),
    }


async def _summary(conn: asyncpg.Connection, point: int, max_listed: int) -> dict[str, Any]:
    m = transition_arrays()
    ended = [STATES.index(s) for s in TASK_ENDED]
    rows = await conn.fetch(
        queries["state_at_summary"], point, m.kinds, m.types, m.states, ended, max_listed
    )
    counts: Counter[tuple[str | None, str]] = Counter()
    states: dict[tuple[str, str], int | None] = {}
    changed: dict[str, int] = {}
    for row in rows:
        if row["entity_id"] is not None:
            states[(row["kind"], row["entity_id"])] = row["state"]
            changed[row["entity_id"]] = row["last_position"]
        elif row["kind"] == EntityKind.TASK.value:
            name = STATES[row["state"]] if row["state"] is not None else UNKNOWN
            counts[(row["job_id"], name)] += row["n"]
    fields = await _entities(conn, point, [entity_id for _, entity_id in states])
    grouped = _by_kind(
        [(key[0], _entity(*key, fields.get(key), state)) for key, state in states.items()]
    )
    listed = sorted(grouped.pop("tasks"), key=lambda t: changed[t["task_id"]])
    unfinished_total = sum(n for (_, state), n in counts.items() if state not in TASK_ENDED)
    return {
        **grouped,
        "task_counts": _nest(counts),
        "unfinished_tasks": listed,
        "unfinished_total": unfinished_total,
    }


def _nest(counts: Counter[tuple[str | None, str]]) -> dict[str, dict[str, int]]:
    nested: dict[str, dict[str, int]] = {}
    for (job_id, state), n in sorted(counts.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        nested.setdefault(job_id or "(no job)", {})[state] = n
    return nested


def state_at(
    url: str,
    *,
    position: int | None = None,
    timestamp: datetime | None = None,
    all_tasks: bool = False,
    max_listed: int = MAX_LISTED,
    without: Sequence[int] = (),
) -> dict[str, Any]:
    """The state of jobs, actors, nodes and tasks at ``position`` or at ``timestamp``
    (the last position recorded by then). Tasks come as counts per job and state plus
    the first ``max_listed`` unfinished ones (a job may have 10^5 tasks); with
    ``all_tasks`` every task is under "tasks". OutOfRangeError names the retained range
    when the point is outside it. ``without``: servers of the log left out (they do not
    answer: ``readonly_sql.leave_out_servers``)."""
    return asyncio.run(
        state_at_async(
            url,
            position=position,
            timestamp=timestamp,
            all_tasks=all_tasks,
            max_listed=max_listed,
            without=without,
        )
    )


def render(state: Mapping[str, Any]) -> str:
    """The terminal view: one line per job, node and actor, task counts per job and
    state, then the unfinished tasks (capped, with a note)."""
    recorded = state["recorded_at"].isoformat() if state["recorded_at"] else "?"
    lines = [f"State at position {state['position']} (recorded {recorded})"]
    lines.append(f"{len(state['jobs'])} jobs")
    for job in state["jobs"]:
        ended = f", ended {job['ended_at'].isoformat()}" if job["ended_at"] else ""
        error = f": {job['error']}" if job["error"] else ""
        lines.append(f"  {job['job_id']} {job['state']}  {job['entrypoint'] or '?'}{ended}{error}")
    lines.append(f"{len(state['nodes'])} nodes")
    for node in state["nodes"]:
        lines.append(f"  {node['node_id']} {node['state']} at {node['address'] or '?'}")
    lines.append(f"{len(state['actors'])} actors")
    for actor in state["actors"]:
        name = f" '{actor['name']}'" if actor["name"] else ""
        where = f" on {actor['node_id']}" if actor["node_id"] else ""
        lines.append(
            f"  {actor['actor_id']} {actor['state']} {actor['class_name'] or '?'}{name}{where}, "
            f"restarts: {actor['num_restarts']}"
        )
    total = sum(sum(by_state.values()) for by_state in state["task_counts"].values())
    lines.append(f"{total} tasks")
    for job_id, by_state in state["task_counts"].items():
        counts = ", ".join(f"{n} {s}" for s, n in by_state.items())
        lines.append(f"  job {job_id}: {counts}")
    shown = state["unfinished_tasks"][: MAX_LISTED if "tasks" in state else None]
    if state["unfinished_total"]:
        lines.append(f"{state['unfinished_total']} tasks not finished at that point:")
    for task in shown:
        where = f" on {task['node_id']}" if task["node_id"] else ""
        lines.append(
            f"  {task['task_id']} {task['state']} {task['name'] or '?'}{where}, "
            f"attempt {task['attempt']}"
        )
    if state["unfinished_total"] > len(shown):
        lines.append(
            f"  ... and {state['unfinished_total'] - len(shown)} more (--json lists every task)"
        )
    return "\n".join(lines)
