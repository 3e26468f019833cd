"""Hostile names and values (issue 8): actor names, namespaces, task and resource names
and `cairn sql` parameters with quotes, semicolons, NUL characters, lone surrogates
(undecodable bytes) or a megabyte of text are stored and read back exactly, or refused
at the call with a ValueError naming the argument -- never a crash of the node daemon
nor a half-written log."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from log_rows import rows

import sdk as ray
from controlplane.readonly_sql import run_readonly
from sdk.options import storable

pytestmark = pytest.mark.timeout(300)

SPECIAL = [
    "'",
    '"',
    ";",
    "'; DROP TABLE events; --",
    "$1",
    "%s",
    "\\",
    "\x00",
    "\udcff",  # os.fsdecode(b"\xff"): a byte that is not UTF-8
    "\ud800",
    "\n",
    "\u2603",
    "\U0001f600",
    "{}",
    "::jsonb",
]
hostile = (
    st.lists(st.one_of(st.text(max_size=6), st.sampled_from(SPECIAL)), min_size=1, max_size=4)
    .map("".join)
    .filter(bool)
)
MEGABYTE = "\u00e9;'" * (1024 * 1024 // 3)
_serial = itertools.count()


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    ray.init(num_cpus=1)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@ray.remote
class Holder:
    def name(self, value: str) -> str:
        return value


@ray.remote
def one() -> int:
    return 1


def _payload_text(url: str, entity_id: str, event_type: str, field: str) -> str | None:
    found = rows(
        url,
        "SELECT payload->>$3 AS value FROM events WHERE entity_id = $1 AND event_type = $2",
        entity_id,
        event_type,
        field,
    )
    return found[0]["value"] if found else None


def _named_actor(url: str, name: str) -> None:
    namespace = f"{name}\u2603{next(_serial)}"  # hostile too, and unique per example
    try:
        actor = Holder.options(name=name, namespace=namespace).remote()
    except ValueError as exc:
        assert storable(name) is not None, f"refused a storable name: {exc}"
        assert "name" in str(exc) or "namespace" in str(exc)
        return
    assert storable(name) is None, "accepted a name the log cannot store"
    assert ray.get(actor.name.remote(name), timeout=60) == name
    found = ray.get_actor(name, namespace=namespace)
    assert found._actor_id == actor._actor_id
    assert _payload_text(url, actor._actor_id, "creation_requested", "name") == name
    assert _payload_text(url, actor._actor_id, "creation_requested", "namespace") == namespace
    ray.kill(actor)


def _task_and_resource(url: str, name: str) -> None:
    try:
        ref = one.options(name=name, resources={name: 1}).remote()
    except ValueError as exc:
        assert storable(name) is not None, f"refused a storable name: {exc}"
        assert "name" in str(exc)
        return
    assert storable(name) is None, "accepted a name the log cannot store"
    task_id = ref.task_id().hex()
    for _ in range(100):  # written behind: durable within milliseconds
        stored = rows(
            url,
            "SELECT payload->>'name' AS name, "
            "ARRAY(SELECT jsonb_object_keys(payload->'resources')) AS resources "
            "FROM events WHERE entity_id = $1 AND event_type = 'submitted'",
            task_id,
        )
        if stored:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert stored and stored[0]["name"] == name
    assert name in stored[0]["resources"]
    ray.cancel(ref)  # no node has that resource


def _sql_parameter(url: str, value: str) -> None:
    try:
        columns, result = asyncio.run(run_readonly(url, "SELECT $1::text AS v", [value]))
    except (ValueError, asyncpg.DataError, asyncpg.PostgresError) as exc:
        assert storable(value) is not None, f"refused a storable parameter: {exc}"
        return
    assert storable(value) is None
    assert columns == ["v"] and result == [(value,)]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(name=hostile)
@example(name=MEGABYTE)
@example(name="a\x00b")
@example(name="caf\udce9")
def test_hostile_names_are_kept_exactly_or_refused(node: str, name: str) -> None:
    _named_actor(node, name)
    _task_and_resource(node, name)
    _sql_parameter(node, name)


def test_refused_at_the_call_before_anything_starts(node: str) -> None:
    for bad in ("a\x00b", "\udcff"):
        with pytest.raises(ValueError, match="namespace"):
            ray.init(namespace=bad)
        with pytest.raises(ValueError, match="resource name"):
            ray.init(resources={bad: 1})
        with pytest.raises(ValueError, match="name"):
            ray.get_actor(bad)
        with pytest.raises(ValueError, match="name"):
            Holder.options(name=bad)


def test_after_all_of_it_the_node_runs_and_the_log_is_whole(node: str) -> None:
    assert ray.get(one.remote(), timeout=60) == 1
    (row,) = rows(node, "SELECT count(*) = max(position) AS whole, count(*) AS n FROM events")
    assert row["whole"], "the log's positions have a gap"
    assert row["n"] > 0
