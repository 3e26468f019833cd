"""What a merged reader of a log on two servers costs its writers, with its busy servers'
tailers unlistening (as the projector's reader does) and with them listening (as before):
8 writers x batch 1, side by side in one run.

    python bench/merged_reader.py [--rounds N] [--seconds S]

Two embedded PostgreSQL servers made for the run hold one log of two shards (one a
server); ``bench/log_append.py``'s writer processes append to it (each a
``ServersAppender``) while a ``ServersTailer`` at the projector's pace
(``projector.GATHER_S``) follows it. Each round measures the writers' appends/s with
the reader as it is, with the reader as it was (``ServersTailer._unlisten`` made a
no-op in this process: its busy servers' tailers keep listening; the two in turn,
alternating which goes first), and with no reader. Prints each round and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import log_append as la  # (this directory is on sys.path when run)

from controlplane import schema
from controlplane.eventlog.servers import ServersTailer, servers_head_positions
from controlplane.projections.projector import GATHER_S

WRITERS, BATCH = 8, 1
UNLISTENING = ServersTailer._unlisten


async def _kept_listening(_reader: ServersTailer) -> None:
    """The merged reader before it unlistened: its servers' tailers kept listening."""


async def _tailed(pool: la.WriterPool, urls: list[str], seconds: float) -> float:
    """The writers' appends/s while a merged reader follows the log."""
    await pool.prepare(WRITERS, la.Job("log", BATCH, seconds))
    heads = await servers_head_positions(urls)
    done = asyncio.Event()
    async with ServersTailer(
        urls, after=heads, batch_size=10_000, poll_interval=0.1, gather=GATHER_S
    ) as reader:

        async def follow() -> int:
            read = 0
            while not done.is_set():
                read += len(await reader.read(wait=0.05))
            return read

        following = asyncio.create_task(follow())
        results = await pool.go(WRITERS, time.time() + la.START_DELAY_S)
        done.set()
        await following
    return la._rate(results)[1]


async def _run(urls: list[str], rounds: int, seconds: float) -> dict[str, list[float]]:
    pool = la.WriterPool(tuple(urls), WRITERS)
    try:
        await asyncio.to_thread(schema.set_log_servers, urls, 2)
        await la._warm_up(pool, 1.0, modes=("log",))
        rates: dict[str, list[float]] = {"unlistening": [], "listening": [], "untailed": []}
        for n in range(rounds):
            order = ("unlistening", "listening") if n % 2 == 0 else ("listening", "unlistening")
            for label in order:
                ServersTailer._unlisten = (  # type: ignore[method-assign]
                    UNLISTENING if label == "unlistening" else _kept_listening
                )
                rates[label].append(await _tailed(pool, urls, seconds))
            row = la.Row(WRITERS, BATCH)
            await la._measure_untailed(pool, row, seconds)
            rates["untailed"].append(row.untailed_rate)
            said = ", ".join(f"{label} {values[-1]:,.0f}" for label, values in rates.items())
            print(f"round {n + 1}: appends/s {said}", flush=True)
        return rates
    finally:
        ServersTailer._unlisten = UNLISTENING  # type: ignore[method-assign]
        pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    from controlplane.gcs import Gcs
    from controlplane.gcs_url import normalize

    print(f"machine: {la._cpu_model()}, {la._nproc()} CPUs")
    with Gcs(None) as first, Gcs(None) as second:
        urls = [normalize(first.owner_url), normalize(second.owner_url)]
        rates = asyncio.run(_run(urls, args.rounds, args.seconds))
    median = {label: statistics.median(values) for label, values in rates.items()}
    print(
        f"medians (appends/s, {WRITERS} writers x batch {BATCH}, 2 servers): "
        + ", ".join(f"{label} {value:,.0f}" for label, value in median.items())
    )
    print(
        f"unlistening / listening {median['unlistening'] / median['listening']:.3f}; the "
        f"reader costs the writers {1 - median['unlistening'] / median['untailed']:.1%} "
        f"(listening: {1 - median['listening'] / median['untailed']:.1%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
