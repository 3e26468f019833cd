"""The multi-host fixture (tests/hosts.py): hosts reach each other only by their
192.0.2.x addresses, keep /tmp, /dev/shm and loopback to themselves, see the checkout
read-only yet can run Cairn from it, can be cut off the network and plugged back, and
leave nothing behind, even when a test fails or the test process is killed."""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hosts import (
    CHECKOUT,
    PYTHON,
    Host,
    Hosts,
    bound_paths,
    hosts_fixture,
    session_of,
    sweep_stale,
)

two_hosts = hosts_fixture(2)
three_hosts = hosts_fixture(3)

# Run in a host: connect to argv[1]:argv[2] until the outcome is argv[3] ("1": connects,
# "0": does not), for at most argv[4] seconds; prints the last outcome.
CONNECT_UNTIL = """
import socket, sys, time
host, port, want, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
deadline = time.monotonic() + limit
while True:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        ok, outcome = True, "connected"
    except OSError as exc:
        ok, outcome = False, f"{type(exc).__name__} errno={exc.errno}"
    if ok == want or time.monotonic() > deadline:
        print(outcome)
        sys.exit(0 if ok == want else 1)
    time.sleep(0.05)
"""

# Run in a host: fetch argv[1] over HTTP, retrying until it answers, for argv[2] seconds.
FETCH = """
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
"""


def connect_until(host: Host, address: str, port: int, reachable: bool, limit: float) -> str:
    """Polls, from ``host``, until ``address:port`` is (or is not) reachable; fails the
    test if that is not so within ``limit`` seconds. Returns the last outcome."""
    argv = [PYTHON, "-c", CONNECT_UNTIL, address, str(port), "1" if reachable else "0"]
    result = host.run([*argv, str(limit)], timeout=limit + 30, check=False)
    assert result.returncode == 0, (
        f"{host.name} -> {address}:{port}: wanted {'reachable' if reachable else 'unreachable'}"
        f" within {limit}s, got {result.stdout.strip()} {result.stderr}"
    )
    return result.stdout.strip()


def tcp_server(host: Host, address: str, port: int) -> subprocess.Popen[bytes]:
    """A TCP server in ``host`` that accepts (and closes) connections on address:port."""
    code = (
        "import socket\n"
        f"s = socket.create_server(({address!r}, {port}))\n"
        "while True:\n"
        "    s.accept()[0].close()\n"
    )
    return host.popen([PYTHON, "-c", code], stdout=subprocess.DEVNULL)


def root_links() -> str:
    """The root network namespace's interfaces, addresses and routes."""
    out = [
        subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
        for args in (["-o", "link"], ["-o", "addr"], ["route"], ["-6", "route"])
    ]
    # counters and timers change on their own; names, addresses and routes must not
    return re.sub(r"valid_lft \S+ preferred_lft \S+", "", "".join(out))


def mount_lines(needles: list[str]) -> list[str]:
    """Lines of any process's mountinfo that mention any of ``needles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "mountinfo").read_text()
        except OSError:
            continue
        found += [line for line in text.splitlines() if any(n in line for n in needles)]
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def owner(pid: int) -> int | None:
    """The uid a process runs as (None: it is gone)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def wait_until(condition: Callable[[], bool], limit: float, what: str) -> None:
    """Polls ``condition`` until it holds; fails the test after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"not within {limit}s: {what}"
        time.sleep(0.05)


def assert_nothing_left(hosts: Hosts, pids: list[int]) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in hosts.namespaces:
        assert name not in listed
        assert not Path("/run/netns", name).exists()
    wait_until(lambda: not any(running(p) for p in pids), 10, f"processes {pids} gone")
    assert mount_lines([*hosts.mount_tags, *hosts.namespaces]) == []
    assert hosts.tag not in root_links()


@pytest.fixture
def root_loopback_server() -> Iterator[int]:
    """A TCP server listening on the root namespace's 127.0.0.1; yields its port."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


@pytest.mark.timeout(120)
def test_hosts_reach_each_other_by_address_and_name(three_hosts: Hosts) -> None:
    a, b, c = three_hosts
    assert [h.ip for h in three_hosts] == ["192.0.2.10", "192.0.2.11", "192.0.2.12"]
    a.run(["sh", "-c", "echo served by $(hostname) > /tmp/page.txt"])
    a.popen(
        [PYTHON, "-m", "http.server", "8000", "--bind", a.ip, "--directory", "/tmp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for client, url in ((b, f"http://{a.ip}:8000/page.txt"), (c, "http://host0:8000/page.txt")):
        fetched = client.run([PYTHON, "-c", FETCH, url, "30"], timeout=60).stdout
        assert fetched.strip() == "served by host0"
    assert b.run(["hostname"]).stdout.strip() == "host1"


@pytest.mark.timeout(120)
def test_tmp_and_dev_shm_are_private_to_a_host(two_hosts: Hosts) -> None:
    a, b = two_hosts
    name = f"hosts-test-{secrets.token_hex(4)}"
    a.run(["sh", "-c", f"echo a > /tmp/{name} && echo a > /dev/shm/{name}"])
    assert a.run(["cat", f"/tmp/{name}", f"/dev/shm/{name}"]).stdout == "a\na\n"
    for directory in ("/tmp", "/dev/shm"):
        assert b.run(["test", "-e", f"{directory}/{name}"], check=False).returncode == 1
        assert not Path(directory, name).exists()  # nor in the root namespace
    # and a fresh host starts empty: nothing of the root's /tmp is there
    assert b.run(["ls", "-A", "/dev/shm"]).stdout == ""
    under_tmp = {Path(p).parts[2] for p in bound_paths() if Path(p).parts[1:2] == ("tmp",)}
    assert set(b.run(["ls", "-A", "/tmp"]).stdout.split()) == under_tmp


@pytest.mark.timeout(120)
def test_loopback_is_private_and_there_is_no_route_out(
    two_hosts: Hosts, root_loopback_server: int
) -> None:
    a, b = two_hosts
    # the root namespace's loopback server answers there, not in a host
    socket.create_connection(("127.0.0.1", root_loopback_server), timeout=5).close()
    outcome = connect_until(b, "127.0.0.1", root_loopback_server, reachable=False, limit=10)
    assert f"errno={errno.ECONNREFUSED}" in outcome
    # a host's loopback server answers in that host only
    tcp_server(a, "127.0.0.1", 7000)
    connect_until(a, "127.0.0.1", 7000, reachable=True, limit=30)
    outcome = connect_until(b, "127.0.0.1", 7000, reachable=False, limit=10)
    assert f"errno={errno.ECONNREFUSED}" in outcome
    # nothing outside the switch: no default route, so nothing leaves the host
    outcome = connect_until(b, "198.51.100.1", 80, reachable=False, limit=10)
    assert f"errno={errno.ENETUNREACH}" in outcome
    assert b.run(["ip", "-4", "route"]).stdout.split()[0] == "192.0.2.0/24"
    assert len(b.run(["ip", "-4", "route"]).stdout.splitlines()) == 1


@pytest.mark.timeout(120)
def test_root_network_namespace_is_never_changed() -> None:
    before = root_links()
    with Hosts(2) as hosts:
        assert root_links() == before
        hosts[0].link_down()
        hosts[0].link_up()
        assert root_links() == before
    assert root_links() == before


@pytest.mark.timeout(120)
def test_checkout_is_read_only_in_a_host_yet_runs_python(two_hosts: Hosts) -> None:
    a, _ = two_hosts
    probe = f"hosts-test-{secrets.token_hex(4)}"
    imported = a.python(
        "import controlplane, sdk, sys, os\n"
        "print(controlplane.__file__); print(sys.prefix)\n"
        "print(os.environ['PYTHONDONTWRITEBYTECODE'])"
    ).stdout.split()
    assert imported == [str(CHECKOUT / "controlplane" / "__init__.py"), sys.prefix, "1"]
    for directory in (CHECKOUT, Path(sys.prefix), Path(sys.base_prefix)):
        written = a.run(["touch", str(directory / probe)], check=False)
        assert written.returncode != 0 and "Read-only file system" in written.stderr
        assert not (directory / probe).exists()
    # the working directory is the host's view of the checkout, not the root's
    assert a.run(["pwd"]).stdout.strip() == str(CHECKOUT)
    written = a.run(["touch", probe], check=False)
    assert "Read-only file system" in written.stderr and not (CHECKOUT / probe).exists()
    assert a.cairn("--help").stdout.startswith("Usage:")


@pytest.mark.timeout(120)
def test_environment_drops_the_root_clusters_variables(
    two_hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = two_hosts
    for name in ("CAIRN_GCS_URL", "CAIRN_ADDRESS", "CAIRN_AUTH_TOKEN", "CAIRN_TEST_GCS_URL"):
        monkeypatch.setenv(name, "root-only")
    monkeypatch.setenv("TMPDIR", "/nowhere")
    monkeypatch.setenv("HOSTS_TEST_KEPT", "kept")
    show = "import os, json; print(json.dumps(dict(os.environ)))"
    seen = json.loads(a.python(show).stdout)
    assert not any(seen.get(n) for n in ("CAIRN_GCS_URL", "CAIRN_ADDRESS", "TMPDIR"))
    assert "CAIRN_AUTH_TOKEN" not in seen and "CAIRN_TEST_GCS_URL" not in seen
    assert seen["HOSTS_TEST_KEPT"] == "kept"
    given = json.loads(
        a.python(show, env={"CAIRN_ADDRESS": "given", "HOSTS_TEST_KEPT": None}).stdout
    )
    assert given["CAIRN_ADDRESS"] == "given" and "HOSTS_TEST_KEPT" not in given


@pytest.mark.timeout(120)
def test_link_down_cuts_a_host_off_and_link_up_plugs_it_back(three_hosts: Hosts) -> None:
    a, b, c = three_hosts
    tcp_server(a, a.ip, 7001)
    connect_until(b, a.ip, 7001, reachable=True, limit=30)
    a.link_down()
    connect_until(b, a.ip, 7001, reachable=False, limit=10)
    connect_until(c, a.ip, 7001, reachable=False, limit=10)
    connect_until(a, a.ip, 7001, reachable=True, limit=10)  # the host itself runs on
    tcp_server(c, c.ip, 7002)
    connect_until(b, c.ip, 7002, reachable=True, limit=30)  # the others still talk
    connect_until(a, c.ip, 7002, reachable=False, limit=10)
    a.link_up()
    connect_until(b, a.ip, 7001, reachable=True, limit=30)
    connect_until(a, c.ip, 7002, reachable=True, limit=30)


@pytest.mark.timeout(120)
def test_pids_and_kill_processes(two_hosts: Hosts) -> None:
    a, b = two_hosts
    sleeper = a.popen(["sleep", "600"])
    # a daemon that left its parent (as `cairn start` leaves its node) counts too
    out = a.run(["sh", "-c", "setsid sleep 600 > /dev/null 2>&1 & echo $!"]).stdout
    daemon = int(out)
    assert {sleeper.pid, daemon} <= set(a.pids())
    assert a.holder_pid not in a.pids()
    assert not {sleeper.pid, daemon} & set(b.pids())
    a.kill_processes()
    assert sleeper.wait(10) == -signal.SIGKILL
    wait_until(lambda: not running(daemon), 10, "the daemon killed")
    assert a.pids() == []
    assert a.run(["true"]).returncode == 0  # the host is still usable


@pytest.mark.timeout(120)
def test_nothing_is_left_behind_when_a_test_fails() -> None:
    hosts = Hosts(2)
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"), hosts:
        for host in hosts:
            pids.append(host.popen(["sleep", "600"]).pid)
            out = host.run(["sh", "-c", "setsid sleep 600 > /dev/null 2>&1 & echo $!"])
            pids.append(int(out.stdout))
            # a process that ignores SIGTERM: killed after the grace period
            ignoring = host.popen(
                [
                    PYTHON,
                    "-c",
                    "import signal, sys, time\n"
                    "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True)\n"
                    "time.sleep(600)",
                ],
                stdout=subprocess.PIPE,
            )
            assert ignoring.stdout is not None and ignoring.stdout.readline() == b"ok\n"
            ignoring.stdout.close()
            pids.append(ignoring.pid)
            host.run(["sh", "-c", "echo x > /dev/shm/left && echo x > /tmp/left"])
            pids.append(host.holder_pid)
        assert len(mount_lines(hosts.mount_tags)) >= 4
        raise RuntimeError("the test failed")
    assert_nothing_left(hosts, pids)
    hosts.close()  # idempotent


# Run as a separate process, then SIGKILLed: what a killed test run leaves.
KILLED_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from hosts import Hosts
hosts = Hosts(1, prefix=sys.argv[2])
hosts.start()
daemon = hosts[0].run(["sh", "-c", "setsid sleep 600 > /dev/null 2>&1 & echo $!"]).stdout
print(hosts[0].netns, hosts[0].holder_pid, daemon.strip(), flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(120)
def test_a_killed_runs_leftovers_are_swept() -> None:
    # a prefix of its own: no other run's sweep takes its leftovers before it looks
    prefix = f"cairnhostk{secrets.token_hex(3)}"
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(Path(__file__).parent), prefix],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as run:
        try:
            assert run.stdout is not None
            netns, holder, daemon = run.stdout.readline().split()
            run.kill()
            run.wait()
            # the holder dies with its test process; the daemon in the host and the
            # namespace stay until a later run sweeps them
            wait_until(lambda: not running(int(holder)), 10, "the holder gone with its parent")
            assert running(int(daemon)) and Path("/run/netns", netns).exists()
            switch = netns.removesuffix("-h0") + "-sw"
            assert sorted(sweep_stale(prefix)) == [netns, switch]
            assert not Path("/run/netns", netns).exists()
            assert not Path("/run/netns", switch).exists()
            wait_until(lambda: not running(int(daemon)), 10, "the daemon killed")
        finally:
            run.kill()
            sweep_stale(prefix)


@pytest.mark.timeout(120)
def test_a_checkout_under_tmp_is_still_seen(tmp_path: Path) -> None:
    """CI may clone under /tmp, which each host replaces with its own tmpfs: the
    checkout must be bound back at its path."""
    checkout = tmp_path / "checkout"
    (checkout / "tests").mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "hosts.py", checkout / "tests" / "hosts.py")
    (checkout / "marker").write_text("here\n")
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(checkout / 'tests')!r})\n"
        "from hosts import Hosts, CHECKOUT\n"
        "with Hosts(1) as hosts:\n"
        "    host = hosts[0]\n"
        "    print(host.run(['cat', 'marker']).stdout, end='')\n"
        "    print(host.run(['touch', 'new'], check=False).returncode)\n"
        "    print(host.run(['ls', '-A', '/tmp']).stdout, end='')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    # the host's /tmp holds only what was bound back there: the checkout's top folder
    # and, where the interpreter lives under /tmp too (a venv in a clone there), its own
    under_tmp = [Path(p) for p in (sys.prefix, sys.base_prefix, os.path.realpath(sys.prefix))]
    allowed = {checkout.parts[2]} | {p.parts[2] for p in under_tmp if p.parts[1:2] == ("tmp",)}
    assert out[:2] == ["here", "1"] and checkout.parts[2] in out[2:], out
    assert set(out[2:]) <= allowed, out
    assert not (checkout / "new").exists()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tls", ["off", "auto"])
def test_a_cairn_head_runs_in_a_host(two_hosts: Hosts, tls: str) -> None:
    """``cairn start --head`` on a host's address starts its embedded PostgreSQL (as
    the cairn-postgres user, from a copy of the binaries in the host's /tmp), and
    ``cairn status`` and ``cairn stop`` find it there; nothing of it is seen outside."""
    a, b = two_hosts
    started = a.cairn("start", "--head", "--node-ip-address", a.ip, "--tls", tls)
    try:
        session = session_of(started)
        assert a.run(["test", "-d", session], check=False).returncode == 0
        assert not Path(session).exists()
        assert pwd.getpwnam("cairn-postgres").pw_uid in {owner(pid) for pid in a.pids()}
        assert a.run(["sh", "-c", "ls -d /tmp/cairn-pginstall-*"]).returncode == 0
        status = a.cairn("status").stdout
        assert "1 nodes alive, 0 dead" in status, status
        assert re.search(rf"ALIVE at {re.escape(a.ip)}:\d+ \(head\)", status), status
        assert b.cairn("status", check=False).returncode != 0  # not on another host
    finally:
        stopped = a.cairn("stop").stdout
    assert "stopped the head" in stopped, stopped
    wait_until(lambda: a.pids() == [], 30, "every process of the head gone")
