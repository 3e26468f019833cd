"""Node labels and label selectors, as Ray has them ("Use labels to control scheduling").

A node's labels are strings keyed by strings, with Kubernetes' syntax (as Ray): a key is
an optional DNS-subdomain prefix and "/" then a name of at most 63 characters, a value
at most 63 characters (or empty); both begin and end with a letter or digit and have
only letters, digits, "-", "_" and "." between. Every node has ``ray.io/node-id``.

A selector is what a task or actor asks of its node's labels, as it travels in the
task spec and the log (plain JSON, so the data plane and the log hold it without this
module): ``{"hard": {key: [op, [values]]}, "soft": {...}}``, each part present only
when not empty. ``op`` is "in" (the node has the key, with one of the values), "!in"
(it lacks the key, or has another value), "exists" or "!exists". A node must match
every hard expression; among those, nodes that match every soft one come first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

NODE_ID_LABEL = "ray.io/node-id"

_NAME = r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?"
_NAME_RE = re.compile(_NAME)
_PREFIX_RE = re.compile(rf"{_NAME}(\.{_NAME})*")
_RULES = (
    "63 characters or less, beginning and ending with a letter or digit, with only "
    "letters, digits, '-', '_' and '.' between"
)


def key_problem(key: object) -> str | None:
    """Why ``key`` is not a label key, or None."""
    if not isinstance(key, str):
        return f"label keys must be strings, got {key!r:.80} ({type(key).__name__})"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (len(prefix) > 253 or not _PREFIX_RE.fullmatch(prefix)):
        return (
            f"invalid label key prefix {prefix!r:.80}: DNS labels separated by dots, "
            "253 characters or less"
        )
    if len(name) > 63 or not _NAME_RE.fullmatch(name):
        return f"invalid label key {key!r:.80}: its name must be {_RULES}"
    return None


def value_problem(key: str, value: object) -> str | None:
    """Why ``value`` is not a value of the label ``key``, or None."""
    if not isinstance(value, str):
        return f"the value of label {key!r} must be a string, got {value!r:.80}"
    if value and (len(value) > 63 or not _NAME_RE.fullmatch(value)):
        return f"invalid value {value!r:.80} of label {key!r}: it must be empty or {_RULES}"
    return None


def check_node_labels(labels: object, where: str) -> dict[str, str]:
    """A node's labels as given (``where`` names the argument); ValueError saying what
    is wrong. ``ray.io/node-id`` is the node's own: it cannot be given."""
    if not isinstance(labels, Mapping):
        raise ValueError(f"{where} must be a dict of label strings, got {type(labels).__name__}")
    for key, value in labels.items():
        problem = key_problem(key) or value_problem(key, value)
        if problem:
            raise ValueError(f"{where}: {problem}")
        if key == NODE_ID_LABEL:
            raise ValueError(f"{where}: {NODE_ID_LABEL} is set by Cairn (the node's id)")
    return dict(labels)


def parse_labels_option(text: str) -> dict[str, str]:
    """``cairn start --labels``: a JSON object ('{"zone": "us-a"}'), or Ray's
    "key=value,key2=value2"; ValueError saying what is wrong."""
    text = text.strip()
    if text.startswith("{"):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--labels is not valid JSON: {exc}") from None
        return check_node_labels(labels, "--labels")
    labels = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or "=" in value:
            raise ValueError(
                f"--labels: {pair!r} is not key=value (give a JSON object or key=value,key2=value2)"
            )
        labels[key.strip()] = value.strip()
    return check_node_labels(labels, "--labels")


def expression(key: str, op: str, values: list[str], where: str) -> list[Any]:
    """One checked expression ``[op, values]`` of ``key``."""
    problem = key_problem(key)
    if problem is None and op in ("in", "!in") and not values:
        problem = f"{op}() of label {key!r} needs at least one value"
    for value in values if problem is None else ():
        problem = value_problem(key, value) or (
            f"empty value in {op}() of label {key!r}" if not value else None
        )
        if problem:
            break
    if problem:
        raise ValueError(f"{where}: {problem}")
    return [op, list(values)]


def from_ray_selector(selector: object, where: str = "label_selector") -> dict[str, list[Any]]:
    """Ray's ``label_selector`` dict ({"zone": "us-a"}, "!us-a", "in(a,b)",
    "!in(a,b)") as hard expressions; ValueError saying what is wrong."""
    if not isinstance(selector, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(selector).__name__}")
    expressions: dict[str, list[Any]] = {}
    for key, text in selector.items():
        if not isinstance(key, str) or not isinstance(text, str):
            raise ValueError(f"{where}: keys and values must be strings, got {key!r}: {text!r}")
        negated = text.startswith("!")
        body = text[1:] if negated else text
        if body.startswith("in(") and body.endswith(")"):
            values = [v.strip() for v in body[3:-1].split(",")]
        elif "(" in body or ")" in body or "," in body:
            raise ValueError(
                f"{where}: {text!r} of label {key!r} is not a selector: give 'value', "
                "'!value', 'in(a,b)' or '!in(a,b)'"
            )
        else:
            values = [body]
        expressions[key] = expression(key, "!in" if negated else "in", values, where)
    return expressions


def selector(
    hard: Mapping[str, list[Any]] | None, soft: Mapping[str, list[Any]] | None = None
) -> dict[str, dict[str, list[Any]]] | None:
    """The selector a task spec carries (None: it has none)."""
    made = {part: dict(exprs) for part, exprs in (("hard", hard), ("soft", soft)) if exprs}
    return made or None


def _matches(labels: Mapping[str, str], expressions: Mapping[str, list[Any]]) -> bool:
    for key, (op, values) in expressions.items():
        value = labels.get(key)
        if op == "in":
            ok = value is not None and value in values
        elif op == "!in":
            ok = value is None or value not in values
        elif op == "exists":
            ok = value is not None
        else:  # "!exists"
            ok = value is None
        if not ok:
            return False
    return True


def hard_match(labels: Mapping[str, str], chosen: Mapping[str, Any] | None) -> bool:
    """Whether a node with ``labels`` may run what asks for ``chosen``."""
    return chosen is None or _matches(labels, chosen.get("hard") or {})


def soft_match(labels: Mapping[str, str], chosen: Mapping[str, Any] | None) -> bool:
    """Whether such a node is also one it prefers (True if it has no preference)."""
    return chosen is None or _matches(labels, chosen.get("soft") or {})


def describe(chosen: Mapping[str, Any]) -> str:
    """The selector for people: "zone in (us-a), gpu exists; preferring ..."."""

    def part(expressions: Mapping[str, list[Any]]) -> str:
        return ", ".join(
            f"{key} {op}" + (f" ({','.join(values)})" if values else "")
            for key, (op, values) in expressions.items()
        )

    said = part(chosen.get("hard") or {}) or "any labels"
    if chosen.get("soft"):
        said += f"; preferring {part(chosen['soft'])}"
    return said


def node_labels(node_id: str, labels: Mapping[str, str] | None) -> dict[str, str]:
    """A node's labels with Ray's default (its id), as nodes() shows them."""
    return {NODE_ID_LABEL: node_id, **(labels or {})}
