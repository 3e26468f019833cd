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


@ray.remote
class Tally:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def note(self, what: str) -> list[str]:
        self.seen.append(what)
        return list(self.seen)


def test_nodes_show_their_arguments_and_options_and_refuse_misuse_as_ray() -> None:
    gpu = ray.remote(num_gpus=1)(lambda: None)
    node = mul.options(name="m").bind(1, y=2)
    assert (node.get_args(), node.get_kwargs()) == ((1,), {"y": 2})
    assert node.get_options() == {"name": "m"}
    assert gpu.bind().get_options() == {"num_gpus": 1, "max_calls": 1}  # (Ray's default shown)
    assert gpu.options(num_cpus=2).bind().get_options() == {"num_gpus": 1, "num_cpus": 2}
    with pytest.raises(AttributeError, match=r"\.remote\(\) cannot be used on FunctionNodes"):
        node.remote()
    actor = Tally.options(name="t").bind()
    assert actor.get_options() == {"name": "t"}
    with pytest.raises(AttributeError, match=r"\.bind\(\) cannot be used again"):
        actor.bind()
    with pytest.raises(AttributeError, match="'Tally' has no attribute 'remote'"):
        actor.remote()
    with pytest.raises(AttributeError, match=r"cannot be used on ClassMethodNodes"):
        actor.note.remote("x")
    with pytest.raises(ValueError, match="quantity of resource num_cpus cannot be negative"):
        mul.options(num_cpus=-1)
    with pytest.raises(TypeError, match="The type of keyword 'num_cpus'"):
        mul.options(num_cpus="2")


def test_calls_bound_on_one_actor_run_in_the_order_bound() -> None:
    """As Ray's: each call depends on the one bound before it on its actor, so all run,
    in order, even when the output reads only the last."""
    from sdk.dag import PARENT_CLASS_NODE_KEY, PREV_CLASS_METHOD_CALL_KEY

    actor = Tally.bind()
    first = actor.note.options(name="first").bind("a")
    actor.note.bind("b")
    last = actor.note.bind("c")
    assert ray.get(last.execute(), timeout=60) == ["a", "b", "c"]
    earlier = last.get_other_args_to_resolve()[PREV_CLASS_METHOD_CALL_KEY]
    assert earlier.get_other_args_to_resolve()[PREV_CLASS_METHOD_CALL_KEY] is first
    assert last.get_other_args_to_resolve()[PARENT_CLASS_NODE_KEY] is actor
    assert first.get_options() == {"name": "first"}
