"""A node's logs directory, read by name: what its ``ReadLog`` gRPC call answers
(controlplane/logs.py asks it), and what a process on the node reads directly."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

READ_AT_ONCE = 512 * 1024  # bytes of one ReadLog call (base64 in JSON: under gRPC's limit)
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class LogsError(Exception):
    """Logs that cannot be had, with why (no such task, its node is gone, ...)."""


def checked_path(logs_dir: Path, name: str) -> Path:
    """The file ``name`` of the logs directory; LogsError for any name that is not a
    plain file name there (no separators, no ``..``, no hidden files)."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name in (".", ".."):
        raise LogsError(f"{name!r} is not the name of a log file")
    return logs_dir / name


def list_files(logs_dir: Path) -> list[dict[str, Any]]:
    """The logs directory's files: name, size, inode, mtime."""
    found = []
    try:
        entries = list(os.scandir(logs_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        found.append(
            {"name": entry.name, "size": stat.st_size, "inode": stat.st_ino, "mtime": stat.st_mtime}
        )
    return sorted(found, key=lambda f: f["name"])


def read_range(logs_dir: Path, name: str, offset: int, length: int) -> bytes:
    """At most ``READ_AT_ONCE`` bytes of the file from ``offset`` (b"" past its end)."""
    path = checked_path(logs_dir, name)
    if offset < 0 or length < 0:
        raise LogsError(f"a byte range of {name!r} must not be negative")
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read(min(length, READ_AT_ONCE))
    except FileNotFoundError:
        raise LogsError(f"no log file {name!r}") from None
    except IsADirectoryError:
        raise LogsError(f"{name!r} is not a log file") from None


def read_log_handler(logs_dir: Path) -> Any:
    """The node's ``ReadLog`` call: ``{"list": true}`` lists its logs directory;
    ``{"name", "offset", "length"}`` reads a range (base64); a bad request answers
    ``{"error": ...}``."""

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        try:
            if request.get("list"):
                return {"files": list_files(logs_dir)}
            data = read_range(
                logs_dir,
                request.get("name"),  # type: ignore[arg-type]  # (checked there)
                int(request.get("offset", 0)),
                int(request.get("length", READ_AT_ONCE)),
            )
            return {"data": base64.b64encode(data).decode()}
        except (LogsError, ValueError, TypeError) as exc:
            return {"error": str(exc)}

    return answer
