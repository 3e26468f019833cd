"""Workers' output after the fact: ``cairn logs``, the state API's ``list_logs`` /
``get_log`` and the dashboard read it here.

Each worker's stdout and stderr are files on its node (``<session>/logs/worker-<id>.out``
/ ``.err``, controlplane/node/worker_output.py), rotated by the worker into ``.1``,
``.2``, ... A task attempt's ``running`` event records where the files stood when it
was sent (offset and inode of each): its lines run from there to where the next
attempt on that worker starts, or to the end of the files. The inode names the copy
an offset refers to after rotations; copies rotated past ``CAIRN_LOG_BACKUPS`` are
gone, and the answer says so (``Lines.notes``).

The node holding the files reads them: on this machine directly (a node recorded here,
or a private cluster's session), from elsewhere through the node's ``ReadLog`` call
(a bounded range of a named file of its logs directory; no other path is readable).
A node dead in the log, or not answering, took its files with it: ``LogsError`` says
which."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from controlplane.eventlog.connection import connect
from controlplane.node.log_files import (
    READ_AT_ONCE,
    LogsError,
    list_files,
    read_range,
)
from controlplane.sql import queries
from dataplane.output_lines import MARKER, parse_marker, parse_rotation

LOGS_DIR = "logs"
_STREAMS = {"out": "stdout", "err": "stderr"}
_CALL_TIMEOUT_S = 10.0
FOLLOW_INTERVAL_S = 0.5


# -- reading a node's files, here or through the node ----------------------------------


class NodeFiles(Protocol):
    async def list(self) -> list[dict[str, Any]]: ...

    async def read(self, name: str, offset: int, length: int) -> bytes: ...


@dataclass
class LocalFiles:
    logs_dir: Path

    async def list(self) -> list[dict[str, Any]]:
        return list_files(self.logs_dir)

    async def read(self, name: str, offset: int, length: int) -> bytes:
        return read_range(self.logs_dir, name, offset, length)


@dataclass
class RemoteFiles:
    node_id: str
    address: str
    timeout: float = _CALL_TIMEOUT_S
    _auth: tuple[str | None, Any] | None = None

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        from controlplane.node import rpc

        if self._auth is None:
            self._auth = _credentials(self.address)
        token, secure = self._auth
        try:
            answer = await asyncio.to_thread(
                rpc.call, self.address, "ReadLog", request, self.timeout, token, secure=secure
            )
        except rpc.AuthError as exc:
            raise LogsError(f"node {self.node_id} refused to read its logs: {exc}") from None
        except ConnectionError as exc:
            raise LogsError(
                f"node {self.node_id} at {self.address} does not answer ({exc}): the logs it "
                "holds cannot be read (if the node is gone, its logs went with it)"
            ) from None
        if "error" in answer:
            raise LogsError(f"node {self.node_id}: {answer['error']}")
        return answer

    async def list(self) -> list[dict[str, Any]]:
        return list((await self._call({"list": True}))["files"])

    async def read(self, name: str, offset: int, length: int) -> bytes:
        answer = await self._call({"name": name, "offset": offset, "length": length})
        return base64.b64decode(answer["data"])


def _credentials(address: str) -> tuple[str | None, Any]:
    """The cluster token (``$CAIRN_AUTH_TOKEN``, else that of a node of this machine)
    and, where this machine's nodes use TLS, a node's certificate to call with."""
    from controlplane import auth, local_node, tls

    token = auth.find_token(address)
    secure = None
    for node in local_node.local_nodes():
        token = token or auth.read_token(node.session_dir)
        secure = secure or tls.NodeTls.find(node.session_dir)
    return token, secure


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit())


def _runs(session_dir: Path, node_id: str) -> bool:
    """Whether the session directory is that of the node (its node.ready names it)."""
    try:
        return (session_dir / "node.ready").read_text().strip() == node_id
    except OSError:
        return False


async def read_all(files: NodeFiles, name: str, start: int = 0, end: int | None = None) -> bytes:
    """Bytes ``start`` to ``end`` (None: the end) of a file, a call per bounded range."""
    chunks = []
    offset = start
    while end is None or offset < end:
        want = READ_AT_ONCE if end is None else min(READ_AT_ONCE, end - offset)
        data = await files.read(name, offset, want)
        if not data:
            break
        chunks.append(data)
        offset += len(data)
    return b"".join(chunks)


# -- a worker's stream across its rotated copies ---------------------------------------


@dataclass(frozen=True)
class Copy:
    name: str
    size: int
    inode: int
    rotated_at: float | None = None  # when the worker rotated it in (None: its first)


def copies(listing: Iterable[dict[str, Any]], worker_id: str, suffix: str) -> list[Copy]:
    """A worker's stream's files, oldest first: ``.N``, ..., ``.1``, then the current."""
    base = f"worker-{worker_id}.{suffix}"
    found: list[tuple[int, Copy]] = []
    for entry in listing:
        name = entry["name"]
        if name == base:
            rank = 0
        elif name.startswith(base + ".") and name[len(base) + 1 :].isdigit():
            rank = int(name[len(base) + 1 :])
        else:
            continue
        found.append((rank, Copy(name, int(entry["size"]), int(entry.get("inode", 0)))))
    return [c for _, c in sorted(found, key=lambda f: -f[0])]


async def stream_copies(files: NodeFiles, worker_id: str, suffix: str) -> list[Copy]:
    """``copies``, each with when it was rotated in (its first line says)."""
    found = []
    for copy in copies(await files.list(), worker_id, suffix):
        first = (await files.read(copy.name, 0, 256)).split(b"\n", 1)[0]
        rotated_at = parse_rotation(first.decode(errors="replace"))
        found.append(Copy(copy.name, copy.size, copy.inode, rotated_at))
    return found


@dataclass
class Lines:
    """What was found: the lines, and notes on what was not (rotated away, ...)."""

    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


Point = tuple[int, int]  # (index of a copy, oldest first; offset in it)


def locate(
    stream: list[Copy], offset: int, inode: int | None, at: float | None = None
) -> Point | None:
    """Where an offset recorded in a running event (at ``at``) is now: in the copy with
    its inode, unless that copy was rotated in later, reusing the inode of the one
    meant (None: rotated away); without an inode (an older log), the current copy."""
    if inode is None:
        return (len(stream) - 1, offset) if stream and offset <= stream[-1].size else None
    for index, copy in enumerate(stream):
        if copy.inode == inode and offset <= copy.size:
            if at is not None and copy.rotated_at is not None and copy.rotated_at > at:
                return None
            return index, offset
    return None


async def read_between(
    files: NodeFiles, stream: list[Copy], start: Point, end: Point | None
) -> bytes:
    """The stream's bytes from ``start`` to ``end`` (None: its end), across copies."""
    last = len(stream) - 1 if end is None else end[0]
    parts = []
    for index in range(start[0], last + 1):
        begin = start[1] if index == start[0] else 0
        stop = end[1] if end is not None and index == end[0] else stream[index].size
        if end is None and index == last:
            parts.append(await read_all(files, stream[index].name, begin))
        elif stop > begin:
            parts.append(await read_all(files, stream[index].name, begin, stop))
    return b"".join(parts)


def split_lines(data: bytes, encoding: str = "utf-8", errors: str = "replace") -> list[str]:
    """Text lines, the workers' marker and rotation lines left out."""
    return [line for line in text_lines(data, encoding, errors) if not line.startswith(MARKER)]


def text_lines(data: bytes, encoding: str = "utf-8", errors: str = "replace") -> list[str]:
    """Lines split at newlines only (str.splitlines would split the markers' record
    separator too), the last one kept even without its newline."""
    lines = data.decode(encoding, errors).split("\n")
    return lines[:-1] if lines[-1] == "" else lines


# -- finding whose files hold what: the log ----------------------------------------------


@dataclass
class LogReader:
    """Finds logs through the log at ``gcs_url``; reads them where they are
    (``session_dirs``: those of nodes whose files this process may read directly)."""

    gcs_url: str
    session_dirs: Sequence[Path] | None = None
    timeout: float = _CALL_TIMEOUT_S
    encoding: str = "utf-8"
    errors: str = "replace"
    _files: dict[str, NodeFiles] = field(default_factory=dict)

    def _lines(self, data: bytes) -> list[str]:
        return split_lines(data, self.encoding, self.errors)

    async def _query(self, name: str, *args: Any) -> list[asyncpg.Record]:
        conn = await connect(self.gcs_url)
        try:
            return list(await conn.fetch(queries[name], *args))
        finally:
            await conn.close()

    async def files_of(self, node_id: str) -> NodeFiles:
        """The files of a node: read here if it is this process's node or a private
        cluster's on this machine (no gRPC there), else through the node's ReadLog
        call; LogsError if the node is gone."""
        if node_id in self._files:
            return self._files[node_id]
        rows = await self._query("log_node", node_id)
        address, socket, dead = rows[0] if rows else (None, None, None)
        if address is None:
            raise LogsError(f"no node {node_id} in the log")
        here = [Path(socket).parent] if socket else []
        here += list(self.session_dirs or [])
        files: NodeFiles | None = None
        if dead is None and not _is_host_port(address):  # a private cluster
            files = next((LocalFiles(d / LOGS_DIR) for d in here if _runs(d, node_id)), None)
            if files is None:
                raise LogsError(
                    f"node {node_id} runs a private cluster on another machine: its logs "
                    "are readable only there"
                )
        elif dead is None:
            local = [d for d in self.session_dirs or [] if _runs(d, node_id)]
            files = LocalFiles(local[0] / LOGS_DIR) if local else None
        if dead is not None:
            raise LogsError(
                f"node {node_id} ({address}) is dead ({dead}): the logs it held went with it"
            )
        if files is None:
            files = RemoteFiles(node_id, address, self.timeout)
        self._files[node_id] = files
        return files

    async def _worker(self, worker_id: str) -> tuple[str, int | None]:
        rows = await self._query("log_worker", worker_id)
        if not rows:
            raise LogsError(f"no worker {worker_id!r} in the log")
        return rows[0]["node_id"], rows[0]["pid"]

    # -- the entities' lines -------------------------------------------------------

    async def task_attempts(self, task_id: str) -> list[asyncpg.Record]:
        rows = await self._query("log_task_attempts", task_id)
        if not rows:
            raise LogsError(f"no task {task_id!r} ran (it has no running event in the log)")
        return rows

    async def task_lines(self, task_id: str, attempt_number: int = 0, suffix: str = "out") -> Lines:
        """One attempt's lines of a task (``attempt_number``: 0 for its first run, as
        Ray's; -1 for its last)."""
        stream_name = _stream(suffix)
        attempts = await self.task_attempts(task_id)
        try:
            attempt = attempts[attempt_number]
        except IndexError:
            raise LogsError(
                f"task {task_id} ran {len(attempts)} attempt(s): no attempt {attempt_number}"
            ) from None
        worker_id, node_id = attempt["worker_id"], attempt["node_id"]
        on_worker = await self._query("log_attempts_on_worker", worker_id)
        index = next(i for i, r in enumerate(on_worker) if r["position"] == attempt["position"])
        files = await self.files_of(node_id)
        stream = await stream_copies(files, worker_id, suffix)
        found = Lines()
        if not stream:
            found.notes.append(f"worker {worker_id} on node {node_id} has no {stream_name} file")
            return found
        start = _point(stream, on_worker[index], stream_name)
        end = None
        if index + 1 < len(on_worker):  # the next attempt on the worker: where this one ends
            end = _point(stream, on_worker[index + 1], stream_name)
            if end is None:
                found.notes.append(_rotated(task_id, worker_id, node_id, whole=True))
                return found
        if start is not None and end is not None and start > end:
            start = None  # (its inode was reused by a newer copy: its own copy is gone)
        if start is None:
            if end == (0, 0):
                found.notes.append(_rotated(task_id, worker_id, node_id, whole=True))
                return found
            found.notes.append(_rotated(task_id, worker_id, node_id, whole=False))
            start = (0, 0)
        found.lines = self._lines(await read_between(files, stream, start, end))
        return found

    async def task_started(self, task_id: str, attempt_number: int = 0) -> bool:
        """Whether the attempt has started (and so has lines to follow); LogsError if
        the log has no such task, or it ended without running that attempt."""
        attempts = await self._query("log_task_attempts", task_id)
        if -len(attempts) <= attempt_number < len(attempts):
            return True
        known = (await self._query("log_task_known", task_id))[0]
        if not known["submitted"]:
            raise LogsError(f"no task {task_id!r} in the log")
        if known["over"]:
            raise LogsError(
                f"task {task_id} ended after {len(attempts)} attempt(s): "
                f"no attempt {attempt_number}"
            )
        return False

    async def task_lines_once_started(
        self, task_id: str, attempt_number: int = 0, suffix: str = "out"
    ) -> Lines:
        """As ``task_lines``, for a follower: a task not started yet has no lines yet
        (a note says so) rather than being an error."""
        if not await self.task_started(task_id, attempt_number):
            return Lines(notes=[f"task {task_id} has not started yet: waiting for it"])
        return await self.task_lines(task_id, attempt_number, suffix)

    async def task_ended(self, task_id: str, attempt_number: int = 0) -> bool:
        if not await self.task_started(task_id, attempt_number):
            return False
        attempts = await self.task_attempts(task_id)
        position = attempts[attempt_number]["position"]
        rows = await self._query("log_task_attempt_ended", task_id, position)
        return bool(rows[0][0])

    async def worker_lines(self, worker_id: str, suffix: str = "out") -> Lines:
        """All of a worker's output, over every copy still there."""
        node_id, _pid = await self._worker(worker_id)
        return await self._worker_stream(worker_id, node_id, suffix)

    async def _worker_stream(self, worker_id: str, node_id: str, suffix: str) -> Lines:
        files = await self.files_of(node_id)
        stream = await stream_copies(files, worker_id, suffix)
        found = Lines()
        if not stream:
            found.notes.append(
                f"worker {worker_id} on node {node_id} has no {_stream(suffix)} file"
            )
            return found
        data = await read_between(files, stream, (0, 0), None)
        if _may_have_lost_copies(stream):
            found.notes.append(
                f"worker {worker_id}'s oldest {_stream(suffix)} lines were rotated away "
                f"(only the last {len(stream)} files are kept, CAIRN_LOG_BACKUPS)"
            )
        found.lines = self._lines(data)
        return found

    async def actor_lines(self, actor_id: str, suffix: str = "out") -> Lines:
        """An actor's output: all of its workers', one per life, in order."""
        workers = await self._query("log_actor_workers", actor_id)
        if not workers:
            raise LogsError(f"no actor {actor_id!r} came alive (no alive event in the log)")
        found = Lines()
        for row in workers:
            one = await self._worker_stream(row["worker_id"], row["node_id"], suffix)
            found.lines += one.lines
            found.notes += one.notes
        return found

    async def job_lines(self, job_id: str, suffix: str = "out") -> Lines:
        """Every line the job's tasks and actors printed, in order per worker, each
        prefixed as at the driver: ``(name pid=N, ip=HOST)``."""
        workers = await self._query("log_job_workers", job_id)
        found = Lines()
        for row in workers:
            worker_id = row["worker_id"]
            node_id, pid = await self._worker(worker_id)
            ip = await self._ip(node_id)
            try:
                files = await self.files_of(node_id)
            except LogsError as exc:
                found.notes.append(str(exc))
                continue
            stream = await stream_copies(files, worker_id, suffix)
            if not stream:
                continue
            if _may_have_lost_copies(stream):
                found.notes.append(f"worker {worker_id}'s oldest lines were rotated away")
            data = await read_between(files, stream, (0, 0), None)
            whose: tuple[str, str] | None = None
            for line in text_lines(data, self.encoding, self.errors):
                if line.startswith(MARKER):  # (whose lines follow, or a rotation's time)
                    whose = parse_marker(line) or whose
                elif whose is not None and whose[0] == job_id:
                    found.lines.append(f"({whose[1]} pid={pid}, ip={ip}) {line}")
        return found

    async def _ip(self, node_id: str) -> str:
        rows = await self._query("log_node", node_id)
        address = rows[0]["address"] if rows else None
        if address and _is_host_port(address):
            return address.rpartition(":")[0]
        return "127.0.0.1"  # (a private cluster's node: this machine)

    async def node_of_ip(self, ip: str) -> str:
        """The live node whose address is on ``ip`` (Ray's ``node_ip``)."""
        rows = await self._query("log_nodes")
        for row in rows:
            address = row["address"] or ""
            if row["dead"] is None and address.rpartition(":")[0] == ip:
                return str(row["node_id"])
        local = [r for r in rows if r["dead"] is None and not _is_host_port(r["address"] or "")]
        if ip in ("127.0.0.1", "localhost") and len(local) == 1:
            return str(local[0]["node_id"])  # (a private cluster's one node)
        raise LogsError(f"no live node at {ip}")

    async def worker_of_pid(self, pid: int, node_id: str | None) -> str:
        """The worker that ran as process ``pid`` (on ``node_id``; the last one)."""
        rows = await self._query("log_worker_of_pid", pid)
        found = [r for r in rows if node_id is None or r["node_id"] == node_id]
        if not found:
            where = f" on node {node_id}" if node_id else ""
            raise LogsError(f"no worker with pid {pid}{where} in the log")
        return str(found[-1]["worker_id"])

    async def node_files(self, node_id: str) -> list[dict[str, Any]]:
        return await (await self.files_of(node_id)).list()

    async def submission_lines(self, submission_id: str) -> Lines:
        """What a job submission's driver printed (its file on the head that ran it)."""
        from controlplane import jobs

        try:
            found = await jobs.read_submission(self.gcs_url, submission_id)
        except jobs.JobNotFound as exc:
            raise LogsError(str(exc)) from None
        if found.driver_node_id is None:
            if found.status.is_terminal():  # (ended before its driver ran: no file)
                return Lines(notes=[f"job {submission_id} {found.status.value}: {found.message}"])
            return Lines(notes=[f"job {submission_id} has not started yet"])
        return await self.file_lines(found.driver_node_id, jobs.log_name(found.submission_id))

    async def submission_ended(self, submission_id: str) -> bool:
        from controlplane import jobs

        return (await jobs.read_submission(self.gcs_url, submission_id)).status.is_terminal()

    async def file_lines(self, node_id: str, name: str) -> Lines:
        files = await self.files_of(node_id)
        return Lines(self._lines(await read_all(files, name)))


def _stream(suffix: str) -> str:
    try:
        return _STREAMS[suffix]
    except KeyError:
        raise LogsError(f"suffix must be 'out' or 'err', got {suffix!r}") from None


def _point(stream: list[Copy], attempt: asyncpg.Record, stream_name: str) -> Point | None:
    payload = _payload(attempt["payload"])
    offset = payload.get(f"{stream_name}_offset")
    if offset is None:  # (its files did not exist yet when it was sent)
        return (0, 0)
    return locate(
        stream, int(offset), payload.get(f"{stream_name}_inode"), payload.get("output_at")
    )


def _payload(value: Any) -> dict[str, Any]:
    import json

    return json.loads(value) if isinstance(value, str) else dict(value)


def _may_have_lost_copies(stream: list[Copy]) -> bool:
    """Whether older copies than those left may have been dropped: the oldest is ``.N``
    with N the number of backups kept."""
    from dataplane.output_lines import BACKUPS

    return len(stream) > 1 and stream[0].name.endswith(f".{BACKUPS}")


def _rotated(task_id: str, worker_id: str, node_id: str, *, whole: bool) -> str:
    what = "its lines were" if whole else "its first lines were"
    return (
        f"task {task_id}: {what} rotated away from worker {worker_id}'s files on node "
        f"{node_id} (only the last CAIRN_LOG_BACKUPS copies are kept)"
    )


def tail(lines: list[str], count: int) -> list[str]:
    """The last ``count`` lines (all for a negative count, as Ray's ``tail=-1``)."""
    return lines if count < 0 else lines[len(lines) - count :] if count else []


async def follow(
    fetch: Callable[[], Awaitable[Lines]],
    ended: Callable[[], Awaitable[bool]] | None,
    tail_lines: int,
    interval: float,
    on_note: Callable[[str], None] | None = None,
) -> AsyncGenerator[str, None]:
    """The last ``tail_lines`` lines, then each new one as it comes; until ``ended``
    says so (and its last lines are out), else for ever. (Lines are counted: those of
    a file rotated away while following are not shown again.)"""
    shown: int | None = None
    noted: set[str] = set()
    while True:
        over = await ended() if ended is not None else False
        found = await fetch()
        for note in found.notes:
            if note not in noted and on_note is not None:
                on_note(note)
            noted.add(note)
        if shown is None:
            for line in tail(found.lines, tail_lines):
                yield line
        else:
            for line in found.lines[shown:]:
                yield line
        shown = max(shown or 0, len(found.lines))
        if over:
            return
        await asyncio.sleep(interval)


async def task_output(gcs_url: str, task_id: str, attempt_number: int = -1) -> Lines:
    """A task attempt's stdout lines (the last attempt by default), for the dashboard."""
    return await LogReader(gcs_url).task_lines(task_id, attempt_number)


async def actor_output(gcs_url: str, actor_id: str) -> Lines:
    """An actor's stdout lines, all of its lives', for the dashboard."""
    return await LogReader(gcs_url).actor_lines(actor_id)
