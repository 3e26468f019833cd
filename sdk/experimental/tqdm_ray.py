"""``ray.experimental.tqdm_ray``: a tqdm-like progress bar that remote tasks and actors
update and the driver draws (several at once, each with the process it runs in). In
a worker a bar prints its state as one marked JSON line at most every
``flush_interval_s`` (and when it closes); the driver's output printer turns those lines
into bars (dataplane/progress_bars.py). In the driver it draws directly."""

from __future__ import annotations

import builtins
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from dataplane import context
from dataplane.progress_bars import MAGIC, bars


class tqdm:
    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        desc: str | None = None,
        total: int | None = None,
        unit: str | None = None,
        position: int | None = None,
        flush_interval_s: float = 1.0,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self._iterable = iterable
        self._desc = desc or ""
        self._total = total
        self._unit = unit or "it"
        self._pos = position or 0
        self._flush_interval_s = flush_interval_s
        self._uuid = uuid.uuid4().hex
        self._x = 0
        self._closed = False
        self._last_flush = 0.0
        self._dump(force=True)

    def set_description(self, desc: str) -> None:
        self._desc = desc
        self._dump()

    def update(self, n: int = 1) -> None:
        self._x += n
        self._dump()

    def refresh(self) -> None:
        self._dump(force=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._dump(force=True)

    def __iter__(self) -> Iterator[Any]:
        if self._iterable is None:
            raise ValueError("No iterable provided")
        for item in self._iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> tqdm:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _state(self) -> dict[str, Any]:
        return {
            "__magic_token__": MAGIC,
            "x": self._x,
            "pos": self._pos,
            "desc": self._desc,
            "total": self._total,
            "unit": self._unit,
            "uuid": self._uuid,
            "closed": self._closed,
        }

    def _dump(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self._flush_interval_s:
            return
        self._last_flush = now
        if context.current_task() is None:  # the driver: drawn here
            bars.update(("", os.getpid(), self._uuid), self._state(), "")
        else:  # a worker: its output reaches the driver, which draws it
            builtins.print(json.dumps(self._state()), flush=True)


def safe_print(*args: Any, **kwargs: Any) -> None:
    """``print`` that leaves the driver's bars whole (they are drawn on stderr, one
    line each, so a printed line does not overwrite them)."""
    builtins.print(*args, **kwargs)
