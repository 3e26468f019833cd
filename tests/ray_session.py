"""A private cluster (``sdk.init``) for one test module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sdk as ray


def private_cluster(**init_args: Any) -> Iterator[None]:
    """Starts a private cluster with ``init_args`` and shuts it down after the module;
    ``yield from`` it in a module-scoped fixture."""
    ray.init(**init_args)
    try:
        yield
    finally:
        ray.shutdown()
