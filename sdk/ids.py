"""Ray's ID classes (``ray.ActorID``, ``ray.TaskID``, ``ray.NodeID``, ``ray.JobID``, ...):
Cairn's ids are hex strings; these wrap one, for programs that build or compare IDs."""

from __future__ import annotations

from typing import Any


class BaseID:
    """An id: its hex string and the bytes it spells."""

    __slots__ = ("_hex",)

    def __init__(self, id: bytes | str) -> None:
        if isinstance(id, bytes):
            self._hex = id.hex()
        elif isinstance(id, str):
            try:
                bytes.fromhex(id)
            except ValueError:
                raise ValueError(f"{type(self).__name__}: not a hex id: {id!r:.80}") from None
            self._hex = id.lower()
        else:
            raise TypeError(f"{type(self).__name__} takes bytes or a hex string, got {id!r:.80}")

    @classmethod
    def from_hex(cls, hex_id: str) -> Any:
        return cls(hex_id)

    @classmethod
    def from_binary(cls, binary: bytes) -> Any:
        return cls(binary)

    @classmethod
    def nil(cls) -> Any:
        return cls(b"\xff" * 16)

    def is_nil(self) -> bool:
        return set(self._hex) <= {"f"}

    def hex(self) -> str:
        return self._hex

    def binary(self) -> bytes:
        return bytes.fromhex(self._hex)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._hex == self._hex  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._hex))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._hex})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._hex,))


class ActorID(BaseID):
    __slots__ = ()


class ActorClassID(BaseID):
    __slots__ = ()


class FunctionID(BaseID):
    __slots__ = ()


class JobID(BaseID):
    __slots__ = ()


class NodeID(BaseID):
    __slots__ = ()


class PlacementGroupID(BaseID):
    __slots__ = ()


class TaskID(BaseID):
    __slots__ = ()


class UniqueID(BaseID):
    __slots__ = ()


class WorkerID(BaseID):
    __slots__ = ()
