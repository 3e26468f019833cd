"""`cairn state --at`: the state of jobs, tasks, actors and nodes at a past point of the
log, computed in SQL, equals the projector's fold of the log up to that point, at every
position of a job with a retried task, a failed task, a restarted actor and a node that
dies; a time resolves to the last position recorded by then; points outside the
retained log (old partitions dropped) are refused with the range, exit code 2."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from log_rows import rows

from controlplane.cli import main
from controlplane.eventlog import EntityKind, Event, EventAppender, RecordedEvent
from controlplane.eventlog.partitions import PartitionManager
from controlplane.projections.spec import fold
from controlplane.state_at import render, state_at

pytestmark = pytest.mark.timeout(120)

J, T, A, N = EntityKind.JOB, EntityKind.TASK, EntityKind.ACTOR, EntityKind.NODE


def _job_events() -> list[Event]:
    """One job's history, in order: t1 runs once, t2 fails on n1 and is retried on n2,
    t3 fails for good, actor a1 dies with n1 and restarts on n2, n1 dies."""

    def task(tid: str, kind: str, payload: dict[str, Any], node: str | None = None) -> Event:
        return Event(T, tid, kind, payload, job_id="j1", node_id=node)

    return [
        Event(
            N,
            "n1",
            "registered",
            {"address": "10.0.0.1:7000", "resources": {"CPU": 2}},
            node_id="n1",
        ),
        Event(
            N,
            "n2",
            "registered",
            {"address": "10.0.0.2:7000", "resources": {"CPU": 2}},
            node_id="n2",
        ),
        Event(J, "j1", "submitted", {"entrypoint": "python job.py"}, job_id="j1", node_id="n1"),
        Event(J, "j1", "started", {}, job_id="j1", node_id="n1"),
        task("t1", "submitted", {"name": "square", "function": "m.square"}, "n1"),
        task("t2", "submitted", {"name": "flaky", "function": "m.flaky"}, "n1"),
        task("t3", "submitted", {"name": "boom", "function": "m.boom"}, "n1"),
        Event(A, "a1", "creation_requested", {"class_name": "Counter", "name": "c"}, job_id="j1"),
        task("t1", "scheduled", {"attempt": 0}, "n1"),
        task("t2", "scheduled", {"attempt": 0}, "n1"),
        Event(A, "a1", "scheduled", {}, job_id="j1", node_id="n1"),
        task("t1", "running", {"worker_id": "w1", "attempt": 0}, "n1"),
        Event(N, "n1", "heartbeat", {"available": {"CPU": 0}}, node_id="n1"),
        task("t2", "running", {"worker_id": "w2", "attempt": 0}, "n1"),
        Event(A, "a1", "alive", {"worker_id": "w3"}, job_id="j1", node_id="n1"),
        task("t1", "finished", {"attempt": 0}, "n1"),
        task("t2", "failed", {"error": "ValueError", "attempt": 0}, "n1"),
        task("t2", "retried", {"attempt": 1}, "n1"),
        Event(N, "n1", "dead", {"cause": "heartbeats stopped"}),
        Event(A, "a1", "restarting", {"attempt": 1, "cause": "node died"}, job_id="j1"),
        task("t2", "spilled", {"attempt": 1, "resources": {"CPU": 1}}),
        task("t2", "placed", {"node_id": "n2", "attempt": 1}, "n2"),
        Event(A, "a1", "alive", {"worker_id": "w4"}, job_id="j1", node_id="n2"),
        task("t3", "scheduled", {"attempt": 0}, "n2"),
        task("t2", "running", {"worker_id": "w5", "attempt": 1}, "n2"),
        task("t3", "running", {"worker_id": "w6", "attempt": 0}, "n2"),
        task("t3", "failed", {"error": "RuntimeError: boom", "attempt": 0}, "n2"),
        task("t2", "finished", {"attempt": 1}, "n2"),
        Event(N, "n2", "heartbeat", {"available": {"CPU": 2}}, node_id="n2"),
        Event(J, "j1", "failed", {"error": "task t3 failed"}, job_id="j1", node_id="n2"),
    ]


async def _append_one_by_one(url: str, events: list[Event]) -> list[int]:
    """Each event in its own batch, a little apart, so each has its own time."""
    positions = []
    async with EventAppender(url) as appender:
        for event in events:
            positions.append(await appender.append(event))
            await asyncio.sleep(0.002)
    return positions


def _log(url: str) -> list[RecordedEvent]:
    return [RecordedEvent.from_row(r) for r in rows(url, "SELECT * FROM events ORDER BY position")]


SHOWN = {"jobs": "job_id", "tasks": "task_id", "actors": "actor_id", "nodes": "node_id"}


def _expected(log: list[RecordedEvent], position: int) -> dict[str, dict[str, dict[str, Any]]]:
    """The fold of the log up to ``position``, per table and key."""
    folded = fold(e for e in log if e.position <= position)
    expected: dict[str, dict[str, dict[str, Any]]] = {table: {} for table in SHOWN}
    for (table, key), row in folded.items():
        if table in expected:
            expected[table][key] = row
    return expected


def _assert_same(state: dict[str, Any], expected: dict[str, dict[str, dict[str, Any]]]) -> None:
    for table, key in SHOWN.items():
        if table not in state:
            continue
        got = {entity[key]: entity for entity in state[table]}
        assert set(got) == set(expected[table]), (table, state["position"])
        for entity_id, entity in got.items():
            for column, value in entity.items():
                if column != key:
                    assert value == expected[table][entity_id][column], (
                        table,
                        entity_id,
                        column,
                        state["position"],
                    )


@pytest.mark.parametrize("log_shards", [1, 4])  # (4: the job's shard and shard 0's nodes)
def test_state_at_every_position_equals_the_fold_of_the_log_prefix(gcs_url: str) -> None:
    asyncio.run(_append_one_by_one(gcs_url, _job_events()))
    log = _log(gcs_url)
    for event in log:
        expected = _expected(log, event.position)
        full = state_at(gcs_url, position=event.position, all_tasks=True)
        assert full["position"] == event.position
        assert full["recorded_at"] == event.recorded_at
        _assert_same(full, expected)

        summary = state_at(gcs_url, position=event.position)
        _assert_same(summary, expected)  # jobs, actors, nodes in full
        tasks = expected["tasks"]
        counts: dict[str, dict[str, int]] = {}
        for row in tasks.values():
            by_state = counts.setdefault(row["job_id"], {})
            by_state[row["state"]] = by_state.get(row["state"], 0) + 1
        assert summary["task_counts"] == counts == full["task_counts"]
        unfinished = {t for t, r in tasks.items() if r["state"] not in ("FINISHED", "FAILED")}
        assert {t["task_id"] for t in summary["unfinished_tasks"]} == unfinished
        assert summary["unfinished_total"] == len(unfinished)
        for task in summary["unfinished_tasks"]:
            assert task == next(t for t in full["tasks"] if t["task_id"] == task["task_id"])


def test_mid_job_states_and_terminal_view(gcs_url: str) -> None:
    positions = asyncio.run(_append_one_by_one(gcs_url, _job_events()))
    # after t2 was retried and n1 died, before a1 restarted (event 19 of 30)
    mid = positions[18]
    state = state_at(gcs_url, position=mid, all_tasks=True)
    assert {j["job_id"]: j["state"] for j in state["jobs"]} == {"j1": "RUNNING"}
    tasks = {t["task_id"]: (t["state"], t["node_id"], t["attempt"]) for t in state["tasks"]}
    assert tasks == {
        "t1": ("FINISHED", "n1", 0),
        "t2": ("RETRYING", "n1", 1),
        "t3": ("SUBMITTED", "n1", 0),
    }
    assert {n["node_id"]: n["state"] for n in state["nodes"]} == {"n1": "DEAD", "n2": "ALIVE"}
    assert [(a["state"], a["num_restarts"]) for a in state["actors"]] == [("ALIVE", 0)]

    result = CliRunner().invoke(main, ["state", "--at", str(mid), "--gcs-url", gcs_url])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"State at position {mid}" in out
    assert "j1 RUNNING  python job.py" in out
    assert "n1 DEAD at 10.0.0.1:7000" in out and "n2 ALIVE at 10.0.0.2:7000" in out
    assert "a1 ALIVE Counter 'c' on n1, restarts: 0" in out
    assert "job j1: 1 FINISHED, 1 RETRYING, 1 SUBMITTED" in out
    assert "t2 RETRYING flaky on n1, attempt 1" in out
    assert "t3 SUBMITTED boom on n1, attempt 0" in out
    assert "t1 FINISHED" not in out  # finished tasks are counted, not listed

    end = CliRunner().invoke(main, ["state", "--at", str(positions[-1]), "--gcs-url", gcs_url])
    assert "j1 FAILED  python job.py" in end.output and "task t3 failed" in end.output
    assert "a1 ALIVE Counter 'c' on n2, restarts: 1" in end.output
    assert "job j1: 1 FAILED, 2 FINISHED" in end.output

    capped = render(state_at(gcs_url, position=mid, max_listed=1))
    # the longest unchanged first: t3 (submitted at event 7) before t2 (retried at 18)
    assert "t3 SUBMITTED" in capped and "t2 RETRYING" not in capped
    assert "... and 1 more (--json lists every task)" in capped


def test_a_time_resolves_to_the_last_position_recorded_by_then(gcs_url: str) -> None:
    positions = asyncio.run(_append_one_by_one(gcs_url, _job_events()))
    log = {e.position: e for e in _log(gcs_url)}
    before, after = log[positions[15]], log[positions[16]]  # t1 finished, t2 failed
    assert before.recorded_at < after.recorded_at
    between = before.recorded_at + (after.recorded_at - before.recorded_at) / 2
    state = state_at(gcs_url, timestamp=between, all_tasks=True)
    assert state["position"] == before.position
    assert {t["task_id"]: t["state"] for t in state["tasks"]}["t2"] == "RUNNING"
    assert state_at(gcs_url, timestamp=after.recorded_at)["position"] == after.position

    # on the command line: ISO 8601, a time without a zone is UTC
    naive = between.astimezone(UTC).replace(tzinfo=None).isoformat()
    result = CliRunner().invoke(main, ["state", "--at", naive, "--gcs-url", gcs_url])
    assert result.exit_code == 0, result.output
    assert f"State at position {before.position}" in result.output
    zoned = between.astimezone(UTC).isoformat().replace("+00:00", "Z")
    result = CliRunner().invoke(main, ["state", "--at", zoned, "--gcs-url", gcs_url, "--json"])
    assert result.exit_code == 0, result.output
    assert f'"position": {before.position},' in result.output


def test_points_outside_the_retained_log_are_refused_with_the_range(gcs_url: str) -> None:
    runner = CliRunner()
    empty = runner.invoke(main, ["state", "--at", "1", "--gcs-url", gcs_url])
    assert empty.exit_code == 2 and "the log is empty" in empty.output

    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=10, partitions_ahead=1)
    positions = asyncio.run(_append_one_by_one(gcs_url, _job_events()))  # positions 1..30
    first = min(manager.partitions(), key=lambda p: p.lower_bound)
    manager.retire(first.table_name, None)  # positions 1..10 are gone
    log = _log(gcs_url)
    assert log[0].position == 11

    def refused(at: str) -> str:
        result = runner.invoke(main, ["state", "--at", at, "--gcs-url", gcs_url])
        assert result.exit_code == 2, result.output
        return result.output

    range_text = f"positions 11..{positions[-1]}, recorded {log[0].recorded_at.isoformat()}"
    assert range_text in refused("5")
    assert range_text in refused(str(positions[-1] + 1))
    assert range_text in refused((log[0].recorded_at - timedelta(milliseconds=1)).isoformat())
    assert range_text in refused((datetime.now(UTC) + timedelta(days=1)).isoformat())
    assert "neither a position" in refused("yesterday")
    ok = runner.invoke(main, ["state", "--at", "11", "--gcs-url", gcs_url])
    assert ok.exit_code == 0 and "State at position 11" in ok.output


def test_state_at_reads_a_consistent_log_while_it_grows(gcs_url: str) -> None:
    """Appends after the point asked for change nothing in the answer."""
    positions = asyncio.run(_append_one_by_one(gcs_url, _job_events()[:10]))
    before = state_at(gcs_url, position=positions[-1], all_tasks=True)
    asyncio.run(_append_one_by_one(gcs_url, _job_events()[10:]))
    after = state_at(gcs_url, position=positions[-1], all_tasks=True)
    assert after.pop("retained")["last_position"] == positions[-1] + 20
    before.pop("retained")
    assert after == before
