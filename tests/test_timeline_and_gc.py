"""`cairn timeline` (a job's task attempts as a Chrome trace, from the log) and
`cairn gc` (retiring old partitions to Parquet without touching the one taking
appends), on a real PostgreSQL; one trace comes from a real job on a real node."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner
from log_rows import rows, wait_for_rows
from processes import run_cairn

from controlplane.cli import main
from controlplane.eventlog import EntityKind, Event, EventAppender
from controlplane.eventlog.partitions import PartitionManager, read_parquet_archive
from controlplane.retention import parse_duration

pytestmark = pytest.mark.timeout(120)

T = EntityKind.TASK


def _micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def _task(task: str, kind: str, payload: dict[str, Any], node: str | None = None) -> Event:
    """A task event as the node daemon writes it: only `submitted` carries the job id."""
    job = "job-1" if kind == "submitted" else None
    return Event(T, task, kind, payload, job_id=job, node_id=node)


def _seed_job() -> list[list[Event]]:
    """Batches of events, appended one batch at a time so that times differ."""
    return [
        [
            Event(EntityKind.JOB, "job-1", "submitted", {"entrypoint": "x.py"}, job_id="job-1"),
            _task("t-ok", "submitted", {"name": "mod.square"}),
            _task("t-retry", "submitted", {"name": "mod.flaky"}),
            _task("t-fail", "submitted", {"name": "mod.boom"}),
            _task(
                "t-call", "submitted", {"name": "Counter.add", "actor_id": "a1", "method": "add"}
            ),
            _task("t-never", "submitted", {"name": "mod.queued"}),
            Event(T, "t-other", "submitted", {"name": "mod.other"}, job_id="job-2"),
        ],
        [
            _task("t-ok", "scheduled", {}, "node-a"),
            _task("t-ok", "running", {"worker_id": "w1"}, "node-a"),
            _task("t-retry", "running", {"worker_id": "w2", "attempt": 0}, "node-a"),
            _task("t-call", "running", {"worker_id": "w3"}, "node-b"),
            _task("t-other", "running", {"worker_id": "w9"}, "node-a"),
        ],
        [
            _task("t-ok", "finished", {}, "node-a"),
            _task("t-retry", "failed", {"error": "worker_died", "attempt": 0}, "node-a"),
            _task("t-retry", "retried", {"attempt": 1}, "node-a"),
            _task("t-call", "finished", {"attempt": 0}, "node-b"),
            _task("t-other", "finished", {}, "node-a"),
        ],
        [
            _task("t-retry", "running", {"worker_id": "w4", "attempt": 1}, "node-b"),
            _task("t-fail", "running", {"worker_id": "w1"}, "node-a"),
        ],
        [
            _task("t-retry", "finished", {"attempt": 1}, "node-b"),
            _task("t-fail", "failed", {"error": "task_error: ValueError"}, "node-a"),
        ],
    ]


async def _append_batches(url: str, batches: list[list[Event]]) -> None:
    async with EventAppender(url) as appender:
        for batch in batches:
            await appender.append_many(batch)
            await asyncio.sleep(0.02)


def _spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


@pytest.mark.parametrize("log_shards", [1, 4])
def test_timeline_has_one_span_per_attempt_on_node_and_worker_tracks(
    gcs_url: str, tmp_path: Path
) -> None:
    asyncio.run(_append_batches(gcs_url, _seed_job()))
    out = tmp_path / "trace.json"
    result = CliRunner().invoke(main, ["timeline", "job-1", "-o", str(out), "--gcs-url", gcs_url])
    assert result.exit_code == 0, result.output
    assert "wrote 5 task attempts of job job-1" in result.output
    trace = json.loads(out.read_text())
    spans = _spans(trace)
    got = {(s["args"]["task_id"], s["args"]["attempt"]): s for s in spans}
    # t-never did not run; t-other belongs to another job
    assert sorted(got) == [
        ("t-call", 0),
        ("t-fail", 0),
        ("t-ok", 0),
        ("t-retry", 0),
        ("t-retry", 1),
    ]
    assert {k: (s["name"], s["args"]["outcome"], s["args"]["error"]) for k, s in got.items()} == {
        ("t-ok", 0): ("mod.square", "finished", None),
        ("t-retry", 0): ("mod.flaky", "failed", "worker_died"),
        ("t-retry", 1): ("mod.flaky", "finished", None),
        ("t-fail", 0): ("mod.boom", "failed", "task_error: ValueError"),
        ("t-call", 0): ("Counter.add", "finished", None),
    }
    assert got[("t-call", 0)]["args"]["actor_id"] == "a1"
    assert all(s["cat"] == "task" for s in spans)

    # pid and tid are numbers, labelled with the node and worker they stand for
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    nodes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    workers = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    tracks = {k: (nodes[s["pid"]], workers[(s["pid"], s["tid"])]) for k, s in got.items()}
    assert tracks == {
        ("t-ok", 0): ("node node-a", "worker w1"),
        ("t-retry", 0): ("node node-a", "worker w2"),
        ("t-retry", 1): ("node node-b", "worker w4"),
        ("t-fail", 0): ("node node-a", "worker w1"),
        ("t-call", 0): ("node node-b", "worker w3"),
    }

    # times are the log's: from `running` to the attempt's end, in microseconds
    times = {
        (r["entity_id"], r["event_type"], json.loads(r["payload"]).get("attempt", 0)): r[
            "recorded_at"
        ]
        for r in rows(
            gcs_url, "SELECT entity_id, event_type, payload::text, recorded_at FROM events"
        )
    }
    for (task, attempt), span in got.items():
        start = times[(task, "running", attempt)]
        end = times.get((task, "finished", attempt)) or times[(task, "failed", attempt)]
        assert span["ts"] == _micros(start)
        assert span["dur"] == _micros(end) - _micros(start) > 0


def test_timeline_of_an_unknown_job_is_a_usage_error(gcs_url: str, tmp_path: Path) -> None:
    asyncio.run(_append_batches(gcs_url, _seed_job()))
    out = tmp_path / "trace.json"
    result = run_cairn("timeline", "no-such-job", "-o", str(out), "--gcs-url", gcs_url, check=False)
    assert result.returncode == 2
    assert "no job 'no-such-job' in the log" in result.stderr
    assert not out.exists()


@pytest.mark.timeout(180)
def test_timeline_of_a_real_job(tmp_path: Path) -> None:
    import sdk as ray

    @ray.remote
    def square(x: int) -> int:
        time.sleep(0.05)
        return x * x

    @ray.remote
    def boom() -> None:
        raise ValueError("boom")

    from workloads import Counter

    ray.init(num_cpus=2)
    try:
        context = ray.get_runtime_context()
        refs = [square.remote(i) for i in range(4)]
        assert ray.get(refs) == [0, 1, 4, 9]
        failing = boom.remote()
        with pytest.raises(ray.exceptions.RayTaskError):
            ray.get(failing)
        counter = Counter.remote()
        calls = [counter.add.remote(1) for _ in range(2)]
        assert ray.get(calls) == [1, 2]
        expected = {r.task_id().hex() for r in [*refs, failing, *calls]}
        out = tmp_path / "trace.json"
        deadline = time.monotonic() + 20
        while True:  # the ends of the last attempts may be written behind the results
            args = ["timeline", context.get_job_id(), "-o", str(out)]
            result = CliRunner().invoke(main, [*args, "--gcs-url", context.gcs_address])
            assert result.exit_code == 0, result.output
            spans = _spans(json.loads(out.read_text()))
            ended = {s["args"]["task_id"] for s in spans if s["args"]["outcome"] != "unfinished"}
            if expected <= ended or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        ray.shutdown()
    ours = [s for s in spans if s["args"]["task_id"] in expected]
    assert sorted(s["args"]["task_id"] for s in ours) == sorted(expected)  # one span each
    by_name: dict[str, list[str]] = {}
    for span in ours:
        by_name.setdefault(span["name"].rsplit(".", 1)[-1], []).append(span["args"]["outcome"])
    assert by_name == {"square": ["finished"] * 4, "boom": ["failed"], "add": ["finished"] * 2}
    node = context.get_node_id()
    assert {s["args"]["node_id"] for s in ours} == {node}
    # a task worker runs one task at a time: its spans follow one another (an actor's
    # calls are logged `running` when handed to its worker, so they may overlap)
    by_worker: dict[int, list[tuple[int, int]]] = {}
    for span in spans:
        if "actor_id" in span["args"] or "__init__" in span["name"]:
            continue
        by_worker.setdefault(span["tid"], []).append((span["ts"], span["ts"] + span["dur"]))
    for runs in by_worker.values():
        runs.sort()
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(runs)), runs
    # the actor's creation ran too, as a span of its own on the actor's worker
    others = [s for s in spans if s["args"]["task_id"] not in expected]
    calls_worker = {s["tid"] for s in ours if s["name"].endswith("add")}
    assert len(calls_worker) == 1
    assert [s["tid"] for s in others] == list(calls_worker)


def test_durations() -> None:
    assert [parse_duration(d) for d in ("30s", "15m", "12h", "7d", "2w", "1.5s")] == [
        30,
        900,
        43200,
        604800,
        1209600,
        1.5,
    ]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("7 days")
    result = CliRunner().invoke(main, ["gc", "--older-than", "soon", "--gcs-url", "postgresql://x"])
    assert result.exit_code == 2 and "not a duration" in result.output


async def _append_objects(url: str, prefix: str, count: int) -> list[int]:
    async with EventAppender(url) as appender:
        return await appender.append_many(
            [
                Event(
                    EntityKind.OBJECT,
                    f"{prefix}-{n}",
                    "created",
                    {"size_bytes": n},
                    job_id=prefix,
                    data=bytes([n]),
                )
                for n in range(count)
            ]
        )


_P1, _P2 = f"events_p{1:019d}", f"events_p{51:019d}"  # as the migration names them
_ALL = (
    "SELECT position, event_id::text, recorded_at, job_id, entity_kind::text, entity_id, "
    "event_type, node_id, payload::text, data FROM events WHERE position >= $1 AND "
    "position < $2 ORDER BY position"
)


def _until_older_than(url: str, seconds: float, below: int) -> None:
    """Until the newest event before position ``below`` is older than ``seconds`` by the
    server's clock (the one that stamped it, and that gc goes by)."""
    wait_for_rows(
        url,
        "SELECT 1 FROM events WHERE position < $2 "
        "HAVING clock_timestamp() - max(recorded_at) > make_interval(secs => $1)",
        seconds,
        below,
        timeout=30,
    )


def _states(url: str) -> dict[tuple[int, int], str]:
    return {(p.lower_bound, p.upper_bound): p.state for p in PartitionManager(url).partitions()}


def test_gc_archives_and_drops_old_full_partitions_only(gcs_url: str, tmp_path: Path) -> None:
    PartitionManager(gcs_url).configure(partition_size=50, partitions_ahead=1)
    asyncio.run(_append_objects(gcs_url, "old", 50))  # fills [1, 51)
    _until_older_than(gcs_url, 2.5, 51)
    asyncio.run(_append_objects(gcs_url, "young", 70))  # fills [51, 101); 20 in the hot one
    old_rows = rows(gcs_url, _ALL, 1, 51)
    assert len(old_rows) == 50

    # (2.5 s: the young partition stays younger while a `cairn gc` process starts)
    gc = ["gc", "--older-than", "2.5s", "--gcs-url", gcs_url]
    dry = CliRunner().invoke(main, [*gc, "--dry-run"])
    assert dry.exit_code == 0 and dry.output.splitlines() == [f"would retire {_P1} [1, 51)"]
    assert _states(gcs_url)[(1, 51)] == "attached"

    archive = tmp_path / "archive"
    result = run_cairn(*gc, "--archive", str(archive))
    assert f"retired {_P1} [1, 51): 50 events" in result.stdout
    assert "1 partitions, 50 events archived" in result.stdout
    states = _states(gcs_url)
    assert (states[(1, 51)], states[(51, 101)], states[(101, 151)]) == (
        "dropped",
        "attached",
        "attached",
    )
    # the Parquet file holds exactly the rows the partition held
    table = read_parquet_archive(archive / f"{_P1}.parquet")
    got = list(zip(*[table.column(n).to_pylist() for n in table.column_names], strict=True))
    assert [r[:8] for r in got] == [tuple(r.values())[:8] for r in old_rows]
    assert [json.loads(r[8]) for r in got] == [json.loads(r["payload"]) for r in old_rows]
    assert [r[9] for r in got] == [bytes(r["data"]) for r in old_rows]
    # the documented recipe (docs/sql.md) reads it back with pyarrow.dataset
    events = ds.dataset(archive, format="parquet")
    found = events.to_table(filter=pc.field("job_id") == "old", columns=["entity_id"])
    assert found.num_rows == 50

    # a second run, later, without an archive: the rest of the full partitions go, the
    # hot one stays although every event in it is old by now
    _until_older_than(gcs_url, 2.5, 121)
    result = run_cairn(*gc)
    assert f"dropped {_P2} [51, 101): 50 events" in result.stdout
    assert "not archived, these events are gone" in result.stdout
    assert "1 partitions, 50 events dropped without an archive" in result.stdout
    assert _states(gcs_url)[(101, 151)] == "attached"
    assert rows(gcs_url, "SELECT min(position), count(*) FROM events")[0][:] == (101, 20)
    assert "nothing to retire" in run_cairn(*gc).stdout

    # appends carry on, into the partition that was never touched and past it
    positions = asyncio.run(_append_objects(gcs_url, "after", 40))
    assert positions == list(range(121, 161))
    assert rows(gcs_url, "SELECT count(*) FROM events")[0][0] == 60


def test_gc_finishes_what_an_interrupted_gc_left(gcs_url: str, tmp_path: Path) -> None:
    """A gc that stopped part way left one partition detached and one archived: the
    next gc archives and drops the first and drops the second, before anything new."""
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=50, partitions_ahead=1)
    asyncio.run(_append_objects(gcs_url, "old", 120))  # fills [1, 51) and [51, 101)
    first = rows(gcs_url, _ALL, 1, 51)
    manager.detach(_P1)  # stopped after detaching the first
    manager.detach(_P2)
    kept = manager.export_parquet(_P2, tmp_path / "earlier")  # and after archiving this one
    assert (_states(gcs_url)[(1, 51)], _states(gcs_url)[(51, 101)]) == ("detached", "archived")

    archive = tmp_path / "archive"
    result = run_cairn("gc", "--older-than", "7d", "--gcs-url", gcs_url, "--archive", str(archive))
    assert f"retired {_P1} [1, 51): 50 events, left detached by an earlier gc" in result.stdout
    assert (
        f"retired {_P2} [51, 101): 50 events, left archived by an earlier gc; archived to {kept}"
        in result.stdout
    )
    states = _states(gcs_url)
    assert (states[(1, 51)], states[(51, 101)], states[(101, 151)]) == (
        "dropped",
        "dropped",
        "attached",
    )
    table = read_parquet_archive(archive / f"{_P1}.parquet")
    assert table.column("position").to_pylist() == [r["position"] for r in first]
    assert kept.exists()
