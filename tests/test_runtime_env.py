"""``runtime_env`` as far as Cairn honours it (issue 18): ``env_vars`` of the job
(``init``), of a task or an actor, merged as Ray merges them (the child's fields over
the parent's, ``env_vars`` key by key), inherited by nested tasks, in the log with each
task; every other field refused by name, not ignored. Real node daemon, workers and
PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from log_rows import wait_for_rows
from ray_session import private_cluster

import sdk as ray

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(
        num_cpus=1, runtime_env={"env_vars": {"CAIRN_T_JOB": "job", "CAIRN_T_A": "a"}}
    )


@ray.remote
def env(*names: str) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


@ray.remote
def nested() -> dict[str, str | None]:
    return ray.get(env.remote("CAIRN_T_JOB", "CAIRN_T_A", "CAIRN_T_TASK"))


@ray.remote
class Holder:
    def env(self, name: str) -> str | None:
        return os.environ.get(name)

    def runtime_env(self) -> dict:
        return ray.get_runtime_context().runtime_env


def test_the_jobs_env_vars_reach_its_tasks_and_a_tasks_own_override_them() -> None:
    assert ray.get(env.remote("CAIRN_T_JOB", "CAIRN_T_A")) == {
        "CAIRN_T_JOB": "job",
        "CAIRN_T_A": "a",
    }
    own = env.options(runtime_env={"env_vars": {"CAIRN_T_A": "task", "CAIRN_T_TASK": "t"}})
    ref = own.remote("CAIRN_T_JOB", "CAIRN_T_A", "CAIRN_T_TASK")
    assert ray.get(ref) == {"CAIRN_T_JOB": "job", "CAIRN_T_A": "task", "CAIRN_T_TASK": "t"}
    # the same worker, the next task: back to the job's
    assert ray.get(env.remote("CAIRN_T_A", "CAIRN_T_TASK")) == {
        "CAIRN_T_A": "a",
        "CAIRN_T_TASK": None,
    }
    row = wait_for_rows(
        ray.get_runtime_context().gcs_address,
        "SELECT payload->'runtime_env'->'env_vars'->>'CAIRN_T_A' AS a FROM events "
        "WHERE entity_id = $1 AND event_type = 'submitted'",
        ref.task_id(),
    )
    assert row[0]["a"] == "task"  # the environment of each task is in the log


def test_nested_tasks_inherit_their_parents_env_vars() -> None:
    parent = nested.options(runtime_env={"env_vars": {"CAIRN_T_TASK": "parent"}})
    assert ray.get(parent.remote()) == {
        "CAIRN_T_JOB": "job",
        "CAIRN_T_A": "a",
        "CAIRN_T_TASK": "parent",
    }


def test_an_actors_env_vars_hold_for_its_life() -> None:
    holder = Holder.options(runtime_env={"env_vars": {"CAIRN_T_ACTOR": "yes"}}).remote()
    assert ray.get(holder.env.remote("CAIRN_T_ACTOR")) == "yes"
    assert ray.get(holder.env.remote("CAIRN_T_JOB")) == "job"
    assert ray.get(holder.runtime_env.remote())["env_vars"]["CAIRN_T_ACTOR"] == "yes"


def test_what_cairn_does_not_honour_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'pip' is not supported by Cairn yet"):
        env.options(runtime_env={"pip": ["requests"]})
    with pytest.raises(ValueError, match="unknown runtime_env field 'colour'"):
        env.options(runtime_env={"colour": "blue"})
    with pytest.raises(ValueError, match="env_vars"):
        env.options(runtime_env={"env_vars": {"A": 1}})
    with pytest.raises(ValueError, match="working_dir"):
        Holder.options(runtime_env={"working_dir": "."})
