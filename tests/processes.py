"""Finding this machine's processes by their command line (for tests that kill or
watch a node's processes), and running the ``cairn`` command line."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path


def pids_with(*needles: str, environ: bool = False) -> list[int]:
    """The pids of the processes whose command line (and, with ``environ``, environment:
    secrets such as the GCS URL travel there) contains every one of ``needles``."""
    wanted = [needle.encode() for needle in needles]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if environ:
                cmd += (entry / "environ").read_bytes()
        except OSError:
            continue
        if all(needle in cmd for needle in wanted):
            found.append(int(entry.name))
    return found


ROOT = Path(__file__).resolve().parent.parent


def private_temp_dir() -> Path:
    """A temp directory for a cluster of its own (``isolated_env``): its nodes are
    recorded there, so other tests' ``cairn`` commands do not see them, nor they others'.
    Mode 0755: PostgreSQL's system user must pass through it (pytest's tmp_path is
    0700)."""
    path = Path(tempfile.mkdtemp(prefix="cairn-test-"))
    path.chmod(0o755)
    return path


def isolated_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without Cairn's variables, with its temp directory ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return {**env, "TMPDIR": str(tmp), **extra}


def run_cairn(
    *args: str,
    check: bool = True,
    env: dict[str, str | None] | None = None,
    tmp: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs the ``cairn`` command line (from this checkout), with ``env`` added to the
    environment (a value of None removes that variable) -- with ``tmp``, to the
    ``isolated_env`` of that temp directory; with ``check``, a failure is an
    AssertionError showing what it printed."""
    base = isolated_env(tmp) if tmp is not None else os.environ
    environment = {**base, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
        env={k: v for k, v in environment.items() if v is not None},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cairn {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def gcs_url_of(session_dir: Path) -> str:
    """The GCS URL a node's daemon (of that session directory) hands its clients."""
    from dataplane.client import CoreClient

    client = CoreClient(str(session_dir / "node.sock"), "observer")
    try:
        return client.welcome.gcs_url
    finally:
        client.close()


def next_daemon_id(session_dir: Path, old_id: str, timeout: float = 30.0) -> str:
    """The id of the daemon a node started in place of ``old_id`` (its node.ready),
    once it is ready; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    ready = session_dir / "node.ready"
    while time.monotonic() < deadline:
        new_id = ready.read_text() if ready.exists() else old_id
        if new_id != old_id:
            return new_id
        time.sleep(0.1)
    raise AssertionError("the node daemon was not started again")


def run_driver(
    tmp_path: Path, code: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` (dedented) as a driver script of its own, from the checkout (its
    output captured); AssertionError showing it if it fails."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(code))
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def dashboard_address(session_dir: Path, other_than: str = "", timeout: float = 60.0) -> str:
    """The head's HTTP service's address, from its session's ``dashboard.address``
    (once there, and not ``other_than``: that of a service since restarted)."""
    path = session_dir / "dashboard.address"
    deadline = time.monotonic() + timeout
    while not path.exists() or path.read_text() in ("", other_than):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return path.read_text()
