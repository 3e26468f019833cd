"""Remote functions: ``@remote`` on a function, ``.remote(...)`` to submit it as a task,
``.options(...)`` to override its options for one call site."""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import cloudpickle

from dataplane import context
from dataplane import protocol as p
from dataplane.code_paths import dumps_with_paths
from dataplane.serialization import SerializationError, serialize_with_refs
from dataplane.shm import INLINE_LIMIT
from sdk import options as opts
from sdk import runtime_env
from sdk.dag import FunctionNode, current_dag_id
from sdk.generator import ObjectRefGenerator
from sdk.object_ref import ObjectRef
from sdk.runtime import client_or_auto_init, job_namespace, put_object
from sdk.signatures import check_arguments, signature_of
from sdk.util.scheduling_strategies import placement


class RemoteFunction:
    def __init__(self, function: Callable[..., Any], options: dict[str, Any]) -> None:
        self._function = function
        self._options = opts.validate(options)
        # the options given (decorator, then .options() over them): a DAG node's
        # get_options(), as Ray's
        self._given_options = dict(options)
        self._bind_options = dict(options)
        if options.get("num_gpus") and "max_calls" not in options:
            self._bind_options["max_calls"] = 1  # (Ray's default for a GPU task, shown)
        self._qualname = f"{function.__module__}.{function.__qualname__}"
        self._pickled: tuple[str, bytes] | None = None
        self._signature = signature_of(function)
        functools.update_wrapper(self, function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "Remote functions cannot be called directly. Instead of running "
            f"'{self._qualname}()', try '{self._qualname}.remote()'."
        )

    def options(self, **options: Any) -> RemoteFunction:
        merged = RemoteFunction.__new__(RemoteFunction)
        merged.__dict__.update(self.__dict__)
        merged._options = {**self._options, **opts.validate(options)}
        merged._given_options = {**self._given_options, **options}
        merged._bind_options = dict(merged._given_options)
        return merged

    def bind(self, *args: Any, **kwargs: Any) -> FunctionNode:
        """A node of a DAG (sdk/dag.py): this function's task, run by ``execute``."""
        return FunctionNode(self, args, kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        check_arguments(self._signature, args, kwargs, f"{self._qualname}.remote()")
        client = client_or_auto_init()
        resolved = opts.resolve(self._options)
        function_id, blob = self._pickle()
        client.register_function(function_id, blob, self._qualname)
        task = context.current_task()
        strategy, selector = placement(resolved["scheduling_strategy"], resolved["label_selector"])
        args_list, kwargs_map, contained, keep_alive = build_args(args, kwargs)
        num_returns = opts.num_returns_on_wire(resolved["num_returns"])
        spec = p.TaskSpec(
            task_id=uuid.uuid4().hex,
            job_id=task.job_id if task else client.welcome.job_id,
            name=resolved["name"] or self._qualname,
            function_id=function_id,
            args=args_list,
            kwargs=kwargs_map,
            num_returns=num_returns,
            resources=opts.resource_request(resolved),
            max_retries=resolved["max_retries"],
            retry_exceptions=bool(resolved["retry_exceptions"]),
            retry_exception_types=retry_types(resolved["retry_exceptions"]),
            contained_refs=contained,
            parent_task_id=task.task_id if task else None,
            strategy=strategy,
            max_calls=_max_calls(resolved),
            runtime_env=runtime_env.for_submission(resolved["runtime_env"], client.welcome.gcs_url),
            dag_id=current_dag_id(),
            label_selector=selector,
            labels=resolved["_labels"],
            generator_backpressure=opts.backpressure_on_wire(
                resolved["_generator_backpressure_num_objects"], num_returns
            ),
            namespace=job_namespace(client),
        )
        client.submit(spec)
        del keep_alive  # the daemon pins large arguments from submission on
        return results_of(spec)

    def _pickle(self) -> tuple[str, bytes]:
        if self._pickled is None:
            self._pickled = pickle_code(self._function, f"the remote function {self._qualname}")
        return self._pickled


def results_of(spec: p.TaskSpec) -> Any:
    """What ``.remote()`` gives for a submitted task or call: its ref, its refs
    (num_returns > 1), None (0), or a generator (``"streaming"``); ``"dynamic"``: the
    ref of its DynamicObjectRefGenerator."""
    if spec.streaming:
        return ObjectRefGenerator(spec.task_id, spec.generator_backpressure)
    refs = [ObjectRef._owned(object_id) for object_id in spec.return_ids()]
    if spec.num_returns == 1 or spec.dynamic:
        return refs[0]
    return refs if spec.num_returns > 1 else None


def retry_types(option: bool | list | tuple) -> bytes | None:
    """TaskSpec.retry_exception_types of a retry_exceptions option."""
    if isinstance(option, bool):
        return None
    return cloudpickle.dumps(tuple(option))


def _max_calls(resolved: dict[str, Any]) -> int:
    if resolved["max_calls"] is not None:
        return int(resolved["max_calls"])
    return 1 if resolved["num_gpus"] else 0


def pickle_code(code: Any, what: str) -> tuple[str, bytes]:
    """A function or class pickled by value, with its id (a digest of the bytes); a
    driver's carries its code paths (dataplane/code_paths.py)."""
    try:
        blob = dumps_with_paths(code, runtime_env.code_paths())
    except Exception as exc:
        raise TypeError(f"could not serialize {what}: {type(exc).__name__}: {exc}") from exc
    return hashlib.sha1(blob).hexdigest(), blob


def build_args(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[p.Arg], dict[str, p.Arg], tuple[str, ...], list[ObjectRef]]:
    """Task arguments: the Args, the refs nested in them, and the refs of large
    arguments put into the store (to keep alive until the task is submitted)."""
    contained: list[str] = []
    keep_alive: list[ObjectRef] = []
    arg_list = [_arg(a, i, contained, keep_alive) for i, a in enumerate(args)]
    kwarg_map = {k: _arg(v, k, contained, keep_alive) for k, v in kwargs.items()}
    return arg_list, kwarg_map, tuple(dict.fromkeys(contained)), keep_alive


def _arg(
    value: Any, position: int | str, contained: list[str], keep_alive: list[ObjectRef]
) -> p.Arg:
    """A top-level ref is passed by reference (the worker gets its value); anything else
    is serialized inline, or put into the store first when large (as Ray does)."""
    if isinstance(value, ObjectRef):
        return p.Arg(ref=value.hex())
    try:
        serialized, refs = serialize_with_refs(value)
    except SerializationError as exc:
        raise SerializationError(
            f"Could not serialize the argument {position!r} of a task: {exc}"
        ) from exc
    contained.extend(refs)
    if serialized.total_size <= INLINE_LIMIT:
        return p.Arg(inline=serialized.to_bytes())
    ref = ObjectRef._owned(put_object(serialized, refs))
    keep_alive.append(ref)
    return p.Arg(ref=ref.hex())
