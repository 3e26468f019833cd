"""The packages type-check: mypy, with the settings of [tool.mypy] in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )


@pytest.mark.timeout(300)
def test_mypy_is_clean() -> None:
    result = _mypy("controlplane", "dataplane", "sdk")
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"


# The node's parts rebuilt for issue 16: checked strictly (what they import is checked
# under the default settings above).
STRICT = [
    "controlplane/node",  # every part of the node daemon, and the daemon itself
    "dataplane/arena.py",
    "dataplane/object_table.py",
    "dataplane/shm.py",
    "dataplane/spilling.py",
    "dataplane/store_memory.py",
    "dataplane/transfer.py",
]


@pytest.mark.timeout(300)
def test_the_rebuilt_parts_are_strictly_typed() -> None:
    result = _mypy("--strict", "--follow-imports=silent", *STRICT)
    assert result.returncode == 0, f"mypy --strict found errors:\n{result.stdout}{result.stderr}"
