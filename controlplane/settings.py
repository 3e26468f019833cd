"""Settings read from the environment (``$CAIRN_...``): one place that parses them and
says clearly which one is wrong."""

from __future__ import annotations

import os


def env_number(name: str, default: float, *, minimum: float, unit: str = "seconds") -> float:
    """``$name`` as a number of at least ``minimum``; ``default`` when it is not set."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${name} must be a number of {unit}, not {raw!r}") from None
    if not value >= minimum:
        raise ValueError(f"${name} must be at least {minimum:g} {unit}, not {raw!r}")
    return value
