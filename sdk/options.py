"""The table of options for remote functions (``@remote(...)`` and ``.options(...)``),
with their types, defaults and constraints, in Ray's shape (ray_option_utils)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    types: tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] = lambda v: None


def storable(value: str) -> str | None:
    """Why the log cannot hold ``value`` exactly, or None. PostgreSQL's text and jsonb
    refuse NUL characters and text that is not valid Unicode (lone surrogates, as
    ``os.fsdecode`` makes of undecodable bytes): such a name is refused here, at the
    call, rather than by the node daemon when it logs it."""
    if "\x00" in value:
        return "contains a NUL character, which the log (PostgreSQL) cannot store"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"is not valid Unicode text ({value[exc.start]!r} at index {exc.start} is a lone "
            "surrogate, e.g. from undecodable bytes), which the log (PostgreSQL) cannot store"
        )
    return None


def check_text(argument: str, value: Any, *, allow_empty: bool = True) -> None:
    """ValueError naming ``argument`` unless ``value`` is a string the log can store."""
    if not isinstance(value, str):
        raise ValueError(f"{argument} must be a str, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{argument} must not be empty")
    problem = storable(value)
    if problem:
        raise ValueError(f"{argument} {problem}")


def _name(value: Any) -> str | None:
    return "must not be empty" if not value else storable(value)


def _non_negative(value: Any) -> str | None:
    if value is None or value >= 0:
        return None
    # (Ray's words, as its tests match them: a quantity of a resource cannot be negative)
    return (
        "must be >= 0: it only accepts None, 0 or a positive number (a quantity of "
        "resource {key} cannot be negative)"
    )


def _num_returns(value: Any) -> str | None:
    if value in ("streaming", "dynamic") or (isinstance(value, int) and value >= 0):
        return None
    return "must be an int >= 0, 'streaming' or 'dynamic'"


def num_returns_on_wire(value: int | str) -> int:
    """TaskSpec.num_returns: a count, or STREAMING / DYNAMIC for a generator."""
    from dataplane.protocol import DYNAMIC, STREAMING

    if value == "streaming":
        return STREAMING
    return DYNAMIC if value == "dynamic" else int(value)


def _backpressure(value: Any) -> str | None:
    """Ray's rule: a count > 0 (1: a value made only when the last one is taken, as a
    Python generator), or -1 for none."""
    if value > 0 or value == -1:
        return None
    return "must be > 0 (how many values may wait for the caller) or -1 (no backpressure)"


def backpressure_on_wire(value: int | None, num_returns: int) -> int:
    """TaskSpec.generator_backpressure of a task (or call) whose TaskSpec.num_returns is
    ``num_returns``; ValueError where it is set on one that is not a streaming
    generator (it would have no effect)."""
    from dataplane.protocol import STREAMING

    if value is None or value == -1:
        return -1
    if num_returns != STREAMING:
        raise ValueError(
            "_generator_backpressure_num_objects applies to streaming generators only "
            "(num_returns='streaming')"
        )
    return int(value)


def _runtime_env(value: Any) -> str | None:
    from sdk.runtime_env import check

    try:
        check(value, "the option")
    except (TypeError, ValueError) as exc:
        return str(exc).removeprefix("the option: ")
    return None


def _concurrency_groups(value: Any) -> str | None:
    for name, size in value.items():
        if not isinstance(name, str) or not name or storable(name):
            return f"must name each group with a non-empty str, got {name!r:.80}"
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            return f"must give each group an int >= 1 calls at once, got {name}={size!r}"
    return None


def _retries(value: Any) -> str | None:
    return None if value >= -1 else "must be -1 (retry forever) or >= 0"


def _retry_exceptions(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if not all(isinstance(t, type) and issubclass(t, BaseException) for t in value):
        return "must be a bool or a list of exception classes"
    return None


def _resources(value: Any) -> str | None:
    if value is None:
        return None
    for key, amount in value.items():
        if not isinstance(key, str) or not key:
            return f"has a resource name that is not a non-empty string: {key!r}"
        problem = storable(key)
        if problem:
            return f"has a resource name that {problem}: {key[:80]!r}"
        if key in ("CPU", "GPU"):
            return f"must not contain {key!r}: use num_cpus / num_gpus"
        if not isinstance(amount, int | float) or isinstance(amount, bool) or amount < 0:
            return f"has an invalid amount for {key!r}: {amount!r}"
    return None


def _strategy(value: Any) -> str | None:
    from sdk.util.scheduling_strategies import to_wire

    try:
        to_wire(value)
    except ValueError as exc:
        return str(exc).removeprefix("scheduling_strategy ")
    return None


def _label_selector(value: Any) -> str | None:
    from controlplane.labels import from_ray_selector

    try:
        from_ray_selector(value, "is invalid")
    except ValueError as exc:
        return str(exc)
    return None


def _labels(value: Any) -> str | None:
    from controlplane.labels import key_problem, value_problem

    for key, label in value.items():
        problem = key_problem(key) or value_problem(key, label) or storable(key + label)
        if problem:
            return f"has an invalid label: {problem}"
    return None


TASK_OPTIONS: dict[str, Option] = {
    "num_cpus": Option((int, float), 1, _non_negative),
    "num_gpus": Option((int, float), 0, _non_negative),
    "resources": Option((dict,), None, _resources),
    "num_returns": Option((int, str), 1, _num_returns),
    "max_retries": Option((int,), 3, _retries),
    # tasks of the function one worker runs before it exits; None: Ray's default (no
    # limit, or 1 for a task that uses GPUs, to let go of GPU memory)
    "max_calls": Option((int,), None, _non_negative),
    "retry_exceptions": Option((bool, list, tuple), False, _retry_exceptions),
    "name": Option((str,), None, storable),
    "memory": Option((int, float), None, _non_negative),
    "scheduling_strategy": Option((str, object), None, _strategy),
    "label_selector": Option((dict,), None, _label_selector),
    "_labels": Option((dict,), None, _labels),  # the task's own, logged with it
    "runtime_env": Option((dict,), None, _runtime_env),
    "_generator_backpressure_num_objects": Option((int,), None, _backpressure),
}


ACTOR_OPTIONS: dict[str, Option] = {
    "num_cpus": Option((int, float), 0, _non_negative),  # actors default to 0, as Ray
    "num_gpus": Option((int, float), 0, _non_negative),
    "resources": Option((dict,), None, _resources),
    "memory": Option((int, float), None, _non_negative),
    "max_restarts": Option((int,), 0, _retries),
    "max_task_retries": Option((int,), 0, _retries),
    "max_concurrency": Option((int,), None, lambda v: None if v >= 1 else "must be >= 1"),
    "name": Option((str,), None, _name),
    "namespace": Option((str,), None, storable),
    "lifetime": Option(
        (str,),
        None,
        lambda v: (
            None if v in ("detached", "non_detached") else "must be 'detached' or 'non_detached'"
        ),
    ),
    "get_if_exists": Option((bool,), False),
    "max_pending_calls": Option(
        (int,), -1, lambda v: None if v == -1 or v > 0 else "must be -1 (no limit) or > 0"
    ),
    "concurrency_groups": Option((dict,), None, _concurrency_groups),
    "scheduling_strategy": Option((str, object), None, _strategy),
    "label_selector": Option((dict,), None, _label_selector),
    "_labels": Option((dict,), None, _labels),  # the actor's own, logged with it
    "runtime_env": Option((dict,), None, _runtime_env),
    # Cairn's own: after a restart the actor's earlier calls are re-run from the log
    "replay_calls_on_restart": Option((bool,), False),
    "checkpoint_interval": Option((int,), 0, _non_negative),
}


def validate(options: Mapping[str, Any], table: Mapping[str, Option] = TASK_OPTIONS) -> dict:
    """Checked options; ValueError naming the option that is unknown or invalid."""
    for key, value in options.items():
        option = table.get(key)
        if option is None:
            raise ValueError(
                f"Invalid option keyword {key} for remote functions. "
                f"Valid ones are {sorted(table)}."
            )
        if value is None:
            continue
        if not isinstance(value, option.types) or (
            isinstance(value, bool) and bool not in option.types
        ):
            names = " or ".join(t.__name__ for t in option.types)
            # a TypeError, as Ray's ("The type of keyword ... must be ...")
            raise TypeError(
                f"The type of keyword {key!r} must be {names}, got {type(value).__name__}"
            )
        problem = option.check(value)
        if problem:
            raise ValueError(f"option {key!r} {problem.replace('{key}', key)}")
    return dict(options)


def resolve(options: Mapping[str, Any], table: Mapping[str, Option] = TASK_OPTIONS) -> dict:
    """All options with defaults filled in."""
    return {
        key: options.get(key, option.default) if options.get(key) is not None else option.default
        for key, option in table.items()
    }


def resource_request(options: Mapping[str, Any]) -> dict[str, float]:
    request = {"CPU": float(options["num_cpus"]), "GPU": float(options["num_gpus"])}
    if options.get("memory"):
        request["memory"] = float(options["memory"])
    for key, amount in (options.get("resources") or {}).items():
        request[key] = float(amount)
    return {k: v for k, v in request.items() if v > 0}
