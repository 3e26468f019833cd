"""Failover to a streaming replica during a job: the primary is SIGKILLed, the replica
promoted, and the cluster -- given both in one multi-host URL -- carries on there.
Every event acknowledged before the primary died is on the new primary (the replica is
synchronous); the job completes; the pause clients saw is measured.

Then failover without an operator (``--gcs-replicas 1``): the watchdog promotes the
replica of a killed or frozen primary by itself, over TLS for other machines too, drops
a lost replica so that the primary goes on, and a job on such a head rides out the loss
of its primary. And fencing: a process that saw the promoted server's epoch refuses the
old primary when it comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
from hosts import PYTHON, Host, Hosts, hosts_fixture, session_of
from log_rows import fetch_rows, rows
from processes import ROOT, isolated_env, private_temp_dir, run_cairn

import sdk as ray
from controlplane import schema, tls
from controlplane.embedded_postgres import EmbeddedPostgres, ServerTls
from controlplane.errors import GcsFencedError, LogDivergedError
from controlplane.eventlog import EntityKind, Event, EventAppender, Tailer, fencing
from controlplane.eventlog.connection import connect
from controlplane.eventlog.servers import ServersAppender, log_urls, open_tailer, shard_of
from controlplane.gcs import Gcs
from controlplane.gcs_url import hosts, with_hosts, with_query
from controlplane.postgres_processes import server_processes
from controlplane.session_dirs import alive

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def servers() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    primary = EmbeddedPostgres()
    replica = None
    try:
        schema.upgrade(primary.start())
        replica = primary.start_replica()
        yield primary, replica
    finally:
        ray.shutdown()
        if replica is not None:
            replica.stop()
        primary.stop()


@ray.remote
def square(x: int) -> int:
    return x * x


def test_failover_to_a_promoted_replica_loses_no_acknowledged_event(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    primary, replica = servers
    password = primary.url.split("@")[0].rsplit(":", 1)[1]
    url = (
        f"postgresql://cairn:{password}@127.0.0.1:{primary.port},127.0.0.1:{replica.port}"
        "/cairn?target_session_attrs=read-write"
    )
    ray.init(num_cpus=2, gcs_url=url)
    refs = [square.remote(i) for i in range(3000)]
    deadline = time.monotonic() + 60
    while len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < 300:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # a result is visible only once its finished event is durable: these were acknowledged
    acknowledged = [r.task_id().hex() for r in ray.wait(refs, num_returns=len(refs), timeout=0)[0]]
    assert len(acknowledged) < len(refs)  # the primary dies mid-job
    primary.kill()
    killed = time.monotonic()
    time.sleep(0.5)  # the time an operator (or a watchdog) takes to notice
    replica.promote()
    assert ray.get(refs, timeout=120) == [i * i for i in range(3000)]
    pause = time.monotonic() - killed
    print(f"failover: the job went on {pause:.2f}s after the primary died")

    rows = asyncio.run(
        fetch_rows(
            replica.url,
            "SELECT entity_id, array_agg(event_type ORDER BY position) AS history "
            "FROM events WHERE entity_kind = 'task' GROUP BY entity_id",
        )
    )
    history = {row["entity_id"]: row["history"] for row in rows}
    for task_id in acknowledged:  # acknowledged before the primary died: all there
        assert "finished" in history[task_id], task_id
    for ref in refs:  # and the whole job, each transition once
        assert history[ref.task_id().hex()] == ["submitted", "running", "finished"]


def test_a_tailer_that_read_events_the_promoted_replica_lacks_stops(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    """Events visible on the old primary that never reached the replica (here: the
    replica stopped streaming and the primary stopped waiting for it) were read by one
    tailer; after the failover the log holds other events at those positions. That
    tailer refuses to go on (LogDivergedError); one that read only what the replica had
    goes on with the new primary's events."""
    primary, replica = servers
    password = primary.url.split("@")[0].rsplit(":", 1)[1]
    both = (
        f"postgresql://cairn:{password}@127.0.0.1:{primary.port},127.0.0.1:{replica.port}"
        "/cairn?target_session_attrs=read-write"
    )

    async def run() -> None:
        async with (
            EventAppender(primary.url) as appender,
            Tailer(both) as diverged,
            Tailer(both) as faithful,
        ):
            replicated = await appender.append_many([_job(f"both {i}") for i in range(3)])
            _wait(lambda: _replica_has(replica, replicated[-1]), "the replica has them")
            assert len(await faithful.read(wait=5)) == 3
            replica.execute("ALTER SYSTEM SET primary_conninfo = ''")  # it stops following
            replica.execute("SELECT pg_reload_conf()")
            primary.drop_synchronous_standby()
            await appender.append_many([_job(f"old primary only {i}") for i in range(2)])
            assert len(await diverged.read(wait=5)) == 5  # 3 replicated, 2 not
        primary.kill()
        replica.promote()
        fencing.record_promotion(replica.url)
        async with EventAppender(replica.url) as appender:
            await appender.append_many([_job(f"new primary {i}") for i in range(4)])
        async with Tailer(both, unavailable_timeout=10) as check:
            assert [e.entity_id for e in await check.read(wait=5)][3:] == [
                f"new primary {i}" for i in range(4)
            ]
        with pytest.raises(LogDivergedError, match=r"no longer holds 2 event\(s\)"):
            await diverged.read(wait=10)
        after = await faithful.read(wait=10)  # (positions 4 to 7: the new primary's)
        assert [e.entity_id for e in after] == [f"new primary {i}" for i in range(4)]
        await diverged.close()
        await faithful.close()

    asyncio.run(run())


def _replica_has(replica: EmbeddedPostgres, position: int) -> bool:
    return _count(replica.url, f"SELECT count(*) FROM events WHERE position = {position}") == 1


# -- fencing ---------------------------------------------------------------------------


def _job(name: str) -> Event:
    return Event(EntityKind.JOB, name, "submitted", {"entrypoint": name})


def _count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


def test_a_process_that_saw_the_new_epoch_refuses_the_old_primary(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    primary, replica = servers
    password = primary.url.split("@")[0].rsplit(":", 1)[1]
    both = (
        f"postgresql://cairn:{password}@127.0.0.1:{primary.port},127.0.0.1:{replica.port}"
        "/cairn?target_session_attrs=read-write"
    )

    system_id = rows(primary.url, "SELECT system_identifier AS s FROM pg_control_system()")[0]["s"]

    async def run() -> None:
        async with EventAppender(both) as appender:
            await appender.append(_job("before"))
            primary.kill()
            replica.promote()
            await appender.append(_job("after"))  # on the promoted replica: epoch 2
            seen = fencing.highest_seen((system_id, "cairn"))
            assert seen is not None and (seen.epoch, seen.timeline) == (2, 2)
            # the old primary comes back (restarted on its data, as a restored copy would)
            primary.start()
            # the appender's next connection: the URL names the old primary first, and
            # it takes writes; it is refused and the current one used
            await appender._conn.close()  # type: ignore[union-attr]
            await appender.append(_job("after the old primary came back"))
        # pointed at the old primary alone: refused, naming both epochs
        with pytest.raises(GcsFencedError) as refused:
            await EventAppender(primary.url, unavailable_timeout=0.5).start()
        message = str(refused.value)
        assert "epoch 1 (timeline 1" in message and "behind epoch 2 (timeline 2" in message
        assert "127.0.0.1" in message and password not in message

    asyncio.run(run())
    jobs = "SELECT count(*) FROM events WHERE entity_kind = 'job'"
    assert _count(replica.url, jobs) == 3
    assert _count(primary.url, jobs) == 1  # nothing reached the old primary after it
    epochs = rows(replica.url, "SELECT epoch, timeline FROM gcs_epochs ORDER BY epoch")
    assert [(r["epoch"], r["timeline"]) for r in epochs] == [(1, 1), (2, 2)]


def test_an_epoch_behind_or_beside_the_highest_seen_is_refused() -> None:
    def epoch(n: int, epoch_id: str) -> fencing.Epoch:
        return fencing.Epoch(-1, "fencing-unit-test", n, epoch_id, n)

    url = "postgresql://u:secret@h1:1,h2:2/db"
    try:
        fencing.accept(epoch(1, "a"), url)
        fencing.accept(epoch(2, "b"), url)  # moves on
        fencing.accept(epoch(2, "b"), url)  # the same server again
        with pytest.raises(GcsFencedError, match="behind epoch 2"):
            fencing.accept(epoch(1, "a"), url)
        with pytest.raises(GcsFencedError, match="a fork"):
            fencing.accept(epoch(2, "c"), url)
        assert fencing.highest_seen((-1, "fencing-unit-test")) == epoch(2, "b")
    finally:
        fencing._highest.pop((-1, "fencing-unit-test"), None)


# -- the watchdog ----------------------------------------------------------------------


def _signal_server(pid: int, sig: signal.Signals) -> list[int]:
    """Sends ``sig`` to a postmaster and its backends at once (SIGKILL: as the loss of
    its machine would); returns their pids."""
    pids = server_processes(pid)
    for each in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, sig)
    return pids


def _wait(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.02)


def _tls_for_gcs(directory: Path, host: str) -> tuple[ServerTls, dict[str, str]]:
    """A cluster CA's server certificate for ``host`` and a client's TLS parameters."""
    client, authority = tls.NodeTls.make_head(directory, [host, "127.0.0.1"])
    key = tls.new_key()
    cert = authority.issue(key.public_key(), "cairn gcs", [host, "127.0.0.1"], client=False)
    return ServerTls(cert, tls.key_pem(key), authority.certificate), client.postgres_params()


def test_the_watchdog_promotes_the_replica_of_a_killed_primary_over_tls() -> None:
    """Both servers serve other machines (here at 127.0.0.2) over TLS with the cluster's
    certificate, and the cluster URL names both: a client of another machine carries on
    through the primary's SIGKILL with no command typed."""
    work = private_temp_dir()
    server_tls, client_params = _tls_for_gcs(work, "127.0.0.2")
    events: list[str] = []
    gcs = Gcs(
        session_dir=work,
        listen_host="127.0.0.2",
        server_tls=server_tls,
        replicas=1,
        on_event=events.append,
    )
    try:
        gcs.start()
        primary, replica = gcs.servers
        assert (primary.tls, replica.tls) == (server_tls, server_tls)
        assert f"@127.0.0.2:{primary.port},127.0.0.2:{replica.port}/" in gcs.cluster_url
        assert "target_session_attrs=read-write" in gcs.cluster_url
        remote = with_query(gcs.cluster_url, client_params)
        with pytest.raises(psycopg.OperationalError):  # no TLS, no way in
            psycopg.connect(gcs.cluster_url, connect_timeout=5).close()

        async def run() -> list[int]:
            async with EventAppender(remote) as appender:
                positions = [await appender.append(_job(f"before-{i}")) for i in range(50)]
                killed = _signal_server(primary.pid or 0, signal.SIGKILL)
                positions += [await appender.append(_job(f"after-{i}")) for i in range(50)]
                conn = appender._conn
                assert conn is not None
                assert await conn.fetchval("SELECT inet_server_port()") == replica.port
                _wait(lambda: not any(alive(pid) for pid in killed), "the primary is gone")
                return positions

        assert asyncio.run(run()) == list(range(1, 101))
        _wait(gcs.watchdog.done.is_set, "the watchdog acted")  # type: ignore[union-attr]
        assert gcs.embedded is replica and gcs.replica is None
        assert any("the GCS failed over" in e and "epoch 2" in e for e in events), events
        assert _count(replica.url, "SELECT count(*) FROM events") == 100
    finally:
        gcs.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_a_frozen_primary_is_killed_before_its_replica_is_promoted() -> None:
    gcs = Gcs(replicas=1, on_event=lambda _: None)
    frozen: list[int] = []
    try:
        gcs.start()
        primary, replica = gcs.servers

        async def run() -> float:
            async with EventAppender(gcs.url) as appender:
                await appender.append(_job("before"))
                frozen.extend(_signal_server(primary.pid or 0, signal.SIGSTOP))
                stopped = time.monotonic()
                await appender.append(_job("after"))  # waits for the promotion
                return time.monotonic() - stopped

        pause = asyncio.run(run())
        watchdog = gcs.watchdog
        assert watchdog is not None
        _wait(watchdog.done.is_set, "the watchdog acted")
        assert watchdog.promoted.is_set()
        assert 0.5 <= pause < 30, pause  # not before the bound: it might only be slow
        # never two primaries: the frozen one was killed before the promotion
        _wait(lambda: not any(alive(pid) for pid in frozen), "the frozen primary is gone")
        assert _count(replica.url, "SELECT count(*) FROM events") == 2
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        gcs.stop()


def test_a_lost_replica_is_dropped_and_the_primary_goes_on() -> None:
    """Without the watchdog, every commit would wait for ever for the dead replica."""
    events: list[str] = []
    gcs = Gcs(replicas=1, on_event=events.append)
    try:
        gcs.start()
        primary, replica = gcs.servers
        killed = _signal_server(replica.pid or 0, signal.SIGKILL)

        async def run() -> None:
            async with EventAppender(gcs.url) as appender:
                await asyncio.wait_for(appender.append(_job("alone")), 30)

        asyncio.run(run())
        assert gcs.embedded is primary and gcs.watchdog is not None
        assert not gcs.watchdog.promoted.is_set()
        assert any("the GCS replica" in e and "is lost" in e for e in events), events
        _wait(lambda: not any(alive(pid) for pid in killed), "the replica is gone")
        assert _count(primary.url, "SELECT count(*) FROM events") == 1
    finally:
        gcs.stop()


async def test_a_process_dials_first_the_host_that_last_answered(gcs_url: str) -> None:
    """A multi-host URL whose first host takes connections and never answers (a lost
    machine, packets dropped): the first connection waits out its timeout there, the
    process's later ones go straight to the host that answered."""
    dialled = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dialled
        dialled += 1
        while await reader.read(1024):  # (until the client gives up)
            pass
        writer.close()

    lost = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = lost.sockets[0].getsockname()[1]
    url = with_query(
        with_hosts(gcs_url, [f"127.0.0.1:{port}", *hosts(gcs_url)]),
        {"target_session_attrs": "read-write"},
    )
    try:
        for _ in range(3):
            conn = await connect(url, timeout=1, fence=False)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
    finally:
        lost.close()
    assert dialled == 1


def _task_on_shard(shard: int, task_id: str) -> Event:
    """A task's event in ``shard`` of two (its job's)."""
    job = next(f"job-{n}" for n in range(1000) if shard_of(f"job-{n}", 2) == shard)
    return Event(EntityKind.TASK, task_id, "submitted", {"name": "f"}, job_id=job)


def test_each_server_of_a_log_fails_over_to_its_own_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A log on two embedded servers (``--log-servers 2 --gcs-replicas 1``): each has
    its replica and its watchdog, and server 0's ``log_servers`` names both of server 1.
    Server 1's primary frozen: a writer of server 0's shard goes on meanwhile, one of
    server 1's waits, and lands on server 1's promoted replica; server 0 stays the
    primary at epoch 1; the merged reader and server 0's union read every event once."""
    monkeypatch.setenv("CAIRN_GCS_FAILOVER_AFTER_S", "3")
    events: list[str] = []
    gcs = Gcs(replicas=1, log_servers=2, log_shards=2, on_event=events.append)
    frozen: list[int] = []
    try:
        gcs.start()
        (one,), (replica,) = gcs.other_log_servers, gcs.other_replicas
        urls = asyncio.run(log_urls(gcs.url))
        assert hosts(urls[1]) == [f"127.0.0.1:{one.port}", f"127.0.0.1:{replica.port}"]
        assert "target_session_attrs=read-write" in urls[1]

        async def run() -> None:
            async with ServersAppender(urls) as both, EventAppender(urls[0]) as zero:
                await both.append(_task_on_shard(1, "before"))
                frozen.extend(_signal_server(one.pid or 0, signal.SIGSTOP))
                waiting = asyncio.ensure_future(both.append(_task_on_shard(1, "after")))
                for i in range(20):
                    await zero.append(_task_on_shard(0, f"meanwhile-{i}"))
                assert not waiting.done() and not gcs.other_watchdogs[0].promoted.is_set()
                await asyncio.wait_for(waiting, 60)

        asyncio.run(run())
        _wait(gcs.other_watchdogs[0].done.is_set, "server 1's watchdog acted")
        assert gcs.other_watchdogs[0].promoted.is_set() and gcs.other_log_servers == [replica]
        assert gcs.watchdog is not None and not gcs.watchdog.promoted.is_set()
        assert any("the GCS's server 1 failed over" in e for e in events), events
        _wait(lambda: not any(alive(pid) for pid in frozen), "the frozen primary is gone")
        epochs = "SELECT count(*) FROM gcs_epochs"
        assert (_count(gcs.owner_urls[0], epochs), _count(gcs.owner_urls[1], epochs)) == (1, 2)
        assert _count(gcs.owner_url, "SELECT count(*) FROM log_union.events") == 22

        async def read_all() -> list[str]:
            got: list[str] = []
            async with await open_tailer(gcs.url) as reader:
                while len(got) < 22:
                    got += [e.entity_id for e in await reader.read(wait=10)]
            return got

        expected = ["before", "after", *(f"meanwhile-{i}" for i in range(20))]
        assert sorted(asyncio.run(read_all())) == sorted(expected)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        gcs.stop()


# -- a job on a `cairn start --head --gcs-replicas 1` head -------------------------------

# A driver: runs a job; once 200 of its tasks are done, prints their ids (acknowledged:
# a result is visible only once its finished event is durable) and waits for a line on
# stdin (the test kills the GCS's primary meanwhile); then more tasks, the whole job's
# results, and what the log it reaches says, as JSON.
JOB = """
import asyncio, json, sys, time
import sdk as ray

ray.init(address="auto")

@ray.remote
def square(x):
    return x * x

refs = [square.remote(i) for i in range(2000)]
while len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < 200:
    time.sleep(0.01)
acked = [r.task_id().hex() for r in ray.wait(refs, num_returns=len(refs), timeout=0)[0]]
print(json.dumps(acked), flush=True)
sys.stdin.readline()
more = [square.remote(i) for i in range(2000, 2500)]
assert ray.get(refs + more, timeout=120) == [i * i for i in range(2500)]

async def log(url):
    from controlplane.eventlog.connection import connect  # each host its own timeout
    from controlplane.eventlog.servers import log_urls
    conns = [await connect(server) for server in await log_urls(url)]
    home, last = conns[0], conns[-1]  # (a log on one server: the same)
    try:
        return {
            "history": {r["entity_id"]: r["history"] for r in await home.fetch(
                "SELECT entity_id, array_agg(event_type ORDER BY position) AS history "
                "FROM log_union.events WHERE entity_kind = 'task' GROUP BY entity_id")},
            "deaths": [[r["entity_id"], r["payload"]] for r in await home.fetch(
                "SELECT entity_id, payload::text AS payload FROM log_union.events "
                "WHERE entity_kind = 'node' AND event_type = 'dead'")],
            "epochs": [[[r["epoch"], r["timeline"]] for r in await conn.fetch(
                "SELECT epoch, timeline FROM gcs_epochs ORDER BY epoch")] for conn in conns],
            "port": await last.fetchval("SELECT inet_server_port()"),
            "recovery": await last.fetchval("SELECT pg_is_in_recovery()"),
        }
    finally:
        for conn in conns:
            await conn.close()

found = asyncio.run(log(ray.get_runtime_context().gcs_address))
print(json.dumps({"acked": acked, "tasks": [r.task_id().hex() for r in refs + more], **found}))
ray.shutdown()
"""


def _ride_out(
    driver: subprocess.Popen[str],
    kill_primary: Callable[[], None],
    timeout: float = 150,
    hosts: Sequence[Host] = (),
) -> dict:
    """Drives ``JOB``: kills the primary once tasks were acknowledged, and returns what
    the driver reported at the end (or fails with the node logs of ``hosts``)."""
    assert driver.stdin is not None and driver.stdout is not None
    line = driver.stdout.readline()
    assert line, driver.communicate()
    acked = json.loads(line)
    kill_primary()
    driver.stdin.write("killed\n")
    driver.stdin.flush()
    out, err = driver.communicate(timeout=timeout)
    assert driver.returncode == 0, err[-4000:] + "".join(h.node_logs(60) for h in hosts)
    job = json.loads(out.strip().splitlines()[-1])
    assert job["acked"] == acked and len(acked) >= 200 and len(job["tasks"]) == 2500
    return job


def _check_log(job: dict, replica_port: int, failed_over: int = 1) -> None:
    """The log is on the promoted replica (of its last server: a log on several servers
    lost that one's primary, and the ``failed_over`` - 1 before it theirs): every
    acknowledged event, the whole job, each transition once, the promotions' epochs (the
    other servers' unchanged); and the pause declared no node dead."""
    assert job["port"] == replica_port
    history = job["history"]
    for task_id in job["acked"]:
        assert "finished" in history[task_id], task_id
    for task_id in job["tasks"]:  # (spilled and placed too, for a task run elsewhere)
        events = history[task_id]
        assert events[0] == "submitted" and events[-1] == "finished", events
        assert len(events) == len(set(events)) and "running" in events, events
    assert job["deaths"] == []
    untouched = len(job["epochs"]) - failed_over
    assert job["epochs"] == [[[1, 1]]] * untouched + [[[1, 1], [2, 2]]] * failed_over


def _cairn(tmp: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cairn(*args, check=check, tmp=tmp)


def _postmaster(pid_file: str) -> tuple[int, int]:
    """(pid, port) of a server from its ``postmaster.pid`` file's text."""
    lines = pid_file.splitlines()
    return int(lines[0]), int(lines[3])


# the driver of JOB, its job's events on server 1 of two (another job until they are)
ON_SERVER_1 = """ray.init(address="auto")
from controlplane.eventlog.servers import shard_of
while shard_of(ray.get_runtime_context().get_job_id(), 2) != 1:
    ray.shutdown()
    ray.init(address="auto")
"""


def test_a_job_rides_out_the_loss_of_the_gcs_primary_with_no_command_typed() -> None:
    tmp = private_temp_dir()
    driver: subprocess.Popen[str] | None = None
    try:
        _cairn(tmp, "start", "--head", "--port", "0", "--num-cpus", "2", "--gcs-replicas", "1")
        (record,) = (tmp / "cairn-nodes").glob("*.json")
        session = Path(json.loads(record.read_text())["session_dir"])
        primary_pid, _ = _postmaster((session / "pgdata" / "postmaster.pid").read_text())
        replica_pid, replica_port = _postmaster(
            (session / "replica" / "pgdata" / "postmaster.pid").read_text()
        )
        driver = subprocess.Popen(
            [sys.executable, "-c", JOB],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=isolated_env(tmp),
        )
        job = _ride_out(driver, lambda: _signal_server(primary_pid, signal.SIGKILL))
        _check_log(job, replica_port)
        log = (tmp / f"cairn-node-{record.stem}.log").read_text()
        assert "the GCS failed over" in log, log
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        _cairn(tmp, "stop", check=False)
        leftovers = [p for p in tmp.iterdir() if p.name.startswith("cairn-session-")]
        shutil.rmtree(tmp, ignore_errors=True)
    assert not alive(replica_pid) and not alive(primary_pid)
    assert leftovers == []


two_hosts = hosts_fixture(2)


@pytest.mark.timeout(300)
def test_a_node_on_another_machine_follows_the_failover(two_hosts: Hosts) -> None:
    """The head (host a) runs a log on two servers, each with its replica, each served
    over TLS on the head's address; it hands joining nodes a URL naming server 0 and
    its replica, and server 0 names both of server 1: a job driven on host b, its
    events on server 1, rides out the loss of both servers' primaries at once."""
    a, b = two_hosts
    token = {"CAIRN_AUTH_TOKEN": "failover-test-" + secrets.token_urlsafe(16)}
    started = a.cairn(
        "start",
        "--head",
        "--node-ip-address",
        a.ip,
        "--gcs-replicas",
        "1",
        "--log-servers",
        "2",
        "--log-shards",
        "2",
        env=token,
    )
    try:
        session = session_of(started)
        primaries = [
            _postmaster(a.run(["cat", f"{session}/{server}/pgdata/postmaster.pid"]).stdout)[0]
            for server in (".", "log-server-1")
        ]
        replica = a.run(["cat", f"{session}/log-server-1/replica/pgdata/postmaster.pid"])
        _, replica_port = _postmaster(replica.stdout)
        b.cairn(
            "start",
            "--address",
            f"{a.ip}:6380",
            "--node-ip-address",
            b.ip,
            "--num-cpus",
            "2",
            env=token,
        )
        driver = b.popen(
            [PYTHON, "-c", JOB.replace('ray.init(address="auto")\n', ON_SERVER_1)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def lose_both_primaries() -> None:
            for pid in primaries:
                _signal_server(pid, signal.SIGKILL)

        job = _ride_out(driver, lose_both_primaries, hosts=[a, b])
        _check_log(job, replica_port, failed_over=2)
    finally:
        b.cairn("stop", check=False)
        a.cairn("stop", check=False)
    _wait(lambda: a.pids() == [] and b.pids() == [], "every process of the cluster gone")


# a job on server 0 of two whose tasks cross nodes: an argument made on this host, the
# work on the head's (its resource), the values fetched back
ACROSS_NODES = """
import sdk as ray
from controlplane.eventlog.servers import shard_of
ray.init(address="auto")
while shard_of(ray.get_runtime_context().get_job_id(), 2) != 0:
    ray.shutdown()
    ray.init(address="auto")

@ray.remote(resources={"on_head": 0.01})
def add(x, y):
    return x + y

arg = ray.put(list(range(1000)))
refs = [add.remote(i, ray.get(arg)[i]) for i in range(40)] + [add.remote(1, 2)]
assert ray.get(refs, timeout=60) == [2 * i for i in range(40)] + [3]
print("done", flush=True)
"""


@pytest.mark.timeout(240)
def test_losing_one_server_of_two_stops_only_the_jobs_it_holds(two_hosts: Hosts) -> None:
    """A log on two embedded servers without replicas: server 1 is killed, and stays
    down for longer than a process rides out an outage. The nodes' daemons, the global
    scheduler and the projector read server 0's events on without it, a node joins
    meanwhile (host b), and a job whose shard is on server 0, driven there, runs tasks
    that cross to the head's node. Then host b crashes, server 1 still away: its node is
    declared dead all the same (migration 0032), its fence there owed."""
    a, b = two_hosts
    env = {
        "CAIRN_AUTH_TOKEN": "away-test-" + secrets.token_urlsafe(16),
        "CAIRN_GCS_SERVER_AWAY_AFTER_S": "2",
        "CAIRN_GCS_UNAVAILABLE_TIMEOUT_S": "3",  # (riding out server 1 gives up soon)
    }
    started = a.cairn(
        "start",
        "--head",
        "--node-ip-address",
        a.ip,
        "--log-servers",
        "2",
        "--log-shards",
        "2",
        "--num-cpus",
        "1",
        "--resources",
        '{"on_head": 1}',
        env=env,
    )
    try:
        pid_file = a.run(["cat", f"{session_of(started)}/log-server-1/pgdata/postmaster.pid"])
        _signal_server(_postmaster(pid_file.stdout)[0], signal.SIGKILL)
        time.sleep(6)  # (past riding out: a reader that still waited for it gave up)
        b.cairn(  # (a node joins while server 1 is away)
            "start",
            "--address",
            f"{a.ip}:6380",
            "--node-ip-address",
            b.ip,
            "--num-cpus",
            "1",
            env=env,
        )
        driver = b.python(ACROSS_NODES, env=env, check=False, timeout=120)
        said = a.node_logs(200) + b.node_logs(200)
        assert driver.returncode == 0 and "done" in driver.stdout, driver.stderr[-3000:] + said
        assert "the GCS's server 1 has not answered" in said, said
        status = a.cairn("status", env=env).stdout
        assert "2 nodes alive, 0 dead" in status, status
        assert 'could not connect to server "cairn_log_server_1"' in status, status
        b.kill_processes()  # (host b crashes: its node stops pinging, server 1 still away)
        _wait(
            lambda: "1 nodes alive, 1 dead" in a.cairn("status", env=env).stdout,
            "host b's node declared dead while server 1 is away",
        )
        owed = (
            "SELECT payload->>'fence_owed_on' AS owed FROM events"
            " WHERE entity_kind = 'node' AND event_type = 'dead'"
        )
        dead = a.cairn("sql", "--without-server", "1", "--format", "json", owed, env=env)
        assert json.loads(dead.stdout) == [{"owed": "[1]"}], dead.stdout + dead.stderr
    finally:
        b.cairn("stop", check=False)
        a.cairn("stop", check=False)
    _wait(lambda: a.pids() == [] and b.pids() == [], "every process of the cluster gone")


def test_gcs_replicas_is_refused_where_it_cannot_work() -> None:
    tmp = private_temp_dir()
    try:
        for args, expected in [
            (["--head", "--gcs-replicas", "2"], "must be 0 or 1"),
            (["--address", "127.0.0.1:1", "--gcs-replicas", "1"], "is for the head"),
            (
                ["--head", "--gcs-url", "postgresql://u:p@127.0.0.1:1/db", "--gcs-replicas", "1"],
                "keeps its own replicas",
            ),
        ]:
            refused = _cairn(tmp, "start", "--port", "0", *args, check=False)
            assert refused.returncode != 0 and expected in refused.stderr, refused.stderr
        assert not (tmp / "cairn-nodes").exists() or not list((tmp / "cairn-nodes").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


three_hosts = hosts_fixture(3)


@pytest.mark.timeout(360)
def test_a_job_rides_out_the_loss_of_the_heads_machine(three_hosts: Hosts) -> None:
    """The head (host a) runs the GCS's primaries, a log on two servers; host b a node
    and the replica of each (``--gcs-replica-host b`` on the head, ``--gcs-replica`` on
    b); host c a node and the driver. Host a is lost as a machine: cut off (packets
    dropped, as a pulled cable), then every process on it killed. With no command typed,
    b promotes both replicas, b's node declares the head's node dead and runs a global
    scheduler, and the job on c finishes; the log on b holds every acknowledged event
    and each server's promotion's epoch. What the user sees: a pause, then the job goes
    on. (A log on one server takes the same path, for server 0 alone.)"""
    a, b, c = three_hosts
    env = {
        "CAIRN_AUTH_TOKEN": "failover-test-" + secrets.token_urlsafe(16),
        # TCP gives up on the lost machine's connections in 4 s (10 s by default: a
        # shorter pause, the same story), before the head's node is declared dead
        "CAIRN_GCS_TCP_TIMEOUT_S": "4",
        "CAIRN_NODE_DEAD_AFTER_S": "6",
    }
    head = ["--address", f"{a.ip}:6380"]
    try:
        a.cairn(
            "start",
            "--head",
            "--node-ip-address",
            a.ip,
            "--num-cpus",
            "1",
            "--gcs-replicas",
            "1",
            "--gcs-replica-host",
            b.ip,
            "--log-servers",
            "2",
            "--log-shards",
            "2",
            env=env,
        )
        refused = c.cairn(  # the replica is planned on b, not c
            "start", *head, "--node-ip-address", c.ip, "--gcs-replica", env=env, check=False
        )
        assert refused.returncode != 0 and f"plans its GCS replica on {b.ip}" in refused.stderr
        b.cairn(
            "start", *head, "--node-ip-address", b.ip, "--num-cpus", "2", "--gcs-replica", env=env
        )
        c.cairn("start", *head, "--node-ip-address", c.ip, "--num-cpus", "2", env=env)
        _wait(
            lambda: all(
                f"{server} replica on the other machine streams: commits wait" in a.node_logs()
                for server in ("the GCS", "the GCS's server 1")
            ),
            "each of the head's primaries waits for its replica on b",
        )
        head_node = a.run(["sh", "-c", "cat /tmp/cairn-session-*/node.ready"]).stdout.strip()
        driver = c.popen(
            [PYTHON, "-c", JOB],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def lose_host_a() -> None:
            a.link_down()
            a.kill_processes()

        job = _ride_out(driver, lose_host_a, timeout=240, hosts=three_hosts.hosts[1:])
        assert job["recovery"] is False and job["epochs"] == [[[1, 1], [2, 2]]] * 2
        history = job["history"]
        for task_id in job["tasks"]:
            assert history[task_id][-1] == "finished", history[task_id]
        assert [node for node, _cause in job["deaths"]] == [head_node]
        said = b.node_logs()
        assert "the GCS failed over to this machine" in said, said
        assert "the GCS's server 1 failed over to this machine" in said, said
        assert "running a global scheduler" in said, said
    finally:
        for host in (c, b, a):
            host.cairn("stop", check=False)
    _wait(lambda: b.pids() == [] and c.pids() == [], "every process of the cluster gone")
