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


def method_signatures(cls: type) -> dict[str, inspect.Signature | None]:
    """The signatures of a class's methods as its instances' calls see them (without
    ``self``; static and class methods as they are)."""
    found: dict[str, inspect.Signature | None] = {}
    for name, member in inspect.getmembers(cls, callable):
        if name.startswith("__") and name != "__call__":
            continue
        if not (inspect.isfunction(member) or inspect.ismethod(member)):
            found[name] = None  # (a nested class, a callable object: not checked)
            continue
        signature = signature_of(member)
        kind = inspect.getattr_static(cls, name, None)
        if signature is not None and not isinstance(kind, staticmethod | classmethod):
            parameters = list(signature.parameters.values())
            if not parameters or parameters[0].kind not in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            ):
                signature = None  # (no self to drop: not checked)
            else:
                signature = signature.replace(parameters=parameters[1:])
        found[name] = signature
    return found
