"""docs/compatibility.md says, for every public name of Ray Core 2.60, whether Cairn
has it (works, differs) or not (absent). This test keeps it true: every name of Ray's
is on the page, and what the page says matches what ``sdk`` has (Ray's names:
tests/ray_names.py)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from ray_names import ACTOR_OPTIONS, RAY, RAY_EXCEPTIONS, RAY_UTIL, RUNTIME_CONTEXT, TASK_OPTIONS

import sdk
import sdk.runtime_context
from sdk import options as opts

PAGE = Path(__file__).resolve().parent.parent / "docs" / "compatibility.md"


def _page() -> dict[str, dict[str, str]]:
    """{section title: {name: status}} of the page's tables."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in PAGE.read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip("` "), {})
        elif match := re.match(r"\| `([^`]+)` \| (works|differs|absent) \|", line):
            current[match.group(1)] = match.group(2)
    return sections


def _has_attribute(module: object, name: str) -> bool:
    if hasattr(module, name):
        return True
    try:
        importlib.import_module(f"{module.__name__}.{name}")  # type: ignore[attr-defined]
    except ImportError:
        return False
    return True


def _check(section: str, ray_names: list[str], present: object) -> None:
    listed = _page()[section]
    assert sorted(set(ray_names) - set(listed)) == [], f"names of {section} not on the page"
    for name, status in listed.items():
        here = present(name) if callable(present) else name in present
        if status == "absent":
            assert not here, f"{section}.{name} is marked absent but Cairn has it: update the page"
        else:
            assert here, f"{section}.{name} is marked {status} but Cairn lacks it"


def test_the_ray_module() -> None:
    _check("ray", RAY, lambda name: _has_attribute(sdk, name))


def test_ray_util() -> None:
    _check("ray.util", RAY_UTIL, lambda name: _has_attribute(sdk.util, name))


def test_ray_exceptions() -> None:
    _check("ray.exceptions", list(RAY_EXCEPTIONS), lambda name: hasattr(sdk.exceptions, name))


def test_the_runtime_context() -> None:
    context = sdk.runtime_context.RuntimeContext
    _check("ray.runtime_context.RuntimeContext", RUNTIME_CONTEXT, lambda n: hasattr(context, n))


def test_the_options_of_remote_functions_and_actors() -> None:
    _check("Options of remote functions", TASK_OPTIONS, set(opts.TASK_OPTIONS))
    _check("Options of actors", ACTOR_OPTIONS, set(opts.ACTOR_OPTIONS))
