"""Append throughput and append-to-tail latency of the event log, beside the raw ceiling.

    python bench/log_append.py [--gcs-url URL] [--seconds N] [--warmup N]

For each configuration (1 and 8 writer processes x batches of 1, 100 and 1000 events):

* log: each writer process appends task events through its own ``EventAppender``
  (``append_many``, batches back to back) for ``--seconds``; a ``Tailer`` in this process,
  starting after the head position, receives them and records ``now - sent_at`` per event
  (it reads everything, as the projector does, and at the projector's pace: under load
  a read at most every ``projector.GATHER_S``, which the latencies include);
* untailed: the log run again with no tailer (on a small machine the tailer's decoding
  competes with the writers and the server for CPU; the raw runs have no reader);
* raw: the same rows, same writers and batch sizes, written with plain asyncpg
  ``copy_records_to_table`` into ``bench_raw_copy`` -- a regular (logged), unpartitioned
  table with no indexes and no constraints, one transaction per batch. This is the ceiling:
  what the server and client can do without the log's head lock, checks and indexes.

Without ``--gcs-url`` (or ``$CAIRN_GCS_URL``) an embedded PostgreSQL is started and
removed afterwards. With a URL, the events appended stay in that server's log (the log is
append-only): point it at a scratch database.

See bench/README.md for what the columns mean and the figures measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import asyncpg

from controlplane.eventlog import EntityKind, Event, EventAppender, Tailer, new_event_id
from controlplane.eventlog.servers import ServersAppender
from controlplane.gcs_url import normalize, redact
from controlplane.projections.projector import GATHER_S as PROJECTOR_GATHER_S

WRITER_COUNTS = (1, 8)
BATCH_SIZES = (1, 100, 1000)
RAW_TABLE = "bench_raw_copy"
RAW_COLUMNS = (
    "position",
    "event_id",
    "recorded_at",
    "job_id",
    "entity_kind",
    "entity_id",
    "event_type",
    "node_id",
    "payload",
    "data",
)
TARGET_RAW_FRACTION = 0.5  # log >= 50% of the raw ceiling at batch 1000
TARGET_P99_MS = 20.0  # p99 append-to-tail latency at 1 writer
START_DELAY_S = 0.3  # writers are told the start time this far ahead, then all start at once
# Writer processes run at a lower priority: on a small machine the tailer (the measuring
# instrument, in this process) and the server should not be starved by the load generators.
WRITER_NICE = 5


# -- writer processes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    mode: str  # "log" or "raw"
    batch: int
    seconds: float
    jobs: tuple[str, ...] = ("job-bench",)  # writer w appends for jobs[w % len(jobs)]


@dataclass(frozen=True)
class WriterResult:
    events: int
    started: float  # wall clock
    finished: float


class _Shutdown(Exception):
    """The parent sent None (close) where a start time was expected."""


def _writer_main(url: str | tuple[str, ...], writer: int, pipe: Connection) -> None:
    """A writer process, alive for the whole benchmark: runs one Job per message until it
    gets None.

    Protocol per job: parent sends Job; writer answers "ready"; parent sends the wall-clock
    start time; writer runs until start + seconds and answers a WriterResult (or
    ("error", traceback), after which it exits)."""
    os.nice(WRITER_NICE)
    asyncio.run(_writer_loop(url, writer, pipe))


async def _writer_loop(url: str | tuple[str, ...], writer: int, pipe: Connection) -> None:
    # One EventAppender and one raw connection per process, opened at first use and kept:
    # a long-lived appender is the normal case, and a new connection's first few appends
    # run on custom plans (see README "Cold connections"), which would skew a 3 s run.
    # several URLs: one log on several servers (controlplane/eventlog/servers.py); raw
    # COPY goes to the first
    urls = (url,) if isinstance(url, str) else url
    appender: EventAppender | ServersAppender | None = None
    conn: asyncpg.Connection | None = None
    try:
        while True:
            job = pipe.recv()  # blocks the loop while idle; nothing else runs here then
            if job is None:
                return
            try:
                if job.mode == "log" and appender is None:
                    appender = await (
                        EventAppender(urls[0]) if len(urls) == 1 else ServersAppender(urls)
                    ).start()
                elif job.mode != "log":
                    conn = conn or await asyncpg.connect(urls[0])
                pipe.send("ready")
                start = _start_time(pipe)
                if job.mode == "log":
                    assert appender is not None
                    result = await _append_loop(appender, writer, job, start)
                else:
                    assert conn is not None
                    result = await _copy_loop(conn, writer, job, start)
            except _Shutdown:
                return
            except Exception:
                pipe.send(("error", f"writer {writer}:\n{traceback.format_exc()}"))
                return
            pipe.send(result)
    finally:
        if appender is not None:
            await appender.close()
        if conn is not None:
            await conn.close()


def _start_time(pipe: Connection) -> float:
    start = pipe.recv()
    if start is None:
        raise _Shutdown
    return float(start)


_tasks_used = 0  # per writer process, over all its jobs: every task id is used once


def _task_numbers(count: int) -> range:
    global _tasks_used
    first, _tasks_used = _tasks_used, _tasks_used + count
    return range(first, first + count)


async def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _append_loop(
    appender: EventAppender | ServersAppender, writer: int, job: Job, start: float
) -> WriterResult:
    await _sleep_until(start)
    end = start + job.seconds
    n = 0
    while time.time() < end:
        events = [
            Event(
                EntityKind.TASK,
                f"task-{writer}-{t}",
                "submitted",
                {"name": "bench.f", "sent_at": 0.0},
                job_id=job.jobs[writer % len(job.jobs)],
            )
            for t in _task_numbers(job.batch)
        ]
        # Append-to-tail latency runs from the append call, so stamp the batch just
        # before it (building 1000 events takes milliseconds of its own).
        sent_at = time.time()
        for event in events:
            event.payload["sent_at"] = sent_at  # type: ignore[index]
        await appender.append_many(events)
        n += job.batch
    return WriterResult(n, start, time.time())


async def _copy_loop(conn: asyncpg.Connection, writer: int, job: Job, start: float) -> WriterResult:
    await _sleep_until(start)
    end = start + job.seconds
    base = (writer + 1) * 10**12  # no shared position counter: that is the point of "raw"
    n = 0
    while time.time() < end:
        now = dt.datetime.now(dt.UTC)
        rows = [
            (
                base + t,
                new_event_id(),
                now,
                "job-bench",
                "task",
                f"task-{writer}-{t}",
                "submitted",
                None,
                json.dumps({"name": "bench.f", "sent_at": time.time()}, separators=(",", ":")),
                None,
            )
            for t in _task_numbers(job.batch)
        ]
        await conn.copy_records_to_table(RAW_TABLE, records=rows, columns=RAW_COLUMNS)
        n += job.batch
    return WriterResult(n, start, time.time())


# -- the parent: pool, tailer, measurement ---------------------------------------------------


class WriterPool:
    """``size`` spawned writer processes, reused by every configuration."""

    def __init__(self, url: str | tuple[str, ...], size: int) -> None:
        # the job each writer appends for: one per shard of the log (``use_shards``), so
        # that with W <= S writers each appends to a shard of its own
        self.jobs: tuple[str, ...] = ("job-bench",)
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for w in range(size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=_writer_main, args=(url, w, child_end), name=f"bench-writer-{w}"
            )
            proc.start()
            child_end.close()
            self.pipes.append(parent_end)
            self.procs.append(proc)

    async def _recv(self, pipe: Connection) -> object:
        message = await asyncio.to_thread(pipe.recv)
        if isinstance(message, tuple) and message and message[0] == "error":
            raise RuntimeError(message[1])
        return message

    async def use_shards(self, conn: asyncpg.Connection) -> int:
        """Writers append for one job per shard of the log, each in its own; returns how
        many shards the log has."""
        count = await conn.fetchval("SELECT shard_count FROM event_log_head WHERE id = 1")
        found: dict[int, str] = {}
        n = 0
        while len(found) < count:
            job = f"job-bench-{n}"
            shard = await conn.fetchval("SELECT cairn_shard_of_v1($1, $2)", job, count)
            found.setdefault(shard, job)
            n += 1
        self.jobs = tuple(found[s] for s in range(count))
        return int(count)

    async def prepare(self, writers: int, job: Job) -> None:
        job = replace(job, jobs=self.jobs)
        for pipe in self.pipes[:writers]:
            pipe.send(job)
        for pipe in self.pipes[:writers]:
            if await self._recv(pipe) != "ready":
                raise RuntimeError("writer protocol error")

    async def go(self, writers: int, start: float) -> list[WriterResult]:
        for pipe in self.pipes[:writers]:
            pipe.send(start)
        results = [await self._recv(pipe) for pipe in self.pipes[:writers]]
        assert all(isinstance(r, WriterResult) for r in results)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


async def _follow(tailer: Tailer, until: asyncio.Future[int]) -> list[tuple[float, list[float]]]:
    """Reads until the tailer reaches the position ``until`` resolves to (known once the
    writers are done). Returns, per read, when it returned and each event's latency (ms)."""
    reads: list[tuple[float, list[float]]] = []
    while not (until.done() and tailer.position >= until.result()):
        events = await tailer.read(wait=0.05)
        now = time.time()
        if events:
            reads.append((now, [(now - e.payload["sent_at"]) * 1000 for e in events]))
    return reads


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Row:
    writers: int
    batch: int
    log_rate: float = 0.0
    untailed_rate: float = 0.0  # the log again, with no tailer running
    raw_rate: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    tailed_in_run: float = 0.0  # fraction of the run's events the tailer got before it ended
    log_events: int = 0
    raw_events: int = 0

    @property
    def ratio(self) -> float:
        return self.log_rate / self.raw_rate if self.raw_rate else float("nan")

    @property
    def untailed_ratio(self) -> float:
        return self.untailed_rate / self.raw_rate if self.raw_rate else float("nan")


def _rate(results: list[WriterResult]) -> tuple[int, float]:
    events = sum(r.events for r in results)
    elapsed = max(r.finished for r in results) - min(r.started for r in results)
    return events, events / elapsed


async def _measure_log(
    pool: WriterPool, conn: asyncpg.Connection, url: str, row: Row, seconds: float
) -> None:
    await pool.prepare(row.writers, Job("log", row.batch, seconds))
    head = await conn.fetchval("SELECT max(last_position) FROM event_log_shards")
    async with Tailer(
        url, after=head, batch_size=10_000, poll_interval=0.1, gather=PROJECTOR_GATHER_S
    ) as tailer:
        until: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        follow = asyncio.create_task(_follow(tailer, until))
        try:
            results = await pool.go(row.writers, time.time() + START_DELAY_S)
            final = await conn.fetchval("SELECT max(last_position) FROM event_log_shards")
            until.set_result(final)
            reads = await asyncio.wait_for(follow, timeout=120)
        finally:
            follow.cancel()
    row.log_events, row.log_rate = _rate(results)
    stored = await conn.fetchval("SELECT count(*) FROM events WHERE position > $1", head)
    if stored != row.log_events:  # (positions of a sharded log skip: count them)
        raise RuntimeError(f"{row.log_events} events appended but {stored} stored")
    if sum(len(lat) for _, lat in reads) != row.log_events:
        raise RuntimeError(f"the tailer got {sum(len(lat) for _, lat in reads)} events")
    # Latency over what the tailer had received by the time the last writer stopped; what
    # it read after that (draining a backlog) is left out and shows as tailed < 100%.
    run_end = max(r.finished for r in results)
    ordered = sorted(x for at, lat in reads if at <= run_end for x in lat)
    row.p50_ms = _percentile(ordered, 0.50)
    row.p99_ms = _percentile(ordered, 0.99)
    row.max_ms = ordered[-1] if ordered else float("nan")
    row.tailed_in_run = len(ordered) / row.log_events if row.log_events else 0.0


async def _measure_untailed(pool: WriterPool, row: Row, seconds: float) -> None:
    """The log's throughput with nothing reading it: the tailer and its decoding share the
    machine's CPUs with the writers and the server, which the raw runs do not have."""
    await pool.prepare(row.writers, Job("log", row.batch, seconds))
    results = await pool.go(row.writers, time.time() + START_DELAY_S)
    _, row.untailed_rate = _rate(results)


async def _measure_raw(pool: WriterPool, row: Row, seconds: float) -> None:
    await pool.prepare(row.writers, Job("raw", row.batch, seconds))
    results = await pool.go(row.writers, time.time() + START_DELAY_S)
    row.raw_events, row.raw_rate = _rate(results)


async def _warm_up(
    pool: WriterPool, seconds: float, modes: tuple[str, ...] = ("log", "raw")
) -> None:
    """Every writer process appends and copies once before anything is measured (imports,
    connections, prepared statements, the first pages of the tables)."""
    if seconds <= 0:
        return
    for mode in modes:
        await pool.prepare(len(pool.pipes), Job(mode, 100, seconds))
        await pool.go(len(pool.pipes), time.time() + START_DELAY_S)


# -- reporting ------------------------------------------------------------------------------


def _cpu_model() -> str:
    """The first CPU's model name, with family/model numbers (VMs often show a vague name)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    name = info.get("model name", "unknown CPU")
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    if "hypervisor" in info.get("flags", "").split():
        name += ", virtualized"
    return name


def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


async def _server_info(conn: asyncpg.Connection) -> str:
    version = await conn.fetchval("SHOW server_version")
    settings = []
    for name in ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers"):
        settings.append(f"{name}={await conn.fetchval(f'SHOW {name}')}")
    return f"PostgreSQL {version} ({', '.join(settings)})"


def _print_table(rows: list[Row]) -> None:
    header = (
        f"{'writers':>7} {'batch':>5} {'log ev/s':>10} {'raw ev/s':>10} {'log/raw':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'tailed':>6} "
        f"{'untailed ev/s':>13} {'untailed/raw':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.writers:>7} {r.batch:>5} {r.log_rate:>10,.0f} {r.raw_rate:>10,.0f} "
            f"{r.ratio:>7.0%} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} {r.max_ms:>7.1f} "
            f"{r.tailed_in_run:>6.0%} {r.untailed_rate:>13,.0f} {r.untailed_ratio:>12.0%}"
        )


def _print_targets(rows: list[Row]) -> None:
    print()
    print("targets:")
    for r in rows:
        if r.batch == 1000:
            met = r.ratio >= TARGET_RAW_FRACTION
            print(
                f"  log >= {TARGET_RAW_FRACTION:.0%} of raw at batch 1000, {r.writers} writer(s): "
                f"{r.ratio:.0%} -> {'MET' if met else 'MISSED'} "
                f"(untailed: {r.untailed_ratio:.0%})"
            )
    for r in rows:
        if r.writers == 1:
            met = r.p99_ms < TARGET_P99_MS
            print(
                f"  p99 append-to-tail < {TARGET_P99_MS:.0f} ms at 1 writer, batch {r.batch}: "
                f"{r.p99_ms:.1f} ms -> {'MET' if met else 'MISSED'}"
            )


# -- main -----------------------------------------------------------------------------------


async def _bench(url: str, seconds: float, warmup: float) -> list[Row]:
    conn = await asyncpg.connect(normalize(url))
    pool: WriterPool | None = None
    try:
        print(f"machine: {_nproc()} CPUs, {_cpu_model()}")
        print(f"server:  {await _server_info(conn)}")
        print(f"python:  {sys.version.split()[0]}, asyncpg {asyncpg.__version__}")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load:    {load} (1/5/15 min averages before the run; other work skews results)")
        print(
            f"each configuration: {seconds:g} s log with tailer, {seconds:g} s log untailed, "
            f"{seconds:g} s raw COPY"
        )
        print()
        await conn.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        await conn.execute(
            f"""CREATE TABLE {RAW_TABLE} (
                position bigint, event_id uuid, recorded_at timestamptz, job_id text,
                entity_kind text, entity_id text, event_type text, node_id text,
                payload jsonb, data bytea)"""
        )
        pool = WriterPool(normalize(url), max(WRITER_COUNTS))
        await pool.use_shards(conn)
        await _warm_up(pool, warmup)
        # As the node daemon does at start: what exists now is never collected again. A
        # reader that decodes hundreds of events a read promotes many short-lived objects,
        # and each full collection then walked every module's objects too: ~50 ms pauses
        # once a second in this process, which the latencies counted (p99 at 1 x 100:
        # ~65 ms without this, ~18 ms with it; 2026-12-07).
        gc.freeze()
        rows = []
        for writers in WRITER_COUNTS:
            for batch in BATCH_SIZES:
                row = Row(writers, batch)
                await _measure_log(pool, conn, url, row, seconds)
                await _measure_untailed(pool, row, seconds)
                await _measure_raw(pool, row, seconds)
                rows.append(row)
                print(
                    f"  done: {writers} writer(s), batch {batch}: log {row.log_rate:,.0f} ev/s "
                    f"(untailed {row.untailed_rate:,.0f}), raw {row.raw_rate:,.0f} ev/s",
                    flush=True,
                )
        return rows
    finally:
        if pool is not None:
            pool.close()
        with contextlib.suppress(Exception):
            await conn.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--gcs-url",
        default=None,
        help="PostgreSQL to use (default: $CAIRN_GCS_URL, else an embedded server)",
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="duration of each measurement (default 3)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unreported warm-up, seconds (default 1)"
    )
    args = parser.parse_args(argv)

    from controlplane.gcs import Gcs  # parent only: migrations pull in alembic/psycopg

    began = time.monotonic()
    with Gcs(args.gcs_url) as gcs:
        where = "embedded PostgreSQL" if gcs.embedded else "PostgreSQL"
        print(f"GCS:     {where} at {redact(gcs.url)}")
        # the owner's URL: the raw COPY baseline makes a table of its own (DDL)
        rows = asyncio.run(_bench(gcs.owner_url, args.seconds, args.warmup))
    print()
    _print_table(rows)
    _print_targets(rows)
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
