"""A call's arguments checked against the function's signature when it is submitted,
as Ray does: a missing or unexpected argument is a TypeError at ``.remote()``, not an
error later in a worker."""

from __future__ import annotations

import inspect
from typing import Any


def signature_of(target: Any) -> inspect.Signature | None:
    """The signature calls are checked against (None: it has none Python can read, as
    some builtins: calls are not checked)."""
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def check_arguments(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any], what: str
) -> None:
    if signature is None:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{what}: {exc}") from None
