"""Session directories (``/tmp/cairn-session-*``): where a session keeps its embedded
PostgreSQL data, sockets and logs. Each records the pid of the process that made it, so
a later session can remove the directories of sessions whose owner died without
cleaning up (SIGKILL, os._exit) once nothing of theirs runs any more."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from dataplane import shm

PREFIX = "cairn-session-"
_OWNER_FILE = "owner.pid"


def new_session_dir() -> Path:
    sweep_stale()
    path = Path(tempfile.mkdtemp(prefix=PREFIX))
    (path / _OWNER_FILE).write_text(str(os.getpid()))
    return path


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (maybe not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def sweep_stale() -> list[Path]:
    """Removes session directories whose owner and PostgreSQL are both gone, and the
    shared-memory segments of the node that ran there (a node killed outright leaves
    them; whoever sweeps first must remove them, as no one can tell whose they are
    once the directory is gone)."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        owner = _pid_in(path / _OWNER_FILE)
        if owner is None or alive(owner):
            continue  # not ours to judge (no owner file), or still in use
        postmasters = [_pid_in(path / d / "postmaster.pid") for d in ("pgdata", "replica/pgdata")]
        if any(pid is not None and alive(pid) for pid in postmasters):
            continue  # its GCS (or the GCS's replica) still runs
        with contextlib.suppress(OSError):  # its node's segments first: they name it
            shm.unlink_all((path / "node.ready").read_text().strip())
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
            removed.append(path)
    return removed
