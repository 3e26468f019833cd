"""Issue 20's append targets side by side: this tree against another checkout of Cairn.

    python bench/append_versus.py --versus-tree DIR [--rounds N] [--seconds N] [--shards S]

The rows of bench/log_append.py that the targets name -- 8 writer processes x batch 1
(appends/s) and 8 x 1000 (% of raw COPY) -- run on this tree and on ``DIR`` (e.g. a git
worktree of the code before issue 20), one after the other, ``--rounds`` times, each run
on an embedded PostgreSQL of its own made for it, so that neither side finds the other's
events. Each run is a process in its tree (``PYTHONPATH`` and the tree's own
``bench/log_append.py``: its writers, its tailer, its raw COPY). This tree's log has
``--shards`` shards (each writer appending for a job of its own shard, as
``bench/scale.py --appends`` does); a tree without shards runs its single log.

Printed per round and side: the log's rate with a tailer reading everything, without it
(untailed), and raw COPY's in the same run; then the medians and their ratios. The
machine's busy share during each run says whether the CPU or a lock bound it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
ROWS = ((8, 1), (8, 1000))


def _busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


async def _child(shards: int, seconds: float, warmup: float) -> dict[str, Any]:
    """One run, in the tree on sys.path: each row's log, untailed and raw rates."""
    import asyncpg
    import log_append as la

    from controlplane import schema
    from controlplane.gcs import Gcs
    from controlplane.gcs_url import normalize

    figures: dict[str, Any] = {}
    with Gcs(None) as gcs:
        url = normalize(gcs.owner_url)
        conn = await asyncpg.connect(url)
        pool = la.WriterPool(url, 8)
        try:
            await conn.execute(
                f"""CREATE TABLE {la.RAW_TABLE} (
                    position bigint, event_id uuid, recorded_at timestamptz, job_id text,
                    entity_kind text, entity_id text, event_type text, node_id text,
                    payload jsonb, data bytea)"""
            )
            await la._warm_up(pool, warmup)
            sharded = hasattr(schema, "set_log_shards") and shards > 1
            if sharded:
                await asyncio.to_thread(schema.set_log_shards, url, shards)
                await pool.use_shards(conn)
            figures["shards"] = shards if sharded else 1
            for writers, batch in ROWS:
                row = la.Row(writers, batch)
                at = _busy()
                await la._measure_log(pool, conn, url, row, seconds)
                tailed = _busy()
                await la._measure_untailed(pool, row, seconds)
                untailed = _busy()
                await la._measure_raw(pool, row, seconds)
                raw = _busy()
                figures[f"{writers}x{batch}"] = {
                    "log": row.log_rate,
                    "untailed": row.untailed_rate,
                    "raw": row.raw_rate,
                    "busy": [_share(at, tailed), _share(tailed, untailed), _share(untailed, raw)],
                }
        finally:
            pool.close()
            await conn.close()
    return figures


def _run(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [
        sys.executable,
        __file__,
        "--child",
        str(tree),
        "--shards",
        str(args.shards),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
    ]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the run in {tree} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _line(label: str, figures: dict[str, Any]) -> str:
    one, thousand = figures["8x1"], figures["8x1000"]
    busy = "/".join(f"{b:.0%}" for b in one["busy"][:2])
    return (
        f"  {label:<6} S={figures['shards']}  8 x 1: log {one['log']:7,.0f}  untailed "
        f"{one['untailed']:7,.0f}  raw {one['raw']:7,.0f} (busy {busy})  |  8 x 1000: log "
        f"{thousand['log'] / thousand['raw']:.0%} untailed "
        f"{thousand['untailed'] / thousand['raw']:.0%} of raw"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--versus-tree", metavar="DIR", help="the other checkout of Cairn")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--seconds", type=float, default=5.0, help="per rate measured")
    parser.add_argument("--warmup", type=float, default=3.0, help="appends before measuring")
    parser.add_argument("--shards", type=int, default=8, help="this tree's log's shards")
    parser.add_argument("--child", metavar="TREE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.path[:0] = [str(Path(args.child) / "bench"), args.child]
        figures = asyncio.run(_child(args.shards, args.seconds, args.warmup))
        print(json.dumps(figures))
        return 0
    if not args.versus_tree:
        parser.error("--versus-tree DIR is needed")
    other = Path(args.versus_tree).resolve()
    print(
        f"machine: {os.cpu_count()} CPUs; {args.seconds:g} s per rate; this tree {HERE} "
        f"against {other}; {time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {"this": [], "other": []}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}", flush=True)
        for label, tree in (("this", HERE), ("other", other)):
            runs[label].append(_run(tree, args))
            print(_line(label, runs[label][-1]), flush=True)

    def median(label: str, row: str, key: str) -> float:
        return statistics.median(r[row][key] for r in runs[label])

    def share(label: str, key: str) -> float:
        return statistics.median(r["8x1000"][key] / r["8x1000"]["raw"] for r in runs[label])

    print("medians")
    for key in ("log", "untailed", "raw"):
        this, that = median("this", "8x1", key), median("other", "8x1", key)
        print(f"  8 x 1 {key:<9} this {this:7,.0f}  other {that:7,.0f}  ratio {this / that:.2f}")
    for key in ("log", "untailed"):
        print(
            f"  8 x 1000 {key:<9} of raw COPY: this {share('this', key):.0%}  "
            f"other {share('other', key):.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
