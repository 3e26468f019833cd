"""Finding this machine's processes by their command line (for tests that kill or
watch a node's processes)."""

from __future__ import annotations

from pathlib import Path


def pids_with(*needles: str) -> list[int]:
    """The pids of the processes whose command line contains every one of ``needles``."""
    wanted = [needle.encode() for needle in needles]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if all(needle in cmd for needle in wanted):
            found.append(int(entry.name))
    return found
