"""What the node's workers print: kept in files, one pair per worker
(``logs/worker-<id>.out`` / ``.err`` in the session), and sent on to the drivers of the
jobs they printed for -- a driver on this node directly, one on another node through
that node (its ``Output`` call), found by the job's ``submitted`` event.

A reader pass (every ``_POLL_S``) reads what each file gained, whole lines only; the
workers' marker lines (dataplane/output_lines.py) say whose lines follow. A worker
rotates its own files (``.1``, ``.2``, ...): a file found with another inode than the
one being read was rotated, and the rest of the old one (and any copy rotated in after
it) is read first.
Files stay after their worker ended, for ``cairn logs``, until the session's directory
goes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from controlplane.eventlog.connection import KeptConnection
from controlplane.sql import queries
from dataplane import protocol as p
from dataplane.output_lines import MARKER, parse_marker, parse_rotation
from dataplane.transfer import LinkError

if TYPE_CHECKING:
    from controlplane.node.task_table import Connection

log = logging.getLogger(__name__)

_POLL_S = 0.1
_READ_AT_ONCE = 1 << 20  # bytes of one file per pass: a chatty worker cannot stall others
_SEND_TIMEOUT_S = 5.0
STREAMS = (("stdout", ".out"), ("stderr", ".err"))


def log_paths(logs_dir: Path, worker_id: str) -> tuple[Path, Path]:
    """A worker's stdout and stderr files."""
    return tuple(logs_dir / f"worker-{worker_id}{suffix}" for _, suffix in STREAMS)  # type: ignore[return-value]


@dataclass
class _Watched:
    path: Path
    stream: str
    pid: int
    offset: int = 0
    inode: int | None = None  # of the file being read
    partial: bytes = b""
    job_id: str | None = None  # whose lines these are, as the last marker said
    name: str = ""
    ended: bool = False  # its worker is gone: read once more, then dropped


@dataclass
class WorkerOutput:
    node_id: str
    gcs_url: str
    logs_dir: Path
    ip: Callable[[], str]  # this node's address, as drivers see it in the prefix
    address_of: Callable[[str], str | None]  # a node's gRPC address (None: unknown)
    peers: Callable[[], list[str]]  # the other live nodes' addresses
    call: Callable[[str, str, dict[str, Any]], Awaitable[Any]]  # (address, method, request)
    drivers: dict[str, Connection] = field(default_factory=dict)  # job -> its driver here
    _watched: list[_Watched] = field(default_factory=list)
    _driver_nodes: dict[str, str | None] = field(default_factory=dict)  # job -> node
    _passing: asyncio.Lock = field(default_factory=asyncio.Lock)
    _gcs: KeptConnection = field(init=False)  # the drivers' nodes' lookups

    def __post_init__(self) -> None:
        self._gcs = KeptConnection(self.gcs_url)

    def files(self, worker_id: str) -> tuple[IO[bytes], IO[bytes]]:
        """The worker's stdout and stderr, opened to append (the caller closes them
        once the process has them)."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        out, err = log_paths(self.logs_dir, worker_id)
        return open(out, "ab"), open(err, "ab")

    def watch(self, worker_id: str, pid: int) -> None:
        for (stream, _), path in zip(STREAMS, log_paths(self.logs_dir, worker_id), strict=True):
            self._watched.append(_Watched(path, stream, pid))

    def ended(self, pid: int) -> None:
        """The worker is gone: what it wrote last is read, then its files are left."""
        for watched in self._watched:
            if watched.pid == pid:
                watched.ended = True

    def offsets(self, worker_id: str) -> dict[str, float]:
        """Where the worker's output stands now: what it prints next starts there (in
        the current files, named by inode: they may be rotated later), as a task's
        ``running`` event records."""
        found: dict[str, float] = {}
        for (stream, _), path in zip(STREAMS, log_paths(self.logs_dir, worker_id), strict=True):
            with contextlib.suppress(OSError):
                stat = path.stat()
                found[f"{stream}_offset"] = stat.st_size
                found[f"{stream}_inode"] = stat.st_ino
        found["output_at"] = time.time()  # (a copy rotated in later reuses an inode)
        return found

    async def run(self) -> None:
        """Reads and sends, for the daemon's life."""
        while True:
            await asyncio.sleep(_POLL_S)
            try:
                await self.read_all()
            except Exception:  # (a lost line is better than a node without output)
                log.exception("reading the workers' output")

    async def read_all(self) -> None:
        """One pass: the new lines of every file, delivered. Passes run one at a time, so
        that a flush (``flush``) ends only once the lines an earlier pass read are
        delivered too."""
        async with self._passing:
            await self._read_all()

    async def _read_all(self) -> None:
        batches: dict[str, list[p.OutputLines]] = {}
        for watched in list(self._watched):
            for job_id, name, lines in self._read(watched):
                batches.setdefault(job_id, []).append(
                    p.OutputLines(self.ip(), watched.pid, name, watched.stream, lines)
                )
            if watched.ended:
                self._watched.remove(watched)
        for job_id, found in batches.items():
            await self._deliver(job_id, found)

    def _read(self, watched: _Watched) -> list[tuple[str, str, list[str]]]:
        """The file's new whole lines, as (job, name of what printed them, lines) in
        file order (lines before any marker: kept in the file only)."""
        data = b""
        try:
            with open(watched.path, "rb") as file:
                stat = os.fstat(file.fileno())
                if watched.inode is not None and stat.st_ino != watched.inode:
                    data = _rotated_since(watched, file)  # then the new file, from 0
                    watched.offset = 0
                watched.inode = stat.st_ino
                size = stat.st_size
                if size > watched.offset:
                    file.seek(watched.offset)
                    fresh = file.read(_READ_AT_ONCE)
                    watched.offset += len(fresh)
                    data += fresh
        except FileNotFoundError:
            # Between a rotation's two renames the file is briefly missing: it is read
            # again next pass (the watch ends only with its worker: ``ended``).
            return []
        if not data:
            return []
        data = watched.partial + data
        cut = data.rfind(b"\n") + 1
        if watched.ended and watched.offset >= size:
            cut = len(data)  # its last line, even without a newline
        watched.partial = data[cut:]
        found: list[tuple[str, str, list[str]]] = []
        for raw in data[:cut].splitlines():
            line = raw.decode(errors="replace")
            if line.startswith(MARKER):  # (whose lines follow, or a rotation's time)
                marked = parse_marker(line)
                if marked is not None:
                    watched.job_id, watched.name = marked
                continue
            if watched.job_id is None:
                continue
            if found and found[-1][:2] == (watched.job_id, watched.name):
                found[-1][2].append(line)
            else:
                found.append((watched.job_id, watched.name, [line]))
        return found

    async def _deliver(self, job_id: str, batches: list[p.OutputLines]) -> None:
        driver = self.drivers.get(job_id)
        if driver is not None:
            if not driver.closed:
                driver.send(p.Output(batches))
            return
        node_id = await self._driver_node(job_id)
        if node_id is None or node_id == self.node_id:
            return  # its driver is gone (or never asked for output)
        address = self.address_of(node_id)
        if address is None:
            return
        request = {"job_id": job_id, "batches": [_as_json(b) for b in batches]}
        try:
            await asyncio.wait_for(self.call(address, "Output", request), _SEND_TIMEOUT_S)
        except (LinkError, TimeoutError) as exc:
            log.info("output of job %s not sent to node %s: %s", job_id, node_id, exc)

    async def flush(self, *, everywhere: bool) -> None:
        """Reads and sends what the workers printed so far: here, and with
        ``everywhere`` on every other node too (each sends its lines on before it
        answers), so a driver about to leave sees its job's last lines."""
        await self.read_all()
        if everywhere:
            calls = [
                asyncio.wait_for(self.call(address, "FlushOutput", {}), _SEND_TIMEOUT_S)
                for address in self.peers()
            ]
            await asyncio.gather(*calls, return_exceptions=True)

    async def flush_requested(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Another node's ``FlushOutput`` call (its driver is leaving)."""
        await self.read_all()
        return {}

    def received(self, request: dict[str, Any]) -> dict[str, Any]:
        """Another node's ``Output`` call: lines for a driver of this node."""
        driver = self.drivers.get(str(request.get("job_id")))
        if driver is not None and not driver.closed:
            driver.send(p.Output([p.OutputLines(**b) for b in request.get("batches", [])]))
        return {}

    async def _driver_node(self, job_id: str) -> str | None:
        if job_id not in self._driver_nodes:
            async with self._gcs.use() as conn:
                found = await conn.fetchval(queries["job_driver_node"], job_id)
            if found is None:  # (its submitted event not committed yet: asked again later)
                return None
            self._driver_nodes[job_id] = found
        return self._driver_nodes[job_id]


def _as_json(batch: p.OutputLines) -> dict[str, Any]:
    return {
        "ip": batch.ip,
        "pid": batch.pid,
        "name": batch.name,
        "stream": batch.stream,
        "lines": batch.lines,
    }


def _rotated_since(watched: _Watched, current: IO[bytes]) -> bytes:
    """What the worker wrote to its rotated copies since the last pass: the rest of the
    one being read, then each copy rotated in after it, whole (a loaded node may pass
    more than one rotation between two reads), oldest first by the rotation line each
    starts with. Nothing if the one being read was rotated past the backups: those
    lines stay lost to the driver, and the files say so (controlplane/logs.py)."""
    newest = _rotated_at(current) or float("inf")  # (a file without the line: newest)
    reading = os.fstat(current.fileno()).st_ino
    with contextlib.ExitStack() as opened:
        found: dict[int, tuple[float, IO[bytes]]] = {}
        for path in watched.path.parent.glob(f"{watched.path.name}.*"):
            if not path.suffix[1:].isdigit():
                continue
            with contextlib.suppress(FileNotFoundError):
                copy = opened.enter_context(open(path, "rb"))
                inode = os.fstat(copy.fileno()).st_ino
                rotated_at = _rotated_at(copy) or 0.0
                if inode != reading and rotated_at < newest:
                    found[inode] = (rotated_at, copy)  # (renamed while listed: once)
        if watched.inode not in found:
            return b""
        since = found[watched.inode][0]
        parts = []
        for inode, (rotated_at, older) in sorted(found.items(), key=lambda item: item[1][0]):
            if rotated_at >= since:
                older.seek(watched.offset if inode == watched.inode else 0)
                parts.append(older.read())
        return b"".join(parts)


def _rotated_at(file: IO[bytes]) -> float | None:
    """When the worker rotated the file in (its first line says; None: its first file)."""
    file.seek(0)
    return parse_rotation(file.readline(256).decode(errors="replace"))
