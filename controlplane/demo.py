"""The README's demo workload: writer processes walk simulated tasks through their
lifecycle, appending every transition to the log, while this process tails the log,
checks that every event arrives exactly once and in order per task, keeps the
projections, and prints what it measured.

(Until the runtime exists this stands in for a real job; later issues replace it.)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from controlplane.eventlog import EntityKind, Event, log_head_positions, open_appender, open_tailer
from controlplane.gcs import Gcs
from controlplane.gcs_url import redact
from controlplane.projections import Projector

LIFECYCLE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("submitted", {"name": "demo.square"}),
    ("running", {"worker_id": "worker-0", "scheduled": True}),
    ("finished", {}),
)


@dataclass
class DemoReport:
    events: int
    seconds: float
    latencies_ms: list[float]
    task_states: dict[str, int]

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _writer_process(url: str, writer: int, tasks: int, concurrency: int) -> None:
    asyncio.run(_write_tasks(url, writer, tasks, concurrency))


async def _write_tasks(url: str, writer: int, tasks: int, concurrency: int) -> None:
    async with await open_appender(url) as appender:

        async def walk(lane: int) -> None:
            for n in range(lane, tasks, concurrency):
                task_id = f"task-{writer}-{n}"
                for event_type, payload in LIFECYCLE:
                    await appender.append(
                        Event(
                            EntityKind.TASK,
                            task_id,
                            event_type,
                            {
                                **payload,
                                "seq": LIFECYCLE.index((event_type, payload)),
                                "sent_at": time.time(),
                            },
                            job_id=f"job-{writer}",
                            node_id="node-demo",
                        )
                    )

        await asyncio.gather(*(walk(lane) for lane in range(concurrency)))


async def _tail_and_check(url: str, expected: int, after: list[int]) -> tuple[list[float], float]:
    seen: set[object] = set()
    last_seq: dict[str, int] = {}
    latencies: list[float] = []
    start = time.monotonic()
    async with await open_tailer(url, after=after) as tailer:
        while len(seen) < expected:
            for event in await tailer.read(wait=30):
                if event.event_id in seen:
                    raise AssertionError(f"event {event.event_id} delivered twice")
                seen.add(event.event_id)
                seq = event.payload["seq"]
                if seq != last_seq.get(event.entity_id, -1) + 1:
                    raise AssertionError(f"{event.entity_id}: event {seq} out of order")
                last_seq[event.entity_id] = seq
                latencies.append((time.time() - event.payload["sent_at"]) * 1000)
    return latencies, time.monotonic() - start


async def _run(url: str, writers: int, tasks_per_writer: int, concurrency: int) -> DemoReport:
    after = await log_head_positions(url)
    conn = await asyncpg.connect(url)
    try:
        expected = writers * tasks_per_writer * len(LIFECYCLE)
        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_writer_process, args=(url, w, tasks_per_writer, concurrency))
            for w in range(writers)
        ]
        tail = asyncio.create_task(_tail_and_check(url, expected, after))
        for proc in procs:
            proc.start()
        latencies, seconds = await tail
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"writer process exited with {proc.exitcode}")
        async with Projector(url) as projector:
            await projector.catch_up()
        rows = await conn.fetch("SELECT state, count(*) AS n FROM tasks GROUP BY state")
        return DemoReport(expected, seconds, latencies, {r["state"]: r["n"] for r in rows})
    finally:
        await conn.close()


def run_demo(
    url: str | None = None, writers: int = 4, tasks_per_writer: int = 2500, concurrency: int = 32
) -> DemoReport:
    with Gcs(url) as gcs:
        where = "embedded PostgreSQL" if gcs.embedded else "PostgreSQL"
        print(f"GCS: {where} at {redact(gcs.url)}")
        report = asyncio.run(_run(gcs.url, writers, tasks_per_writer, concurrency))
    rate = report.events / report.seconds
    print(
        f"{writers} writer processes appended {report.events:,} events "
        f"({writers * tasks_per_writer:,} tasks x {len(LIFECYCLE)} transitions, "
        f"{concurrency} concurrent tasks each) in {report.seconds:.2f} s: {rate:,.0f} events/s"
    )
    print(
        f"the tailer got every event exactly once, each task's in order; append-to-tail "
        f"latency p50 {report.percentile(0.5):.1f} ms, p99 {report.percentile(0.99):.1f} ms"
    )
    states = ", ".join(f"{state} {n:,}" for state, n in sorted(report.task_states.items()))
    print(f"SELECT state, count(*) FROM tasks GROUP BY state -> {states}")
    return report
