"""A node's resources (CPU, GPU, memory, custom): what it has and what is free.
Amounts may be fractional; they are kept to 1e-4 to avoid drift from float sums.

GPUs are also tracked one by one, so that a task is told which GPUs are its own
(``CUDA_VISIBLE_DEVICES``, ``get_gpu_ids()``), as in Ray: a request of one or more
GPUs takes that many whole, unused GPUs; a fraction below one shares a GPU with other
fractions (packed onto the fullest GPU it fits on).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

HEAD_RESOURCE = "node:__internal_head__"


def _round(value: float) -> float:
    return round(value, 4)


def node_resources(ip: str, *, head: bool) -> dict[str, float]:
    """Ray's implicit resources of a node: ``node:<ip>`` (1; a task asks a fraction of
    it, ``resources={"node:10.0.0.5": 0.01}``, to run on a node at that address) and,
    on the head, ``node:__internal_head__`` (likewise, to run on the head)."""
    implicit = {f"node:{ip}": 1.0}
    if head:
        implicit[HEAD_RESOURCE] = 1.0
    return implicit


def visible_gpu_ids(count: int) -> list[str]:
    """The ids of the node's GPUs as the CUDA runtime names them: those listed in this
    process's ``CUDA_VISIBLE_DEVICES`` if set, else 0..count-1."""
    listed = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:count] if len(listed) >= count else [str(i) for i in range(count)]


class ResourcePool:
    def __init__(self, total: Mapping[str, float]) -> None:
        self.total = {k: _round(v) for k, v in total.items() if v > 0}
        self.available = dict(self.total)
        self.gpu_names = visible_gpu_ids(int(self.total.get("GPU", 0)))
        self._gpu_free = [1.0] * len(self.gpu_names)  # per GPU: the fraction unused

    def fits_total(self, request: Mapping[str, float]) -> bool:
        """Could this node ever run it?"""
        return all(self.total.get(k, 0.0) >= v for k, v in request.items() if v > 0)

    def available_for(self, request: Mapping[str, float]) -> bool:
        if not all(self.available.get(k, 0.0) >= _round(v) for k, v in request.items() if v > 0):
            return False
        return self._pick_gpus(request.get("GPU", 0.0)) is not None

    def acquire(self, request: Mapping[str, float], *, allow_overcommit: bool = False) -> list[str]:
        """Takes the resources; returns the ids of the GPUs given to the request."""
        if not allow_overcommit and not self.available_for(request):
            raise ValueError(f"resources {dict(request)} are not available")
        for k, v in request.items():
            if v > 0:
                self.available[k] = _round(self.available.get(k, 0.0) - v)
        amount = request.get("GPU", 0.0)
        picked = self._pick_gpus(amount) or []
        share = amount if amount < 1 else 1.0
        for index in picked:
            self._gpu_free[index] = _round(self._gpu_free[index] - share)
        return [self.gpu_names[i] for i in picked]

    def release(self, request: Mapping[str, float], gpu_ids: list[str] | None = None) -> None:
        for k, v in request.items():
            if v > 0:
                self.available[k] = _round(self.available.get(k, 0.0) + v)
        amount = request.get("GPU", 0.0)
        share = amount if amount < 1 else 1.0
        for name in gpu_ids or []:
            index = self.gpu_names.index(name)
            self._gpu_free[index] = _round(self._gpu_free[index] + share)

    def _pick_gpus(self, amount: float) -> list[int] | None:
        """Indices of the GPUs a request of ``amount`` GPUs would get; None if it does
        not fit now."""
        if amount <= 0 or not self._gpu_free:
            return []
        if amount < 1:
            fitting = [i for i, free in enumerate(self._gpu_free) if free >= _round(amount)]
            return [min(fitting, key=lambda i: self._gpu_free[i])] if fitting else None
        whole = [i for i, free in enumerate(self._gpu_free) if free >= 1.0]
        count = int(amount)
        return whole[:count] if len(whole) >= count else None

    def without_gpus(self, request: Mapping[str, float]) -> dict[str, float]:
        """The part of a request a blocked task lends out (its GPUs stay its own)."""
        return {k: v for k, v in request.items() if k != "GPU"}
