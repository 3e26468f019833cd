"""A PostgreSQL server's processes, found in /proc: its postmaster's backends, and
whether a process still runs (a zombie does not)."""

from __future__ import annotations

import os


def server_processes(pid: int) -> list[int]:
    """A postmaster's pid and its backends' (to signal them all at once, as a crash of
    its machine would: tests and benchmarks of failover)."""
    return [pid, *children_of(pid)]


def children_of(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
