"""Ray's DAG API (issue 18), as its documentation shows it: ``bind`` on remote
functions, actor classes and actor methods, ``InputNode`` (whole, by index, by key),
``MultiOutputNode``, ``execute``, ``experimental_compile``; the tasks of one execution
carry its DAG id in the log. Real node daemon, workers and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from log_rows import wait_for_rows
from ray_session import private_cluster

import sdk as ray
from sdk.dag import InputNode, MultiOutputNode

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=2)


@ray.remote
def inc(x: int) -> int:
    return x + 1


@ray.remote
def mul(x: int, y: int) -> int:
    return x * y


@ray.remote
class Counter:
    def __init__(self, start: int) -> None:
        self.total = start

    def add(self, k: int) -> int:
        self.total += k
        return self.total


def test_a_function_dag_runs_each_node_once_per_execute() -> None:
    with InputNode() as inp:
        shared = inc.bind(inp)
        dag = mul.bind(shared, shared)
    ref = dag.execute(2)
    assert ray.get(ref) == 9
    assert len(_tasks_of(_dag_id(ref), 2)) == 2  # one task for the shared node
    assert ray.get(dag.execute(4)) == 25  # a graph runs again with new input


def test_input_by_index_and_by_key() -> None:
    with InputNode() as inp:
        dag = mul.bind(inp[0], inp.y)
    assert ray.get(dag.execute(3, y=4)) == 12
    with pytest.raises(ValueError, match="execute"):
        dag.execute(3)


def test_actors_and_their_methods_in_a_dag() -> None:
    with InputNode() as inp:
        counter = Counter.bind(10)
        dag = MultiOutputNode([counter.add.bind(inp), counter.add.bind(inp)])
    assert ray.get(dag.execute(1)) == [11, 12]  # one actor, its calls in order
    live = Counter.remote(0)
    with InputNode() as inp:
        on_handle = live.add.bind(inc.bind(inp))
    assert ray.get(on_handle.execute(4)) == 5
    assert ray.get(on_handle.execute(4)) == 10  # the live actor's state goes on


def test_a_compiled_dag_gives_the_same_results() -> None:
    with InputNode() as inp:
        dag = mul.bind(inc.bind(inp), inp)
    compiled = dag.experimental_compile()
    assert [ray.get(compiled.execute(i)) for i in range(3)] == [
        ray.get(dag.execute(i)) for i in range(3)
    ]
    compiled.teardown()


def test_the_tasks_of_one_execution_share_its_dag_id_in_the_log() -> None:
    with InputNode() as inp:
        first = inc.bind(inp)
        dag = mul.bind(first, inc.bind(first))
    ref = dag.execute(1)
    assert ray.get(ref) == 6
    other = dag.execute(2)
    ray.get(other)
    dag_id = _dag_id(ref)
    assert dag_id and len(_tasks_of(dag_id, 3)) == 3
    assert _dag_id(other) != dag_id


def _dag_id(ref: ray.ObjectRef) -> str:
    """The DAG id in the submitted event of the task that makes ``ref``."""
    (row,) = wait_for_rows(
        ray.get_runtime_context().gcs_address,
        "SELECT payload->>'dag_id' AS dag_id FROM events "
        "WHERE entity_id = $1 AND event_type = 'submitted'",
        ref.task_id().hex(),
    )
    return str(row["dag_id"])


def _tasks_of(dag_id: str, at_least: int) -> list[str]:
    """The tasks submitted with ``dag_id``, once there are ``at_least``."""
    rows = wait_for_rows(
        ray.get_runtime_context().gcs_address,
        "SELECT entity_id FROM events WHERE event_type = 'submitted' AND payload->>'dag_id' = $1",
        dag_id,
        count=at_least,
    )
    return [row["entity_id"] for row in rows]
