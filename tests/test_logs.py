"""``cairn logs`` and the state API's ``list_logs`` / ``get_log`` (issue 19, point 2):
one task attempt's lines cut out of its worker's files (a retried task's attempts told
apart, a dead worker's lines kept), an actor's, a job's (prefixed as at the driver),
``--tail``, ``--follow`` of a running task, rotation; on a cluster of two nodes, a
task's lines read from the node that ran it over gRPC, and a clear message once that
node is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from log_rows import wait_for_rows
from machine_cluster import machine_cluster, node_id
from processes import gcs_url_of, run_cairn
from ray_session import private_cluster

import sdk as ray
from controlplane import local_node
from sdk.util.state import RayStateApiException, get_log, list_logs

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parent.parent
ALIVE = "SELECT 1 FROM events WHERE entity_id = $1 AND event_type = 'alive'"
RUNNING = "SELECT payload FROM events WHERE entity_id = $1 AND event_type = 'running'"


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=1)  # one worker: tasks share its files


def gcs() -> str:
    return ray.get_runtime_context().gcs_address


def cairn_logs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cairn("logs", "--gcs-url", gcs(), *args, check=check)


@ray.remote
def say(word: str, lines: int) -> int:
    for n in range(lines):
        print(f"{word} {n}")
        print(f"{word} err {n}", file=sys.stderr)
    return os.getpid()


def test_a_task_shows_its_own_lines_only_tail_and_err(cluster: None) -> None:
    first, second = say.remote("alpha", 3), say.remote("beta", 4)
    assert ray.get(first) == ray.get(second)  # the same worker: one file, two tasks
    wait_for_rows(gcs(), RUNNING, second.task_id().hex())
    assert cairn_logs("--task", first.task_id().hex()).stdout.splitlines() == [
        "alpha 0",
        "alpha 1",
        "alpha 2",
    ]
    assert cairn_logs("--task", second.task_id().hex(), "--tail", "2").stdout.splitlines() == [
        "beta 2",
        "beta 3",
    ]
    assert cairn_logs("--task", second.task_id().hex(), "--err").stdout.splitlines() == [
        f"beta err {n}" for n in range(4)
    ]
    assert list(get_log(task_id=first.task_id().hex())) == ["alpha 0", "alpha 1", "alpha 2"]
    assert list(get_log(task_id=second.task_id().hex(), tail=1, suffix="err")) == ["beta err 3"]
    followed = get_log(task_id=second.task_id().hex(), follow=True, tail=2, _interval=0.1)
    assert list(followed) == ["beta 2", "beta 3"]  # (its attempt is over: so is following)


def test_a_retried_tasks_attempts_are_told_apart_and_a_dead_workers_lines_kept(
    cluster: None, tmp_path: Path
) -> None:
    flag = tmp_path / "crashed"

    @ray.remote(max_retries=1)
    def flaky(path: str) -> str:
        if not os.path.exists(path):
            print("first attempt, about to die", flush=True)
            open(path, "w").close()
            os._exit(1)  # the worker dies: its files stay
        print("second attempt, fine")
        return "done"

    ref = flaky.remote(str(flag))
    assert ray.get(ref) == "done"
    wait_for_rows(gcs(), RUNNING, ref.task_id().hex(), count=2)
    task = ref.task_id().hex()
    assert cairn_logs("--task", task).stdout.splitlines() == ["first attempt, about to die"]
    assert cairn_logs("--task", task, "--attempt-number", "1").stdout.splitlines() == [
        "second attempt, fine"
    ]
    assert list(get_log(task_id=task, attempt_number=1)) == ["second attempt, fine"]
    missing = cairn_logs("--task", task, "--attempt-number", "2", check=False)
    assert missing.returncode != 0 and "ran 2 attempt(s): no attempt 2" in missing.stderr
    unknown = cairn_logs("--task", "no-such-task", check=False)
    assert unknown.returncode != 0 and "no task 'no-such-task' ran" in unknown.stderr


@ray.remote
class Greeter:
    def __init__(self, name: str) -> None:
        print(f"greeter {name} born")

    def greet(self, who: str) -> str:
        print(f"hello {who}")
        return str(ray.get_runtime_context().get_actor_id())


def test_an_actors_lines_and_a_jobs_lines_prefixed_as_at_the_driver(cluster: None) -> None:
    greeter = Greeter.remote("ada")
    actor_id = ray.get(greeter.greet.remote("bob"))
    ray.get(greeter.greet.remote("cy"))
    wait_for_rows(
        gcs(), "SELECT 1 FROM events WHERE entity_id = $1 AND event_type = 'alive'", actor_id
    )
    assert cairn_logs("--actor", actor_id).stdout.splitlines() == [
        "greeter ada born",
        "hello bob",
        "hello cy",
    ]
    assert list(get_log(actor_id=actor_id, tail=1)) == ["hello cy"]
    gamma = say.remote("gamma", 1)
    pid = ray.get(gamma)
    wait_for_rows(gcs(), RUNNING, gamma.task_id().hex())
    job = cairn_logs("--job", ray.get_runtime_context().get_job_id()).stdout.splitlines()
    assert f"(say pid={pid}, ip=127.0.0.1) gamma 0" in job
    assert any(line.endswith(") hello cy") and line.startswith("(Greeter pid=") for line in job)
    ray.kill(greeter)


def test_list_logs_and_get_log_of_a_nodes_file(cluster: None) -> None:
    node = ray.get_runtime_context().get_node_id()
    pid = ray.get(say.remote("delta", 2))
    found = list_logs(node_id=node)
    assert found["worker_out"] and all(n.endswith(".out") for n in found["worker_out"])
    assert found["worker_err"] and all(".err" in n for n in found["worker_err"])
    assert list_logs(node_id=node, glob_filter="*.err").keys() == {"worker_err"}
    lines = list(get_log(pid=pid))
    assert lines[-2:] == ["delta 0", "delta 1"]
    name = next(n for n in found["worker_out"] if lines == list(get_log(node_id=node, filename=n)))
    listed = cairn_logs("--node", node).stdout
    assert name in listed
    assert cairn_logs("--node", node, "--file", name, "--tail", "1").stdout == "delta 1\n"
    worker_id = name.removeprefix("worker-").removesuffix(".out")
    assert cairn_logs("--worker", worker_id).stdout.splitlines() == lines
    for bad in ("../node.ready", "/etc/passwd", ".hidden"):
        with pytest.raises(RayStateApiException, match="is not the name of a log file"):
            list(get_log(node_id=node, filename=bad))
    with pytest.raises(ValueError, match="exactly one of"):
        list(get_log(node_id=node))
    refused = cairn_logs("--task", "x", "--actor", "y", check=False)
    assert refused.returncode != 0 and "exactly one of" in refused.stderr


def test_follow_waits_for_a_task_to_start_and_prints_its_lines_until_it_ends(
    cluster: None, tmp_path: Path
) -> None:
    start, go = tmp_path / "start", tmp_path / "go"

    @ray.remote
    def gate(path: str) -> None:
        while not os.path.exists(path):
            time.sleep(0.05)

    @ray.remote
    def slow(path: str, _gate: None) -> None:
        print("before", flush=True)
        while not os.path.exists(path):
            time.sleep(0.05)
        print("after", flush=True)

    ref = slow.remote(str(go), gate.remote(str(start)))  # (waits for its argument)
    command = [sys.executable, "-m", "controlplane.cli", "logs", "--gcs-url", gcs()]
    follower = subprocess.Popen(
        [*command, "--task", ref.task_id().hex(), "--follow", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert follower.stdout is not None and follower.stderr is not None
        assert "has not started yet: waiting" in follower.stderr.readline()
        start.touch()
        assert follower.stdout.readline() == "before\n"  # while the task still runs
        go.touch()
        ray.get(ref)
        assert follower.wait(timeout=60) == 0  # the attempt ended: so does --follow
        assert follower.stdout.read() == "after\n"
    finally:
        follower.kill()
        follower.wait()


def test_rotation_lines_are_found_in_older_copies_and_lost_ones_are_named(
    tmp_path: Path,
) -> None:
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, json, time
            import sdk as ray
            from controlplane.logs import LogReader, LogsError

            ray.init(num_cpus=1)

            @ray.remote
            def chatty():
                import os
                for chunk in range(3):  # each chunk fills a file: the worker rotates it
                    written_to = os.fstat(1).st_ino
                    for n in range(40):
                        print(f"chunk {chunk} line {n:02d} " + "x" * 40, flush=True)
                    for _ in range(600):  # (until it did: the next chunk, a file of its own)
                        if os.fstat(1).st_ino != written_to:
                            break
                        time.sleep(0.05)

            @ray.remote
            def quiet():
                print("quiet one", flush=True)

            first = chatty.remote()
            ray.get(first)
            second = quiet.remote()
            ray.get(second)
            reader = LogReader(ray.get_runtime_context().gcs_address)

            def lines(task_id):  # (once its running event is written)
                for _ in range(600):
                    try:
                        return asyncio.run(reader.task_lines(task_id))
                    except LogsError:
                        time.sleep(0.05)
                raise AssertionError("no running event")

            b = lines(second.task_id().hex())
            a = lines(first.task_id().hex())
            print(json.dumps({"a": a.lines, "a_notes": a.notes, "b": b.lines, "b_notes": b.notes}))
            ray.shutdown()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "CAIRN_LOG_MAX_BYTES": "1000", "CAIRN_LOG_BACKUPS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert found["b"] == ["quiet one"] and found["b_notes"] == []
    assert [line.split(" x")[0] for line in found["a"]] == [
        f"chunk 2 line {n:02d}" for n in range(40)
    ]
    assert found["a_notes"] and "first lines were rotated away" in found["a_notes"][0]


def test_on_a_cluster_a_tasks_lines_come_from_its_node_and_its_loss_is_named(
    tmp_path: Path,
) -> None:
    head = ["--num-cpus", "1", "--dashboard-port", "0"]
    with machine_cluster(head, ["--num-cpus", "1", "--resources", '{"far": 1}']) as cluster:
        script = tmp_path / "driver.py"
        script.write_text(
            textwrap.dedent(
                """
                import sdk as ray

                ray.init(address="auto", log_to_driver=False)

                @ray.remote(resources={"far": 1})
                def far():
                    print("from the far node")
                    return ray.get_runtime_context().get_node_id()

                ref = far.remote()
                print(ref.task_id().hex(), ray.get(ref))
                """
            )
        )
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr[-3000:]
        task_id, ran_on = done.stdout.split()
        far_node = cluster.joined[0]
        assert ran_on == node_id(far_node)
        wait_for_rows(gcs_url_of(cluster.head.session_dir), RUNNING, task_id)
        assert run_cairn("logs", "--task", task_id).stdout == "from the far node\n"
        listed = run_cairn("logs", "--node", ran_on).stdout  # (its ReadLog call)
        assert ".out" in listed and ".err" in listed
        outside = run_cairn("logs", "--node", ran_on, "--file", "../node.ready", check=False)
        assert outside.returncode != 0 and "is not the name of a log file" in outside.stderr
        os.kill(far_node.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while far_node.pid in {n.pid for n in local_node.local_nodes()}:
            assert time.monotonic() < deadline, "the far node did not stop"
            time.sleep(0.1)
        gone = run_cairn("logs", "--task", task_id, check=False)
        assert gone.returncode != 0
        assert ran_on in gone.stderr and "logs" in gone.stderr, gone.stderr
