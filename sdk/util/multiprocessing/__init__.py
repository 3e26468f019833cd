"""``ray.util.multiprocessing``: a ``multiprocessing.Pool`` whose workers are actors."""

from sdk.util.multiprocessing.pool import AsyncResult, Pool, TimeoutError

__all__ = ["AsyncResult", "Pool", "TimeoutError"]
