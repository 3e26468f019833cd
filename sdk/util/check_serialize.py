"""``ray.util.inspect_serializability``: which part of a value cannot be serialized,
found by trying its parts (a function's globals and closure, an object's attributes)
down to ``depth``, as Ray's tool reports it."""

from __future__ import annotations

import inspect
import sys
from typing import Any, NamedTuple, TextIO

import cloudpickle


class FailureTuple(NamedTuple):
    """One part that cannot be serialized: the part, its name, and what holds it."""

    obj: Any
    name: str
    parent: Any


def _serializable(value: Any) -> bool:
    try:
        cloudpickle.dumps(value)
    except Exception:
        return False
    return True


def _parts(value: Any) -> list[tuple[str, Any]]:
    """The named parts of ``value`` that serializing it serializes too."""
    if inspect.isfunction(value):
        closure = inspect.getclosurevars(value)
        return [*closure.globals.items(), *closure.nonlocals.items()]
    if inspect.ismethod(value):
        return [("__self__", value.__self__), ("__func__", value.__func__)]
    found = getattr(value, "__dict__", None)
    if isinstance(found, dict):
        return list(found.items())
    return []


def inspect_serializability(
    base_obj: Any, name: str | None = None, depth: int = 3, print_file: TextIO | None = None
) -> tuple[bool, set[FailureTuple]]:
    """Whether ``base_obj`` can be serialized, and the innermost parts that cannot
    (each with its name and holder), looked for ``depth`` levels down; a report goes to
    ``print_file`` (standard output by default)."""
    out = print_file or sys.stdout
    label = name or getattr(base_obj, "__qualname__", None) or repr(base_obj)[:80]
    failures: set[FailureTuple] = set()
    ok = _serializable(base_obj)
    print(f"Checking serializability of {label}: {'ok' if ok else 'FAILED'}", file=out)
    if not ok:
        _find(base_obj, label, None, depth, failures, out, 1)
    return ok, failures


def _find(
    value: Any,
    name: str,
    parent: Any,
    depth: int,
    failures: set[FailureTuple],
    out: TextIO,
    level: int,
) -> None:
    culprits = [(n, part) for n, part in _parts(value) if not _serializable(part)]
    if not culprits or depth <= 0:
        failures.add(FailureTuple(value, name, parent))
        return
    for part_name, part in culprits:
        print(f"{'    ' * level}{part_name} of {name} cannot be serialized", file=out)
        _find(part, part_name, value, depth - 1, failures, out, level + 1)
