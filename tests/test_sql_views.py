"""The SQL surface (migration 0009, docs/sql.md) over a real job: a task retried after
an exception, a task that fails, an actor with calls, a chain of tasks over a put; plus a
node that dies (appended to the same log). The worked examples are read from
docs/sql.md and run as written; the views agree with the projections' fold."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from log_rows import rows
from workloads import Counter, add, flaky

import sdk as ray
from controlplane.embedded_postgres import owner_url
from controlplane.eventlog import EntityKind, Event, EventAppender, Tailer
from controlplane.projections import TABLES, fold
from controlplane.readonly_sql import WriteRefusedError, run_readonly
from sdk.api import client_or_auto_init
from sdk.util.placement_group import placement_group, remove_placement_group

pytestmark = pytest.mark.timeout(180)

DOC = Path(__file__).resolve().parent.parent / "docs" / "sql.md"
_QUERY = re.compile(r"<!-- query: (\w+) -->\n```sql\n(.*?)```", re.DOTALL)
VIEWS = (
    "jobs",
    "tasks",
    "task_attempts",
    "objects",
    "functions",
    "actors",
    "actor_calls",
    "nodes",
    "placement_groups",
)


def doc_queries() -> dict[str, str]:
    """The worked examples of docs/sql.md, by the name in their `<!-- query: -->` line."""
    return dict(_QUERY.findall(DOC.read_text()))


@ray.remote(max_retries=0)
def broken() -> None:
    raise RuntimeError("broken for the audit")


@ray.remote
def double(x: int) -> int:
    return 2 * x


class Run:
    """What the job did, as the test knows it."""

    url: str
    job_id: str
    flaky_task: str
    broken_task: str
    actor_id: str
    put_id: str
    result_id: str
    chain_tasks: list[str]
    dead_node: str
    old_task: str
    long_task: str
    recent_task: str


def _node_death(node: str, job: str) -> tuple[list[Event], list[Event], dict[str, str]]:
    """Events of a node that dies: a task that ended minutes before (old), one running
    since then until the death (long), one run in its last seconds (recent). The first
    list is shifted 3 minutes into the past after it is appended."""
    ids = {name: uuid.uuid4().hex for name in ("old", "long", "recent")}

    def task(task_id: str, kind: str, payload: dict[str, Any]) -> Event:
        return Event(EntityKind.TASK, task_id, kind, payload, job_id=job, node_id=node)

    def ran(task_id: str) -> list[Event]:
        return [
            task(task_id, "submitted", {"name": "audit.on_dead_node", "dependencies": []}),
            task(task_id, "scheduled", {"attempt": 0}),
            task(task_id, "running", {"worker_id": f"{node}-w1", "attempt": 0}),
        ]

    earlier = [
        Event(EntityKind.NODE, node, "registered", {"address": "x:1", "resources": {}}),
        *ran(ids["old"]),
        task(ids["old"], "finished", {"attempt": 0}),
        *ran(ids["long"]),
    ]
    later = [
        *ran(ids["recent"]),
        task(ids["recent"], "finished", {"attempt": 0}),
        Event(EntityKind.NODE, node, "dead", {"cause": "missed pings"}, node_id=node),
        Event(
            EntityKind.TASK,
            ids["long"],
            "retried",
            {"attempt": 1, "reason": f"node {node} died"},
            job_id=job,
        ),
    ]
    return earlier, later, ids


def _owner_url(runtime_url: str) -> str:
    """The log's owner (the runtime's login may not rewrite events): crafting history."""
    session_dir = Path(client_or_auto_init().welcome.session_dir)
    return owner_url(runtime_url, session_dir) or runtime_url


async def _append_node_death(url: str, run: Run) -> None:
    earlier, later, ids = _node_death(run.dead_node, run.job_id)
    async with EventAppender(url) as appender:
        await appender.append_many(earlier)
        conn = await asyncpg.connect(_owner_url(url))
        try:  # history crafted for the test: these happened 3 minutes ago
            await conn.execute(
                "UPDATE events SET recorded_at = recorded_at - interval '3 minutes'"
                " WHERE event_id = ANY($1::uuid[])",
                [e.event_id for e in earlier],
            )
        finally:
            await conn.close()
        await appender.append_many(later)
    run.old_task, run.long_task, run.recent_task = ids["old"], ids["long"], ids["recent"]


@pytest.fixture(scope="module", params=[1, 4], ids=["1-shard", "4-shards"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One real run, on a log of one shard and on a log of four (the job's events in its
    shard, the nodes' in shard 0: the views, lineage() and the fold read across them)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CAIRN_LOG_SHARDS", str(request.param))
        context = ray.init(num_cpus=2)
    try:
        r = Run()
        r.url, r.job_id = context.gcs_address, context.get_job_id()
        shards = rows(r.url, "SELECT shard_count FROM event_log_head")
        assert shards[0]["shard_count"] == request.param
        marker = tmp_path_factory.mktemp("flaky") / "marker"
        flaky_ref = flaky.remote(str(marker))
        assert ray.get(flaky_ref) == "second attempt"
        broken_ref = broken.remote()
        with pytest.raises(RuntimeError, match="broken for the audit"):
            ray.get(broken_ref)
        counter = Counter.remote()
        assert ray.get([counter.add.remote(k) for k in (1, 2, 3)]) == [1, 3, 6]
        put = ray.put(5)
        first = double.remote(put)
        result = add.remote(first, put)
        assert ray.get(result) == 15
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready(), timeout=30)
        remove_placement_group(group)
        r.flaky_task, r.broken_task = flaky_ref.task_id().hex(), broken_ref.task_id().hex()
        r.actor_id = counter._actor_id
        r.put_id, r.result_id = put.hex(), result.hex()
        r.chain_tasks = [first.task_id().hex(), result.task_id().hex()]
        r.dead_node = f"node-dead-{uuid.uuid4().hex[:8]}"
        asyncio.run(_append_node_death(r.url, r))
        yield r
    finally:
        ray.shutdown()


def query(run: Run, statement: str, *params: str) -> list[dict[str, Any]]:
    columns, rows = asyncio.run(run_readonly(run.url, statement, list(params)))
    return [dict(zip(columns, row, strict=True)) for row in rows]


def test_why_did_a_task_run_twice(run: Run) -> None:
    rows = query(run, doc_queries()["why_task_ran_twice"], run.flaky_task)
    assert [(r["attempt"], r["outcome"]) for r in rows] == [(0, "RETRIED"), (1, "FINISHED")]
    assert "flaky: first attempt fails" in rows[0]["retry_reason"]
    assert rows[0]["ended_at"] <= rows[1]["started_at"]
    assert all(r["node_id"] and r["worker_id"] for r in rows)

    failed = query(run, doc_queries()["why_task_ran_twice"], run.broken_task)
    assert [(r["attempt"], r["outcome"]) for r in failed] == [(0, "FAILED")]
    assert "broken for the audit" in failed[0]["error"]


def test_which_inputs_and_code_produced_an_object(run: Run) -> None:
    rows = query(run, doc_queries()["inputs_and_code"], run.result_id)
    made = {(r["depth"], r["object_id"]): r for r in rows}
    first_task, result_task = run.chain_tasks
    top = made[(0, run.result_id)]
    assert (top["made_by"], top["task_id"], top["function_name"]) == (
        "task",
        result_task,
        add._qualname,
    )
    assert top["code_id"] and top["code_id"] != made[(1, first_task + "00000001")]["code_id"]
    assert made[(1, first_task + "00000001")]["function_name"] == double._qualname
    puts = [r for r in rows if r["made_by"] == "put"]
    assert {r["object_id"] for r in puts} == {run.put_id}  # the one input, at depth 1 and 2
    assert {r["depth"] for r in puts} == {1, 2}
    assert all(r["task_id"] is None and r["code_id"] is None for r in puts)


def test_what_ran_on_a_node_in_the_minute_before_it_died(run: Run) -> None:
    rows = query(run, doc_queries()["node_last_minute"], run.dead_node)
    got = {r["task_id"]: r for r in rows}
    assert set(got) == {run.long_task, run.recent_task}  # not the one that ended earlier
    assert got[run.long_task]["outcome"] == "RETRIED"
    assert got[run.long_task]["retry_reason"] == f"node {run.dead_node} died"
    assert got[run.recent_task]["outcome"] == "FINISHED"
    assert [r["task_id"] for r in rows] == [run.long_task, run.recent_task]  # by start


def test_the_slowest_functions_by_p95(run: Run) -> None:
    rows = query(run, doc_queries()["slowest_functions"])
    by_name = {r["name"]: r for r in rows}
    assert by_name[flaky._qualname]["finished"] == 1
    assert by_name["audit.on_dead_node"]["finished"] == 2
    assert broken._qualname not in by_name  # it never finished
    p95 = [r["p95_duration"] for r in rows]
    assert p95 == sorted(p95, reverse=True)
    assert all(r["p50_duration"] <= r["p95_duration"] <= r["max_duration"] for r in rows)


def test_actor_calls_and_actors(run: Run) -> None:
    calls = query(
        run,
        "SELECT method, sequence, state, job_id FROM actor_calls WHERE actor_id = $1"
        " ORDER BY sequence",
        run.actor_id,
    )
    adds = [c for c in calls if c["method"] == "add"]
    assert [(c["sequence"], c["state"]) for c in adds] == [(i, "FINISHED") for i in range(3)]
    assert {c["job_id"] for c in adds} == {run.job_id}
    actor = query(run, "SELECT class_name, state FROM actors WHERE actor_id = $1", run.actor_id)
    assert actor[0]["class_name"].endswith("Counter")


async def _fold_of_log(url: str) -> dict[tuple[str, str], dict[str, Any]]:
    events = []
    async with Tailer(url) as tailer:
        while batch := await tailer.read(wait=0.3):
            events += batch
    return fold(events)


def test_views_agree_with_the_fold_of_the_same_log(run: Run) -> None:
    folded = asyncio.run(_fold_of_log(run.url))
    compared = 0
    for table in TABLES.values():
        rows = query(run, f"SELECT * FROM {table.name}")
        assert rows, table.name
        view = {row[table.key]: row for row in rows}
        expected = {key: row for (name, key), row in folded.items() if name == table.name}
        assert set(view) == set(expected), table.name
        shared = [c for c in table.columns if c in rows[0]]
        for key, row in expected.items():
            for column in shared:
                got = view[key][column]
                if column in table.json_columns and got is not None:
                    got = json.loads(got)
                assert got == row[column], (table.name, key, column)
                compared += 1
    assert compared > 100


def test_each_event_is_in_its_jobs_shard(run: Run) -> None:
    """An event naming its job is in the job's shard, one naming none in shard 0
    (controlplane/README.md, "The sharded log"); an entity's history read across them is
    in causal order (the fold above equals the views)."""
    shards = query(run, "SELECT shard_count FROM event_log_head")[0]["shard_count"]
    placed = query(
        run,
        "SELECT job_id, array_agg(DISTINCT shard) AS shards, "
        f"array_agg(DISTINCT cairn_shard_of_v1(job_id, {int(shards)})) AS expected "
        "FROM events GROUP BY job_id",
    )
    assert placed and all(row["shards"] == row["expected"] for row in placed)
    assert {row["shards"][0] for row in placed if row["job_id"] is None} == {0}


def test_every_event_of_a_jobs_entity_names_the_job_and_lies_in_one_shard(run: Run) -> None:
    """A task's, object's, actor's or placement group's events all name its job, even
    those written by a node that did not know it (migrations/sql/0020_entity_jobs.up.sql):
    its whole history is in one shard."""
    entities = query(
        run,
        "SELECT entity_kind::text AS kind, entity_id, array_agg(DISTINCT shard) AS shards, "
        "array_agg(DISTINCT job_id) AS jobs, array_agg(event_type) AS types FROM events "
        "WHERE entity_kind IN ('task', 'object', 'actor', 'placement_group') "
        "GROUP BY entity_kind, entity_id",
    )
    kinds = {row["kind"] for row in entities}
    assert kinds == {"task", "object", "actor", "placement_group"}
    strays = [row for row in entities if len(row["shards"]) != 1 or len(row["jobs"]) != 1]
    assert strays == []
    assert not [row for row in entities if row["jobs"] == [None]]


def test_the_audit_role_reads_the_views_and_writes_nothing(run: Run) -> None:
    for view in VIEWS:
        query(run, f"SELECT * FROM {view} LIMIT 1")
    assert query(run, "SELECT count(*) AS n FROM projection.tasks")[0]["n"] >= 0

    async def as_audit() -> None:
        conn = await asyncpg.connect(run.url)
        try:
            await conn.execute("SET ROLE cairn_audit")
            assert await conn.fetchval("SELECT count(*) FROM tasks") > 0
            for statement in (
                "INSERT INTO projection.tasks (task_id, state, last_position, updated_at)"
                " VALUES ('x', 'RUNNING', 1, now())",
                "DELETE FROM events",
                "CREATE VIEW mine AS SELECT 1",
                "DROP VIEW tasks",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(as_audit())
    with pytest.raises(WriteRefusedError):
        query(run, "WITH x AS (DELETE FROM events RETURNING 1) SELECT * FROM x")
