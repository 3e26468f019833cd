"""Storage faults (issue 15): a full disk under a node's spill directory and under the
GCS's data directory, and a GCS wiped or put back from an older copy.

Full disks are small tmpfs mounts inside a test host (tests/hosts.py: a mount
namespace of its own), filled with a filler file that the test removes to free space.
Each test says what the cluster must do and what the user sees."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from host_cluster import finish_driver, start_driver
from hosts import PYTHON, Host, Hosts, hosts_fixture
from processes import ROOT, isolated_env, private_temp_dir, run_cairn

from controlplane import auth, schema
from controlplane.embedded_postgres import EmbeddedPostgres
from controlplane.errors import GcsFencedError, GcsIdentityError
from controlplane.eventlog import EntityKind, Event, EventAppender, fencing
from controlplane.eventlog.connection import connect
from controlplane.session_dirs import alive

pytestmark = pytest.mark.timeout(300)
one_host = hosts_fixture(1)

# Run in a host: a private cluster whose spill directory is a 130 MiB tmpfs, 95 MiB of it
# taken by a filler file: room for one spilled 30 MiB object, not two. Prints what it
# saw as JSON.
SPILL_DISK_FULL = """
import glob, json, os, subprocess, time
import numpy as np
import sdk as ray
from sdk.exceptions import GetTimeoutError, ObjectStoreFullError

MB = 1 << 20
ray.init(num_cpus=1, object_store_memory=100 * MB)
(session,) = glob.glob("/tmp/cairn-session-*")
spill = os.path.join(session, "spill")
os.makedirs(spill, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=130m", "spilldisk", spill], check=True)
filler = os.path.join(spill, "filler")
subprocess.run(["dd", "if=/dev/zero", "of=" + filler, "bs=1M", "count=95"],
               check=True, capture_output=True)
seen = {}

def value(n):
    return np.full(30 * MB // 8, n, dtype=np.int64)

def files():
    return sorted(f for f in os.listdir(spill) if f != "filler")

acked = [ray.put(value(n)) for n in range(4)]  # the 4th spills the 1st: the disk is full
seen["spilled_before"] = files()
try:
    ray.put(value(4))
    seen["put"] = None
except ObjectStoreFullError as exc:
    seen["put"] = str(exc)
seen["files_after_put"] = files()

@ray.remote
def make(n):
    return np.full(30 * MB // 8, n, dtype=np.int64)

try:
    ray.get(make.remote(5), timeout=60)
    seen["task"] = None
except ObjectStoreFullError as exc:  # the task's error, as an instance of its cause
    seen["task"] = [type(exc).__name__, str(exc)]
seen["files_after_task"] = files()
# what is in memory reads back while the disk is full; the spilled one cannot be
# brought back (room would need another spill) and waits, kept, not lost
seen["in_memory"] = [int(ray.get(r, timeout=30)[0]) for r in acked[1:]]
try:
    ray.get(acked[0], timeout=2)
    seen["spilled_read"] = "read"
except GetTimeoutError:
    seen["spilled_read"] = "waits"
os.unlink(filler)  # space is freed
seen["put_after"] = int(ray.get(ray.put(value(6)), timeout=60)[0])
seen["task_after"] = int(ray.get(make.remote(7), timeout=60)[-1])
seen["acked_after"] = [int(ray.get(r, timeout=60)[-1]) for r in acked]
seen["spill_ids"] = [r.hex() for r in acked]
import asyncio, asyncpg
async def spilled():
    conn = await asyncpg.connect(ray.get_runtime_context().gcs_address)
    try:
        return [r["entity_id"] for r in await conn.fetch(
            "SELECT entity_id FROM events WHERE event_type = 'spilled' ORDER BY position")]
    finally:
        await conn.close()
seen["spilled_events"] = asyncio.run(spilled())
ray.shutdown()
print(json.dumps(seen))
"""


def _run(host: Host, code: str, timeout: float = 240) -> dict:
    result = host.python(textwrap.dedent(code), timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_full_spill_disk_fails_the_put_clearly_and_spilling_resumes_once_freed(
    one_host: Hosts,
) -> None:
    """The store is full and its spill directory's disk too: the put and the task that
    need room fail with ObjectStoreFullError naming the directory and the cause (they
    no longer spin for ever), no half-written spill file stays, every acknowledged
    object is kept (the spilled one waits to be read back rather than being lost), and
    once space is freed new work spills again and every object reads back."""
    seen = _run(one_host[0], SPILL_DISK_FULL)
    first = seen["spill_ids"][0]
    assert seen["spilled_before"] == [first]
    for error in (seen["put"], seen["task"][1]):
        assert error is not None
        assert "cannot fit" in error and "/spill failed: No space left on device" in error
    assert seen["task"][0] == "RayTaskError(ObjectStoreFullError)"
    # the failed attempts left nothing half-written behind
    assert seen["files_after_put"] == seen["files_after_task"] == [first]
    assert seen["in_memory"] == [1, 2, 3]
    assert seen["spilled_read"] == "waits"
    assert seen["put_after"] == 6 and seen["task_after"] == 7
    assert seen["acked_after"] == [0, 1, 2, 3]
    # the first spill, then those that made room once space was freed
    assert seen["spilled_events"][0] == first and len(seen["spilled_events"]) >= 2


# -- a full disk under the GCS's data directory -------------------------------------

UNAVAILABLE_ENV = "CAIRN_GCS_UNAVAILABLE_TIMEOUT_S"

# Run in a host: runs argv[1] tasks and prints their ids, values and errors as JSON.
TASKS = """
import json, sys, sdk as ray
ray.init(address="auto")
if len(sys.argv) > 2:  # connected first (a full /tmp would hide the cluster's records)
    print("READY", flush=True)
    sys.stdin.readline()

@ray.remote
def square(x):
    return x * x

refs = [square.remote(i) for i in range(int(sys.argv[1]))]
out = {"ids": [r.task_id().hex() for r in refs], "values": [], "errors": []}
for ref in refs:
    try:
        out["values"].append(ray.get(ref, timeout=120))
    except Exception as exc:
        out["errors"].append(f"{type(exc).__name__}: {exc}")
print(json.dumps(out))
ray.shutdown()
"""

# Run in a host: each task's event types in log order, for the ids on stdin.
HISTORIES = """
import asyncio, json, sys, asyncpg, sdk as ray
ray.init(address="auto")
url = ray.get_runtime_context().gcs_address
ids = json.loads(sys.stdin.read())

async def main():
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT entity_id, array_agg(event_type ORDER BY position) AS history "
            "FROM events WHERE entity_id = ANY($1::text[]) GROUP BY 1", ids)
    finally:
        await conn.close()
    return {row["entity_id"]: row["history"] for row in rows}

print(json.dumps(asyncio.run(main())))
ray.shutdown()
"""

# Run in a host: argv[1:] as the head's PostgreSQL superuser (its password and port
# from the session directory), one statement after the other, until one fails; prints
# how many ran and the error, as JSON.
AS_SUPERUSER = """
import glob, json, os, sys, psycopg
(session,) = glob.glob("/tmp/cairn-session-*")
password = open(os.path.join(session, "gcs_password")).read().strip()
port = open(os.path.join(session, "pgdata", "postmaster.pid")).read().splitlines()[3]
done, error = 0, None
try:
    with psycopg.connect(f"postgresql://cairn:{password}@127.0.0.1:{port}/cairn",
                         autocommit=True) as conn:
        for statement in sys.argv[1:]:
            conn.execute(statement)
            done += 1
except psycopg.Error as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"done": done, "error": error}))
"""


def _tasks(host: Host, count: int) -> dict:
    result = host.run([PYTHON, "-c", TASKS, str(count)], timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _tasks_once(host: Host, count: int, meanwhile: Callable[[], None]) -> dict:
    """``_tasks`` from a driver connected before ``meanwhile`` runs."""
    driver, ready = start_driver(host, TASKS, str(count), "wait", stdin=True)
    try:
        assert ready.strip() == "READY", ready
        meanwhile()
    finally:
        seen = finish_driver(driver, input="go\n", timeout=240)
    return seen


def _histories(host: Host, task_ids: list[str]) -> dict[str, list[str]]:
    result = host.python(HISTORIES, input=json.dumps(task_ids), check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _as_superuser(host: Host, *statements: str) -> dict:
    result = host.run([PYTHON, "-c", AS_SUPERUSER, *statements], check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fill_tmp(host: Host, leave_mib: int) -> None:
    """Makes the host's /tmp (a tmpfs: the head's session directory, PostgreSQL's data
    directory with it) a small disk, then fills it but for ``leave_mib`` MiB with
    /tmp/filler; removing the filler frees the space."""
    used = int(host.run(["df", "-B1", "--output=used", "/tmp"]).stdout.split()[-1])
    host.run(["mount", "-o", f"remount,size={used + 128 * 1024 * 1024}", "/tmp"])
    host.run(["dd", "if=/dev/zero", "of=/tmp/filler", "bs=1M"], check=False)
    if leave_mib:
        host.run(["truncate", "-s", f"-{leave_mib}M", "/tmp/filler"])


def _postmasters(host: Host) -> set[int]:
    """The PostgreSQL servers (postmasters) running in ``host``."""
    found = set()
    for pid in host.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"/bin/postgres") and b"-D" in argv:
            found.add(pid)
    return found


def _wait_for(
    condition: Callable[[], bool], what: str, timeout: float = 60.0, poll: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(poll)


def _all_finished(histories: dict[str, list[str]], task_ids: list[str]) -> None:
    for task_id in task_ids:
        history = histories.get(task_id, [])
        assert history[-1:] == ["finished"] and history.count("finished") == 1, history


def test_a_full_gcs_disk_fails_appends_clearly_and_the_cluster_resumes_once_freed(
    one_host: Hosts,
) -> None:
    """The disk under the head's PostgreSQL data directory fills up while its
    write-ahead log still has room (segments made ahead): PostgreSQL answers "could not
    extend file ...: No space left on device"; appends are held and retried for the
    unavailability bound (3 s here), then the work that needed them fails with a
    GcsDiskFullError's message naming the GCS and saying its disk is full. Nothing
    acknowledged is lost, the node stays up, and once the space is freed new work is
    recorded again."""
    host = one_host[0]
    host.cairn("start", "--head", "--num-cpus", "2", env={UNAVAILABLE_ENV: "3"})
    try:
        before = _tasks(host, 40)
        assert before["errors"] == [] and before["values"] == [i * i for i in range(40)]
        # write-ahead log segments made ahead (kept, not removed, below min_wal_size), so
        # that the data files fill up first: the case PostgreSQL answers with an error
        switches = ["SELECT pg_logical_emit_message(false, 'wal', 'x')", "SELECT pg_switch_wal()"]
        ran = _as_superuser(
            host,
            "ALTER SYSTEM SET min_wal_size = '1GB'",
            "SELECT pg_reload_conf()",
            *switches * 8,
            "CHECKPOINT",
        )
        assert ran["error"] is None, ran
        full = _tasks_once(host, 40, lambda: _fill_tmp(host, leave_mib=0))
        assert full["errors"], "the disk filled up and every task still recorded"
        for error in full["errors"]:
            assert "the GCS at postgresql://cairn_runtime:***@127.0.0.1:" in error, error
            assert "is out of disk space" in error and "No space left on device" in error
        host.run(["rm", "/tmp/filler"])  # space is freed
        after = _tasks(host, 40)
        assert after["errors"] == [] and after["values"] == [i * i for i in range(40)]
        _all_finished(_histories(host, before["ids"] + after["ids"]), before["ids"] + after["ids"])
    finally:
        host.run(["rm", "-f", "/tmp/filler"])
        host.cairn("stop", check=False)


def test_a_full_disk_under_the_write_ahead_log_stops_postgresql_and_the_head_restarts_it(
    one_host: Hosts,
) -> None:
    """The disk fills up when PostgreSQL needs a new write-ahead log segment: it PANICs,
    its crash recovery fails for the same reason and the postmaster exits (it does not
    come back by itself). Callers see an unreachable GCS and hold their appends; the
    head says what happened (the server log's last words) and starts PostgreSQL again
    every 2 s; once space is freed it starts, and the cluster goes on with nothing
    acknowledged lost."""
    host = one_host[0]
    host.cairn("start", "--head", "--num-cpus", "2", env={UNAVAILABLE_ENV: "60"})
    try:
        before = _tasks(host, 40)
        assert before["errors"] == []
        pid_file = host.run(["sh", "-c", "cat /tmp/cairn-session-*/pgdata/postmaster.pid"])
        postmaster = int(pid_file.stdout.splitlines()[0])
        _fill_tmp(host, leave_mib=0)
        switches = ["SELECT pg_logical_emit_message(false, 'wal', 'x')", "SELECT pg_switch_wal()"]
        crashed = _as_superuser(host, *switches * 64)  # until a new segment is needed
        assert crashed["error"] is not None, crashed
        _wait_for(lambda: postmaster not in host.pids(), "PostgreSQL stops")  # (by itself)
        # the head starts it again, which fails while the disk stays full
        retries: set[int] = set()
        _wait_for(
            lambda: bool(retries.update(_postmasters(host) - {postmaster}) or retries),
            "the head to start PostgreSQL again",
            poll=0.005,
        )
        _wait_for(lambda: not retries & set(host.pids()), "the new start to fail")
        host.run(["rm", "/tmp/filler"])  # space is freed
        after = _tasks(host, 40)  # the head started PostgreSQL again
        assert after["errors"] == [] and after["values"] == [i * i for i in range(40)]
        _all_finished(_histories(host, before["ids"] + after["ids"]), before["ids"] + after["ids"])
        said = host.node_logs()
        assert "the GCS's PostgreSQL stopped by itself" in said, said
        assert "PANIC:  could not write to file" in said, said
        assert "it could not start yet" in said and "runs again" in said, said
    finally:
        host.run(["rm", "-f", "/tmp/filler"])
        host.cairn("stop", check=False)


# -- a GCS wiped, replaced or put back: the checks, in this process ---------------------


@pytest.fixture
def remembering() -> Iterator[None]:
    """This process remembers its log while the test runs, as a node daemon does."""
    fencing.remember()
    try:
        yield
    finally:
        fencing.forget()


async def _append(url: str, count: int) -> list[int]:
    async with EventAppender(url) as appender:
        return await appender.append_many(
            [
                Event(EntityKind.JOB, f"j{i}", "submitted", {"entrypoint": "test"})
                for i in range(count)
            ]
        )


async def _connects(url: str) -> None:
    conn = await connect(url)
    await conn.close()


def _identity(url: str) -> tuple[str, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT cluster_id::text, system_id FROM cairn_identity_v1()").fetchone()
    assert row is not None
    return row[0], int(row[1])


def _recreate(url: str) -> None:
    """Drops the database of ``url`` (its connections with it) and makes it anew."""
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(
        urlsplit(url)._replace(path="/postgres").geturl(), autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


@pytest.mark.usefixtures("remembering")
def test_a_process_that_remembers_its_log_refuses_it_wiped(
    pg_server_url: str, gcs_url: str
) -> None:
    """Its log gone (the database dropped), empty (made anew), or migrated anew (a new
    cluster id): each is refused with GcsIdentityError naming the log it was using; the
    log it had passes, before and after a restart of its connections."""
    asyncio.run(_append(gcs_url, 3))
    known = fencing.remembered()
    assert known is not None and known[0] is not None and known[2] >= 3
    cluster_id, system_id = _identity(gcs_url)
    assert (known[0].cluster_id, known[0].system_id) == (cluster_id, system_id)
    asyncio.run(_connects(gcs_url))  # the same log: fine

    _recreate(gcs_url)
    with pytest.raises(GcsIdentityError, match="no Cairn log with an identity") as empty:
        asyncio.run(_connects(gcs_url))
    assert f"was using cluster id {cluster_id}" in str(empty.value)
    schema.upgrade(gcs_url)  # a new log at the same place
    with pytest.raises(GcsIdentityError, match="another log") as other:
        asyncio.run(_append(gcs_url, 1))
    assert cluster_id in str(other.value) and _identity(gcs_url)[0] in str(other.value)
    assert "wiped" in str(other.value) and "postgresql://" in str(other.value)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{urlsplit(gcs_url).path[1:]}" WITH (FORCE)')
    with pytest.raises(GcsIdentityError, match="its database is gone"):
        asyncio.run(_connects(gcs_url))


@pytest.mark.usefixtures("remembering")
def test_a_process_refuses_its_log_put_back_from_an_older_copy(
    pg_server_url: str, gcs_url: str
) -> None:
    """A copy of the log taken earlier (here a database made from it as a template:
    the same cluster id, fewer events) is refused once the process has seen positions
    past its head, naming both; a copy that is not behind passes."""
    asyncio.run(_append(gcs_url, 5))
    name = urlsplit(gcs_url).path.lstrip("/")
    copy = f"{name}_copy"
    copy_url = gcs_url.replace(f"/{name}", f"/{copy}")
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"')
    try:
        asyncio.run(_connects(copy_url))  # level with what was seen: the same log
        positions = asyncio.run(_append(gcs_url, 4))
        with pytest.raises(GcsIdentityError, match="put back from an older copy") as older:
            asyncio.run(_append(copy_url, 1))
        message = str(older.value)
        assert "ends at position 5," in message and f"position {positions[-1]:,}" in message
        assert f"positions 6 to {positions[-1]:,}" in message
        with psycopg.connect(copy_url) as conn:  # nothing was appended to the copy
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (5,)
        asyncio.run(_connects(gcs_url))
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)')


def test_a_daemon_started_anew_remembers_what_its_node_saw(gcs_url: str, tmp_path: Path) -> None:
    """What a node saw is kept in its session directory, and a daemon started in its
    place (after a crash) holds the GCS to it: another log is refused, and so is one at
    an epoch behind (an old primary, a copy from before a failover), as fencing."""
    path = tmp_path / fencing.IDENTITY_FILE
    fencing.remember(path)
    try:
        asyncio.run(_append(gcs_url, 3))
        fencing.flush()
        seen = fencing.remembered()
        fencing.forget()
        fencing.remember(path)  # the next daemon of the node
        assert fencing.remembered() == seen
        asyncio.run(_connects(gcs_url))
        saved = json.loads(path.read_text())["servers"]["0"]  # (server 0 of the log)
        for change, error, match in [
            ({"cluster_id": "00000000-0000-0000-0000-000000000001"}, GcsIdentityError, "another"),
            ({"epoch": saved["epoch"] + 1}, GcsFencedError, "behind epoch"),
        ]:
            path.write_text(json.dumps({"servers": {"0": {**saved, **change}}}))
            fencing.remember(path)
            with pytest.raises(error, match=match):
                asyncio.run(_connects(gcs_url))
    finally:
        fencing.forget()


def test_a_process_that_does_not_remember_checks_no_identity(gcs_url: str) -> None:
    """Tools and tests (cairn sql, a driver's reads) are not pinned to one log."""
    assert fencing.remembered() is None
    asyncio.run(_connects(gcs_url))


# -- a GCS wiped, replaced or put back: a cluster of real processes ---------------------

TOKEN = "storage-faults-" + auth.new_token()

# A driver: runs tasks on both nodes and prints their results and the log's head.
JOB = """
import json, sdk as ray
ray.init(address="auto")

@ray.remote(scheduling_strategy="SPREAD")
def square(x):
    import os
    return x * x, os.environ.get("CAIRN_NODE_TAG", "")

results = ray.get([square.remote(i) for i in range(40)], timeout=120)
print(json.dumps({"sum": sum(r[0] for r in results)}))
ray.shutdown()
"""

# A driver connected before the fault: says READY, waits for a line, then tries a task
# and prints what it got.
WAITING_DRIVER = """
import json, sys, sdk as ray
ray.init(address="auto")

@ray.remote
def one():
    return 1

assert ray.get(one.remote(), timeout=60) == 1
print("READY", flush=True)
sys.stdin.readline()
try:
    ray.get(one.remote(), timeout=60)
    print(json.dumps({"error": None}))
except BaseException as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


@dataclass
class OwnGcsCluster:
    """A head and a joined node (``cairn start``) in a temp directory of their own, on
    an embedded PostgreSQL this test runs (``--gcs-url``): the test can wipe it, stop
    it and put an older copy of its data directory back."""

    tmp: Path
    server: EmbeddedPostgres
    pids: list[int]  # the node processes, head first

    def env(self) -> dict[str, str]:
        return isolated_env(self.tmp, **{auth.TOKEN_ENV: TOKEN})

    def driver(self, code: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
            env=self.env(),
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def head_position(self) -> int:
        with psycopg.connect(self.server.url) as conn:
            row = conn.execute("SELECT max(last_position) FROM event_log_shards").fetchone()
        assert row is not None
        return int(row[0])

    def wait_stopped(self, timeout: float = 60.0) -> list[str]:
        """Waits until every node process has exited; returns each one's output."""
        deadline = time.monotonic() + timeout
        while any(alive(pid) for pid in self.pids):
            assert time.monotonic() < deadline, "the nodes did not stop"
            time.sleep(0.05)
        return [(self.tmp / f"cairn-node-{pid}.log").read_text() for pid in self.pids]


@contextlib.contextmanager
def own_gcs_cluster() -> Iterator[OwnGcsCluster]:
    tmp = private_temp_dir()
    (tmp / "gcs").mkdir(mode=0o711)
    server = EmbeddedPostgres(tmp / "gcs")
    try:
        server.start()
        cairn = {auth.TOKEN_ENV: TOKEN, "CAIRN_GCS_URL": server.url}
        run_cairn("start", "--head", "--port", "0", "--num-cpus", "1", tmp=tmp, env=cairn)
        (head,) = _records(tmp)
        run_cairn(
            "start",
            "--address",
            head["address"],
            "--port",
            "0",
            "--num-cpus",
            "1",
            tmp=tmp,
            env={auth.TOKEN_ENV: TOKEN},
        )
        pids = sorted(int(p.stem) for p in (tmp / "cairn-nodes").glob("*.json"))
        head_pid = next(
            int(p.stem)
            for p in (tmp / "cairn-nodes").glob("*.json")
            if json.loads(p.read_text())["head"]
        )
        yield OwnGcsCluster(tmp, server, [head_pid, *(p for p in pids if p != head_pid)])
    finally:
        run_cairn("stop", tmp=tmp, check=False)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _records(tmp: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp / "cairn-nodes").glob("*.json"))]


def _refusals(outputs: list[str], why: str) -> None:
    """Each node's output says its daemon refused the GCS, why, and that it stopped."""
    for output in outputs:
        assert "refusing the GCS at postgresql://cairn:***@127.0.0.1:" in output, output
        assert why in output, output
        assert "it refused the GCS; this node stops" in output, output


def test_nodes_refuse_a_wiped_gcs_and_stop_saying_why() -> None:
    """The GCS's database is dropped and made anew under a running cluster: each node
    (the head's and the joined one's daemons) refuses the new log instead of going on
    in it, and stops, saying why; a connected driver's next call says why too; and
    nothing of the old cluster reaches the new log."""
    with own_gcs_cluster() as cluster:
        assert cluster.driver(JOB)["sum"] == sum(i * i for i in range(40))
        driver = subprocess.Popen(
            [sys.executable, "-c", WAITING_DRIVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=cluster.env(),
        )
        try:
            assert driver.stdout is not None and driver.stdin is not None
            assert driver.stdout.readline().strip() == "READY", driver.stderr
            _recreate(cluster.server.url)
            schema.upgrade(cluster.server.url)
            outputs = cluster.wait_stopped()
            driver.stdin.write("go\n")
            driver.stdin.flush()
            out, err = driver.communicate(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        _refusals(outputs, "wiped")
        error = json.loads(out.strip().splitlines()[-1])["error"]
        assert error is not None and "refusing the GCS" in error and "wiped" in error, err
        with psycopg.connect(cluster.server.url) as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_nodes_refuse_their_gcs_put_back_from_an_older_copy() -> None:
    """A cold copy of the GCS's data directory is taken (the server stopped and started
    again: the cluster rides that out), the cluster appends more, then the server is
    stopped and the copy put back in its place, as a restored backup would be: each
    node refuses it (its log ends below positions the node has seen) and stops, saying
    why; the copy gets no event, so no position or id is handed out twice."""
    with own_gcs_cluster() as cluster:
        assert cluster.driver(JOB)["sum"] == sum(i * i for i in range(40))
        server, data = cluster.server, cluster.server.data_dir
        backup = data.with_name("pgdata.backup")
        server.stop(keep_data=True)
        subprocess.run(["cp", "-a", str(data), str(backup)], check=True)
        server.start()
        copied_at = cluster.head_position()
        assert cluster.driver(JOB)["sum"] == sum(i * i for i in range(40))  # more events
        assert cluster.head_position() > copied_at
        server.stop(keep_data=True)
        data.rename(data.with_name("pgdata.newer"))
        backup.rename(data)
        server.start()
        outputs = cluster.wait_stopped()
        _refusals(outputs, "put back from an older copy")
        # the copy ends where the server stood when it was copied: at most where the
        # cluster read it after the restart (events held through the restart may land
        # between the copy and that read), and no event reached it since
        found = re.search(r"ends at position ([\d,]+), below position", outputs[0])
        assert found is not None, outputs[0]
        restored = int(found.group(1).replace(",", ""))
        assert restored <= copied_at and cluster.head_position() == restored


def test_nodes_refuse_another_server_at_their_gcs_address() -> None:
    """The GCS is replaced by a fresh server on the same port, with the same login (a
    new data directory, migrated anew): the nodes ride out the restart, then find
    another log (another cluster id and server identifier) and refuse it."""
    with own_gcs_cluster() as cluster:
        assert cluster.driver(JOB)["sum"] == sum(i * i for i in range(40))
        old = cluster.server
        (cluster.tmp / "gcs2").mkdir(mode=0o711)
        fresh = EmbeddedPostgres(cluster.tmp / "gcs2")  # made ready on a port of its own
        try:
            fresh.start()
            fresh.execute(f"ALTER ROLE cairn PASSWORD '{urlsplit(old.url).password}'")
            schema.upgrade(old.url.replace(f":{old.port}/", f":{fresh.port}/"))
            fresh.stop(keep_data=True)
            old.stop(keep_data=True)
            fresh.port = old.port  # then in the old one's place: old.url reaches it
            fresh.start()
            outputs = cluster.wait_stopped()
            with psycopg.connect(old.url) as conn:
                assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
        finally:
            fresh.stop()
        _refusals(outputs, "holds another log")
