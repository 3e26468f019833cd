"""Metrics (issue 19, point 5): ``sdk.util.metrics`` recorded in tasks on two nodes, an
actor and the driver, and the runtime's own metrics, served by the head's ``/metrics``
(and ``cairn metrics``) in Prometheus' text format, read back with prometheus_client's
parser; and Ray's validation errors."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator

import cloudpickle
import numpy as np
import pytest
from machine_cluster import machine_cluster, node_id
from processes import dashboard_address, run_cairn
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import sdk as ray
from controlplane.node.metrics import NodeMetrics
from controlplane.readonly_sql import run_readonly
from controlplane.web.metrics import render
from dataplane.user_metrics import MetricsBuffer
from sdk.util.metrics import Counter, Gauge, Histogram
from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(240)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

Samples = list[Sample]


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    head = ["--num-cpus", "1", "--dashboard-port", "0"]
    with machine_cluster(head, ["--num-cpus", "1"]) as started:
        ray.init(address="auto")
        try:
            yield {
                "head": node_id(started.head),
                "node": node_id(started.joined[0]),
                "dashboard": dashboard_address(started.head.session_dir),
            }
        finally:
            ray.shutdown()


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the one sample named ``name`` with these labels (among others)."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"several samples {name} {labels}: {found}"
    return found[0] if found else None


def scrape_until(address: str, ready: Callable[[Samples], bool], timeout: float = 60) -> Samples:
    """Scrapes until ``ready`` (processes report about once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(address)
        if ready(samples):
            return samples
        assert time.monotonic() < deadline, "the metrics did not arrive:\n" + "\n".join(
            f"{s.name} {s.labels} {s.value}" for s in samples if s.name.startswith("ray_")
        )
        time.sleep(0.5)


def on(node: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node, soft=False)


@ray.remote(num_cpus=0.1)
def record(kind: str, latencies: list[float]) -> str:
    done = Counter("jobs_done", "Jobs done.", tag_keys=("kind",))
    done.inc(2, tags={"kind": kind})
    done.inc(tags={"kind": kind})
    latency = Histogram("latency_s", "Latency.", boundaries=[0.1, 1.0], tag_keys=("kind",))
    latency.set_default_tags({"kind": kind})
    for seconds in latencies:
        latency.observe(seconds)
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0.1)
class Queue:
    def __init__(self) -> None:
        self.depth = Gauge("queue_depth", "Items queued.", tag_keys=("queue",))

    def put(self, depth: int) -> str:
        self.depth.set(depth, tags={"queue": "q1"})
        return ray.get_runtime_context().get_node_id()


def test_user_metrics_reach_the_heads_metrics_from_every_node(cluster: dict[str, str]) -> None:
    head, node = cluster["head"], cluster["node"]
    ran = ray.get(
        [
            record.options(scheduling_strategy=on(head)).remote("a", [0.05, 0.5]),
            record.options(scheduling_strategy=on(node)).remote("a", [5.0]),
            record.options(scheduling_strategy=on(node)).remote("b", [0.1]),
        ]
    )
    assert ran == [head, node, node]
    queue = Queue.options(scheduling_strategy=on(node)).remote()
    assert ray.get(queue.put.remote(3)) == node
    assert ray.get(queue.put.remote(7)) == node
    Counter("driver_calls", tag_keys=("who",)).set_default_tags({"who": "driver"}).inc(5)

    def arrived(samples: Samples) -> bool:
        return (
            value(samples, "ray_jobs_done_total", node_id=node, kind="b") == 3
            and value(samples, "ray_jobs_done_total", node_id=node, kind="a") == 3
            and value(samples, "ray_jobs_done_total", node_id=head, kind="a") == 3
            and value(samples, "ray_queue_depth", node_id=node, queue="q1") == 7
            and value(samples, "ray_driver_calls_total", node_id=head, who="driver") == 5
        )

    samples = scrape_until(cluster["dashboard"], arrived)
    # a histogram's buckets are cumulative, with its count and sum, per node and tags
    on_head = {"node_id": head, "kind": "a"}
    assert value(samples, "ray_latency_s_bucket", le="0.1", **on_head) == 1
    assert value(samples, "ray_latency_s_bucket", le="1.0", **on_head) == 2
    assert value(samples, "ray_latency_s_bucket", le="+Inf", **on_head) == 2
    assert value(samples, "ray_latency_s_count", **on_head) == 2
    assert value(samples, "ray_latency_s_sum", **on_head) == pytest.approx(0.55)
    on_node = {"node_id": node, "kind": "a"}
    assert value(samples, "ray_latency_s_bucket", le="1.0", **on_node) == 0
    assert value(samples, "ray_latency_s_bucket", le="+Inf", **on_node) == 1
    assert value(samples, "ray_latency_s_sum", **on_node) == 5.0
    # an observation on a boundary counts in that bucket (Prometheus' "le")
    assert value(samples, "ray_latency_s_bucket", le="0.1", node_id=node, kind="b") == 1
    # every series names its node, with Ray's NodeAddress
    for sample in samples:
        if sample.name.startswith("ray_"):
            assert sample.labels["NodeAddress"] == "127.0.0.1"
    ray.kill(queue)


@ray.remote(num_cpus=0.1)
def square(i: int) -> int:
    return i * i


def test_runtime_metrics_of_every_node(cluster: dict[str, str]) -> None:
    head, node = cluster["head"], cluster["node"]
    before = scrape(cluster["dashboard"])
    finished_before = value(before, "cairn_tasks_ended_total", node_id=node, state="FINISHED")
    assert ray.get([square.options(scheduling_strategy=on(node)).remote(i) for i in range(5)]) == [
        i * i for i in range(5)
    ]
    big = ray.put(np.ones(1 << 20, dtype=np.uint8))  # in the driver's node's store
    samples = scrape(cluster["dashboard"])
    for each in (head, node):
        assert value(samples, "cairn_node_up", node_id=each) == 1
        assert (value(samples, "cairn_node_mem_used_bytes", node_id=each) or 0) > 0
        assert (value(samples, "cairn_node_mem_total_bytes", node_id=each) or 0) > 0
        assert value(samples, "cairn_node_cpu_count", node_id=each) == os.cpu_count()
        utilization = value(samples, "cairn_node_cpu_utilization", node_id=each)
        assert utilization is not None and 0 <= utilization <= 1
        lag = value(samples, "cairn_tailer_lag_events", node_id=each, tailer="node_log_follower")
        assert lag is not None and lag >= 0
        assert (value(samples, "cairn_events_appended_total", node_id=each) or 0) > 0
        assert (value(samples, "cairn_workers", node_id=each) or 0) >= 1
        assert value(samples, "cairn_spilled_bytes", node_id=each) == 0
        for state in ("RUNNING", "QUEUED", "WAITING_FOR_DEPENDENCIES"):
            assert value(samples, "cairn_tasks", node_id=each, state=state) is not None
    stored = {
        s.labels["tailer"]
        for s in samples
        if s.name == "cairn_tailer_lag_events" and "node_id" not in s.labels
    }
    positions = (
        "SELECT 'projection:' || name FROM subscriptions"
        " UNION ALL SELECT 'checkpoint:' || name FROM checkpoints"
    )
    assert stored == {
        row[0]
        for row in asyncio.run(run_readonly(ray.get_runtime_context().gcs_address, positions))[1]
    }
    finished = value(samples, "cairn_tasks_ended_total", node_id=node, state="FINISHED")
    assert finished is not None and finished >= (finished_before or 0) + 5
    assert (value(samples, "cairn_objects", node_id=head) or 0) >= 1
    assert (value(samples, "cairn_object_store_used_bytes", node_id=head) or 0) >= 1 << 20
    del big


def test_cairn_metrics_prints_the_same_exposition(cluster: dict[str, str]) -> None:
    printed = run_cairn("metrics").stdout
    samples = [s for f in text_string_to_metric_families(printed) for s in f.samples]
    for each in (cluster["head"], cluster["node"]):
        assert value(samples, "cairn_node_up", node_id=each) == 1
    assert value(samples, "cairn_workers", node_id=cluster["node"]) is not None


def test_rays_validation_errors() -> None:
    with pytest.raises(ValueError, match="Empty name is not allowed"):
        Counter("")
    with pytest.warns(UserWarning, match="Invalid metric name: 1bad"):
        discarded = Counter("1bad")
    discarded.inc()  # dropped, as Ray drops it
    with pytest.raises(TypeError, match="tag_keys should be a tuple type"):
        Gauge("g", tag_keys=["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Tag keys must be str"):
        Gauge("g", tag_keys=(1,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid tag key 'a-b'"):
        Gauge("g", tag_keys=("a-b",))
    with pytest.raises(ValueError, match="'node_id' is reserved"):
        Gauge("g", tag_keys=("node_id",))
    counter = Counter("c", tag_keys=("a",))
    with pytest.raises(ValueError, match="Unrecognized tag key b"):
        counter.set_default_tags({"b": "x"})
    with pytest.raises(TypeError, match="Tag values must be str"):
        counter.set_default_tags({"a": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"Missing value for tag key\(s\): a"):
        counter.inc()
    with pytest.raises(ValueError, match="Unrecognized tag key"):
        counter.inc(tags={"a": "x", "b": "y"})
    with pytest.raises(TypeError, match="Tag values must be str"):
        counter.inc(tags={"a": 2})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="value must be >0"):
        counter.inc(0, tags={"a": "x"})
    with pytest.raises(TypeError, match="value must be int or float"):
        counter.inc("1", tags={"a": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="boundaries argument should be provided"):
        Histogram("h")
    with pytest.raises(ValueError, match="Use positive values"):
        Histogram("h", boundaries=[1.0, -2.0])
    with pytest.raises(ValueError, match="must be increasing"):
        Histogram("h", boundaries=[2.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Gauge("g").set(None)  # as Ray: nothing
    assert Histogram("h", boundaries=[1.0]).info["boundaries"] == [1.0]


def test_a_node_totals_its_processes_reports() -> None:
    """NodeMetrics without a daemon: reports of two processes summed per metric and
    tags, a gauge's last value kept, a metric redefined with another type left out."""
    buffer = MetricsBuffer()
    buffer.record("counter", "done", "", {"k": "a"}, 2.0)
    buffer.record("counter", "done", "", {"k": "a"}, 1.0)
    buffer.record("gauge", "depth", "", {}, 4.0)
    buffer.record("histogram", "lat", "", {}, 0.5, (1.0,))
    first = buffer.take()
    assert not buffer
    buffer.record("counter", "done", "", {"k": "a"}, 4.0)
    buffer.record("gauge", "depth", "", {}, 1.0)
    buffer.record("histogram", "lat", "", {}, 2.0, (1.0,))
    buffer.record("gauge", "done", "", {"k": "a"}, 9.0)  # another type: left out
    buffer.record("histogram", "lat", "", {}, 5.0, (1.0, 10.0))  # other boundaries: too
    metrics = NodeMetrics()
    metrics.received(first)
    metrics.received(buffer.take())
    totals = {m["name"]: (m["kind"], m["series"]) for m in metrics.user()}
    assert totals["done"] == (
        "counter",
        [{"tags": {"k": "a"}, "value": 7.0, "buckets": [], "count": 0}],
    )
    assert totals["depth"][1][0]["value"] == 1.0
    assert totals["lat"] == (
        "histogram",
        [{"tags": {}, "value": 2.5, "buckets": [1, 1], "count": 2}],
    )


def test_the_lag_of_each_reader_that_keeps_its_place_in_the_log() -> None:
    exposition = render([], 1000, {"projection:tasks": 990, "checkpoint:global_scheduler": 400})
    samples = [s for f in text_string_to_metric_families(exposition.decode()) for s in f.samples]
    assert value(samples, "cairn_tailer_lag_events", tailer="projection:tasks") == 10
    assert value(samples, "cairn_tailer_lag_events", tailer="checkpoint:global_scheduler") == 600
