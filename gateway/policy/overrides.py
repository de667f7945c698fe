"""Overrides: switch shipped rules off, or change their outcome, without editing their files.

A policy file may hold ``overrides:`` beside (or instead of) ``policies:``. Each names a rule id,
or a glob such as ``injection.*``, and what to change; they apply after every file is loaded,
in load order, so a team's directory listed after the shipped pack has the last word.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import yaml

from gateway.policy import nodes
from gateway.policy.errors import Problem
from gateway.policy.model import Mode, Rule

_KEYS = frozenset({"id", "enabled", "action", "mode", "severity", "stages", "scope"})
_PARSERS: dict[str, Any] = {
    "action": nodes.action,
    "mode": lambda node: nodes.choice(node, Mode),
    "severity": nodes.severity,
    "stages": nodes.stages,
    "scope": nodes.scope,
}


@dataclass(frozen=True, slots=True)
class Override:
    pattern: str
    source: str
    line: int
    enabled: bool = True
    changes: tuple[tuple[str, Any], ...] = ()


def parse_overrides(path: str, node: yaml.Node) -> tuple[list[Override], list[Problem]]:
    overrides: list[Override] = []
    problems: list[Problem] = []
    try:
        items = nodes.sequence(node)
    except nodes.Invalid as exc:
        return [], [Problem(path, nodes.line(exc.node), "", exc.message)]
    for item in items:
        fields, invalid = nodes.collect_fields(item, _KEYS, required={"id"})
        pattern = ""
        if "id" in fields and isinstance(fields["id"], yaml.ScalarNode):
            pattern = str(fields["id"].value)
        found = list(invalid)
        changes: list[tuple[str, Any]] = []
        enabled = True
        for key, value in fields.items():
            try:
                if key == "enabled":
                    flag = nodes.scalar(value)
                    if not isinstance(flag, bool):
                        raise nodes.Invalid(value, "enabled must be true or false")
                    enabled = flag
                elif key != "id":
                    changes.append((key, _PARSERS[key](value)))
            except nodes.Invalid as exc:
                found.append(exc)
        problems += [Problem(path, nodes.line(exc.node), pattern, exc.message) for exc in found]
        if not found:
            overrides.append(Override(pattern, path, nodes.line(item), enabled, tuple(changes)))
    return overrides, problems


def apply_overrides(
    rules: Iterable[Rule], overrides: Iterable[Override]
) -> tuple[tuple[Rule, ...], list[Problem]]:
    current = {rule.id: rule for rule in rules}
    disabled: set[str] = set()
    problems: list[Problem] = []
    for override in overrides:
        matched = [rule_id for rule_id in current if fnmatch.fnmatchcase(rule_id, override.pattern)]
        if not matched:
            problems.append(
                Problem(override.source, override.line, override.pattern, "override names no loaded rule")
            )
        for rule_id in matched:
            if override.enabled:
                disabled.discard(rule_id)
            else:
                disabled.add(rule_id)
            current[rule_id] = replace(current[rule_id], **dict(override.changes))
    return tuple(rule for rule_id, rule in current.items() if rule_id not in disabled), problems
