"""Node labels and label-based scheduling, as Ray's "Use labels to control scheduling"
describes them, on a real three-node cluster on this machine: a head without custom
labels and two nodes started with ``cairn start --labels`` (one as JSON, one in Ray's
key=value form). Tasks and actors with a ``label_selector`` or a
``NodeLabelSchedulingStrategy`` run only on nodes whose labels match (soft matches
preferred); one no node matches waits, reported infeasible, never placed; the labels
are in ``nodes()``, ``get_node_labels()`` and the log."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from log_rows import rows, wait_for_rows
from machine_cluster import machine_cluster
from processes import run_cairn

import sdk as ray
from sdk.util.scheduling_strategies import (
    DoesNotExist,
    Exists,
    In,
    NodeAffinitySchedulingStrategy,
    NodeLabelSchedulingStrategy,
    NotIn,
)

pytestmark = pytest.mark.timeout(300)
cloudpickle.register_pickle_by_value(sys.modules[__name__])
ROOT = Path(__file__).resolve().parent.parent
A_LABELS = {"zone": "us-a", "gpu": "a100"}
B_LABELS = {"zone": "us-b", "gpu": "h100"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    with machine_cluster(
        ["--num-cpus", "1"],
        ["--num-cpus", "2", "--labels", json.dumps(A_LABELS)],
        ["--num-cpus", "2", "--labels", "zone=us-b,gpu=h100"],
    ):
        ray.init(address="auto")
        try:
            nodes = {"url": ray.get_runtime_context().gcs_address}
            for node in ray.nodes():
                labels = node["Labels"]
                name = {"us-a": "a", "us-b": "b"}.get(labels.get("zone", ""), "head")
                nodes[name] = node["NodeID"]
            assert set(nodes) == {"url", "head", "a", "b"}
            yield nodes
        finally:
            ray.shutdown()


@ray.remote(num_cpus=1)
def node_of() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1)
def labels_here() -> tuple[str, dict[str, str]]:
    context = ray.get_runtime_context()
    return context.get_node_id(), context.get_node_labels()


@ray.remote(num_cpus=0)
class Where:
    def node(self) -> tuple[str, dict[str, str]]:
        context = ray.get_runtime_context()
        return context.get_node_id(), context.get_node_labels()


def _nodes_of(remote_function: object, count: int = 6, **options: object) -> set[str]:
    refs = [remote_function.options(**options).remote() for _ in range(count)]  # type: ignore[attr-defined]
    return set(ray.get(refs, timeout=120))


def test_every_node_has_its_labels_and_its_id_as_a_label(cluster: dict[str, str]) -> None:
    by_id = {node["NodeID"]: node["Labels"] for node in ray.nodes()}
    assert by_id[cluster["a"]] == {"ray.io/node-id": cluster["a"], **A_LABELS}
    assert by_id[cluster["b"]] == {"ray.io/node-id": cluster["b"], **B_LABELS}
    assert by_id[cluster["head"]] == {"ray.io/node-id": cluster["head"]}
    assert ray.get_runtime_context().get_node_labels() == by_id[cluster["head"]]
    node, labels = ray.get(labels_here.options(label_selector={"zone": "us-a"}).remote())
    assert node == cluster["a"] and labels == by_id[cluster["a"]]


def test_a_hard_selector_places_tasks_only_on_matching_nodes(cluster: dict[str, str]) -> None:
    assert _nodes_of(node_of, label_selector={"zone": "us-a"}) == {cluster["a"]}
    assert _nodes_of(node_of, label_selector={"gpu": "h100", "zone": "us-b"}) == {cluster["b"]}
    assert cluster["a"] not in _nodes_of(node_of, label_selector={"zone": "!us-a"})
    assert _nodes_of(node_of, 8, label_selector={"gpu": "in(a100, h100)"}) <= {
        cluster["a"],
        cluster["b"],
    }
    # the head has no gpu label: "!in" matches it, and only it
    assert _nodes_of(node_of, label_selector={"gpu": "!in(a100,h100)"}) == {cluster["head"]}
    # by the default label, as Ray recommends instead of a hard node affinity
    assert _nodes_of(node_of, label_selector={"ray.io/node-id": cluster["b"]}) == {cluster["b"]}
    decorated = ray.remote(num_cpus=1, label_selector={"zone": "us-b"})(node_of._function)
    assert ray.get(decorated.remote(), timeout=60) == cluster["b"]


def test_node_label_scheduling_strategy(cluster: dict[str, str]) -> None:
    def strategy(**parts: object) -> dict[str, object]:
        return {"scheduling_strategy": NodeLabelSchedulingStrategy(**parts)}  # type: ignore[arg-type]

    assert _nodes_of(node_of, **strategy(hard={"zone": In("us-a")})) == {cluster["a"]}
    assert _nodes_of(node_of, **strategy(hard={"gpu": DoesNotExist()})) == {cluster["head"]}
    assert _nodes_of(node_of, 8, **strategy(hard={"gpu": Exists()})) <= {cluster["a"], cluster["b"]}
    assert cluster["b"] not in _nodes_of(node_of, **strategy(hard={"zone": NotIn("us-b")}))
    # soft: the matching node is preferred (hard labels still bind)
    soft_b = strategy(hard={"gpu": Exists()}, soft={"zone": In("us-b")})
    assert _nodes_of(node_of, **soft_b) == {cluster["b"]}
    assert _nodes_of(node_of, **strategy(hard={}, soft={"gpu": In("a100")})) == {cluster["a"]}
    # a preference no node has: the hard labels decide
    fallback = strategy(hard={"zone": In("us-a")}, soft={"zone": In("mars")})
    assert _nodes_of(node_of, **fallback) == {cluster["a"]}


def test_actors_live_on_a_node_with_their_labels(cluster: dict[str, str]) -> None:
    on_b = Where.options(label_selector={"zone": "us-b"}).remote()
    node, labels = ray.get(on_b.node.remote(), timeout=60)
    assert node == cluster["b"] and labels["gpu"] == "h100"
    prefers_a = Where.options(
        scheduling_strategy=NodeLabelSchedulingStrategy(hard={}, soft={"gpu": In("a100")})
    ).remote()
    assert ray.get(prefers_a.node.remote(), timeout=60)[0] == cluster["a"]
    on_head = Where.options(label_selector={"zone": "!in(us-a,us-b)"}).remote()
    assert ray.get(on_head.node.remote(), timeout=60)[0] == cluster["head"]


def test_a_selector_no_node_matches_is_infeasible_and_never_placed(
    cluster: dict[str, str],
) -> None:
    ref = node_of.options(label_selector={"zone": "mars"}).remote()
    ready, waiting = ray.wait([ref], timeout=3)
    assert ready == [] and waiting == [ref]
    task_id = ref.task_id().hex()
    url = cluster["url"]
    found = wait_for_rows(
        url,
        "SELECT payload FROM events WHERE entity_id = $1 AND event_type = 'infeasible'",
        task_id,
    )
    assert "label_selector" in found[0]["payload"] and "mars" in found[0]["payload"]
    placed = "SELECT 1 FROM events WHERE entity_id = $1 AND event_type IN ('placed', 'running')"
    assert rows(url, placed, task_id) == []
    ray.cancel(ref)
    actor = Where.options(label_selector={"zone": "mars"}).remote()
    ready, _ = ray.wait([actor.node.remote()], timeout=3)
    assert ready == []
    ray.kill(actor)


def test_labels_and_selectors_are_in_the_log(cluster: dict[str, str]) -> None:
    url = cluster["url"]
    registered = rows(
        url,
        "SELECT entity_id, payload->'labels' AS labels FROM events "
        "WHERE entity_kind = 'node' AND event_type = 'registered'",
    )
    logged = {row["entity_id"]: row["labels"] for row in registered}
    assert json.loads(logged[cluster["a"]]) == {"ray.io/node-id": cluster["a"], **A_LABELS}
    assert json.loads(logged[cluster["head"]]) == {"ray.io/node-id": cluster["head"]}
    ref = node_of.options(label_selector={"zone": "in(us-a,us-b)"}, _labels={"team": "x"}).remote()
    ray.get(ref, timeout=60)
    submitted = wait_for_rows(
        url,
        "SELECT payload->'label_selector' AS selector, payload->'labels' AS labels FROM events "
        "WHERE entity_id = $1 AND event_type = 'submitted'",
        ref.task_id().hex(),
    )
    assert json.loads(submitted[0]["selector"]) == {"hard": {"zone": ["in", ["us-a", "us-b"]]}}
    assert json.loads(submitted[0]["labels"]) == {"team": "x"}


def test_bad_labels_and_selectors_are_refused_by_name(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    for selector, said in (
        ({"zone": "in(a,"}, "not a selector"),
        ({"zone": "in()"}, "empty value in in()"),
        ({"-zone": "a"}, "invalid label key '-zone'"),
        ({"zone": 1}, "must be strings"),
    ):
        with pytest.raises(ValueError, match="label_selector") as raised:
            node_of.options(label_selector=selector)
        assert said in str(raised.value)
    for strategy in (
        NodeLabelSchedulingStrategy({"a": In("b")}),
        NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ):
        combined = node_of.options(label_selector={"a": "b"}, scheduling_strategy=strategy)
        with pytest.raises(ValueError, match="label_selector cannot be combined"):
            combined.remote()
    with pytest.raises(ValueError, match="must be str"):
        In("a", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot both be empty"):
        NodeLabelSchedulingStrategy(hard={})
    for given, said in (
        ('{"zone": 1}', "must be a string"),
        ("zone", "is not key=value"),
        ('{"ray.io/node-id": "x"}', "set by Cairn"),
    ):
        failed = run_cairn("start", "--head", "--labels", given, check=False, tmp=tmp_path)
        assert failed.returncode != 0 and said in failed.stderr, failed.stderr


def test_a_private_cluster_has_the_labels_init_gives(tmp_path: Path) -> None:
    """Ray's local example: init(labels=...), a matching task runs, another waits."""
    script = textwrap.dedent(
        """
        import sdk as ray
        ray.init(num_cpus=1, labels={"env": "dev", "hardware": "mock_gpu"})
        @ray.remote
        def get_labels():
            return ray.get_runtime_context().get_node_labels()
        @ray.remote(label_selector={"hardware": "mock_gpu"})
        def matching():
            return "ran"
        @ray.remote(label_selector={"hardware": "real_h100"})
        def non_matching():
            return "should not run"
        labels = ray.get(get_labels.remote())
        assert labels["hardware"] == "mock_gpu" and labels["env"] == "dev", labels
        assert labels["ray.io/node-id"] == ray.get_runtime_context().get_node_id()
        assert ray.get(matching.remote()) == "ran"
        ready, waiting = ray.wait([non_matching.remote()], timeout=3)
        assert not ready and waiting
        ray.shutdown()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
    assert "cannot be scheduled now" in done.stderr and "real_h100" in done.stderr
