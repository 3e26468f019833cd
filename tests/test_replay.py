"""`cairn replay`: a recorded job re-run from the log alone. A deterministic job (puts,
dependent tasks, nested tasks, an actor, a retried task) gives every task its recorded
output; a task using unseeded randomness is named as the first divergence; the replay
is a job of its own, linked to the original; unknown ids are refused with exit code 2."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from log_rows import rows
from processes import run_cairn
from workloads import Counter, add, flaky, square

import sdk as ray
from controlplane.eventlog.servers import shard_of
from controlplane.gcs import Gcs
from controlplane.replay import ReplayReport, replay
from sdk import runtime

pytestmark = pytest.mark.timeout(180)


@ray.remote
def fan_out(n: int) -> list[int]:
    """Submits tasks of its own: the replay re-runs them through this one."""
    return ray.get([square.remote(k) for k in range(n)])


@ray.remote
def noisy(x: int) -> float:
    return x + random.random()  # unseeded: another value on every run


@pytest.fixture
def driver(gcs_url: str) -> Iterator[str]:
    """A private cluster on the test's database; yields the node's socket."""
    ray.init(num_cpus=2, gcs_url=gcs_url)
    try:
        assert runtime._runtime is not None and runtime._runtime.head is not None
        yield runtime._runtime.head.socket_path
    finally:
        ray.shutdown()


def _replay(gcs_url: str, socket: str, job_id: str, **kw: object) -> ReplayReport:
    seen: list[tuple[int, int]] = []
    report = replay(gcs_url, socket, job_id, progress=lambda d, t: seen.append((d, t)), **kw)
    assert seen and seen[-1][0] == seen[-1][1]  # the progress reached the end
    return report


@pytest.mark.parametrize("log_shards", [1, 4])  # (4: the replay, a job of its own, elsewhere)
def test_a_deterministic_job_replays_identically(gcs_url: str, driver: str, tmp_path: Path) -> None:
    job_id = ray.get_runtime_context().get_job_id()
    x = ray.put(7)
    a = square.remote(x)
    b = add.remote(a, 3)
    counter = Counter.remote()
    calls = [counter.add.remote(k) for k in range(3)]
    assert ray.get([b, fan_out.remote(3), flaky.remote(str(tmp_path / "m")), *calls]) == [
        52,
        [0, 1, 4],
        "second attempt",
        0,
        1,
        3,
    ]

    report = _replay(gcs_url, driver, job_id)

    # every task of the job (the 3 nested squares too) was compared, and matched
    names = sorted(c.original.spec.name for c in report.comparisons)
    assert names.count("workloads.square") == 4 and len(names) == 11, names
    assert report.first_divergence is None, report.first_divergence
    digests = [c.original.digest or "" for c in report.comparisons if c.original.spec.num_returns]
    assert len(digests) == 10 and all(d.startswith("xxh3:") for d in digests), digests
    linked = rows(
        gcs_url,
        "SELECT payload->>'replay_of' AS replay_of FROM events "
        "WHERE entity_id = $1 AND entity_kind = 'job' AND event_type = 'submitted'",
        report.replay_job_id,
    )
    assert [r["replay_of"] for r in linked] == [job_id]

    # --task: that task and its upstream only
    only = _replay(gcs_url, driver, job_id, task_id=b.task_id().hex())
    assert sorted(c.original.spec.task_id for c in only.comparisons) == sorted(
        [a.task_id().hex(), b.task_id().hex()]
    )
    assert only.first_divergence is None


def test_unseeded_randomness_is_the_first_divergence(
    gcs_url: str, driver: str, tmp_path: Path
) -> None:
    job_id = ray.get_runtime_context().get_job_id()
    first = square.remote(3)
    random_one = noisy.remote(first)
    after = add.remote(random_one, 1)
    ray.get(after)

    report = _replay(gcs_url, driver, job_id)

    divergence = report.first_divergence
    assert divergence is not None and divergence.original.spec.task_id == random_one.task_id().hex()
    assert divergence.replayed is not None
    assert divergence.original.digest != divergence.replayed.digest
    same = {c.original.spec.task_id for c in report.comparisons if c.same}
    assert first.task_id().hex() in same and random_one.task_id().hex() not in same

    # no cluster of this machine runs for the CLI here (an empty $TMPDIR hides any other):
    # it says so, after checking the id
    result = run_cairn(
        "replay", "--gcs-url", gcs_url, job_id, check=False, env={"TMPDIR": str(tmp_path)}
    )
    assert result.returncode == 1 and "no running Cairn cluster" in result.stderr, result.stderr


def test_unknown_ids_are_refused_with_exit_code_2(gcs_url: str, driver: str) -> None:
    job_id = ray.get_runtime_context().get_job_id()
    ray.get(square.remote(2))
    unknown_job = run_cairn("replay", "--gcs-url", gcs_url, "no-such-job", check=False)
    assert unknown_job.returncode == 2 and "no job 'no-such-job'" in unknown_job.stderr
    unknown_task = run_cairn(
        "replay", "--gcs-url", gcs_url, job_id, "--task", "no-such-task", check=False
    )
    assert unknown_task.returncode == 2 and "no task 'no-such-task'" in unknown_task.stderr


@ray.remote(num_returns="streaming")
def stream_of(n: int, noise: bool = False) -> Iterator[float]:
    for i in range(n):
        yield i + (random.random() if noise and i == 2 else 0)


def test_a_generators_streamed_values_are_compared(gcs_url: str, driver: str) -> None:
    """A replayed generator's values are compared with the recorded ones (its finished
    event's digest is over every value it yielded); a task reading one of its values
    reads the re-run's value at the same index."""
    job_id = ray.get_runtime_context().get_job_id()
    steady = list(stream_of.remote(3))
    noisy_values = list(stream_of.remote(4, True))
    after = add.remote(steady[1], 1)
    assert ray.get(after) == 2 and ray.get(steady) == [0, 1, 2] and len(noisy_values) == 4

    report = _replay(gcs_url, driver, job_id)

    same = {c.original.spec.task_id: c.same for c in report.comparisons}
    assert same == {
        steady[0].task_id().hex(): True,
        noisy_values[0].task_id().hex(): False,
        after.task_id().hex(): True,
    }
    divergence = report.first_divergence
    assert (
        divergence is not None
        and divergence.original.spec.task_id == noisy_values[0].task_id().hex()
    )


def test_a_job_replays_without_a_server_that_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A log on two servers, server 1 stopped: a replay that reads the whole log fails
    (the union needs every server); with ``without=[1]`` the job (its events on server 0)
    replays identically, as a job the node named for server 0."""
    monkeypatch.setenv("CAIRN_GCS_SERVER_AWAY_AFTER_S", "1")  # (readers go on without it)
    with Gcs(log_servers=2) as gcs:
        server = gcs.other_log_servers[0]
        for _ in range(20):  # a driver whose job's events lie on server 0
            ray.init(num_cpus=2, gcs_url=gcs.url)
            job_id = ray.get_runtime_context().get_job_id()
            if shard_of(job_id, 2) == 0:  # (two shards: shard s on server s)
                break
            ray.shutdown()
        try:
            assert ray.get(add.remote(square.remote(ray.put(7)), 3)) == 52
            assert runtime._runtime is not None and runtime._runtime.head is not None
            socket = runtime._runtime.head.socket_path
            server.stop(keep_data=True)
            try:
                with pytest.raises(asyncpg.PostgresError):
                    replay(gcs.url, socket, job_id)
                report = replay(gcs.url, socket, job_id, without=[1])
                assert len(report.comparisons) == 2 and report.first_divergence is None
                assert shard_of(report.replay_job_id, 2) == 0
                # the command line: the away server named, and --without-server reads on
                refused = run_cairn("replay", "--gcs-url", gcs.url, job_id, check=False)
                assert refused.returncode == 1, refused.stderr
                assert "server 1 of the log does not answer" in refused.stderr
                assert "--without-server 1" in refused.stderr
                unknown = ["replay", "--gcs-url", gcs.url, "no-such-job", "--without-server", "1"]
                read = run_cairn(*unknown, check=False)
                assert read.returncode == 2 and "no job 'no-such-job'" in read.stderr, read.stderr
            finally:
                server.start()
        finally:
            ray.shutdown()
