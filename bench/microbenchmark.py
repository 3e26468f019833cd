"""The task, object and (1:1) actor rows of ``ray microbenchmark``, for Cairn and Ray
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

    value = rt.put(0)
    large = np.zeros(100 * 1024 * 1024, dtype=np.int64)
    containing = rt.get(create_object_containing_ref.remote())
    holder = rt.put(containing)

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

    def wait_multiple_refs() -> None:
        not_ready = [small_value.remote() for _ in range(1000)]
        while not_ready:
            _, not_ready = rt.wait(not_ready)

    def tasks_sync() -> None:
        rt.get(small_value.remote())

    @rt.remote(num_cpus=0)
    class Actor:
        def small_value(self) -> bytes:
            return b"ok"

    @rt.remote(num_cpus=0)
    class AsyncActor:
        async def small_value(self) -> bytes:
            return b"ok"

    actor = Actor.remote()
    concurrent_actor = Actor.options(max_concurrency=16).remote()
    async_actor = AsyncActor.remote()

    def actor_sync() -> None:
        rt.get(actor.small_value.remote())

    def actor_async() -> None:
        rt.get([actor.small_value.remote() for _ in range(1000)])

    def actor_concurrent() -> None:
        rt.get([concurrent_actor.small_value.remote() for _ in range(1000)])

    def async_actor_sync() -> None:
        rt.get(async_actor.small_value.remote())

    def async_actor_async() -> None:
        rt.get([async_actor.small_value.remote() for _ in range(1000)])

    return [
        ("1:1 actor calls sync", actor_sync, 1, "calls/s"),
        ("1:1 actor calls async", actor_async, 1000, "calls/s"),
        ("1:1 actor calls concurrent", actor_concurrent, 1000, "calls/s"),
        ("1:1 async-actor calls sync", async_actor_sync, 1, "calls/s"),
        ("1:1 async-actor calls async", async_actor_async, 1000, "calls/s"),
        ("single client get calls", get_small, 1, "calls/s"),
        ("single client put calls", put_small, 1, "calls/s"),
        ("multi client put calls", put_multi_small, 1000, "calls/s"),
        ("single client put gigabytes", put_large, 0.8, "GB/s"),
        ("single client tasks and get batch", small_value_batch, 1, "batches/s"),
        ("multi client put gigabytes", put_multi_large, 10 * 0.8, "GB/s"),
        ("single client get object containing 10k refs", get_containing, 1, "calls/s"),
        ("single client wait 1k refs", wait_multiple_refs, 1, "rounds/s"),
        ("single client tasks sync", tasks_sync, 1, "tasks/s"),
        ("single client tasks async", small_value_batch, 1000, "tasks/s"),
    ]


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


def collect(python: str, backend: str, seconds: float, only: str) -> dict[str, dict]:
    result = subprocess.run(
        [python, __file__, "--run", backend, "--seconds", str(seconds), "--only", only],
        capture_output=True,
        text=True,
        timeout=1800,
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ray-python", default=DEFAULT_RAY_PYTHON)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--only", default="", help="run only rows whose name contains this")
    parser.add_argument("--run", choices=["cairn", "ray"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_backend(args.run, args.seconds, args.only)
        return 0
    print(
        f"machine: {os.cpu_count()} CPUs; {args.seconds:g} s per row; "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
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
