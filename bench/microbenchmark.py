"""The task, object and actor rows of ``ray microbenchmark``, for Cairn and Ray
side by side.

    .venv/bin/python bench/microbenchmark.py [--ray-python /tmp/rayenv/bin/python]
                                             [--seconds 2] [--only SUBSTRING]

Each system runs in its own process (Cairn with this interpreter, Ray with the
interpreter of a separate venv, made by ../shared/tools/ray-baseline.sh), on a fresh
local cluster with the machine's CPUs, the same workloads and the same timing loop:
1 s of warm-up (as Ray's own harness), then as many calls as fit in ``--seconds``; the
figure is calls per second times the row's multiplier (so "tasks async" counts tasks,
"put gigabytes" counts GB). Cairn logs every transition durably while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_RAY_PYTHON = "/tmp/rayenv/bin/python"


def measure(fn: Callable[[], Any], seconds: float, warmup: float = 1.0) -> float:
    """Calls per second of ``fn``, after a warm-up."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        fn()
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed


def workloads(rt: Any, np: Any) -> list[tuple[str, Callable[[], Any], float, str]]:
    """(row name, one call, multiplier, unit) with Ray's workloads."""

    @rt.remote
    def small_value() -> bytes:
        return b"ok"

    @rt.remote
    def do_put_small() -> None:
        for _ in range(100):
            rt.put(0)

    @rt.remote
    def do_put_large() -> None:
        for _ in range(10):
            rt.put(np.zeros(10 * 1024 * 1024, dtype=np.int64))

    @rt.remote
    def create_object_containing_ref() -> list[Any]:
        return [rt.put(i) for i in range(10000)]

    @rt.remote
    def read_slice(array: Any) -> int:
        return int(array[::4096].sum())

    value = rt.put(0)
    large = np.zeros(100 * 1024 * 1024, dtype=np.int64)
    containing = rt.get(create_object_containing_ref.remote())
    holder = rt.put(containing)
    large_ref: list[Any] = []  # (put on the first call of a row that reads it)

    def stored_large() -> Any:
        if not large_ref:
            large_ref.append(rt.put(large))
        return large_ref[0]

    def get_small() -> None:
        rt.get(value)

    def put_small() -> None:
        rt.put(0)

    def put_multi_small() -> None:
        rt.get([do_put_small.remote() for _ in range(10)])

    def put_large() -> None:
        rt.put(large)

    def small_value_batch() -> None:
        rt.get([small_value.remote() for _ in range(1000)])

    def put_multi_large() -> None:
        rt.get([do_put_large.remote() for _ in range(10)])

    def get_containing() -> None:
        rt.get(holder)

    def get_large() -> None:
        rt.get(stored_large())

    def task_reading_large() -> None:
        rt.get(read_slice.remote(stored_large()))

    def wait_multiple_refs() -> None:
        not_ready = [small_value.remote() for _ in range(1000)]
        while not_ready:
            _, not_ready = rt.wait(not_ready)

    def tasks_sync() -> None:
        rt.get(small_value.remote())

    actor_rows = _actor_workloads(rt)
    return [
        *actor_rows,
        ("single client get calls", get_small, 1, "calls/s"),
        ("single client put calls", put_small, 1, "calls/s"),
        ("multi client put calls", put_multi_small, 1000, "calls/s"),
        ("single client put gigabytes", put_large, 0.8, "GB/s"),
        ("single client tasks and get batch", small_value_batch, 1, "batches/s"),
        ("multi client put gigabytes", put_multi_large, 10 * 0.8, "GB/s"),
        ("single client get object containing 10k refs", get_containing, 1, "calls/s"),
        ("single client get of an 800 MB array", get_large, 1, "calls/s"),
        ("task reading a large argument (800 MB, by ref)", task_reading_large, 1, "tasks/s"),
        ("single client wait 1k refs", wait_multiple_refs, 1, "rounds/s"),
        ("single client tasks sync", tasks_sync, 1, "tasks/s"),
        ("single client tasks async", small_value_batch, 1000, "tasks/s"),
    ]


def _lazy(make: Callable[[], Callable[[], Any]]) -> Callable[[], Any]:
    """A row's call that sets the row up on its first call (in the warm-up)."""
    fn: list[Callable[[], Any]] = []

    def call() -> Any:
        if not fn:
            fn.append(make())
        return fn[0]()

    return call


def _actor_workloads(rt: Any) -> list[tuple[str, Callable[[], Any], float, str]]:
    """Ray's actor rows (ray/_private/ray_perf.py), with its classes, call counts and
    multipliers; n_cpu = cpu_count // 2 as there. Each row's actors are made when the
    row first runs, so rows that are filtered out start no processes."""
    n_cpu = max(1, (os.cpu_count() or 2) // 2)

    @rt.remote(num_cpus=0)
    class Actor:
        def small_value(self) -> bytes:
            return b"ok"

        def small_value_arg(self, x: Any) -> bytes:
            return b"ok"

    @rt.remote(num_cpus=0)
    class AsyncActor:
        async def small_value(self) -> bytes:
            return b"ok"

        async def small_value_with_arg(self, x: Any) -> bytes:
            return b"ok"

    @rt.remote(num_cpus=0)
    class Client:
        def __init__(self, servers: Any) -> None:
            self.servers = servers if isinstance(servers, list) else [servers]

        def small_value_batch(self, n: int) -> None:
            results = []
            for s in self.servers:
                results.extend([s.small_value.remote() for _ in range(n)])
            rt.get(results)

        def small_value_batch_arg(self, n: int) -> None:
            x = rt.put(0)
            results = []
            for s in self.servers:
                results.extend([s.small_value_arg.remote(x) for _ in range(n)])
            rt.get(results)

    @rt.remote
    def work(actors: list[Any], n: int) -> None:
        rt.get([actors[i % len(actors)].small_value.remote() for i in range(n)])

    def one_to_one(cls: Any, batch: int, method: str = "small_value", **options: Any) -> Any:
        def make() -> Callable[[], Any]:
            a = cls.options(**options).remote() if options else cls.remote()
            call = getattr(a, method)
            if method != "small_value":
                return lambda: rt.get([call.remote(i) for i in range(batch)])
            if batch == 1:
                return lambda: rt.get(call.remote())
            return lambda: rt.get([call.remote() for _ in range(batch)])

        return _lazy(make)

    def one_to_n(cls: Any, n: int) -> Any:
        def make() -> Callable[[], Any]:
            client = Client.remote([cls.remote() for _ in range(n_cpu)])
            return lambda: rt.get(client.small_value_batch.remote(n))

        return _lazy(make)

    def n_to_n(cls: Any, n: int, m: int) -> Any:
        def make() -> Callable[[], Any]:
            actors = [cls.remote() for _ in range(n_cpu)]
            return lambda: rt.get([work.remote(actors, n) for _ in range(m)])

        return _lazy(make)

    def n_to_n_with_arg(n: int) -> Callable[[], Any]:
        def make() -> Callable[[], Any]:
            clients = [Client.remote(Actor.remote()) for _ in range(n_cpu)]
            return lambda: rt.get([c.small_value_batch_arg.remote(n) for c in clients])

        return _lazy(make)

    return [
        ("1:1 actor calls sync", one_to_one(Actor, 1), 1, "calls/s"),
        ("1:1 actor calls async", one_to_one(Actor, 1000), 1000, "calls/s"),
        (
            "1:1 actor calls concurrent",
            one_to_one(Actor, 1000, max_concurrency=16),
            1000,
            "calls/s",
        ),
        ("1:n actor calls async", one_to_n(Actor, 5000), 5000 * n_cpu, "calls/s"),
        ("n:n actor calls async", n_to_n(Actor, 5000, 4), 5000 * 4, "calls/s"),
        ("n:n actor calls with arg async", n_to_n_with_arg(1000), 1000 * n_cpu, "calls/s"),
        ("1:1 async-actor calls sync", one_to_one(AsyncActor, 1), 1, "calls/s"),
        ("1:1 async-actor calls async", one_to_one(AsyncActor, 1000), 1000, "calls/s"),
        (
            "1:1 async-actor calls with args async",
            one_to_one(AsyncActor, 1000, "small_value_with_arg"),
            1000,
            "calls/s",
        ),
        ("1:n async-actor calls async", one_to_n(AsyncActor, 5000), 5000 * n_cpu, "calls/s"),
        ("n:n async-actor calls async", n_to_n(AsyncActor, 5000, 4), 5000 * 4, "calls/s"),
    ]


def memcpy_ceiling(size: int = 800 * 1000 * 1000) -> float:
    """GB/s of this machine's copy of a large buffer into a kept mapping of populated
    /dev/shm pages (what a put into an arena store can reach at best); best of 3."""
    import mmap

    import numpy as np

    source = np.ones(size, dtype=np.uint8)
    path = Path("/dev/shm") / f"cairn-bench-memcpy-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(fd, size, flags=flags) as mapping:
            target = np.frombuffer(mapping, dtype=np.uint8)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                target[:] = source
                best = min(best, time.perf_counter() - start)
            del target
    finally:
        os.close(fd)
        path.unlink()
    return size / best / 1e9


def run_backend(backend: str, seconds: float, only: str) -> None:
    """In a child process: run every row on one system, print one JSON line per row."""
    import numpy as np

    if backend == "ray":
        import ray as rt

        rt.init(logging_level="ERROR", include_dashboard=False)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import sdk as rt

        rt.init()
    try:
        for name, fn, multiplier, unit in workloads(rt, np):
            if only and only not in name:
                continue
            rate = measure(fn, seconds) * multiplier
            print(json.dumps({"name": name, "value": rate, "unit": unit}), flush=True)
    finally:
        rt.shutdown()


def collect(
    python: str,
    backend: str,
    seconds: float,
    only: str,
    env: dict[str, str] | None = None,
    script: str = __file__,
) -> dict[str, dict]:
    result = subprocess.run(
        [python, script, "--run", backend, "--seconds", str(seconds), "--only", only],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, **(env or {})},
        # its tree's root: ``python -m`` puts the working directory first on sys.path, so
        # the daemons a driver starts import the tree they run in, whatever PYTHONPATH says
        cwd=Path(script).resolve().parents[1],
    )
    rows = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["name"]] = row
    if result.returncode != 0:
        print(
            f"{backend} exited with {result.returncode}:\n{result.stderr[-3000:]}", file=sys.stderr
        )
    return rows


def versus(args: argparse.Namespace) -> int:
    """Cairn beside itself in one run -- with some settings changed (``--versus-env``:
    what a feature costs) or as another checkout of it (``--versus-tree``: what the
    changes since cost) --: the two alternate ``--rounds`` times and each row keeps its
    best figure, so that a disturbance of the machine does not land on one side only."""
    other_env = dict(item.split("=", 1) for item in args.versus_env)
    other_script = __file__
    label = " ".join(args.versus_env)
    if args.versus_tree:
        tree = Path(args.versus_tree).resolve()
        other_script = str(tree / "bench" / "microbenchmark.py")
        other_env["PYTHONPATH"] = str(tree)  # (its daemons and workers too, not ours)
        label = f"the tree {tree}" + (f" with {label}" if label else "")
    best: dict[str, dict[str, float]] = {"as is": {}, "other": {}}
    units: dict[str, str] = {}
    for _ in range(args.rounds):
        for side, extra, script in (("as is", None, __file__), ("other", other_env, other_script)):
            for name, row in collect(
                sys.executable, "cairn", args.seconds, args.only, extra, script
            ).items():
                best[side][name] = max(best[side].get(name, 0.0), row["value"])
                units[name] = row["unit"]
    print(f"Cairn as is vs Cairn as {label}; best of {args.rounds} round(s)")
    print(f"{'row':48s} {'as is':>12s} {'other':>12s} {'ratio':>9s}  unit")
    for name, unit in units.items():
        a, b = best["as is"].get(name), best["other"].get(name)
        ratio = f"{a / b:9.3f}" if a and b else f"{'-':>9s}"
        print(f"{name:48s} {a or 0:12,.2f} {b or 0:12,.2f} {ratio}  {unit}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ray-python", default=DEFAULT_RAY_PYTHON)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--only", default="", help="run only rows whose name contains this")
    parser.add_argument(
        "--versus-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="compare Cairn with Cairn run with this set (e.g. CAIRN_OBJECT_CHECKSUMS=0), "
        "instead of with Ray",
    )
    parser.add_argument(
        "--versus-tree",
        metavar="DIR",
        help="compare Cairn with another checkout of it (e.g. a git worktree of an older "
        "commit), instead of with Ray",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --versus-env/--versus-tree: alternate runs, keep the best",
    )
    parser.add_argument("--run", choices=["cairn", "ray"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_backend(args.run, args.seconds, args.only)
        return 0
    if args.versus_env or args.versus_tree:
        return versus(args)
    print(
        f"machine: {os.cpu_count()} CPUs; {args.seconds:g} s per row; "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    if not args.only or "gigabytes" in args.only or "800 MB" in args.only:
        print(f"memcpy ceiling: {memcpy_ceiling():.2f} GB/s (800 MB into kept, populated pages)")
    cairn = collect(sys.executable, "cairn", args.seconds, args.only)
    have_ray = Path(args.ray_python).exists()
    ray = collect(args.ray_python, "ray", args.seconds, args.only) if have_ray else {}
    if not have_ray:
        print(f"(no Ray at {args.ray_python}: run ../shared/tools/ray-baseline.sh)")
    print(f"{'row':48s} {'Cairn':>12s} {'Ray 2.60':>12s} {'Cairn/Ray':>9s}  unit")
    for name in cairn.keys() | ray.keys():
        c, r = cairn.get(name, {}).get("value"), ray.get(name, {}).get("value")
        unit = (cairn.get(name) or ray.get(name) or {}).get("unit", "")
        ratio = f"{c / r:9.2f}" if c and r else f"{'-':>9s}"
        cs = f"{c:12,.2f}" if c is not None else f"{'failed':>12s}"
        rs = f"{r:12,.2f}" if r is not None else f"{'-':>12s}"
        print(f"{name:48s} {cs} {rs} {ratio}  {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
