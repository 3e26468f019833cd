"""Remote functions and actors that several tests run (workers import them from here,
as they import any test module)."""

from __future__ import annotations

from pathlib import Path

import sdk as ray


@ray.remote
def square(x: int) -> int:
    return x * x


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


@ray.remote(max_retries=2, retry_exceptions=True)
def flaky(marker: str) -> str:
    """Fails its first attempt (the marker file does not exist yet), then succeeds."""
    path = Path(marker)
    if not path.exists():
        path.write_text("first attempt")
        raise ValueError("flaky: first attempt fails")
    return "second attempt"


@ray.remote
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> int:
        self.n += k
        return self.n
