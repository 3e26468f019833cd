"""Application metrics with Ray's API (``ray.util.metrics``): ``Counter``, ``Gauge`` and
``Histogram``, usable in the driver, tasks and actors. Values are folded in the process
and sent to its node about once a second (dataplane/user_metrics.py); the head's
``/metrics`` (and ``cairn metrics``) serves every node's totals, each metric named
``ray_<name>`` as Ray exports it."""

from __future__ import annotations

import re
import warnings
from typing import Any

from dataplane.user_metrics import BUFFER

# Prometheus' rule for metric names (as Ray checks them)
_VALID_METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_VALID_TAG_KEY_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_TAG_KEYS = ("node_id", "NodeAddress")  # what /metrics adds to every series


class Metric:
    """What Ray's three metrics share: a name, a description, tag keys, default tags."""

    _kind = ""

    def __init__(
        self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None
    ) -> None:
        # as Ray: an invalid name is warned about and its values are dropped
        self._discard_metric = self._is_invalid_metric_name(name)
        self._name = name
        self._description = description
        self._default_tags: dict[str, str] = {}
        self._tag_keys: tuple[str, ...] = tag_keys or ()
        if not isinstance(self._tag_keys, tuple):
            raise TypeError(f"tag_keys should be a tuple type, got: {type(self._tag_keys)}")
        for key in self._tag_keys:
            if not isinstance(key, str):
                raise TypeError(f"Tag keys must be str, got {type(key)}.")
            # (Ray takes any str; here each is a Prometheus label, beside the node's)
            if not _VALID_TAG_KEY_RE.match(key) or key.startswith("__"):
                raise ValueError(
                    f"Invalid tag key {key!r}: tag keys can only contain letters, numbers "
                    "and _, cannot start with a number or __."
                )
            if key in RESERVED_TAG_KEYS:
                raise ValueError(
                    f"Tag key {key!r} is reserved: the metrics served carry it for each node."
                )

    @staticmethod
    def _is_invalid_metric_name(name: str) -> bool:
        if len(name) == 0:
            raise ValueError("Empty name is not allowed. Please provide a metric name.")
        if not _VALID_METRIC_NAME_RE.match(name):
            warnings.warn(
                f"Invalid metric name: {name}. Metric will be discarded and data will not "
                "be collected or published. Metric names can only contain letters, "
                "numbers, _, and :. Metric names cannot start with numbers.",
                UserWarning,
                stacklevel=3,
            )
            return True
        return False

    def set_default_tags(self, default_tags: dict[str, str]) -> Metric:
        """Tags used by every record of this metric unless the record names them."""
        for key, value in default_tags.items():
            if key not in self._tag_keys:
                raise ValueError(f"Unrecognized tag key {key}.")
            if not isinstance(value, str):
                raise TypeError(f"Tag values must be str, got {type(value)}.")
        self._default_tags = default_tags
        return self

    def _record(self, value: float, tags: dict[str, str] | None = None) -> None:
        if self._discard_metric:
            return
        final = self._final_tags(tags)
        missing = [key for key in self._tag_keys if key not in final]
        if missing:
            raise ValueError(f"Missing value for tag key(s): {','.join(missing)}.")
        unknown = [key for key in final if key not in self._tag_keys]
        if unknown:  # (Ray drops them; here they would make series of their own)
            raise ValueError(
                f"Unrecognized tag key(s) {','.join(unknown)} for metric {self._name} "
                f"(its tag_keys are {self._tag_keys})."
            )
        BUFFER.record(
            self._kind, self._name, self._description, final, float(value), self._boundaries()
        )

    def _final_tags(self, tags: dict[str, str] | None) -> dict[str, str]:
        if not tags:
            return self._default_tags
        for value in tags.values():
            if not isinstance(value, str):
                raise TypeError(f"Tag values must be str, got {type(value)}.")
        return {**self._default_tags, **tags}

    def _boundaries(self) -> tuple[float, ...]:
        return ()

    @property
    def info(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "description": self._description,
            "tag_keys": self._tag_keys,
            "default_tags": self._default_tags,
        }


def _check_number(value: object) -> None:
    if not isinstance(value, (int, float)):
        raise TypeError(f"value must be int or float, got {type(value)}.")


class Counter(Metric):
    """A total that only grows; exported as the Prometheus counter ``ray_<name>_total``."""

    _kind = "counter"

    def __reduce__(self) -> tuple[Any, ...]:
        return self.__class__, (self._name, self._description, self._tag_keys)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        _check_number(value)
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        self._record(value, tags)


class Gauge(Metric):
    """The last value set (from any process: the node keeps the latest report)."""

    _kind = "gauge"

    def __reduce__(self) -> tuple[Any, ...]:
        return self.__class__, (self._name, self._description, self._tag_keys)

    def set(self, value: float | None, tags: dict[str, str] | None = None) -> None:
        if value is None:  # as Ray: nothing
            return
        _check_number(value)
        self._record(value, tags)


class Histogram(Metric):
    """Observations counted in buckets whose upper bounds are ``boundaries``."""

    _kind = "histogram"

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: list[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(name, description, tag_keys)
        if boundaries is None or len(boundaries) == 0:
            raise ValueError(
                "boundaries argument should be provided when using the Histogram class. "
                'e.g., Histogram("name", boundaries=[1.0, 2.0])'
            )
        for index, boundary in enumerate(boundaries):
            if boundary <= 0:
                raise ValueError(
                    f"Invalid `boundaries` argument at index {index}, {boundaries}. "
                    "Use positive values for the arguments."
                )
        if list(boundaries) != sorted(set(boundaries)):
            raise ValueError(f"`boundaries` must be increasing, got {boundaries}.")
        self.boundaries = boundaries
        self._bounds = tuple(float(b) for b in boundaries)

    def __reduce__(self) -> tuple[Any, ...]:
        return Histogram, (self._name, self._description, self.boundaries, self._tag_keys)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        _check_number(value)
        self._record(value, tags)

    def _boundaries(self) -> tuple[float, ...]:
        return self._bounds

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "boundaries": self.boundaries}


__all__ = ["Counter", "Gauge", "Histogram"]
