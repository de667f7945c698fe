"""YAML nodes and the field parsers shared by policy files and override files.

Files are composed into nodes, not plain objects, so that every problem can name its line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import TypeVar

import yaml

from gateway.policy.model import Action, Scope, Severity, Stage

E = TypeVar("E", bound=Enum)
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)+$")
_ACTIONS = {"log": Action.LOG, "alert": Action.ALERT, "block": Action.BLOCK}


class Invalid(Exception):
    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


def line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def pairs(node: yaml.MappingNode) -> Iterator[tuple[str, yaml.Node]]:
    for key, value in node.value:
        yield str(key.value), value


def lookup(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    return next((value for name, value in pairs(node) if name == key), None)


def collect_fields(
    node: yaml.Node, allowed: Iterable[str], required: Iterable[str] = ()
) -> tuple[dict[str, yaml.Node], list[Invalid]]:
    """The known keys of a mapping, and every unknown, repeated or missing key as an error."""
    allowed = sorted(allowed)
    if not isinstance(node, yaml.MappingNode):
        return {}, [Invalid(node, f"expected a mapping with keys {', '.join(allowed)}")]
    fields: dict[str, yaml.Node] = {}
    invalid: list[Invalid] = []
    for key_node, value in node.value:
        key = str(key_node.value)
        if key not in allowed:
            invalid.append(Invalid(key_node, f"unknown key '{key}' (allowed: {', '.join(allowed)})"))
        elif key in fields:
            invalid.append(Invalid(key_node, f"key '{key}' given twice"))
        else:
            fields[key] = value
    missing = [key for key in required if key not in fields]
    if missing:
        invalid.append(Invalid(node, f"missing {', '.join(repr(key) for key in sorted(missing))}"))
    return fields, invalid


def fields(node: yaml.Node, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, yaml.Node]:
    fields, invalid = collect_fields(node, allowed, required)
    if invalid:
        raise invalid[0]
    return fields


def scalar(node: yaml.Node) -> object:
    if not isinstance(node, yaml.ScalarNode):
        raise Invalid(node, "expected a single value")
    return yaml.constructor.SafeConstructor().construct_object(node)


def text(node: yaml.Node, *, allow_empty: bool = False) -> str:
    value = scalar(node)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise Invalid(node, "expected non-empty text")
    return value


def sequence(node: yaml.Node, *, what: str = "list") -> list[yaml.Node]:
    if not isinstance(node, yaml.SequenceNode):
        raise Invalid(node, f"expected a {what}")
    return list(node.value)


def texts(node: yaml.Node, *, non_empty: bool) -> tuple[str, ...]:
    items = sequence(node)
    if non_empty and not items:
        raise Invalid(node, "expected a non-empty list")
    return tuple(text(item) for item in items)


def rule_id(node: yaml.Node) -> str:
    value = text(node)
    if not _ID.match(value):
        raise Invalid(node, f"id '{value}' must be dotted lowercase words, like 'secrets.aws-key'")
    return value


def choice(node: yaml.Node, enum: type[E]) -> E:
    value = scalar(node)
    for member in enum:
        if value == member.value:
            return member
    names = " | ".join(str(member.value) for member in enum)
    raise Invalid(node, f"expected {names}, got {value!r}")


def severity(node: yaml.Node) -> Severity:
    value = scalar(node)
    if (
        isinstance(value, str)
        and value.lower() in {s.value for s in Severity}
        and (value.islower() or value.isupper())
    ):
        return Severity(value.lower())
    raise Invalid(node, f"severity must be low | medium | high (or LOW | MEDIUM | HIGH), got {value!r}")


def action(node: yaml.Node) -> Action:
    value = scalar(node)
    if isinstance(value, str) and value in _ACTIONS:
        return _ACTIONS[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return Action(value)
    raise Invalid(node, f"action must be log | alert | block (or 0 | 1 | 2), got {value!r}")


def stages(node: yaml.Node) -> frozenset[Stage]:
    items = sequence(node)
    if not items:
        raise Invalid(node, "stages must list prompt and/or response")
    stages = [choice(item, Stage) for item in items]
    if len(set(stages)) != len(stages):
        raise Invalid(node, "a stage is listed twice")
    return frozenset(stages)


def scope(node: yaml.Node) -> Scope:
    given = fields(node, {"orgs", "workspaces", "repos"})
    values = {key: texts(value, non_empty=True) for key, value in given.items()}
    return Scope(**values)
