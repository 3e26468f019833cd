"""Which calls an actor's process has begun and not yet answered, kept in a small file
the process maps and writes in place (no system call per call), and that its node
daemon reads after the process died. With it the daemon knows exactly which of the
dead process's unanswered calls never began: those go to the new instance without
using up ``max_task_retries``; the others may have run part way (at-most-once unless
retries allow). Calls reach an actor from the daemon and straight from callers, so the
order the daemon sent them in no longer tells.

The file holds one 32-byte slot per call that may run at once (``max_concurrency``):
a task id (32 hex characters) while the call runs, zeros otherwise. A slot is set
before the call starts and cleared only after its answer is sent to the daemon, so a
call whose slot is clear either never began or has its answer at the daemon.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Iterator

_SLOT = 32


def begun_calls_path(session_dir: str, worker_id: str) -> str:
    return f"{session_dir}/actor-{worker_id.rsplit('-', 1)[-1]}.begun"


class BegunCalls:
    """The actor process's side: a call runs inside ``running(task_id)``."""

    def __init__(self, path: str, slots: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, slots * _SLOT)
            self._map = mmap.mmap(fd, slots * _SLOT)
        finally:
            os.close(fd)
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self, task_id: str) -> Iterator[None]:
        """Marks the call begun for the ``with`` block, which ends once it is answered."""
        with self._lock:
            slot = self._free.pop()
        span = slice(slot * _SLOT, (slot + 1) * _SLOT)
        self._map[span] = task_id.encode().ljust(_SLOT, b"\0")[:_SLOT]
        try:
            yield
        finally:
            self._map[span] = bytes(_SLOT)
            with self._lock:
                self._free.append(slot)


def read_begun(path: str) -> set[str] | None:
    """The daemon's side, after the process died: the task ids of calls it had begun
    and not answered; None when the file is missing (the process died before it made
    one, or it is not an actor's)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return None
    slots = (data[i : i + _SLOT] for i in range(0, len(data) - _SLOT + 1, _SLOT))
    return {slot.rstrip(b"\0").decode("ascii", "replace") for slot in slots if slot.strip(b"\0")}
