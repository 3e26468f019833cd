"""A Cairn cluster on test hosts (tests/hosts.py): the head on the first host, on the
embedded default, the other hosts joined to it with the cluster token; drivers run on
any host. Shared by the tests of a cluster across machines."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from hosts import PYTHON, Host, Hosts

from controlplane import auth

HEAD_PORT = 6380


@dataclass
class HostCluster:
    hosts: Hosts
    token: str
    node_ids: dict[str, str]  # host name -> its node's id (as last read)

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{HEAD_PORT}"

    def node_id(self, host: Host) -> str:
        """The id of the node running on ``host`` now (a restarted daemon has a new one)."""
        found = host.run(["sh", "-c", "cat /tmp/cairn-session-*/node.ready"], check=False)
        self.node_ids[host.name] = found.stdout.strip()
        return self.node_ids[host.name]

    def driver(self, host: Host, body: str, timeout: float = 120) -> dict:
        """Runs a driver on ``host`` (``import sdk as ray``, connected to its node, with
        ``NODES``: host name -> node id) and returns the JSON object it prints last."""
        result = host.python(self.driver_code(body), timeout=timeout, check=False)
        assert result.returncode == 0, f"driver on {host.name} failed:\n{result.stderr[-4000:]}"
        return json.loads(result.stdout.strip().splitlines()[-1])

    def driver_code(self, body: str) -> str:
        return (
            "import json, sys, time, numpy as np, sdk as ray\n"
            "from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy\n"
            f"NODES = {json.dumps(self.node_ids)}\n"
            'ray.init(address="auto")\n' + body + "\nray.shutdown()\n"
        )

    def sql(self, statement: str, *params: str) -> list[list[str]]:
        """Rows of a read-only statement against the log (``cairn sql`` on the head),
        as text, without the header."""
        args = [a for p in params for a in ("--param", p)]
        out = self.head.cairn("sql", "--format", "json", *args, statement).stdout
        return [list(map(_text, row.values())) for row in json.loads(out)]

    def wait_for_sql(
        self, statement: str, *params: str, timeout: float = 60, what: str = ""
    ) -> list[list[str]]:
        """Polls ``statement`` until it returns a row."""
        deadline = time.monotonic() + timeout
        while not (rows := self.sql(statement, *params)):
            assert time.monotonic() < deadline, f"timed out waiting for {what or statement}"
            time.sleep(0.2)
        return rows


def start_driver(
    host: Host, code: str, *args: str, stdin: bool = False
) -> tuple[subprocess.Popen[str], str]:
    """A driver script on ``host``, in the background while a test injects a fault; it
    and the first line it printed (its sign that it reached the point the test waits
    for). With ``stdin``, it reads its go-ahead there (``finish_driver(input=...)``)."""
    driver = host.popen(
        [PYTHON, "-c", code, *args],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert driver.stdout is not None and driver.stderr is not None
    first = driver.stdout.readline()
    if not first:
        driver.wait()
        raise AssertionError(f"the driver on {host.name} stopped:\n{driver.stderr.read()[-4000:]}")
    return driver, first


def finish_driver(
    driver: subprocess.Popen[str],
    *,
    input: str | None = None,
    timeout: float = 180,
    hosts: Sequence[Host] = (),
) -> dict:
    """Waits for a driver of ``start_driver`` (killed if it overruns) and returns the
    JSON object it printed last (or fails with the node logs of ``hosts``)."""
    try:
        out, err = driver.communicate(input, timeout=timeout)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, err[-4000:] + "".join(h.node_logs(60) for h in hosts)
    return json.loads(out.strip().splitlines()[-1])


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def start(
    hosts: Hosts,
    *,
    cpus: tuple[float, ...] = (1, 2, 2),
    head_env: dict[str, str] | None = None,
    extra: Callable[[Host], list[str]] | None = None,
) -> HostCluster:
    """Starts a head on ``hosts[0]`` and joins a node on every other host."""
    token = "hosts-" + auth.new_token()
    env = {auth.TOKEN_ENV: token}
    head = hosts[0]
    head.cairn(
        "start",
        "--head",
        "--node-ip-address",
        head.ip,
        "--num-cpus",
        str(cpus[0]),
        env={**env, **(head_env or {})},
    )

    def join(host: Host, count: float) -> None:
        host.cairn(
            "start",
            "--address",
            f"{head.ip}:{HEAD_PORT}",
            "--node-ip-address",
            host.ip,
            "--num-cpus",
            str(count),
            *(extra(host) if extra else []),
            env=env,
        )

    with concurrent.futures.ThreadPoolExecutor(max(1, len(hosts.hosts) - 1)) as pool:
        list(pool.map(join, hosts.hosts[1:], cpus[1 : len(hosts.hosts)]))  # all at once
    cluster = HostCluster(hosts, token, {})
    for host in hosts:
        cluster.node_id(host)
    return cluster


@contextlib.contextmanager
def running(hosts: Hosts, **options: object) -> Iterator[HostCluster]:
    cluster = start(hosts, **options)  # type: ignore[arg-type]
    try:
        yield cluster
    finally:  # the nodes at once, then the head (on the first host)
        with concurrent.futures.ThreadPoolExecutor(max(1, len(hosts.hosts) - 1)) as pool:
            list(pool.map(lambda host: host.cairn("stop", check=False), hosts.hosts[1:]))
        hosts.hosts[0].cairn("stop", check=False)


__all__ = ["PYTHON", "HostCluster", "finish_driver", "running", "start", "start_driver"]
