"""Ray's DAG API (``ray.dag``): ``f.bind(...)``, ``Actor.bind(...)``,
``actor.method.bind(...)`` build a graph without running anything; ``InputNode`` stands
for what ``execute`` is given (by index, by key or as an attribute); ``MultiOutputNode``
gathers several outputs. ``dag.execute(...)`` submits the graph's tasks, each once,
with refs between them, and returns the output's ref(s); every task of one execution
carries the same ``dag_id`` in the log (its ``submitted`` event).
``experimental_compile()`` gives a DAG that runs the same way, uncompiled."""

from __future__ import annotations

import abc
import contextvars
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# the execution whose tasks are being submitted (its id goes on their specs)
_dag_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("cairn_dag", default=None)


def current_dag_id() -> str | None:
    return _dag_id.get()


# Ray's keys of ClassMethodNode.get_other_args_to_resolve(): the actor a call is bound
# on, and the call bound on it before
PARENT_CLASS_NODE_KEY = "parent_class_node"
PREV_CLASS_METHOD_CALL_KEY = "prev_class_method_call"


class DAGNode(abc.ABC):
    """A node of a graph: resolved, once per execution, to a ref, a handle or a value."""

    _args: tuple[Any, ...] = ()
    _kwargs: dict[str, Any] = {}  # noqa: RUF012 (never mutated: each node sets its own)
    # the options given where it was bound, as Ray's get_options(): the decorator's, or
    # only those of the .options() call it was bound through
    _bound_options: dict[str, Any] = {}  # noqa: RUF012

    def get_args(self) -> tuple[Any, ...]:
        return self._args

    def get_kwargs(self) -> dict[str, Any]:
        return self._kwargs

    def get_options(self) -> dict[str, Any]:
        return dict(self._bound_options)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the graph with ``args``/``kwargs`` as its input: its output's ref (a
        list of refs for a MultiOutputNode)."""
        execution = _Execution(args, kwargs)
        with execution.active():
            return execution.resolve(self)

    def experimental_compile(self, **_options: Any) -> CompiledDAG:
        return CompiledDAG(self)

    @abc.abstractmethod
    def _resolve(self, execution: _Execution) -> Any:
        """What the node stands for in ``execution`` (submitting what it must)."""


class CompiledDAG:
    """``experimental_compile()``'s DAG: Cairn runs it as the DAG it was made from."""

    def __init__(self, dag: DAGNode) -> None:
        self._dag = dag

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._dag.execute(*args, **kwargs)

    def teardown(self) -> None:
        """Nothing to tear down: no channels were set up."""


class InputNode(DAGNode):
    """What ``execute`` is given: the one positional argument itself, or
    ``inp[i]`` / ``inp["key"]`` / ``inp.key`` for one of several."""

    def __enter__(self) -> InputNode:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getitem__(self, key: int | str) -> InputAttributeNode:
        return InputAttributeNode(self, key)

    def __getattr__(self, name: str) -> InputAttributeNode:
        if name.startswith("__"):
            raise AttributeError(name)
        return InputAttributeNode(self, name)

    def _resolve(self, execution: _Execution) -> Any:
        if len(execution.args) == 1 and not execution.kwargs:
            return execution.args[0]
        raise ValueError(
            "this DAG uses its whole InputNode, so execute() takes exactly one positional "
            f"argument (got {len(execution.args)} and {len(execution.kwargs)} keyword ones); "
            "use inp[i] or inp.key for several"
        )


class InputAttributeNode(DAGNode):
    def __init__(self, source: InputNode, key: int | str) -> None:
        self._source, self._key = source, key

    def _resolve(self, execution: _Execution) -> Any:
        key = self._key
        if isinstance(key, int):
            if key >= len(execution.args):
                raise ValueError(
                    f"the DAG reads input {key}, but execute() got {len(execution.args)}"
                )
            return execution.args[key]
        if key in execution.kwargs:
            return execution.kwargs[key]
        if len(execution.args) == 1 and hasattr(execution.args[0], key):  # inp.x of one value
            return getattr(execution.args[0], key)
        if len(execution.args) == 1 and isinstance(execution.args[0], dict):
            return execution.args[0][key]
        raise ValueError(f"the DAG reads input {key!r}, which execute() was not given")


class FunctionNode(DAGNode):
    """``f.bind(...)``: a task of the remote function ``f``."""

    def __init__(self, function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._function, self._args, self._kwargs = function, args, kwargs
        self._bound_options = dict(getattr(function, "_bind_options", {}))

    def _resolve(self, execution: _Execution) -> Any:
        args, kwargs = execution.arguments(self._args, self._kwargs)
        return self._function.remote(*args, **kwargs)

    def remote(self, *_args: Any, **_kwargs: Any) -> None:
        raise AttributeError(
            ".remote() cannot be used on FunctionNodes: use execute() to run the DAG"
        )


class ClassNode(DAGNode):
    """``Actor.bind(...)``: an actor, made once per execution; ``.method.bind(...)`` on
    it is a call of that actor."""

    def __init__(self, actor_class: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._actor_class, self._args, self._kwargs = actor_class, args, kwargs
        self._bound_options = dict(getattr(actor_class, "_bind_options", {}))

    _last_call: ClassMethodNode | None = None  # the latest call bound on it

    def __getattr__(self, name: str) -> _UnboundMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "bind":  # (Ray's refusals, in Ray's words)
            raise AttributeError(f".bind() cannot be used again on {type(self).__name__}")
        if name == "remote":
            cls = getattr(self._actor_class, "_cls", self._actor_class)
            raise AttributeError(f"'{getattr(cls, '__name__', cls)}' has no attribute 'remote'")
        return _UnboundMethod(self, name)

    def _resolve(self, execution: _Execution) -> Any:
        args, kwargs = execution.arguments(self._args, self._kwargs)
        return self._actor_class.remote(*args, **kwargs)


class _UnboundMethod:
    def __init__(
        self, actor: ClassNode | Any, name: str, options: dict[str, Any] | None = None
    ) -> None:
        self._actor, self._name, self._options = actor, name, options or {}

    def options(self, **options: Any) -> _UnboundMethod:
        return _UnboundMethod(self._actor, self._name, options)

    def remote(self, *_args: Any, **_kwargs: Any) -> None:
        raise AttributeError(
            ".remote() cannot be used on ClassMethodNodes: use .bind() to build the DAG, "
            "and execute() to run it"
        )

    def bind(self, *args: Any, **kwargs: Any) -> ClassMethodNode:
        return ClassMethodNode(self._actor, self._name, args, kwargs, self._options)


class ClassMethodNode(DAGNode):
    """A call of an actor: one bound in the graph (a ClassNode) or a live handle."""

    def __init__(
        self,
        actor: ClassNode | Any,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: dict[str, Any] | None = None,
    ) -> None:
        self._actor, self._method = actor, method
        self._args, self._kwargs = args, kwargs
        self._bound_options = dict(options or {})
        # as Ray's: the calls bound on one actor of the graph run in the order bound,
        # each after the one bound before it (resolved first)
        self._previous: ClassMethodNode | None = None
        if isinstance(actor, ClassNode):
            self._previous, actor._last_call = actor._last_call, self

    def get_other_args_to_resolve(self) -> dict[str, Any]:
        return {PARENT_CLASS_NODE_KEY: self._actor, PREV_CLASS_METHOD_CALL_KEY: self._previous}

    def _resolve(self, execution: _Execution) -> Any:
        handle = execution.resolve(self._actor) if isinstance(self._actor, DAGNode) else self._actor
        if self._previous is not None:
            execution.resolve(self._previous)
        args, kwargs = execution.arguments(self._args, self._kwargs)
        method = getattr(handle, self._method)
        if self._bound_options:
            method = method.options(**self._bound_options)
        return method.remote(*args, **kwargs)


class MultiOutputNode(DAGNode):
    """Several outputs: ``execute`` returns their refs, in order."""

    def __init__(self, outputs: list[DAGNode]) -> None:
        self._outputs = list(outputs)

    def _resolve(self, execution: _Execution) -> Any:
        return [execution.resolve(node) for node in self._outputs]


class _Execution:
    """One ``execute``: its input, each node resolved once, and its id."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs
        self.dag_id = uuid.uuid4().hex
        self._resolved: dict[int, Any] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        token = _dag_id.set(self.dag_id)
        try:
            yield
        finally:
            _dag_id.reset(token)

    def resolve(self, node: DAGNode) -> Any:
        key = id(node)
        if key not in self._resolved:
            self._resolved[key] = node._resolve(self)
        return self._resolved[key]

    def arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Bound arguments with each node in them resolved (top level, and in lists,
        tuples and dicts, as Ray does)."""
        return [self._value(a) for a in args], {k: self._value(v) for k, v in kwargs.items()}

    def _value(self, value: Any) -> Any:
        if isinstance(value, DAGNode):
            return self.resolve(value)
        if isinstance(value, list | tuple):
            return type(value)(self._value(v) for v in value)
        if isinstance(value, dict):
            return {k: self._value(v) for k, v in value.items()}
        return value


__all__ = [
    "PARENT_CLASS_NODE_KEY",
    "PREV_CLASS_METHOD_CALL_KEY",
    "ClassMethodNode",
    "ClassNode",
    "CompiledDAG",
    "DAGNode",
    "FunctionNode",
    "InputAttributeNode",
    "InputNode",
    "MultiOutputNode",
]
