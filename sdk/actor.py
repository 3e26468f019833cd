"""Actors: ``@remote`` on a class, ``Cls.remote(...)`` to create one in its own worker
process, ``handle.method.remote(...)`` to call it. Calls from one caller run in the
order they were submitted; a handle is picklable and may be passed to tasks and other
actors, which then call the actor themselves."""

from __future__ import annotations

import inspect
import itertools
import uuid
from collections.abc import Callable
from typing import Any

from dataplane import context
from dataplane import protocol as p
from dataplane.exceptions import PendingCallsLimitExceeded
from sdk import job_config as job_configs
from sdk import options as opts
from sdk import runtime_env
from sdk.dag import ClassMethodNode, ClassNode, current_dag_id
from sdk.object_ref import ObjectRef
from sdk.remote_function import build_args, pickle_code, results_of, retry_types
from sdk.runtime import client_or_auto_init, job_namespace
from sdk.signatures import check_arguments, method_signatures, signature_of
from sdk.util.scheduling_strategies import placement

_NUM_RETURNS_ATTR = "__cairn_num_returns__"
_GROUP_ATTR = "__cairn_concurrency_group__"
_RETRIES_ATTR = "__cairn_method_retries__"  # its max_task_retries / retry_exceptions
_BACKPRESSURE_ATTR = "__cairn_generator_backpressure__"

# Ray's options of @ray.method, and of an actor method's .options() (which adds name)
METHOD_OPTIONS = (
    "num_returns",
    "concurrency_group",
    "max_task_retries",
    "retry_exceptions",
    "_generator_backpressure_num_objects",
    "enable_task_events",
    "tensor_transport",
)
CALL_OPTIONS = (*METHOD_OPTIONS, "name")


def method(*args: Any, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@sdk.method(...)`` on an actor method, as ``ray.method``: ``num_returns`` (a
    count, or "streaming" / "dynamic" for a generator method), the
    ``concurrency_group`` it runs in (one of the actor's ``concurrency_groups``),
    ``max_task_retries`` / ``retry_exceptions`` for its calls (instead of the actor's
    max_task_retries; with retry_exceptions, a call that raises is run again while
    retries last) and a streaming method's ``_generator_backpressure_num_objects``."""
    if args or not options:
        raise TypeError(
            "The @method decorator must be applied using at least one of the arguments in "
            f"the list {list(METHOD_OPTIONS)}, for example '@method(num_returns=2)'."
        )
    checked = _method_options(options, "@method", METHOD_OPTIONS)
    backpressure = _backpressure(
        checked.get("_generator_backpressure_num_objects"), checked.get("num_returns", 1)
    )

    def mark(function: Callable[..., Any]) -> Callable[..., Any]:
        if "num_returns" in checked:
            setattr(function, _NUM_RETURNS_ATTR, checked["num_returns"])
        if "concurrency_group" in checked:
            setattr(function, _GROUP_ATTR, checked["concurrency_group"])
        retries = {k: checked[k] for k in ("max_task_retries", "retry_exceptions") if k in checked}
        if retries:
            setattr(function, _RETRIES_ATTR, retries)
        if backpressure != -1:
            setattr(function, _BACKPRESSURE_ATTR, backpressure)
        return function

    return mark


def _method_options(options: dict[str, Any], where: str, allowed: tuple[str, ...]) -> dict:
    """The options of a method (or of one call of it) as its calls use them: those
    given, checked (num_returns as TaskSpec.num_returns); ValueError naming one that is
    invalid, or one of Ray's that Cairn cannot honour."""
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in allowed:
            raise TypeError(
                f"Unexpected keyword argument to {where}: '{key}'. The supported keyword "
                f"arguments are {list(allowed)}"
            )
        if value is None:
            continue
        if key == "num_returns":
            checked[key] = _num_returns(value)
        elif key in ("concurrency_group", "name"):
            opts.check_text(f"{where}: {key}", value, allow_empty=False)
            checked[key] = value
        elif key == "max_task_retries":
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise ValueError(f"{where}: max_task_retries must be an int >= -1, got {value!r}")
            checked[key] = value
        elif key == "retry_exceptions":
            if not isinstance(value, bool | list | tuple) or opts.TASK_OPTIONS[key].check(value):
                raise ValueError(
                    f"{where}: retry_exceptions must be a bool or a list of exception "
                    f"classes, got {value!r:.80}"
                )
            checked[key] = value
        elif key == "_generator_backpressure_num_objects":
            checked[key] = value  # (checked against num_returns by _backpressure)
        elif key == "enable_task_events" and value is True:
            continue  # (every call's transitions are events in the log, always)
        else:
            raise ValueError(f"{where}: {key}={value!r:.80} is not supported by Cairn: {_WHY[key]}")
    return checked


_WHY = {
    "enable_task_events": "every transition is an event in the log; it cannot be switched off",
    "tensor_transport": "objects move through the object store only",
}


def _num_returns(value: int | str) -> int:
    """TaskSpec.num_returns of a method's num_returns (ValueError if it is not one)."""
    problem = opts.TASK_OPTIONS["num_returns"].check(value)
    if problem or isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"num_returns {problem or 'must be an int >= 0 or streaming'}: {value!r}")
    return opts.num_returns_on_wire(value)


def _backpressure(value: int | None, num_returns: int) -> int:
    """TaskSpec.generator_backpressure of a method's option (ValueError if invalid)."""
    if value is not None:
        opts.validate({"_generator_backpressure_num_objects": value})
    return opts.backpressure_on_wire(value, num_returns)


def _retries_on_wire(retries: dict[str, Any]) -> dict[str, Any]:
    """A method's max_task_retries / retry_exceptions as ActorOptions.method_options
    keeps them (exception classes cloudpickled, as TaskSpec.retry_exception_types)."""
    wire = dict(retries)
    if "retry_exceptions" in wire:
        option = wire.pop("retry_exceptions")
        wire["retry_exceptions"] = bool(option)
        wire["retry_exception_types"] = retry_types(option)
    return wire


def exit_actor() -> None:
    """Ends the actor from inside one of its methods; later calls raise ActorDiedError."""
    task = context.current_task()
    if task is None:
        raise TypeError("exit_actor() called outside an actor")
    raise context.ActorExit


class ActorClass:
    def __init__(self, cls: type, options: dict[str, Any]) -> None:
        self._cls = cls
        self._options = opts.validate(options, opts.ACTOR_OPTIONS)
        self._bind_options = dict(options)  # (a DAG node's get_options(), as Ray's)
        self._qualname = f"{cls.__module__}.{cls.__qualname__}"
        self._pickled: tuple[str, bytes] | None = None
        self._signature = signature_of(cls)  # (its constructor's)
        self._method_signatures = method_signatures(cls)
        self._methods = {
            name: getattr(member, _NUM_RETURNS_ATTR, 1)
            for name, member in inspect.getmembers(cls, callable)
            if not name.startswith("__") or name == "__call__"
        }
        self._method_groups = {
            name: getattr(member, _GROUP_ATTR)
            for name, member in inspect.getmembers(cls, callable)
            if hasattr(member, _GROUP_ATTR)
        }
        self._method_retries = {
            name: _retries_on_wire(getattr(member, _RETRIES_ATTR))
            for name, member in inspect.getmembers(cls, callable)
            if hasattr(member, _RETRIES_ATTR)
        }
        self._method_backpressure = {
            name: getattr(member, _BACKPRESSURE_ATTR)
            for name, member in inspect.getmembers(cls, callable)
            if hasattr(member, _BACKPRESSURE_ATTR)
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "Actors cannot be instantiated directly. Instead of "
            f"'{self._qualname}()', use '{self._qualname}.remote()'."
        )

    def options(self, **options: Any) -> ActorClass:
        merged = ActorClass.__new__(ActorClass)
        merged.__dict__.update(self.__dict__)
        merged._options = {**self._options, **opts.validate(options, opts.ACTOR_OPTIONS)}
        merged._bind_options = {**self._bind_options, **options}
        return merged

    def bind(self, *args: Any, **kwargs: Any) -> ClassNode:
        """A node of a DAG (sdk/dag.py): this actor, made by ``execute``."""
        return ClassNode(self, args, kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        check_arguments(self._signature, args, kwargs, f"{self._qualname}.remote()")
        client = client_or_auto_init()
        resolved = opts.resolve(self._options, opts.ACTOR_OPTIONS)
        strategy, selector = placement(resolved["scheduling_strategy"], resolved["label_selector"])
        function_id, blob = self._pickle()
        client.register_function(function_id, blob, self._qualname)
        task = context.current_task()
        job_id = task.job_id if task else client.welcome.job_id
        actor_id = uuid.uuid4().hex
        actor_options = p.ActorOptions(
            class_name=self._qualname,
            methods=self._methods,
            name=resolved["name"],
            # (its name's: the one given, else its job's, which a task on any node knows)
            namespace=(
                resolved["namespace"]
                if resolved["namespace"] is not None
                else job_namespace(client)
            ),
            detached=(resolved["lifetime"] or job_configs.default_actor_lifetime()) == "detached",
            max_restarts=resolved["max_restarts"],
            max_task_retries=resolved["max_task_retries"],
            max_concurrency=resolved["max_concurrency"] or self._default_concurrency(),
            concurrency_groups=self._groups(resolved["concurrency_groups"]),
            method_groups=dict(self._method_groups) or None,
            method_options=dict(self._method_retries) or None,
            method_backpressure=dict(self._method_backpressure) or None,
            replay_calls_on_restart=resolved["replay_calls_on_restart"],
            checkpoint_interval=resolved["checkpoint_interval"],
            max_pending_calls=resolved["max_pending_calls"],
        )
        if actor_options.checkpoint_interval and not (
            actor_options.replay_calls_on_restart
            and callable(getattr(self._cls, "__cairn_save__", None))
            and callable(getattr(self._cls, "__cairn_load__", None))
        ):
            raise ValueError(
                "checkpoint_interval needs replay_calls_on_restart=True and an actor class "
                f"with __cairn_save__(self) and __cairn_load__(self, state); {self._qualname} "
                "lacks them"
            )
        if actor_options.replay_calls_on_restart and p.calls_at_once(actor_options) != 1:
            raise ValueError(
                "replay_calls_on_restart needs an actor that runs one call at a time "
                f"(max_concurrency=1, not an async actor): {self._qualname} runs "
                f"{actor_options.max_concurrency} at once, so its calls have no one order "
                "to replay"
            )
        # (its arguments first: one that cannot be sent fails before the name is held)
        arg_list, kwarg_map, contained, keep_alive = build_args(args, kwargs)
        if actor_options.name is not None:
            existing = _claim_name(
                client, actor_id, actor_options, job_id, bool(resolved["get_if_exists"])
            )
            if existing is not None:
                return existing
        spec = p.TaskSpec(
            task_id=uuid.uuid4().hex,
            job_id=job_id,
            name=call_name(self._qualname, "__init__"),
            function_id=function_id,
            args=arg_list,
            kwargs=kwarg_map,
            num_returns=0,
            resources=opts.resource_request(resolved),
            max_retries=0,
            retry_exceptions=False,
            contained_refs=contained,
            parent_task_id=task.task_id if task else None,
            actor_id=actor_id,
            method="__init__",
            actor_options=actor_options,
            strategy=strategy,
            runtime_env=runtime_env.for_submission(resolved["runtime_env"], client.welcome.gcs_url),
            dag_id=current_dag_id(),
            label_selector=selector,
            labels=resolved["_labels"],
            namespace=job_namespace(client),
        )
        client.submit(spec)
        del keep_alive
        handle = ActorHandle(actor_id, self._qualname, self._methods, actor_options)
        handle._signatures = self._method_signatures  # (calls made here are checked)
        return handle

    def _groups(self, groups: dict[str, int] | None) -> dict[str, int] | None:
        """The actor's concurrency groups; ValueError if a method names one it lacks."""
        declared = dict(groups or {})
        for name, group in sorted(self._method_groups.items()):
            if group not in declared:
                raise ValueError(
                    f"{self._qualname}.{name} runs in concurrency group {group!r}, which the "
                    f"actor does not declare (concurrency_groups={declared})"
                )
        return declared or None

    def _default_concurrency(self) -> int:
        """1, or 1000 for an async actor (one with an ``async def`` method), as Ray."""
        is_async = any(
            inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
            for _, member in inspect.getmembers(self._cls, inspect.isfunction)
        )
        return 1000 if is_async else 1

    def _pickle(self) -> tuple[str, bytes]:
        if self._pickled is None:
            self._pickled = pickle_code(self._cls, f"the actor class {self._qualname}")
        return self._pickled


def _claim_name(
    client: Any, actor_id: str, options: p.ActorOptions, job_id: str, get_if_exists: bool
) -> ActorHandle | None:
    """Claims the actor's name; the existing actor's handle with ``get_if_exists``."""
    from dataplane.client import DaemonError

    assert options.name is not None
    try:
        existing = client.request(
            lambda rid: p.ReserveActorName(
                rid, actor_id, options.name, options.namespace, job_id, get_if_exists
            )
        )
    except DaemonError as error:
        raise ValueError(str(error)) from None
    if existing is None:
        return None
    return handle_of(*existing)


def handle_of(actor_id: str, options: p.ActorOptions | None) -> ActorHandle:
    if options is None:
        raise ValueError(f"the actor {actor_id} is being created; try again")
    return ActorHandle(actor_id, options.class_name, options.methods, options)


class ActorHandle:
    """A reference to an actor; its attributes are the actor's methods. ``options``:
    its actor's (what its calls need of them: each method's options, the groups)."""

    def __init__(
        self,
        actor_id: str,
        class_name: str,
        methods: dict[str, int],
        options: p.ActorOptions | None = None,
    ) -> None:
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = methods
        self._options = options
        self._sequence = itertools.count()
        self._signatures: dict[str, inspect.Signature | None] = {}
        # (max_pending_calls) a ref to a return of each call in flight, kept alive so
        # that whether it finished can be asked
        self._pending: list[ObjectRef] = []

    def _check_pending(self, client: Any) -> None:
        """Refuses a call past the actor's ``max_pending_calls``, counting the calls
        of this handle not finished yet (asked of the node only when at the limit)."""
        limit = getattr(self._options, "max_pending_calls", -1)
        if limit <= 0 or len(self._pending) < limit:
            return
        ids = [ref._id for ref in self._pending]
        ready = set(client.wait(ids, len(ids), 0, False))
        self._pending = [ref for ref in self._pending if ref._id not in ready]
        if len(self._pending) >= limit:
            raise PendingCallsLimitExceeded(
                f"Too many pending calls to actor {self._class_name}({self._actor_id}): "
                f"{len(self._pending)} calls not finished, max_pending_calls={limit}"
            )

    def __getattr__(self, name: str) -> ActorMethod:
        methods = self.__dict__.get("_methods", {})
        if name == p.READY_METHOD:  # every actor has it, as in Ray: True once it is up
            return ActorMethod(self, name, 1)
        if name not in methods:
            raise AttributeError(
                f"'{self.__dict__.get('_class_name')}' actor has no method {name!r}"
            )
        options = self.__dict__.get("_options")
        backpressure = (getattr(options, "method_backpressure", None) or {}).get(name, -1)
        return ActorMethod(self, name, methods[name], backpressure=backpressure)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ActorHandle, (self._actor_id, self._class_name, self._methods, self._options))

    def __repr__(self) -> str:
        return f"Actor({self._class_name}, {self._actor_id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)


class ActorMethod:
    def __init__(
        self,
        handle: ActorHandle,
        name: str,
        num_returns: int,
        call_options: dict[str, Any] | None = None,
        backpressure: int = -1,
    ) -> None:
        self._handle = handle
        self._name = name
        self._num_returns = num_returns
        self._call_options = call_options or {}  # .options(): name, retries, group
        self._backpressure = backpressure  # a streaming method's (TaskSpec's)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Actor methods cannot be called directly. Instead of running "
            f"'{self._name}()', try '{self._name}.remote()'."
        )

    def options(self, **options: Any) -> ActorMethod:
        """This method's calls with Ray's call options (``name``, ``num_returns``,
        ``max_task_retries``, ``retry_exceptions``, ``concurrency_group``)."""
        checked = _method_options(options, f"{self._name}.options()", CALL_OPTIONS)
        group = checked.get("concurrency_group")
        declared = getattr(self._handle._options, "concurrency_groups", None) or {}
        if group is not None and group not in declared:
            raise ValueError(
                f"{self._name}.options(): concurrency group {group!r} is not one of the "
                f"actor's (concurrency_groups={declared})"
            )
        num_returns = checked.pop("num_returns", self._num_returns)
        given = checked.pop("_generator_backpressure_num_objects", None)
        if given is not None:
            backpressure = _backpressure(given, num_returns)
        else:
            backpressure = self._backpressure if num_returns == p.STREAMING else -1
        return ActorMethod(
            self._handle, self._name, num_returns, self._call_options | checked, backpressure
        )

    def bind(self, *args: Any, **kwargs: Any) -> ClassMethodNode:
        """A node of a DAG (sdk/dag.py): this call of the actor, made by ``execute``."""
        return ClassMethodNode(self._handle, self._name, args, kwargs, self._call_options)

    def _retries(self) -> dict[str, Any]:
        """max_task_retries / retry_exceptions of this call: its own (.options()), else
        its method's (@method), else none (its actor's max_task_retries then)."""
        options = self._handle._options
        method = (getattr(options, "method_options", None) or {}).get(self._name, {})
        own = self._call_options
        if "retry_exceptions" in own:
            method = {**method, **_retries_on_wire({"retry_exceptions": own["retry_exceptions"]})}
        if "max_task_retries" in own:
            method = {**method, "max_task_retries": own["max_task_retries"]}
        return method

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        handle = self._handle
        if handle._signatures:
            what = f"{handle._class_name}.{self._name}.remote()"
            check_arguments(handle._signatures.get(self._name), args, kwargs, what)
        client = client_or_auto_init()
        handle._check_pending(client)
        task = context.current_task()
        own_retries = self._call_options or getattr(handle._options, "method_options", None)
        retries = self._retries() if own_retries else {}
        arg_list, kwarg_map, contained, keep_alive = build_args(args, kwargs)
        spec = p.TaskSpec(
            task_id=uuid.uuid4().hex,
            job_id=task.job_id if task else client.welcome.job_id,
            name=self._call_options.get("name") or call_name(handle._class_name, self._name),
            function_id="",
            args=arg_list,
            kwargs=kwarg_map,
            num_returns=self._num_returns,
            resources={},
            max_retries=0,
            retry_exceptions=retries.get("retry_exceptions", False),
            retry_exception_types=retries.get("retry_exception_types"),
            contained_refs=contained,
            parent_task_id=task.task_id if task else None,
            actor_id=handle._actor_id,
            method=self._name,
            sequence=next(handle._sequence),
            dag_id=current_dag_id(),
            max_task_retries=retries.get("max_task_retries"),
            concurrency_group=self._call_options.get("concurrency_group"),
            generator_backpressure=self._backpressure,
        )
        client.submit_actor_call(spec)
        del keep_alive
        results = results_of(spec)
        if getattr(handle._options, "max_pending_calls", -1) > 0 and spec.num_returns > 0:
            handle._pending.append(results[0] if isinstance(results, list) else results)
        return results


def call_name(class_name: str, method: str) -> str:
    """A call's default name, as Ray's: "Class.method" by the class's own name (its
    module and any enclosing function left out)."""
    return f"{class_name.rsplit('.', 1)[-1]}.{method}"
