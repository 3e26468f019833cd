"""The driver's code paths in workers: as Ray, a worker can import the modules that sit
beside the driver's script (and in its current directory), because a function or class
pickled by the driver carries those folders and puts them on ``sys.path`` before it is
loaded (its module-level imports run while it is loaded). A worker runs tasks of many
drivers, so the folders of each stay on its ``sys.path`` once added."""

from __future__ import annotations

import os
import sys
from typing import Any

import cloudpickle


def driver_code_paths(has_working_dir: bool) -> list[str]:
    """Ray's: the script's folder (when the script runs from it, not ``python -m``) and,
    unless the job has a ``working_dir``, the current directory."""
    paths = []
    script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
    if script and not sys.flags.interactive:
        folder = os.path.dirname(os.path.realpath(script))
        if folder in sys.path:
            paths.append(folder)
    if not has_working_dir:
        paths.append(os.path.abspath(os.curdir))
    return list(dict.fromkeys(paths))


def dumps_with_paths(code: Any, paths: list[str]) -> bytes:
    """``code`` pickled so that loading it first puts ``paths`` on ``sys.path``."""
    if not paths:
        return cloudpickle.dumps(code)
    return cloudpickle.dumps(_OnPaths(paths, cloudpickle.dumps(code)))


class _OnPaths:
    __slots__ = ("blob", "paths")

    def __init__(self, paths: list[str], blob: bytes) -> None:
        self.paths, self.blob = paths, blob

    def __reduce__(self) -> tuple[Any, ...]:
        return (load_on_paths, (self.paths, self.blob))


def load_on_paths(paths: list[str], blob: bytes) -> Any:
    """Appended, not put first: a task's own ``working_dir`` and the worker's packages
    come before them (a module of the same name beside the script does not shadow)."""
    for path in paths:
        if path not in sys.path:
            sys.path.append(path)
    return cloudpickle.loads(blob)
