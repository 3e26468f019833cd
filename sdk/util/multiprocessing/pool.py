"""Ray's ``multiprocessing.Pool`` over actors: the standard library's Pool API
(``apply``, ``map``, ``imap``, ``imap_unordered``, ``starmap``, their ``_async``
forms, ``close``/``terminate``/``join``, a context manager), each of its ``processes``
an actor that runs the functions it is sent, in chunks."""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

TimeoutError = multiprocessing.TimeoutError


class _PoolWorker:
    """One process of the pool (an actor): runs ``initializer`` once, then chunks."""

    def __init__(self, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
        if initializer is not None:
            initializer(*initargs)

    def run(self, function: Callable[..., Any], chunk: list[Any], star: bool) -> list[Any]:
        return [function(*item) if star else function(item) for item in chunk]

    def apply(self, function: Callable[..., Any], args: tuple[Any, ...], kwds: dict) -> Any:
        return function(*args, **kwds)


class AsyncResult:
    """What the ``_async`` methods return, as the standard library's: ``get``,
    ``wait``, ``ready``, ``successful``; callbacks run once the result is had."""

    def __init__(
        self,
        refs: list[Any],
        *,
        single: bool,
        callback: Callable[[Any], None] | None = None,
        error_callback: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._refs, self._single = refs, single
        self._callback, self._error_callback = callback, error_callback
        self._outcome: tuple[bool, Any] | None = None

    def ready(self) -> bool:
        from sdk.api import wait

        ready, _ = wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)

    def wait(self, timeout: float | None = None) -> None:
        from sdk.api import wait

        wait(self._refs, num_returns=len(self._refs), timeout=timeout)

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError("the result is not ready")
        return self._settle()[0]

    def get(self, timeout: float | None = None) -> Any:
        if timeout is not None:
            self.wait(timeout)
            if not self.ready():
                raise TimeoutError
        ok, value = self._settle()
        if not ok:
            raise value
        return value

    def _settle(self) -> tuple[bool, Any]:
        if self._outcome is None:
            from sdk.api import get

            try:
                chunks = get(self._refs)
                value = chunks[0] if self._single else list(itertools.chain(*chunks))
                self._outcome = (True, value)
                if self._callback is not None:
                    self._callback(value)
            except Exception as exc:
                cause = getattr(exc, "cause", None)
                error = cause if isinstance(cause, BaseException) else exc
                self._outcome = (False, error)
                if self._error_callback is not None:
                    self._error_callback(error)
        return self._outcome


class Pool:
    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] | None = None,
        maxtasksperchild: int | None = None,
        context: Any = None,
        ray_address: str | None = None,
        ray_remote_args: dict[str, Any] | None = None,
    ) -> None:
        from sdk.api import cluster_resources, init, is_initialized, remote

        if maxtasksperchild is not None:
            raise ValueError("Pool(maxtasksperchild=...) is not supported by Cairn yet")
        if not is_initialized():
            init(address=ray_address)
        if processes is None:
            processes = max(1, int(cluster_resources().get("CPU", 1)))
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        worker = remote(_PoolWorker).options(num_cpus=1, **(ray_remote_args or {}))
        self._actors = [worker.remote(initializer, tuple(initargs or ())) for _ in range(processes)]
        self._next = itertools.cycle(range(processes))
        self._pending: list[Any] = []
        self._closed = False

    # -- submitting --------------------------------------------------------------

    def _actor(self) -> Any:
        if self._closed:
            raise ValueError("Pool not running")
        return self._actors[next(self._next)]

    def _chunks(
        self,
        function: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        star: bool,
    ) -> list[Any]:
        items = list(iterable)
        size = chunksize or max(1, len(items) // (len(self._actors) * 4) or 1)
        refs = [
            self._actor().run.remote(function, items[i : i + size], star)
            for i in range(0, len(items), size)
        ]
        self._pending.extend(refs)
        return refs

    def apply(
        self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict | None = None
    ) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict | None = None,
        callback: Callable[[Any], None] | None = None,
        error_callback: Callable[[BaseException], None] | None = None,
    ) -> AsyncResult:
        ref = self._actor().apply.remote(func, tuple(args), dict(kwds or {}))
        self._pending.append(ref)
        return AsyncResult([ref], single=True, callback=callback, error_callback=error_callback)

    def map(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        return self.map_async(func, iterable, chunksize).get()

    def map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], None] | None = None,
        error_callback: Callable[[BaseException], None] | None = None,
    ) -> AsyncResult:
        refs = self._chunks(func, iterable, chunksize, star=False)
        return AsyncResult(refs, single=False, callback=callback, error_callback=error_callback)

    def starmap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[Any]:
        return self.starmap_async(func, iterable, chunksize).get()

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], None] | None = None,
        error_callback: Callable[[BaseException], None] | None = None,
    ) -> AsyncResult:
        refs = self._chunks(func, (tuple(a) for a in iterable), chunksize, star=True)
        return AsyncResult(refs, single=False, callback=callback, error_callback=error_callback)

    def imap(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1
    ) -> Iterator[Any]:
        """Results in the order of ``iterable``, each chunk as soon as it is done."""
        from sdk.api import get

        for ref in self._chunks(func, iterable, chunksize, star=False):
            yield from get(ref)

    def imap_unordered(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1
    ) -> Iterator[Any]:
        """Results as their chunks finish, in any order."""
        from sdk.util.completion import as_completed

        for chunk in as_completed(
            self._chunks(func, iterable, chunksize, star=False), chunk_size=1
        ):
            yield from chunk

    # -- ending ------------------------------------------------------------------

    def close(self) -> None:
        """No more work may be submitted; what was runs to its end (``join``)."""
        self._closed = True

    def terminate(self) -> None:
        """Stops the pool's actors now; work not done is lost."""
        from sdk.api import kill

        self._closed = True
        for actor in self._actors:
            kill(actor)
        self._actors, self._pending = [], []

    def join(self) -> None:
        """Waits for the work submitted (after ``close``), then stops the actors."""
        from sdk.api import wait

        if not self._closed:
            raise ValueError("Pool is still running")
        if self._pending:
            wait(self._pending, num_returns=len(self._pending))
        self.terminate()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
