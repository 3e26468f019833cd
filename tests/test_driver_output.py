"""What tasks and actors print reaches their driver's terminal, as in Ray (issue 19,
point 1): stdout, stderr and ``logging`` lines, prefixed ``(name pid=N, ip=HOST)`` with
the actor's class (or its repr), lines repeated across processes shown once and
counted, nothing with ``log_to_driver=False``, from other nodes too; the last lines
before the driver leaves are not lost (its node asks the others for theirs). Each
worker's output is kept in files on its node (rotated, bounded), and each attempt's
``running`` event says where its lines start. ``tqdm_ray`` bars of remote tasks are
drawn by the driver (issue 18).

Drivers run as their own processes (their terminal is what is checked), each with a
private cluster, or joined to a two-node cluster started with ``cairn start``."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from log_rows import wait_for_rows
from machine_cluster import machine_cluster
from processes import run_driver

import sdk as ray

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parent.parent


PRINTING = """
    import logging, sys, time
    import sdk as ray

    ray.init(num_cpus=1{init})

    @ray.remote
    def shout(i):
        print("hello from task", i)
        print("task", i, "on stderr", file=sys.stderr)
        logging.getLogger("user").warning("a warning from task %d", i)
        return i

    @ray.remote
    class Counter:
        def add(self, n):
            print("counter adds", n)
            return n

    @ray.remote
    class Named:
        def __repr__(self):
            return "Named(blue)"

        def hello(self):
            print("named says hello")

    assert ray.get([shout.remote(i) for i in range(3)]) == [0, 1, 2]
    counter = Counter.remote()
    ray.get(counter.add.remote(5))
    ray.get(Named.remote().hello.remote())
    print("DRIVER DONE")
"""


def test_what_tasks_and_actors_print_reaches_the_driver_prefixed(tmp_path: Path) -> None:
    done = run_driver(tmp_path, PRINTING.format(init=""))
    prefix = r"\((?P<name>[\w().]+) pid=(?P<pid>\d+), ip=127\.0\.0\.1\) "
    out = {m["rest"]: m["name"] for m in re.finditer(prefix + r"(?P<rest>.*)", done.stdout)}
    err = {m["rest"]: m["name"] for m in re.finditer(prefix + r"(?P<rest>.*)", done.stderr)}
    for i in range(3):  # the last lines too: the driver left right after its get
        assert out[f"hello from task {i}"] == "shout"
        assert err[f"task {i} on stderr"] == "shout"
        assert err[f"a warning from task {i}"] == "shout"
    assert out["counter adds 5"] == "Counter"
    assert out["named says hello"] == "Named(blue)"  # an actor's own repr names it
    assert "DRIVER DONE" in done.stdout


def test_log_to_driver_false_keeps_the_lines_in_the_nodes_files_only(tmp_path: Path) -> None:
    kept = """
    from pathlib import Path

    logs = Path(ray.get_runtime_context().get_temp_dir()) / "logs"
    text = "".join(f.read_text() for f in logs.glob("worker-*.out"))
    print("IN FILES", text.count("hello from task"), text.count("counter adds 5"))
"""
    done = run_driver(tmp_path, PRINTING.format(init=", log_to_driver=False") + kept)
    assert "hello from task" not in done.stdout and "on stderr" not in done.stderr
    assert "counter adds" not in done.stdout
    assert "IN FILES 3 1" in done.stdout


def test_output_files_are_rotated_and_bounded_and_no_line_is_lost(tmp_path: Path) -> None:
    done = run_driver(
        tmp_path,
        """
        import time
        from pathlib import Path
        import sdk as ray

        ray.init(num_cpus=1)

        @ray.remote
        def verbose(rounds):
            for r in range(rounds):
                for n in range(20):
                    print(f"line {r * 20 + n:05d} " + "y" * 80)
                time.sleep(0.3)  # (the worker checks its files' size every second)

        ray.get(verbose.remote(12))
        logs = Path(ray.get_runtime_context().get_temp_dir()) / "logs"
        for f in sorted(logs.glob("worker-*.out*")):
            print("FILE", f.name, f.stat().st_size)
        """,
        env={"CAIRN_LOG_MAX_BYTES": "4000", "CAIRN_LOG_BACKUPS": "2"},
    )
    numbers = [int(n) for n in re.findall(r"\) line (\d{5}) y+", done.stdout)]
    assert numbers == list(range(240))  # every line, in order, across the rotations
    files = dict(re.findall(r"FILE (\S+) (\d+)", done.stdout))
    rotated = {name for name in files if re.search(r"\.out\.\d$", name)}
    assert rotated and all(name.endswith((".1", ".2")) for name in rotated)  # 2 kept
    # bounded: the worker looks at its files' size every second (a few rounds late at
    # most on a busy machine)
    assert all(int(size) < 4000 + 4 * 20 * 100 for size in files.values())


def test_the_reader_keeps_watching_a_file_caught_between_a_rotations_renames(
    tmp_path: Path,
) -> None:
    """CI lost a worker's last lines once: a pass that found the file missing (moved
    to ``.1``, the new one not created yet) stopped watching it for good. And lines of
    two tasks read in one pass were all named after the second."""
    import asyncio

    from controlplane.node.worker_output import WorkerOutput, log_paths
    from dataplane.output_lines import marker_line

    class Driver:  # (what the node's connection to a driver is asked for)
        closed = False

        def __init__(self) -> None:
            self.lines: list[str] = []

        def send(self, message: object) -> None:
            self.lines += [f"{b.name}: {line}" for b in message.batches for line in b.lines]  # type: ignore[attr-defined]

    output = WorkerOutput(
        "node",
        "",
        tmp_path,
        lambda: "ip",
        lambda _: None,
        list,
        None,  # type: ignore[arg-type]
    )
    driver = output.drivers["job1"] = Driver()  # type: ignore[assignment]
    out, err = log_paths(tmp_path, "w1")
    out.write_text(marker_line("job1", "f") + "one\n")
    err.touch()
    output.watch("w1", 7)

    async def passes() -> None:
        await output.read_all()
        with out.open("a") as f:
            f.write("two\n")
        out.rename(out.with_name(out.name + ".1"))  # the rotation's first rename
        await output.read_all()  # (finds no file)
        out.write_text("three\n" + marker_line("job1", "g") + "four\n")  # the new file
        await output.read_all()

    asyncio.run(passes())
    # nothing lost, and each line named by the marker before it (not the pass's last)
    assert driver.lines == ["f: one", "f: two", "f: three", "g: four"]


def test_lines_repeated_by_several_workers_are_shown_once_and_counted(tmp_path: Path) -> None:
    code = """
        import os, time
        from pathlib import Path
        import sdk as ray

        ray.init(num_cpus=3)
        here = Path({here!r})

        @ray.remote
        def chatty(i):
            (here / str(i)).touch()  # the three run at once, in three workers
            deadline = time.monotonic() + 60
            while len(list(here.iterdir())) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            print(f"progress step {{i}} of the same loop")
            return os.getpid()

        assert len(set(ray.get([chatty.remote(i) for i in range(3)]))) == 3
    """
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    done = run_driver(tmp_path, code.format(here=str(tmp_path / "a")))
    shown = re.findall(r"progress step \d+ of the same loop(.*)", done.stdout)
    assert len(shown) == 2, done.stdout  # the first as it came, then a summary
    assert shown[1].strip() == "[repeated 2x across cluster]"
    undeduped = run_driver(
        tmp_path, code.format(here=str(tmp_path / "b")), env={"RAY_DEDUP_LOGS": "0"}
    )
    assert len(re.findall(r"progress step \d+ of the same loop", undeduped.stdout)) == 3


def test_tqdm_ray_bars_of_remote_tasks_are_drawn_by_the_driver(tmp_path: Path) -> None:
    done = run_driver(
        tmp_path,
        """
        import sdk as ray
        from sdk.experimental.tqdm_ray import tqdm

        ray.init(num_cpus=2)

        @ray.remote
        def work(n):
            for _ in tqdm(range(n), desc=f"job {n}", flush_interval_s=0):
                pass
            return n

        assert ray.get([work.remote(4), work.remote(7)]) == [4, 7]
        """,
    )
    for n in (4, 7):
        assert re.search(
            rf"job {n}: 100%\|#+\| {n}/{n} it \(work pid=\d+, ip=127.0.0.1\)", done.stderr
        ), done.stderr
    assert "__cairn_tqdm_magic_token__" not in done.stdout + done.stderr


@pytest.fixture
def private() -> Iterator[None]:
    ray.init(num_cpus=1)
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote
def say(word: str, lines: int) -> int:
    for n in range(lines):
        print(f"{word} {n:04d} " + "x" * 60)
    return os.getpid()


def test_each_workers_output_is_kept_in_rotated_files_and_each_attempt_says_where_it_starts(
    private: None,
) -> None:
    logs = Path(ray.get_runtime_context().get_temp_dir()) / "logs"
    ray.get(say.remote("first", 3))
    ref = say.remote("second", 2)
    pid = ray.get(ref)
    row = wait_for_rows(
        ray.get_runtime_context().gcs_address,
        "SELECT payload FROM events WHERE entity_id = $1 AND event_type = 'running'",
        ref.task_id().hex(),
    )[0]
    import json

    payload = json.loads(row["payload"])
    out = logs / f"worker-{payload['worker_id']}.out"
    text = out.read_bytes()[payload["stdout_offset"] :].decode()
    assert text.splitlines()[0].startswith("second 0000 ")  # its own lines start there
    assert "first" not in text
    assert pid > 0


def test_what_tasks_print_on_another_node_reaches_the_driver(tmp_path: Path) -> None:
    with machine_cluster(["--num-cpus", "1"], ["--num-cpus", "1", "--resources", '{"far": 1}']):
        done = run_driver(
            tmp_path,
            """
            import sdk as ray

            ray.init(address="auto")

            @ray.remote(resources={"far": 1})
            def far(i):
                print("printed far away", i)
                return ray.get_runtime_context().get_node_id()

            nodes = set(ray.get([far.remote(i) for i in range(3)]))
            print("RAN ON", *nodes, "DRIVER ON", ray.get_runtime_context().get_node_id())
            """,
        )
    ran_on, driver_on = re.search(r"RAN ON (\w+) DRIVER ON (\w+)", done.stdout).groups()
    assert ran_on != driver_on
    # the last lines too: the driver's node asked the other node for them as it left
    for i in range(3):
        assert re.search(rf"\(far pid=\d+, ip=[\d.]+\) printed far away {i}$", done.stdout, re.M)


def test_the_reader_reads_every_copy_rotated_between_two_passes(tmp_path: Path) -> None:
    """CI lost a round of lines across rotations: the new file's offset counted the
    rest read from the old one (so the next pass skipped as many bytes), and two
    rotations between passes (a busy node) lost the older copy's rest."""
    import asyncio

    from controlplane.node.worker_output import WorkerOutput, log_paths
    from dataplane.output_lines import marker_line, rotate

    class Driver:
        closed = False

        def __init__(self) -> None:
            self.lines: list[str] = []

        def send(self, message: object) -> None:
            self.lines += [line for b in message.batches for line in b.lines]  # type: ignore[attr-defined]

    output = WorkerOutput("node", "", tmp_path, lambda: "ip", lambda _: None, list, None)  # type: ignore[arg-type]
    driver = output.drivers["job1"] = Driver()  # type: ignore[assignment]
    out, err = log_paths(tmp_path, "w1")
    err.touch()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # (the worker's stdout)

    def write(text: str) -> None:
        os.write(fd, text.encode())

    async def passes() -> None:
        write(marker_line("job1", "f") + "one\n")
        output.watch("w1", 7)
        await output.read_all()
        write("two\n")
        rotate(fd, str(out))  # one rotation, with lines not read yet
        write("three\n")
        await output.read_all()
        write("four\n")
        await output.read_all()
        write("five\n")
        rotate(fd, str(out))  # two rotations between passes
        write("six\n")
        rotate(fd, str(out))
        write("seven\n")
        await output.read_all()

    try:
        asyncio.run(passes())
    finally:
        os.close(fd)
    assert driver.lines == ["one", "two", "three", "four", "five", "six", "seven"]
