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


def log_servers() -> int:
    """``$CAIRN_LOG_SERVERS``: how many embedded PostgreSQL servers a GCS made now places
    its log on (1 unless set; ``cairn start --head --log-servers``)."""
    raw = os.environ.get("CAIRN_LOG_SERVERS", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise ValueError(f"$CAIRN_LOG_SERVERS must be a whole number from 1 to 64, not {raw!r}")
    return int(raw)


def log_shards() -> int | None:
    """``$CAIRN_LOG_SHARDS``: how many shards a GCS made now gives its log (None: unset,
    one for a new log, as many as it has for one that exists)."""
    raw = os.environ.get("CAIRN_LOG_SHARDS")
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 1024:
        raise ValueError(f"$CAIRN_LOG_SHARDS must be a whole number from 1 to 1024, not {raw!r}")
    return int(raw)
