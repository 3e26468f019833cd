"""What an actor that restarts re-runs before any other call (``replay_calls_on_restart``,
``checkpoint_interval``): its last checkpoint, loaded (``__cairn_load__``), then every
call that ran to its end after it, read from the log in order; and the daemon's own
calls to an actor (replays, ``__cairn_save__`` and ``__cairn_load__``), whose results
nobody holds."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from controlplane.eventlog.connection import connect
from controlplane.node.task_table import TaskRecord
from controlplane.sql import queries
from dataplane import protocol as p
from dataplane import shm
from dataplane.object_table import ObjectTable
from dataplane.store_memory import StoreMemory

if TYPE_CHECKING:
    from controlplane.node.actors import ActorRecord

log = logging.getLogger("cairn.node")


async def calls_to_replay(
    gcs_url: str, actor: ActorRecord, objects: ObjectTable
) -> tuple[list[TaskRecord], dict[str, Any]]:
    """The daemon's calls that rebuild the actor's state, in order, and the payload of
    its ``replaying`` event: {attempt, calls}, and where a call's argument is gone here
    (or the log could not be read), ``stopped_at`` and ``reason``: the replay ends there."""
    replayed: list[TaskRecord] = []
    payload: dict[str, Any] = {"attempt": actor.restarts or actor.creation.attempt}
    try:
        conn = await connect(gcs_url)
        try:
            checkpoint = await conn.fetchrow(queries["actor_checkpoint"], actor.actor_id)
            after = checkpoint["position"] if checkpoint is not None else 0
            rows = await conn.fetch(queries["actor_calls_to_replay"], actor.actor_id, after)
        finally:
            await conn.close()
        if checkpoint is not None:  # its saved state first, then the calls after it
            load = internal_call(actor, "__cairn_load__", [p.Arg(inline=bytes(checkpoint["data"]))])
            replayed.append(TaskRecord(load, None, attempt=-1, internal="restore"))
            payload["from_checkpoint"] = int(after)
        for row in rows:
            spec, _ = p.submitted_spec(row["data"])
            gone = [d for d in spec.dependencies() if objects.stored(d) is None]
            if gone:
                payload["stopped_at"] = spec.task_id
                payload["reason"] = f"its argument {gone[0]} is no longer here"
                break
            replayed.append(TaskRecord(spec, None, attempt=-1, internal="replay"))
    except Exception as exc:  # the GCS is unreachable: the state stays the constructor's
        payload["reason"] = f"the calls could not be read from the log: {exc}"
    payload["calls"] = [r.spec.task_id for r in replayed if r.internal == "replay"]
    return replayed, payload


def internal_call(actor: ActorRecord, method: str, args: list[p.Arg]) -> p.TaskSpec:
    """A call of the daemon's own to the actor (no caller holds its result)."""
    creation = actor.creation.spec
    return p.TaskSpec(
        task_id=uuid.uuid4().hex,
        job_id=creation.job_id,
        name=f"{actor.options.class_name}.{method}",
        function_id=creation.function_id,
        args=args,
        kwargs={},
        num_returns=1,
        resources={},
        max_retries=0,
        retry_exceptions=False,
        actor_id=actor.actor_id,
        method=method,
    )


def drop_returns(record: TaskRecord, done: p.TaskDone, memory: StoreMemory) -> bytes | None:
    """Drops the results of a daemon's own call; a checkpoint's (the actor's state,
    pickled) is returned first."""
    blob = None
    for location in done.returns:
        if location.region is not None:
            if record.internal == "checkpoint":
                blob = bytes(shm.object_view(memory.prefix, location))
            memory.give_back_location(location)
        elif record.internal == "checkpoint":
            blob = location.inline
    return blob


def internal_call_done(
    actor: ActorRecord, record: TaskRecord, done: p.TaskDone, memory: StoreMemory
) -> tuple[dict[str, Any], bytes] | None:
    """A replayed call's or a restore's result is dropped; a checkpoint's is returned
    (its ``checkpointed`` event's payload, and the state for its data), then dropped."""
    blob = drop_returns(record, done, memory)
    if done.error is not None:
        log.warning("actor %s: %s failed: %s", actor.actor_id, record.spec.name, done.error.message)
        return None
    if record.internal != "checkpoint" or blob is None:
        return None
    return {"calls": actor.options.checkpoint_interval}, blob
