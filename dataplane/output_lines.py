"""What workers print, from their files to the driver's terminal.

A worker's stdout and stderr are files on its node (controlplane/node/worker_output.py
reads them), rotated by the worker itself (``rotate_when_full``): past
``CAIRN_LOG_MAX_BYTES`` a file becomes ``.1`` (older copies shift up to
``CAIRN_LOG_BACKUPS``) and the worker writes on in a new one, so no line is lost.
Before the first line of each task whose job or name differs from the last one's, the
worker writes a marker line (``mark``) to both, so the reader knows whose lines follow
without asking anyone: lines go to the driver of the job they were printed for,
prefixed with what printed them, as Ray does: ``(name pid=N, ip=HOST)``.

At the driver (``OutputPrinter``) lines repeated by several processes within a few
seconds are shown once, then counted (``[repeated 3x across cluster]``), as Ray's
``RAY_DEDUP_LOGS``; ``tqdm_ray``'s progress lines are drawn as bars instead."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from dataplane import protocol as p
from dataplane.progress_bars import bars

MAX_BYTES = int(os.environ.get("CAIRN_LOG_MAX_BYTES", str(64 * 1024**2)))
BACKUPS = int(os.environ.get("CAIRN_LOG_BACKUPS", "3"))
_ROTATION_CHECK_S = 1.0
MARKER = "\x1e:cairn-output:"  # (a record separator first: not something users print)
_DIGITS = re.compile(r"\S*\d\S*")
_DEDUP_WINDOW_S = float(os.environ.get("RAY_DEDUP_LOGS_AGG_WINDOW_S", "5"))


def marker_line(job_id: str, name: str) -> str:
    return f"{MARKER}{json.dumps({'job': job_id, 'name': name})}\n"


def rotation_line() -> str:
    """The first line of a file a worker rotated in: when (its node's clock), so a
    reader can tell it from an older copy whose inode it reuses (controlplane/logs.py)."""
    return f"{MARKER}{json.dumps({'rotated_at': time.time()})}\n"


def parse_rotation(line: str) -> float | None:
    """When the file a rotation line starts was rotated in; None for any other line."""
    if not line.startswith(MARKER):
        return None
    try:
        return float(json.loads(line[len(MARKER) :])["rotated_at"])
    except (ValueError, KeyError, TypeError):
        return None


def parse_marker(line: str) -> tuple[str, str] | None:
    """(job id, name) of a marker line; None for any other line."""
    if not line.startswith(MARKER):
        return None
    try:
        found = json.loads(line[len(MARKER) :])
        return str(found["job"]), str(found["name"])
    except (ValueError, KeyError, TypeError):
        return None


class OutputMarks:
    """A worker's side: writes a marker when what runs changes (not per task: a worker
    running the same function for the same job writes nothing more)."""

    def __init__(self) -> None:
        self._last: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def mark(self, job_id: str, name: str) -> None:
        if (job_id, name) == self._last:
            return
        with self._lock:
            self._last = (job_id, name)
            line = marker_line(job_id, name)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()  # what the last task left unflushed stays its own
                    stream.write(line)
                    stream.flush()
                except (OSError, ValueError):  # (a closed or replaced stream)
                    pass


def rotate_when_full() -> None:
    """A worker's thread: rotates its stdout and stderr files once past ``MAX_BYTES``
    (the new file takes the old one's descriptor: writers never notice)."""

    def watch() -> None:
        while True:
            time.sleep(_ROTATION_CHECK_S)
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    if os.fstat(fd).st_size > MAX_BYTES:
                        rotate(fd, os.readlink(f"/proc/self/fd/{fd}"))

    threading.Thread(target=watch, name="cairn-output-rotation", daemon=True).start()


def rotate(fd: int, path: str) -> None:
    """The new file takes the descriptor before the old one is renamed away, so that
    once the reader sees the new file at ``path``, nothing more is written to the old
    one (``.1``): the rest the reader reads of it then is all there is."""
    fresh = os.open(f"{path}.new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        os.write(fresh, rotation_line().encode())
        os.dup2(fresh, fd)
    finally:
        os.close(fresh)
    for n in range(BACKUPS - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}.{n}", f"{path}.{n + 1}")
    if BACKUPS > 0:
        os.replace(path, f"{path}.1")
    else:
        os.unlink(path)
    os.replace(f"{path}.new", path)


# -- the driver's side -----------------------------------------------------------------


@dataclass
class _Seen:
    since: float
    sources: set[tuple[str, int]]
    count: int = 0
    last: tuple[str, str, str] = ("", "", "")  # prefix, line, stream


@dataclass
class OutputPrinter:
    """Shows the lines a driver is sent. ``progress`` takes tqdm_ray's lines (None:
    they are shown as they are)."""

    dedup: bool = field(default_factory=lambda: os.environ.get("RAY_DEDUP_LOGS", "1") != "0")
    window_s: float = _DEDUP_WINDOW_S
    progress: Callable[[str, p.OutputLines], bool] | None = bars.line
    _recent: dict[str, _Seen] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _timer: threading.Timer | None = None

    def show(self, output: p.Output) -> None:
        with self._lock:
            now = time.monotonic()
            for batch in output.batches:
                prefix = _prefix(batch)
                for line in batch.lines:
                    if self.progress is not None and self.progress(line, batch):
                        continue
                    if self._repeated(line, prefix, batch, now):
                        continue
                    _write(batch.stream, f"{prefix} {line}")
            self._flush(now)

    def _repeated(self, line: str, prefix: str, batch: p.OutputLines, now: float) -> bool:
        """Whether the line repeats one another process printed within the window
        (then it is counted, not shown)."""
        if not self.dedup:
            return False
        key = _DIGITS.sub("", line).strip()
        if not key:
            return False
        source = (batch.ip, batch.pid)
        seen = self._recent.get(key)
        if seen is None or now - seen.since >= self.window_s:
            if seen is not None:
                self._summary(seen)
            self._recent[key] = _Seen(now, {source})
            return False
        seen.sources.add(source)
        if len(seen.sources) < 2:
            return False
        seen.count += 1
        seen.last = (prefix, line, batch.stream)
        if self._timer is None:
            self._timer = threading.Timer(self.window_s, self.flush)
            self._timer.daemon = True
            self._timer.start()
        return True

    def flush(self, *, everything: bool = False) -> None:
        """Shows the counts of repeated lines whose window ended (all: at shutdown)."""
        with self._lock:
            self._timer = None
            self._flush(float("inf") if everything else time.monotonic())

    def _flush(self, now: float) -> None:
        for key, seen in list(self._recent.items()):
            if now - seen.since >= self.window_s:
                del self._recent[key]
                self._summary(seen)
        if self._timer is None and any(s.count for s in self._recent.values()):
            self._timer = threading.Timer(self.window_s, self.flush)
            self._timer.daemon = True
            self._timer.start()

    @staticmethod
    def _summary(seen: _Seen) -> None:
        if seen.count:
            prefix, line, stream = seen.last
            _write(stream, f"{prefix} {line} [repeated {seen.count}x across cluster]")


def _prefix(batch: p.OutputLines) -> str:
    text = f"({batch.name} pid={batch.pid}, ip={batch.ip})"
    target = sys.stderr if batch.stream == "stderr" else sys.stdout
    if _is_tty(target):
        return f"\x1b[36m{text}\x1b[0m"  # Ray's cyan
    return text


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _write(stream: str, text: str) -> None:
    target: TextIO = sys.stderr if stream == "stderr" else sys.stdout
    with contextlib.suppress(OSError, ValueError):  # (the driver's own stream is closed)
        print(text, file=target, flush=True)
