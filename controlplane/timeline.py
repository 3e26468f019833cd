"""A job's task execution as a Chrome trace (``cairn timeline``), as ``ray timeline``
gives: one complete event per task attempt that ran, on a track per node (process)
and worker (thread), so chrome://tracing or Perfetto shows where time went.

Everything comes from the log: a job's tasks are the ones whose ``submitted`` event
carries its job id; an attempt runs from its ``running`` event to the ``finished``,
``failed`` or ``cancelled`` event of the same attempt (a missing attempt is 0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict

from controlplane.errors import GcsError
from controlplane.readonly_sql import run_readonly
from controlplane.sql import queries

ENDS = ("finished", "failed", "cancelled")


class UnknownJobError(GcsError):
    """The log holds no job with that id."""


class TraceEvent(TypedDict, total=False):
    name: str
    cat: str
    ph: str
    pid: int
    tid: int
    ts: int
    dur: int
    args: dict[str, Any]


@dataclass(frozen=True)
class LogRow:
    """One task event of the job, as the ``timeline_task_events`` query returns it."""

    task_id: str
    event_type: str
    recorded_at: datetime
    node_id: str | None
    payload: dict[str, Any]


@dataclass
class Attempt:
    task_id: str
    attempt: int
    node_id: str
    worker_id: str
    started: datetime
    ended: datetime | None = None
    outcome: str = "unfinished"
    error: str | None = None


def _micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def attempts(rows: list[LogRow]) -> list[Attempt]:
    """Pairs each ``running`` event with the end of the same attempt of the same task,
    in log order; an attempt with no end (still running, or its node died before it
    could say) is kept as ``unfinished``, ended by a later start of that attempt or
    left open."""
    done: list[Attempt] = []
    open_runs: dict[tuple[str, int], Attempt] = {}
    for row in rows:
        key = (row.task_id, int(row.payload.get("attempt", 0)))
        if row.event_type == "running":
            previous = open_runs.pop(key, None)
            if previous is not None:
                previous.ended = row.recorded_at
                done.append(previous)
            open_runs[key] = Attempt(
                row.task_id,
                key[1],
                row.node_id or "unknown",
                str(row.payload.get("worker_id", "unknown")),
                row.recorded_at,
            )
        elif row.event_type in ENDS and key in open_runs:
            run = open_runs.pop(key)
            run.ended, run.outcome = row.recorded_at, row.event_type
            run.error = row.payload.get("error")
            done.append(run)
    done.extend(open_runs.values())
    return sorted(done, key=lambda a: a.started)


def chrome_trace(rows: list[LogRow], job_id: str) -> dict[str, Any]:
    """The trace: metadata events naming each node's process and each worker's thread
    (trace viewers want numeric pid/tid), then one ``X`` event per attempt."""
    names = {r.task_id: r.payload for r in rows if r.event_type == "submitted"}
    runs = attempts(rows)
    last = max((r.recorded_at for r in rows), default=None)
    pids: dict[str, int] = {}
    tids: dict[tuple[str, str], int] = {}
    meta: list[TraceEvent] = []
    spans: list[TraceEvent] = []
    for run in runs:
        if run.node_id not in pids:
            pids[run.node_id] = pid = len(pids) + 1
            label = {"name": f"node {run.node_id}"}
            meta.append({"name": "process_name", "ph": "M", "pid": pid, "args": label})
        pid = pids[run.node_id]
        if (run.node_id, run.worker_id) not in tids:
            tids[(run.node_id, run.worker_id)] = tid = len(tids) + 1
            label = {"name": f"worker {run.worker_id}"}
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": label})
        submitted = names.get(run.task_id, {})
        ended = run.ended or last or run.started
        args: dict[str, Any] = {
            "task_id": run.task_id,
            "attempt": run.attempt,
            "outcome": run.outcome,
            "error": run.error,
            "node_id": run.node_id,
            "worker_id": run.worker_id,
        }
        if submitted.get("actor_id"):
            args["actor_id"] = submitted["actor_id"]
        spans.append(
            {
                "name": str(submitted.get("name") or submitted.get("function") or run.task_id),
                "cat": "task",
                "ph": "X",
                "pid": pid,
                "tid": tids[(run.node_id, run.worker_id)],
                "ts": _micros(run.started),
                "dur": max(0, _micros(ended) - _micros(run.started)),
                "args": args,
            }
        )
    return {
        "traceEvents": [*meta, *spans],
        "displayTimeUnit": "ms",
        "otherData": {"job_id": job_id, "task_attempts": len(spans)},
    }


async def job_rows(url: str, job_id: str, *, without: Sequence[int] = ()) -> list[LogRow]:
    """The job's task events (submitted, running and ends), read-only, in log order;
    UnknownJobError when the log has never heard of the job. ``without``: servers of the
    log left out (``readonly_sql.audit_transaction``)."""
    _, known = await run_readonly(url, queries["job_known"], [job_id], without=without)
    if not known or not known[0][0]:
        raise UnknownJobError(f"no job {job_id!r} in the log")
    columns, found = await run_readonly(
        url, queries["timeline_task_events"], [job_id], without=without
    )
    rows = [dict(zip(columns, row, strict=True)) for row in found]
    return [
        LogRow(
            r["task_id"], r["event_type"], r["recorded_at"], r["node_id"], json.loads(r["payload"])
        )
        for r in rows
    ]


async def job_trace(url: str, job_id: str, *, without: Sequence[int] = ()) -> dict[str, Any]:
    """The Chrome trace of one job, from the log."""
    return chrome_trace(await job_rows(url, job_id, without=without), job_id)
