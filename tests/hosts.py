"""Hosts that share nothing but a network link, on this one machine, for tests of a
cluster whose nodes run on separate machines.

Each host is a Linux network namespace with its own loopback and one veth interface at
192.0.2.(10+i)/24 (RFC 5737 TEST-NET-1; the machine's own interface may be in that range
too, as in some sandboxes, which does not matter: the hosts have no link to the root
namespace); the other ends of the veths hang on a bridge in a "switch" namespace of
their own, so the root network namespace is never changed and a host has no route
anywhere but its loopback and its peers. Each host also has a mount namespace of its
own, held by a small holder process (``sleep``): a fresh tmpfs on /tmp and on /dev/shm
(session directories, sockets and shared-memory segments of one host are invisible to
the others and to the root namespace), an /etc/hosts naming the hosts, and the checkout
and the Python installation bind-mounted read-only at the paths they have here. Hosts
also get their own IPC and UTS namespaces (SysV shared memory dies with the host;
``hostname`` is ``host<i>``) but share the pid namespace, so the tests see and signal
their processes with ordinary pids. The root namespace is not on the switch: talk to a
host from another host (``run``, ``python``), not from the test process.

Use it as a context manager, ``with Hosts(3) as hosts: hosts[0].cairn("status")``, or
as a fixture made by ``hosts_fixture(n)``. Requires root (CI runs as root)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pytest

PREFIX = "cairnhost"
SUBNET = "192.0.2"  # RFC 5737 TEST-NET-1
PREFIX_LEN = 24
FIRST_HOST_OCTET = 10
CHECKOUT = Path(__file__).resolve().parents[1]
# The interpreter running the tests, by a path that exists inside the hosts: its directory
# resolved (the prefix is mounted there) but not the file itself, so that a venv's
# python still finds its pyvenv.cfg beside it.
PYTHON = str(
    Path(os.path.realpath(os.path.dirname(sys.executable))) / os.path.basename(sys.executable)
)
# Variables of the root namespace's cluster, or of its temp directory, which mean
# nothing (or the wrong thing) inside a host; kept only where env= gives them.
ROOT_ONLY_ENV = frozenset(
    {"CAIRN_GCS_URL", "CAIRN_ADDRESS", "CAIRN_AUTH_TOKEN", "CAIRN_TEST_GCS_URL", "TMPDIR"}
)
_NETNS_DIR = Path("/run/netns")
_SETUP_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1

# Runs in the holder process, inside the host's (new) network, mount, IPC and UTS
# namespaces, then becomes `sleep infinity`, which keeps the mount namespace alive.
# $1 hostname, $2 address/prefix, $3 veth, $4 mount source tag, $5 /etc/hosts text, then
# the paths to bind read-only. Paths under /tmp would be hidden by the new tmpfs, so each
# path is first bound onto a staging tmpfs (on /dev/shm, replaced at the end), and moved
# back to its own path once /tmp is mounted.
_HOLDER_SCRIPT = r"""
set -eu
hostname=$1 address=$2 veth=$3 tag=$4 etc_hosts=$5
shift 5
echo "$hostname" > /proc/sys/kernel/hostname
f=/proc/sys/net/ipv6/conf/$veth/disable_ipv6
if [ -w "$f" ]; then echo 1 > "$f"; fi
ip link set lo up
ip addr add "$address" dev "$veth"
ip link set "$veth" up
# copies of the root's /run/netns mounts would keep other namespaces alive after
# `ip netns del`, as long as this host lives: detach them all (another run may delete
# its namespaces meanwhile, so entries can vanish under us: best effort per entry)
if mountpoint -q /run/netns; then umount -l /run/netns; fi
awk '$5 ~ "^/run/netns/" {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
done
mount -t tmpfs -o mode=0700,size=1m "$tag-stage" /dev/shm
i=0
for p in "$@"; do
    mkdir /dev/shm/$i
    mount --rbind "$p" /dev/shm/$i
    i=$((i+1))
done
printf '%s' "$etc_hosts" > /dev/shm/hosts
mount --bind /dev/shm/hosts /etc/hosts
mount -o remount,bind,ro /etc/hosts
mount -t tmpfs -o mode=1777 "$tag-tmp" /tmp
i=0
for p in "$@"; do
    mkdir -p "$p"
    mount --move /dev/shm/$i "$p"
    mount -o remount,bind,ro "$p"
    i=$((i+1))
done
umount /dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev "$tag-shm" /dev/shm
echo ready
exec sleep infinity
"""


class HostSetupError(RuntimeError):
    """The namespaces, links or mounts of a host could not be made."""


@functools.cache
def _namespace_probe() -> str | None:
    """Why namespaces cannot be made here (None: they can); asked once per session."""
    missing = [
        tool for tool in ("ip", "unshare", "nsenter", "env", "sleep") if not shutil.which(tool)
    ]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--ipc", "--uts", "true"],
        capture_output=True,
        text=True,
        timeout=_SETUP_TIMEOUT_S,
    )
    if probe.returncode != 0:
        return f"`unshare --net --mount --ipc --uts true` failed: {probe.stderr.strip()}"
    return None


def session_of(started: subprocess.CompletedProcess[str]) -> str:
    """The session directory ``cairn start`` says it made (in its host's /tmp)."""
    found = re.search(r"\(session (\S+);", started.stdout)
    assert found is not None, started.stdout
    return found[1]


def ensure_nft() -> None:
    """nftables, from Debian, for the tests that drop packets; installed here if missing
    (CI runs as root on a new machine: a test that needs it fails, never skips)."""
    if shutil.which("nft"):
        return
    install = ["apt-get", "install", "-y", "-q", "nftables"]
    if subprocess.run(install, capture_output=True, timeout=300).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
        done = subprocess.run(install, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"these tests need nftables (apt-get install nftables): {done.stderr}")


def require_root() -> None:
    """Fails (not skips: a skipped multi-host test would hide a broken cluster) unless
    this process can make network and mount namespaces, which takes root."""
    if os.geteuid() != 0:
        pytest.fail(
            "the multi-host tests need root (CI runs them as root) to make network and "
            "mount namespaces; run them with sudo or as root"
        )
    reason = _namespace_probe()
    if reason is not None:
        pytest.fail(f"the multi-host tests cannot make namespaces here: {reason}")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_SETUP_TIMEOUT_S)
    if result.returncode != 0:
        raise HostSetupError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def _ns_key(path: str) -> tuple[int, int] | None:
    """Identity of a namespace file (a /run/netns entry or /proc/PID/ns/net)."""
    try:
        st = os.stat(path)
    except OSError:  # gone, or a zombie (which has no namespaces any more)
        return None
    return (st.st_dev, st.st_ino)


def _pids_by_netns(keys: set[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """The live processes in each of the network namespaces ``keys``, by namespace."""
    found: dict[tuple[int, int], list[int]] = {key: [] for key in keys}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        key = _ns_key(f"/proc/{entry}/ns/net")
        if key in found:
            found[key].append(int(entry))
    return found


def _signal(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _kill_in_netns(
    keys: set[tuple[int, int]],
    grace: float,
    exclude: frozenset[int] = frozenset(),
    reap: Callable[[], None] = lambda: None,
) -> None:
    """Kills every process in the network namespaces ``keys`` (except ``exclude``):
    SIGTERM, then SIGKILL once ``grace`` seconds have passed, until none is left (new
    children forked meanwhile included); ``reap`` waits for our own children."""
    start = time.monotonic()
    termed: set[int] = set()
    while True:
        reap()
        pids = [p for ps in _pids_by_netns(keys).values() for p in ps if p not in exclude]
        if not pids:
            return
        elapsed = time.monotonic() - start
        if elapsed >= grace:
            _signal(pids, signal.SIGKILL)
        else:
            _signal([p for p in pids if p not in termed], signal.SIGTERM)
            termed.update(pids)
        if elapsed > grace + 30:
            raise RuntimeError(f"processes {pids} survived SIGKILL for 30 s")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Removes the namespaces (and kills the processes) that a test run killed outright
    left behind: those whose name records an owner pid that no longer runs. Returns the
    names removed."""
    if not _NETNS_DIR.is_dir():
        return []
    stale = []
    for entry in _NETNS_DIR.iterdir():
        parts = entry.name.split("-")
        owner = int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None
        if parts[0] == prefix and owner is not None and not _alive(owner):
            stale.append(entry)
    keys = {key for entry in stale if (key := _ns_key(str(entry))) is not None}
    if keys:
        _kill_in_netns(keys, grace=0.0)
    # hosts before switches: a host's veth goes when its namespace does
    for entry in sorted(stale, key=lambda e: e.name.endswith("-sw")):
        with contextlib.suppress(HostSetupError):
            _ip("netns", "del", entry.name)
    return [entry.name for entry in stale]


def _die_with_parent() -> None:
    """In the forked holder: SIGKILL it if the test process dies (a killed pytest)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def bound_paths() -> list[str]:
    """The paths bound read-only into every host: the checkout and the Python
    installation, resolved, without nested duplicates."""
    paths = sorted({os.path.realpath(p) for p in (CHECKOUT, sys.prefix, sys.base_prefix)})
    kept: list[str] = []
    for path in paths:  # sorted: a parent comes before what it contains
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    for path in kept:
        if path == "/" or path == "/dev/shm" or path.startswith("/dev/shm/"):
            raise HostSetupError(f"cannot bind {path} into a host (it would hide /dev/shm)")
    return kept


class Host:
    """One host: its network namespace (``netns``), its address (``ip``) and the holder
    process whose mount namespace its commands enter. Made by ``Hosts``."""

    def __init__(self, index: int, netns: str, switch_netns: str, tag: str) -> None:
        self.index = index
        self.name = f"host{index}"  # also its hostname inside the host
        self.ip = f"{SUBNET}.{FIRST_HOST_OCTET + index}"
        self.netns = netns
        self._switch_netns = switch_netns
        self.veth = f"{tag}h{index}"  # in the host
        self.switch_port = f"{tag}s{index}"  # its other end, on the bridge
        self._holder: subprocess.Popen[bytes] | None = None
        self._children: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.ip}, netns={self.netns})"

    @property
    def holder_pid(self) -> int:
        """The pid of the process that keeps this host's mount namespace."""
        if self._holder is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._holder.pid

    def env(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """The environment of a process in this host: ours without what points at the
        root namespace's cluster or temp directory (``ROOT_ONLY_ENV``), with
        PYTHONDONTWRITEBYTECODE=1 (the checkout is read-only here) and
        PYTHONUNBUFFERED=1 (output read as it comes), plus ``extra`` (None removes)."""
        environment: dict[str, str | None] = {
            k: v for k, v in os.environ.items() if k not in ROOT_ONLY_ENV
        }
        environment |= {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        environment |= dict(extra or {})
        return {k: v for k, v in environment.items() if v is not None}

    def command(self, argv: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """``argv`` prefixed so that it runs in this host (its network, mounts, IPC and
        hostname), in ``cwd`` (default: the checkout): for a Popen of your own."""
        workdir = os.fspath(cwd) if cwd is not None else str(CHECKOUT)
        return [
            "nsenter",
            f"--target={self.holder_pid}",
            "--mount",
            "--net",
            "--ipc",
            "--uts",
            "--",
            # not nsenter's --wd, which opens the directory before entering the host,
            # so the process would work in the root namespace's (writable) checkout
            "env",
            f"--chdir={workdir}",
            "--",
            *argv,
        ]

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        timeout: float = 60,
        check: bool = True,
        input: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` in this host to completion and captures its output (text); with
        ``check``, a non-zero exit is an AssertionError showing that output."""
        result = subprocess.run(
            self.command(argv, cwd),
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.name}: {' '.join(argv)} exited with {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Starts ``argv`` in this host and returns at once (stdin /dev/null unless
        given); ``Hosts`` kills and reaps it at the end if it still runs."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process: subprocess.Popen[Any] = subprocess.Popen(
            self.command(argv, cwd), env=self.env(env), **kwargs
        )
        self._children.append(process)
        return process

    def python(
        self,
        code: str,
        *,
        env: Mapping[str, str | None] | None = None,
        timeout: float = 60,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``python -c code`` in this host with the tests' interpreter (the venv),
        in the checkout, so ``import controlplane, sdk`` works (and ``tests.workloads``)."""
        return self.run([PYTHON, "-c", code], env=env, timeout=timeout, check=check, input=input)

    def cairn(
        self,
        *args: str,
        env: Mapping[str, str | None] | None = None,
        timeout: float = 150,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the ``cairn`` command line (``python -m controlplane.cli``) in this
        host. A node it starts in the background outlives the call, in this host."""
        return self.run(
            [PYTHON, "-m", "controlplane.cli", *args], env=env, timeout=timeout, check=check
        )

    def node_logs(self, lines: int = 10_000) -> str:
        """What the running nodes of this host said (the last ``lines`` of each one's
        output file in its /tmp: the daemons' warnings and errors), under a header; first
        what the GCS's watchdog said, wherever it is in the file (a failover's timing)."""
        watchdog = '"watchdog|promot|GCS primary|GCS replica"'
        each = (
            f'for f in /tmp/cairn-node-*.log; do echo "== $f"; '
            f'grep -n -E {watchdog} "$f" | head -n 40; tail -n {lines} "$f"; done'
        )
        found = self.run(["sh", "-c", each], check=False)
        return f"\n--- node logs on {self.name}:\n{found.stdout}"

    def link_down(self) -> None:
        """Cuts this host from the network, as a pulled cable: its port on the switch
        goes down, so packets to or from its peers are dropped (not refused); its
        loopback and its processes are untouched."""
        _ip("-n", self._switch_netns, "link", "set", self.switch_port, "down")

    def link_up(self) -> None:
        """Plugs this host back in (undoes ``link_down``)."""
        _ip("-n", self._switch_netns, "link", "set", self.switch_port, "up")

    def pids(self) -> list[int]:
        """The live processes running in this host (its holder excepted)."""
        key = _ns_key(str(_NETNS_DIR / self.netns))
        if key is None:
            return []
        holder = self._holder.pid if self._holder is not None else None
        return [pid for pid in _pids_by_netns({key})[key] if pid != holder]

    def kill_processes(self, grace: float = 0.0) -> None:
        """Kills every process in this host but its holder (SIGTERM, SIGKILL after
        ``grace`` seconds; by default SIGKILL at once, as a crash). /tmp and /dev/shm
        keep their files; the host stays usable."""
        key = _ns_key(str(_NETNS_DIR / self.netns))
        if key is not None:
            exclude = frozenset({self._holder.pid}) if self._holder is not None else frozenset()
            _kill_in_netns({key}, grace, exclude, self._reap)

    def _reap(self) -> None:
        self._children = [p for p in self._children if p.poll() is None]

    # -- made and removed by Hosts --------------------------------------------------

    def _start_holder(self, tag: str, etc_hosts: str, paths: Sequence[str]) -> None:
        self._holder = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--ipc",
                "--uts",
                "--",
                "sh",
                "-c",
                _HOLDER_SCRIPT,
                "holder",
                self.name,
                f"{self.ip}/{PREFIX_LEN}",
                self.veth,
                tag,
                etc_hosts,
                *paths,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )

    def _wait_ready(self, deadline: float) -> None:
        holder = self._holder
        assert holder is not None and holder.stdout is not None and holder.stderr is not None
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostSetupError(f"{self.name}: its holder was not ready in time")
            readable, _, _ = select.select([holder.stdout], [], [], left)
            if readable:
                chunk = os.read(holder.stdout.fileno(), 64)
                if not chunk:
                    holder.wait(_SETUP_TIMEOUT_S)
                    raise HostSetupError(
                        f"{self.name}: setting up its namespaces failed (exit "
                        f"{holder.returncode}): {holder.stderr.read().decode(errors='replace')}"
                    )
                line += chunk
        if line != b"ready\n":
            raise HostSetupError(f"{self.name}: unexpected holder output {line!r}")
        holder.stdout.close()
        holder.stderr.close()

    def _stop_holder(self) -> None:
        holder, self._holder = self._holder, None
        if holder is None:
            return
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        holder.wait(_SETUP_TIMEOUT_S)
        for pipe in (holder.stdout, holder.stderr):
            if pipe is not None:
                pipe.close()


class Hosts:
    """``n`` hosts on one switch (see the module's docstring). Entering makes them;
    leaving kills every process in every host (SIGTERM, SIGKILL after ``grace``
    seconds), then the holders, whose mount namespaces (and their tmpfs) go with them,
    and deletes the namespaces, links and switch: nothing is left behind, whether the
    test passed or raised."""

    def __init__(self, n: int = 2, *, grace: float = 3.0, prefix: str = PREFIX) -> None:
        if not 1 <= n <= 200:
            raise ValueError(f"between 1 and 200 hosts, not {n}")
        if "-" in prefix:
            raise ValueError("the prefix may not contain '-'")
        self.id = secrets.token_hex(3)
        self.prefix = prefix
        self.grace = grace
        base = f"{prefix}-{os.getpid()}-{self.id}"
        self.switch_netns = f"{base}-sw"
        self.tag = f"ch{self.id}"  # interface names: at most 15 characters
        self.bridge = f"{self.tag}br"
        self.hosts = [Host(i, f"{base}-h{i}", self.switch_netns, self.tag) for i in range(n)]
        self._made: list[str] = []  # namespaces made, in order

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    @property
    def namespaces(self) -> list[str]:
        """The names of every network namespace of this instance (switch last)."""
        return [h.netns for h in self.hosts] + [self.switch_netns]

    @property
    def mount_tags(self) -> list[str]:
        """The source names of this instance's tmpfs mounts, as /proc/*/mountinfo shows
        them (to check that none remains)."""
        return [f"{h.netns}-{kind}" for h in self.hosts for kind in ("tmp", "shm", "stage")]

    def __enter__(self) -> Hosts:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Makes the switch, the hosts and their links; waits until every host is ready."""
        if self._made:
            raise RuntimeError("these hosts are already started")
        require_root()
        sweep_stale(self.prefix)
        atexit.register(self.close)
        try:
            self._make_switch()
            etc_hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n" + "".join(
                f"{h.ip} {h.name}\n" for h in self.hosts
            )
            paths = bound_paths()
            for host in self.hosts:
                _ip("netns", "add", host.netns)
                self._made.append(host.netns)
                _ip(
                    "-n",
                    self.switch_netns,
                    "link",
                    "add",
                    host.switch_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    host.veth,
                    "netns",
                    host.netns,
                )
                _ip("-n", self.switch_netns, "link", "set", host.switch_port, "master", self.bridge)
                _ip("-n", self.switch_netns, "link", "set", host.switch_port, "up")
            for host in self.hosts:
                host._start_holder(host.netns, etc_hosts, paths)
            deadline = time.monotonic() + _SETUP_TIMEOUT_S
            for host in self.hosts:
                host._wait_ready(deadline)
        except BaseException:
            self.close()
            raise

    def _make_switch(self) -> None:
        _ip("netns", "add", self.switch_netns)
        self._made.append(self.switch_netns)
        # no IPv6 on the switch's ports: no router solicitations or MLD on the wire
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.switch_netns,
                "sh",
                "-c",
                "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 "
                "/proc/sys/net/ipv6/conf/default/disable_ipv6; do "
                'if [ -w "$f" ]; then echo 1 > "$f"; fi; done',
            ],
            check=True,
            capture_output=True,
            timeout=_SETUP_TIMEOUT_S,
        )
        _ip("-n", self.switch_netns, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", self.switch_netns, "link", "set", self.bridge, "up")

    def close(self) -> None:
        """Kills everything in the hosts and removes them (idempotent)."""
        atexit.unregister(self.close)
        keys = {k for name in self._made if (k := _ns_key(str(_NETNS_DIR / name))) is not None}
        holders = frozenset(h._holder.pid for h in self.hosts if h._holder is not None)

        def reap() -> None:
            for host in self.hosts:
                host._reap()

        try:
            if keys:
                _kill_in_netns(keys, self.grace, holders, reap)
        finally:
            for host in self.hosts:
                host._stop_holder()
                for child in host._children:  # killed above: only reaping is left
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(_SETUP_TIMEOUT_S)
                host._children.clear()
            errors = []
            for name in reversed(self._made):  # hosts, then the switch
                try:
                    _ip("netns", "del", name)
                except HostSetupError as exc:
                    errors.append(str(exc))
            self._made.clear()
            if errors:
                raise HostSetupError("; ".join(errors))


def hosts_fixture(
    n: int,
    *,
    scope: Literal["session", "package", "module", "class", "function"] = "function",
    grace: float = 3.0,
) -> Any:
    """A pytest fixture giving ``Hosts(n)``, made for the test (or ``scope``) and removed
    after it. Assign it to a module-level name, which becomes the fixture's name:
    ``three_hosts = hosts_fixture(3)``."""

    @pytest.fixture(scope=scope)
    def fixture() -> Iterator[Hosts]:
        with Hosts(n, grace=grace) as hosts:
            yield hosts

    return fixture
