"""``ray.util.as_completed`` and ``ray.util.map_unordered``: results as they finish,
in chunks taken with ``wait`` (Ray's pattern for a get in a loop, and for limiting the
tasks in flight)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sdk.object_ref import ObjectRef

# (sdk.api is imported where used: sdk.util is imported while sdk.api is being built)


def as_completed(
    refs: Sequence[ObjectRef], *, chunk_size: int = 10, yield_obj_refs: bool = False, **kwargs: Any
) -> Iterator[Any]:
    """Yields the values (or, with ``yield_obj_refs``, the refs) of ``refs`` as chunks
    of ``chunk_size`` of them become ready; ``kwargs`` go to ``wait`` (``timeout``,
    ``fetch_local``)."""
    from sdk.api import get, wait

    _check_chunk(chunk_size)
    pending = list(refs)
    while pending:
        ready, pending = wait(pending, num_returns=min(chunk_size, len(pending)), **kwargs)
        if not ready:  # a wait timeout with none ready
            return
        yield from ready if yield_obj_refs else get(ready)


def map_unordered(
    fn: Any,
    items: Iterable[Any],
    *,
    backpressure_size: int | None = 100,
    chunk_size: int = 10,
    yield_obj_refs: bool = False,
    **kwargs: Any,
) -> Iterator[Any]:
    """``fn.remote(item)`` for each item, with at most ``backpressure_size`` tasks in
    flight (None: no limit), yielding results as chunks of ``chunk_size`` finish."""
    from sdk.api import get, wait

    _check_chunk(chunk_size)
    if backpressure_size is not None and backpressure_size < 1:
        raise ValueError(f"backpressure_size must be at least 1 or None, got {backpressure_size!r}")
    if not callable(getattr(fn, "remote", None)):
        raise TypeError(f"map_unordered() needs a remote function, got {type(fn).__name__}")
    pending: list[ObjectRef] = []
    for item in items:
        if backpressure_size is not None and len(pending) >= backpressure_size:
            ready, pending = wait(pending, num_returns=min(chunk_size, len(pending)), **kwargs)
            yield from ready if yield_obj_refs else get(ready)
        pending.append(fn.remote(item))
    yield from as_completed(pending, chunk_size=chunk_size, yield_obj_refs=yield_obj_refs, **kwargs)


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
