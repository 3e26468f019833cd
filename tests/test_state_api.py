"""Ray's state API (sdk.util.state, `cairn list/get/summary`) on a real cluster: every
answer agrees with the SQL views of the same job, filters and limits are Ray's, nothing
is cut but by the limit (more than Ray's 100 rows), and the same calls answer from the
GCS URL after the cluster stopped."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from log_rows import rows, wait_for_rows
from processes import run_cairn
from ray_session import private_cluster

import sdk as ray
from controlplane.state_api import TASK_STATES
from sdk.util import state
from sdk.util.placement_group import placement_group

pytestmark = pytest.mark.timeout(300)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = 250


@ray.remote
def tiny(i: int) -> int:
    return i


@ray.remote(max_retries=0)
def boom() -> None:
    raise ValueError("boom from a task")


@ray.remote(max_retries=1, retry_exceptions=True)
def flaky(marker: str) -> str:
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("first attempt fails")
    return "second attempt"


@ray.remote
def blocker() -> None:
    time.sleep(600)


@ray.remote
class Counter_:
    def __init__(self) -> None:
        self.n = 0

    def add(self) -> int:
        self.n += 1
        return self.n


@dataclass
class Job:
    url: str
    job_id: str
    failed: str
    flaky: str
    running: str
    pending: str
    alive: str
    dead: str
    put: str
    pg: str
    keep: list[Any]


@pytest.fixture(scope="module")
def cluster(module_gcs_url: str) -> Iterator[None]:
    yield from private_cluster(num_cpus=2, gcs_url=module_gcs_url)


@pytest.fixture(scope="module")
def job(cluster: None, module_gcs_url: str, tmp_path_factory: pytest.TempPathFactory) -> Job:
    url = module_gcs_url
    assert ray.get([tiny.remote(i) for i in range(TINY)]) == list(range(TINY))
    failed = boom.remote()
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(failed)
    retried = flaky.remote(str(tmp_path_factory.mktemp("flaky") / "marker"))
    assert ray.get(retried) == "second attempt"
    alive, dead = Counter_.remote(), Counter_.options(name="doomed").remote()
    assert ray.get([alive.add.remote(), dead.add.remote()]) == [1, 1]
    ray.kill(dead)
    put = ray.put(b"x" * 300_000)
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready())
    running = blocker.remote()  # the other CPU
    pending = tiny.remote(-1)  # no CPU left for it
    wait_for_rows(
        url, "SELECT 1 FROM tasks WHERE task_id = $1 AND state = 'RUNNING'", running.task_id().hex()
    )
    wait_for_rows(
        url, "SELECT 1 FROM actors WHERE actor_id = $1 AND state = 'DEAD'", dead._actor_id
    )
    wait_for_rows(url, "SELECT 1 FROM tasks WHERE task_id = $1", pending.task_id().hex())
    return Job(
        url=url,
        job_id=ray.get_runtime_context().get_job_id(),
        failed=failed.task_id().hex(),
        flaky=retried.task_id().hex(),
        running=running.task_id().hex(),
        pending=pending.task_id().hex(),
        alive=alive._actor_id,
        dead=dead._actor_id,
        put=put.hex(),
        pg=pg.id.hex(),
        keep=[put, alive, pg, running, pending],
    )


def _ms(value: Any) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def _check_tasks_agree(url: str, address: str | None) -> list[Any]:
    """list_tasks (everything, with detail) against the tasks and task_attempts views:
    one row per task's latest attempt, one per earlier attempt, field by field."""
    listed = state.list_tasks(address=address, limit=100_000, detail=True)
    by_key = {(t.task_id, t.attempt_number): t for t in listed}
    assert len(by_key) == len(listed)
    tasks = rows(url, "SELECT * FROM tasks")
    earlier = rows(
        url,
        "SELECT a.* FROM task_attempts a JOIN tasks t USING (task_id) WHERE a.attempt < t.attempt",
    )
    assert len(listed) == len(tasks) + len(earlier)
    for view in tasks:
        got = by_key[(view["task_id"], view["attempt"])]
        assert got.state == TASK_STATES[view["state"]]
        assert (got.name, got.job_id, got.actor_id) == (
            view["name"],
            view["job_id"],
            view["actor_id"],
        )
        assert (got.node_id, got.worker_id) == (view["node_id"], view["worker_id"])
        assert got.creation_time_ms == _ms(view["submitted_at"])
        assert got.type == ("NORMAL_TASK" if view["actor_id"] is None else got.type)
        if view["state"] == "FAILED":
            message = view["error"].split(": ", 1)[-1]  # (the view's: "kind: message")
            assert got.error_message is not None and message in got.error_message
    for view in earlier:
        got = by_key[(view["task_id"], view["attempt"])]
        assert got.state == ("FINISHED" if view["outcome"] == "FINISHED" else "FAILED")
        assert (got.node_id, got.worker_id) == (view["node_id"], view["worker_id"])
        assert got.start_time_ms == _ms(view["started_at"])
    return listed


def test_tasks_agree_with_the_views_and_none_is_cut(job: Job) -> None:
    listed = _check_tasks_agree(job.url, None)
    assert len(listed) > TINY + 5  # more than Ray's default limit, all of them
    assert len(state.list_tasks()) == 100  # Ray's default limit
    first = state.list_tasks(limit=7)
    assert [t.task_id for t in first] == [t.task_id for t in listed[:7]]
    states = {t.task_id: t.state for t in listed if t.attempt_number == 0}
    assert states[job.running] == "RUNNING"
    assert states[job.pending] in ("PENDING_NODE_ASSIGNMENT", "PENDING_ARGS_AVAIL")


def test_filters_are_rays(job: Job) -> None:
    tasks = rows(job.url, "SELECT task_id, state FROM tasks")
    failed = {r["task_id"] for r in tasks if r["state"] == "FAILED"}
    assert job.failed in failed
    for value in ("FAILED", "failed"):  # string values compare case-insensitively
        got = state.list_tasks(filters=[("state", "=", value)], limit=1000)
        # and the flaky task's first attempt, which failed: a row of its own
        assert {(t.task_id, t.attempt_number) for t in got} == {
            (i, 0) for i in failed | {job.flaky}
        }
    not_finished = state.list_tasks(filters=[("state", "!=", "FINISHED")], limit=1000)
    assert {t.task_id for t in not_finished} >= failed | {job.running, job.pending, job.flaky}
    assert all(t.state != "FINISHED" for t in not_finished)
    both = state.list_tasks(
        filters=[("state", "=", "FINISHED"), ("func_or_class_name", "=", tiny_name())], limit=1000
    )
    assert len(both) == TINY
    dead = state.list_actors(filters=[("state", "=", "DEAD")])
    assert [a.actor_id for a in dead] == [job.dead]
    assert state.list_tasks(filters=[("state", "=", "FINISHED"), ("state", "=", "FAILED")]) == []
    with pytest.raises(ValueError, match="Unsupported filter predicate"):
        state.list_tasks(filters=[("state", ">", "FAILED")])
    with pytest.raises(ValueError, match=r"not supported.*state"):
        state.list_tasks(filters=[("error_message", "=", "x")])
    with pytest.raises(ValueError, match="limit"):
        state.list_tasks(limit=0)


def tiny_name() -> str:
    return f"{__name__}.tiny"


def test_detail_and_get(job: Job) -> None:
    plain = state.list_tasks(filters=[("task_id", "=", job.failed)])[0]
    assert plain.error_type == "TASK_EXECUTION_EXCEPTION"
    assert plain.error_message is None and plain.events is None  # detail columns
    task = state.get_task(job.failed)
    assert task.state == task["state"] == task.get("state") == "FAILED"
    assert "boom from a task" in task.error_message
    assert "Traceback (most recent call last)" in task.error_message  # as Ray's
    assert [e["state"] for e in task.events][-1] == "FAILED"
    assert task.required_resources == {"CPU": 1.0}
    attempts = state.get_task(job.flaky)
    assert [(a.attempt_number, a.state) for a in attempts] == [(0, "FAILED"), (1, "FINISHED")]
    assert state.get_task(job.keep[3]).task_id == job.running  # by an ObjectRef
    assert state.get_task("no-such-task") is None
    dead = state.get_actor(job.dead)
    assert (dead.state, dead.name) == ("DEAD", "doomed")
    assert "kill" in dead.death_cause["actor_died_error_context"]["error_message"]
    assert state.get_actor(job.alive).pid > 0
    node = state.get_node(ray.get_runtime_context().get_node_id())
    assert node.state == "ALIVE" and node.is_head_node and node.resources_total["CPU"] == 2
    group = state.get_placement_group(job.pg)
    assert group.state == "CREATED" and group.bundles[0]["unit_resources"] == {"CPU": 1.0}
    assert state.get_job(job.job_id).status == "RUNNING"
    (put,) = state.get_objects(job.put)
    assert put.object_size >= 300_000 and put.state == "CREATED"
    assert state.get_objects("no-such-object") == []
    worker = state.get_worker(state.get_task(job.running).worker_id)
    assert worker.is_alive and worker.pid == state.get_task(job.running).worker_pid
    logs = state.list_logs(node_id=node.node_id)  # (controlplane/logs.py; tests/test_logs.py)
    assert logs["worker_out"] and all(name.startswith("worker-") for name in logs["worker_out"])


def _check_others_agree(url: str, address: str | None) -> None:
    actors = {r["actor_id"]: r for r in rows(url, "SELECT * FROM actors")}
    listed = state.list_actors(address=address, limit=1000, detail=True)
    assert {a.actor_id for a in listed} == set(actors)
    for a in listed:
        view = actors[a.actor_id]
        assert (a.class_name, a.state, a.job_id, a.node_id) == (
            view["class_name"],
            view["state"],
            view["job_id"],
            view["node_id"],
        )
        assert (a.name, a.num_restarts) == (view["name"] or "", view["num_restarts"])
    objects = {r["object_id"]: r for r in rows(url, "SELECT * FROM objects")}
    listed_objects = state.list_objects(address=address, limit=100_000, detail=True)
    assert {o.object_id for o in listed_objects} == set(objects)
    for o in listed_objects:
        view = objects[o.object_id]
        assert (o.object_size, o.state, o.task_id, o.node_id) == (
            view["size_bytes"],
            view["state"],
            view["task_id"],
            view["node_id"],
        )
        assert o.locations == list(view["locations"])
    nodes = {r["node_id"]: r for r in rows(url, "SELECT * FROM nodes")}
    listed_nodes = state.list_nodes(address=address, detail=True)
    assert {n.node_id for n in listed_nodes} == set(nodes)
    for n in listed_nodes:
        view = nodes[n.node_id]
        assert n.state == ("ALIVE" if view["state"] == "ALIVE" else "DEAD")
        assert n.resources_total == json.loads(view["resources"])
        assert n.start_time_ms == _ms(view["registered_at"])
    jobs = {r["job_id"]: r for r in rows(url, "SELECT * FROM jobs")}
    listed_jobs = state.list_jobs(address=address, detail=True)
    assert {j.job_id: (j.status, j.entrypoint) for j in listed_jobs} == {
        k: (v["state"], v["entrypoint"]) for k, v in jobs.items()
    }
    groups = {r["placement_group_id"]: r for r in rows(url, "SELECT * FROM placement_groups")}
    listed_groups = state.list_placement_groups(address=address, detail=True)
    assert {g.placement_group_id: (g.state, g.creator_job_id) for g in listed_groups} == {
        k: (v["state"], v["job_id"]) for k, v in groups.items()
    }
    workers = rows(
        url,
        "SELECT entity_id, node_id, (payload ->> 'pid')::int AS pid FROM events"
        " WHERE entity_kind = 'worker' AND event_type = 'started'",
    )
    listed_workers = state.list_workers(address=address, limit=1000)
    assert {(w.worker_id, w.node_id, w.pid) for w in listed_workers} == {
        (r["entity_id"], r["node_id"], r["pid"]) for r in workers
    }


def test_actors_objects_nodes_jobs_groups_and_workers_agree_with_the_views(job: Job) -> None:
    _check_others_agree(job.url, None)
    assert state.list_objects(filters=[("object_id", "=", job.put)])[0].state == "CREATED"


def _check_summaries_agree(url: str, address: str | None) -> None:
    tasks = state.summarize_tasks(address=address)["cluster"]
    expected: Counter[tuple[str, str]] = Counter()
    for r in rows(url, "SELECT name, state FROM tasks"):
        expected[(r["name"], TASK_STATES[r["state"]])] += 1
    for r in rows(
        url,
        "SELECT t.name, a.outcome FROM task_attempts a JOIN tasks t USING (task_id)"
        " WHERE a.attempt < t.attempt",
    ):
        expected[(r["name"], "FINISHED" if r["outcome"] == "FINISHED" else "FAILED")] += 1
    got = Counter(
        {(name, s): n for name, e in tasks["summary"].items() for s, n in e["state_counts"].items()}
    )
    assert got == expected
    assert tasks["summary"][tiny_name()]["state_counts"]["FINISHED"] >= TINY
    assert tasks["total_actor_scheduled"] == rows(url, "SELECT count(*) FROM actors")[0][0]
    actors = state.summarize_actors(address=address)["cluster"]
    expected_actors = Counter(
        {
            (r["class_name"], r["state"]): r["n"]
            for r in rows(url, "SELECT class_name, state, count(*) AS n FROM actors GROUP BY 1, 2")
        }
    )
    assert (
        Counter(
            {(c, s): n for c, e in actors["summary"].items() for s, n in e["state_counts"].items()}
        )
        == expected_actors
    )
    objects = state.summarize_objects(address=address)["cluster"]
    count, size = rows(url, "SELECT count(*), sum(size_bytes) FROM objects")[0]
    assert objects["total_objects"] == count
    assert objects["total_size_mb"] == pytest.approx(size / 1024**2)


def test_summaries_agree_with_the_views(job: Job) -> None:
    _check_summaries_agree(job.url, None)


def test_the_cli_lists_filters_gets_and_summarizes(job: Job) -> None:
    out = run_cairn(
        "list", "tasks", "--filter", "state=FAILED", "--format", "json", "--gcs-url", job.url
    )
    failed = {t["task_id"] for t in json.loads(out.stdout)}
    assert {job.failed, job.flaky} <= failed
    table = run_cairn("list", "actors", "--filter", "state!=DEAD", "--gcs-url", job.url).stdout
    assert job.alive in table and job.dead not in table and "CLASS_NAME" in table
    got = json.loads(run_cairn("get", "actors", job.dead, "--gcs-url", job.url).stdout)
    assert got[0]["state"] == "DEAD" and got[0]["name"] == "doomed"
    summary = run_cairn("summary", "tasks", "--gcs-url", job.url).stdout
    assert tiny_name() in summary and f"'FINISHED': {TINY}" in summary.replace('"', "'")
    bad = run_cairn("list", "tasks", "--filter", "nosuch=1", "--gcs-url", job.url, check=False)
    assert bad.returncode == 2 and "not supported" in bad.stderr
    missing = run_cairn("get", "tasks", "no-such-task", "--gcs-url", job.url, check=False)
    assert missing.returncode == 1 and "no task 'no-such-task'" in missing.stderr


def test_the_same_calls_answer_from_the_log_after_the_cluster_stopped(job: Job) -> None:
    before = {(t.task_id, t.attempt_number) for t in state.list_tasks(limit=100_000)}
    job.keep.clear()
    ray.shutdown()
    after = _check_tasks_agree(job.url, job.url)
    assert {(t.task_id, t.attempt_number) for t in after} == before
    _check_others_agree(job.url, job.url)
    _check_summaries_agree(job.url, job.url)
    assert state.get_job(job.job_id, address=job.url).status == "SUCCEEDED"
    assert state.get_task(job.failed, address=job.url).error_type == "TASK_EXECUTION_EXCEPTION"
    assert not any(w.is_alive for w in state.list_workers(address=job.url, limit=1000))
    assert [n.state for n in state.list_nodes(address=job.url)] == ["DEAD"]
