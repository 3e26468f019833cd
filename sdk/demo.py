"""``python -m sdk.demo``: a small Ray program run unchanged on a private Cairn cluster
(embedded PostgreSQL, a node daemon, worker processes, shared memory), then what the
log recorded about it, in SQL."""

from __future__ import annotations

import asyncio
import time

import numpy as np

import sdk as ray


@ray.remote
def sample(seed: int, n: int) -> int:
    """Points of a random sample of the unit square that fall in the quarter circle."""
    rng = np.random.default_rng(seed)
    x, y = rng.random(n), rng.random(n)
    return int(np.count_nonzero(x * x + y * y <= 1.0))


@ray.remote
def total(*counts: int) -> int:
    return sum(counts)


@ray.remote
def column_means(matrix: np.ndarray) -> np.ndarray:
    return matrix.mean(axis=0)


async def _log_report(url: str, job_id: str) -> list[str]:
    import asyncpg

    from controlplane.projections import Projector

    async with Projector(url) as projector:
        await projector.catch_up()
    conn = await asyncpg.connect(url)
    try:
        lines = []
        rows = await conn.fetch(
            "SELECT entity_kind::text AS kind, event_type, count(*) AS n FROM events "
            "WHERE job_id = $1 OR job_id IS NULL GROUP BY 1, 2 ORDER BY 1, 3 DESC",
            job_id,
        )
        lines.append(
            "events by kind and type: "
            + ", ".join(f"{r['kind']}.{r['event_type']} {r['n']}" for r in rows)
        )
        rows = await conn.fetch(
            "SELECT name, state, count(*) AS n FROM tasks WHERE job_id = $1 "
            "GROUP BY 1, 2 ORDER BY 1",
            job_id,
        )
        lines.append(
            "SELECT name, state, count(*) FROM tasks GROUP BY 1, 2 -> "
            + ", ".join(f"{r['name'].rsplit('.', 1)[-1]} {r['state']} {r['n']}" for r in rows)
        )
        return lines
    finally:
        await conn.close()


def main() -> None:
    started = time.perf_counter()
    context = ray.init()
    print(
        f"cluster up in {time.perf_counter() - started:.1f} s: node {context.get_node_id()[:8]}, "
        f"{ray.cluster_resources()['CPU']:.0f} CPUs, log at "
        f"{context.gcs_address.split('@')[-1]}"
    )

    started = time.perf_counter()
    samples, per_sample = 32, 500_000
    counts = [sample.remote(seed, per_sample) for seed in range(samples)]
    inside = ray.get(total.remote(*counts))
    print(
        f"pi ~ {4 * inside / (samples * per_sample):.5f} from {samples} tasks and one "
        f"reduce over their refs, in {time.perf_counter() - started:.2f} s"
    )

    started = time.perf_counter()
    matrix = ray.put(np.arange(64 * 1024 * 1024, dtype=np.float64).reshape(-1, 1024))
    means = ray.get(column_means.remote(matrix))
    print(
        f"512 MiB matrix put once, read by a worker in place (shared memory): column "
        f"means {means[0]:.1f} .. {means[-1]:.1f}, in {time.perf_counter() - started:.2f} s"
    )

    ready, pending = ray.wait([sample.remote(s, 10_000) for s in range(8)], num_returns=4)
    print(f"wait: {len(ready)} ready, {len(pending)} pending")

    job_id = context.get_job_id()
    for line in asyncio.run(_log_report(context.gcs_address, job_id)):
        print(line)
    ray.shutdown()


if __name__ == "__main__":
    main()
