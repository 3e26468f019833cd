"""A node's resources (CPU, GPU, memory, custom): what it has and what is free.
Amounts may be fractional; they are kept to 1e-4 to avoid drift from float sums."""

from __future__ import annotations

from collections.abc import Mapping


def _round(value: float) -> float:
    return round(value, 4)


class ResourcePool:
    def __init__(self, total: Mapping[str, float]) -> None:
        self.total = {k: _round(v) for k, v in total.items() if v > 0}
        self.available = dict(self.total)

    def fits_total(self, request: Mapping[str, float]) -> bool:
        """Could this node ever run it?"""
        return all(self.total.get(k, 0.0) >= v for k, v in request.items() if v > 0)

    def available_for(self, request: Mapping[str, float]) -> bool:
        return all(self.available.get(k, 0.0) >= _round(v) for k, v in request.items() if v > 0)

    def acquire(self, request: Mapping[str, float], *, allow_overcommit: bool = False) -> None:
        if not allow_overcommit and not self.available_for(request):
            raise ValueError(f"resources {dict(request)} are not available")
        for k, v in request.items():
            if v > 0:
                self.available[k] = _round(self.available.get(k, 0.0) - v)

    def release(self, request: Mapping[str, float]) -> None:
        for k, v in request.items():
            if v > 0:
                self.available[k] = _round(self.available.get(k, 0.0) + v)
