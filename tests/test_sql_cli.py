"""`cairn sql`: one read-only statement against the log, printed as a table, CSV or
JSON; writes -- plain, hidden in a WITH clause, or behind a second statement -- are
refused and change nothing; the audit role cannot write even when used directly."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import asyncpg
import pytest
from processes import run_cairn

from controlplane.eventlog import EntityKind, Event, EventAppender

pytestmark = pytest.mark.timeout(120)


async def _seed(url: str) -> None:
    async with EventAppender(url) as appender:
        await appender.append_many(
            [
                Event(EntityKind.TASK, f"task-{n}", "submitted", {"name": f"f{n % 2}"}, job_id="j")
                for n in range(6)
            ]
        )


async def _count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


def test_cairn_sql_prints_rows_in_three_formats(gcs_url: str) -> None:
    asyncio.run(_seed(gcs_url))
    query = (
        "SELECT payload->>'name' AS function, count(*) AS n FROM events "
        "WHERE event_type = 'submitted' GROUP BY 1 ORDER BY 1"
    )
    table = run_cairn("sql", "--gcs-url", gcs_url, query).stdout.splitlines()
    assert table[0].split(" | ") == ["function", "n"]
    assert [line.split(" | ") for line in table[2:4]] == [["f0      ", "3"], ["f1      ", "3"]]
    assert table[-1] == "(2 rows)"
    as_csv = run_cairn("sql", "--gcs-url", gcs_url, "--format", "csv", query).stdout
    assert list(csv.reader(io.StringIO(as_csv))) == [["function", "n"], ["f0", "3"], ["f1", "3"]]
    as_json = run_cairn("sql", "--gcs-url", gcs_url, "--format", "json", query).stdout
    assert json.loads(as_json) == [{"function": "f0", "n": 3}, {"function": "f1", "n": 3}]


@pytest.mark.parametrize(
    ("statement", "says"),
    [
        ("DELETE FROM events", "refusing DELETE"),
        ("UPDATE events SET payload = '{}'", "refusing UPDATE"),
        ("DROP TABLE events", "refusing DROP"),
        ("SELECT 1; DELETE FROM events", "one statement at a time"),
        ("WITH gone AS (DELETE FROM events RETURNING 1) SELECT * FROM gone", "writes"),
        ("SELECT lo_create(0)", "writes"),  # a write inside a function
    ],
)
def test_cairn_sql_refuses_writes_and_changes_nothing(
    gcs_url: str, statement: str, says: str
) -> None:
    asyncio.run(_seed(gcs_url))
    before = asyncio.run(_count(gcs_url))
    result = run_cairn("sql", "--gcs-url", gcs_url, statement, check=False)
    assert result.returncode != 0 and says in result.stderr, result.stderr
    assert asyncio.run(_count(gcs_url)) == before


async def test_the_audit_role_cannot_write_even_directly(gcs_url: str) -> None:
    conn = await asyncpg.connect(gcs_url)
    try:
        await conn.execute("SET ROLE cairn_audit")
        assert await conn.fetchval("SELECT count(*) FROM events") == 0  # it may read
        for statement in (
            "DELETE FROM events",
            "INSERT INTO checkpoints (name, position, state) VALUES ('x', 1, '')",
            "DROP TABLE checkpoints",
            "TRUNCATE events",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


def test_cairn_lineage_prints_the_tree_of_an_object(gcs_url: str) -> None:
    put, (a, b, c) = "p" * 32 + "00000000", ("a" * 32, "b" * 32, "c" * 32)

    def made(task: str | None, object_id: str) -> Event:
        payload = {"size_bytes": 8, **({"task_id": task} if task else {})}
        return Event(EntityKind.OBJECT, object_id, "created", payload, job_id="j")

    def submitted(task: str, name: str, args: list[str]) -> Event:
        payload = {"name": name, "dependencies": args}
        return Event(EntityKind.TASK, task, "submitted", payload, job_id="j", node_id="n1")

    async def seed() -> None:
        async with EventAppender(gcs_url) as appender:
            await appender.append_many(
                [
                    made(None, put),
                    submitted(a, "mod.step", [put]),
                    made(a, a + "00000001"),
                    submitted(b, "mod.step", [put]),
                    made(b, b + "00000001"),
                    submitted(c, "mod.add", [a + "00000001", b + "00000001"]),
                    made(c, c + "00000001"),
                ]
            )

    asyncio.run(seed())
    tree = json.loads(run_cairn("lineage", "--gcs-url", gcs_url, "--json", c + "00000001").stdout)
    assert (tree["task_id"], tree["function"], tree["node_id"]) == (c, "mod.add", "n1")
    assert [arg["task_id"] for arg in tree["arguments"]] == [a, b]
    for arg in tree["arguments"]:
        assert arg["function"] == "mod.step"
        assert [(p["object_id"], p["task_id"]) for p in arg["arguments"]] == [(put, None)]
    text = run_cairn("lineage", "--gcs-url", gcs_url, c + "00000001").stdout
    assert text.splitlines()[0].startswith(f"object {c}00000001 made by mod.add (task {c}")
    assert text.count(f"object {put} (put)") == 2 and "├── " in text and "└── " in text
    unknown = run_cairn("lineage", "--gcs-url", gcs_url, "f" * 40, check=False)
    assert unknown.returncode == 2 and f"no object '{'f' * 40}' in the log" in unknown.stderr
