"""The platform's policies as judge rules: a ``GET /policy`` answer, validated, as a policy file.

Pure: no I/O. The platform judges prompts and answers against a policy's ``content`` with a
model; that text becomes a judge rule's instruction, so the gateway asks the same question.
An answer is taken whole or not at all. Errors name a policy by its place in the answer and its
id, never by its content: a rule's own words can be confidential ("Do not mention project X").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from gateway.policy.loader import MAX_REFERENCE
from gateway.policy.model import Action, Scope, Severity

_SEVERITIES = {"LOW": Severity.LOW, "MEDIUM": Severity.MEDIUM, "HIGH": Severity.HIGH}
_ACTIONS = {0: Action.LOG, 1: Action.ALERT, 2: Action.BLOCK}
_NOT_IN_RULE_ID = re.compile(r"[^a-z0-9_-]")
RULE_ID_PREFIX = "platform."


class PlatformAnswerError(ValueError):
    """The platform's answer cannot be imported; the message names the policy, never its text."""


@dataclass(frozen=True, slots=True)
class PlatformPolicy:
    platform_id: str
    name: str
    instruction: str  # the policy's ``content``
    severity: Severity
    action: Action
    scope: Scope

    @property
    def rule_id(self) -> str:
        return rule_id_for(self.platform_id)


def rule_id_for(platform_id: str) -> str:
    """``platform.<id>``, lower-cased, each character the loader's ids refuse turned into ``-``."""
    slug = _NOT_IN_RULE_ID.sub("-", platform_id.lower())
    if not slug[:1].isalnum():
        slug = "p" + slug
    return RULE_ID_PREFIX + slug


def parse_answer(answer: object, *, org: str) -> tuple[PlatformPolicy, ...]:
    """The policies of one ``{success, policies: [Policy]}`` answer to ``GET /policy?orgId=org``."""
    if not isinstance(answer, dict):
        raise PlatformAnswerError("the answer is not a JSON object")
    if answer.get("success") is not True:
        raise PlatformAnswerError("the answer does not say success: true")
    items = answer.get("policies")
    if not isinstance(items, list):
        raise PlatformAnswerError("the answer's 'policies' is not a list")
    policies = tuple(_policy(index, item, org) for index, item in enumerate(items))
    seen: dict[str, int] = {}
    for index, policy in enumerate(policies):
        if policy.platform_id in seen:
            raise PlatformAnswerError(
                f"policy {index} ({policy.platform_id}): duplicate id, also policy {seen[policy.platform_id]}"
            )
        seen[policy.platform_id] = index
    _check_rule_ids(policies)
    return policies


def merge_policies(answers: Iterable[Iterable[PlatformPolicy]]) -> tuple[PlatformPolicy, ...]:
    """One rule per platform policy, in the order first seen: a lower scope's answer may repeat
    the policies of the scopes above it."""
    merged: dict[str, PlatformPolicy] = {}
    for policies in answers:
        for policy in policies:
            merged.setdefault(policy.platform_id, policy)
    _check_rule_ids(merged.values())
    return tuple(merged.values())


def _check_rule_ids(policies: Iterable[PlatformPolicy]) -> None:
    owners: dict[str, str] = {}
    for policy in policies:
        other = owners.setdefault(policy.rule_id, policy.platform_id)
        if other != policy.platform_id:
            raise PlatformAnswerError(
                f"policies {other} and {policy.platform_id} give the same rule id {policy.rule_id}"
            )


def _policy(index: int, item: object, org: str) -> PlatformPolicy:
    if not isinstance(item, dict):
        raise PlatformAnswerError(f"policy {index}: not a JSON object")
    platform_id = item.get("id")
    if not _is_id(platform_id):
        raise PlatformAnswerError(
            f"policy {index}: 'id' must be one line of text, at most {MAX_REFERENCE} characters"
        )
    assert isinstance(platform_id, str)
    where = f"policy {index} ({platform_id})"
    content = item.get("content")
    if not isinstance(content, str) or not content.strip():
        raise PlatformAnswerError(f"{where}: 'content' must be non-empty text")
    name = item.get("name")
    if name is None:
        name = f"Platform policy {platform_id}"
    elif not isinstance(name, str) or not name.strip():
        raise PlatformAnswerError(f"{where}: 'name' must be non-empty text")
    risk = item.get("riskType")
    severity = _SEVERITIES.get(risk) if isinstance(risk, str) else None
    if severity is None:
        raise PlatformAnswerError(f"{where}: riskType {_shown(risk)} is not LOW | MEDIUM | HIGH")
    action_type = item.get("actionType")
    action = _ACTIONS.get(action_type) if type(action_type) is int else None
    if action is None:
        raise PlatformAnswerError(f"{where}: actionType {_shown(action_type)} is not 0 | 1 | 2")
    return PlatformPolicy(platform_id, name, content, severity, action, _scope(where, item, org))


def _scope(where: str, item: Mapping[str, Any], org: str) -> Scope:
    """The narrowest id the policy names: a repo's, else a workspace's, else its org's."""
    if item.get("orgId") != org:
        raise PlatformAnswerError(f"{where}: orgId {_shown(item.get('orgId'))} is not the org asked for")
    ids: dict[str, str | None] = {}
    for key in ("workspaceId", "repoId"):
        value = item.get(key)
        if value is not None and not _is_id(value):
            raise PlatformAnswerError(f"{where}: '{key}' must be null or one line of text")
        ids[key] = value
    if ids["repoId"]:
        return Scope(repos=(ids["repoId"],))
    if ids["workspaceId"]:
        return Scope(workspaces=(ids["workspaceId"],))
    return Scope(orgs=(org,))


def _is_id(value: object) -> bool:
    return (
        isinstance(value, str) and bool(value.strip()) and value.isprintable() and len(value) <= MAX_REFERENCE
    )


def _shown(value: object) -> str:
    """A field's value when it is a short scalar; its type otherwise (it could be anything)."""
    if (
        value is None
        or isinstance(value, bool | int | float)
        or (isinstance(value, str) and len(value) <= 24)
    ):
        return repr(value)
    return f"of type {type(value).__name__}"


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    """A policy file of the platform's policies, and what it was pulled from."""

    policies: tuple[PlatformPolicy, ...]
    source: str  # the endpoint, without credentials
    scopes: tuple[str, ...]  # what was asked for: "org X", "workspace W", "repo R"
    generated_at: datetime

    @property
    def header(self) -> str:
        when = self.generated_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines = [
            f"Generated by `gateway policies pull` from {self.source} at {when}",
            f"({', '.join(self.scopes)}): the platform's policies as judge rules.",
            "The next pull replaces this file: change the policies in the platform, not here.",
        ]
        return "".join(f"# {_one_line(line)}\n" for line in lines)

    @property
    def body(self) -> str:
        """The policies alone: what a pull changes when the platform's policies change."""
        rules = [_rule(policy) for policy in self.policies]
        return yaml.dump(
            {"policies": rules},
            Dumper=_Dumper,
            default_flow_style=False,
            sort_keys=False,
            allow_unicode=True,
            width=100,
        )

    @property
    def text(self) -> str:
        return self.header + self.body

    def actions(self) -> Counter[Action]:
        return Counter(policy.action for policy in self.policies)


class _Dumper(yaml.SafeDumper):
    """As policies are written by hand: text of several lines as a literal block (the emitter
    quotes it instead when a block cannot hold it exactly), the lists of ids and stages on one line.
    """


def _represent_text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


class _OneLine(list[str]):
    pass


def _represent_one_line(dumper: yaml.SafeDumper, value: _OneLine) -> yaml.SequenceNode:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)


_Dumper.add_representer(str, _represent_text)
_Dumper.add_representer(_OneLine, _represent_one_line)


def _rule(policy: PlatformPolicy) -> dict[str, object]:
    scope = policy.scope
    written = {"orgs": scope.orgs, "workspaces": scope.workspaces, "repos": scope.repos}
    return {
        "id": policy.rule_id,
        "reference": policy.platform_id,
        "name": policy.name,
        "severity": policy.severity.value,
        "action": policy.action.label,
        "stages": _OneLine(["prompt", "response"]),
        "scope": {key: _OneLine(ids) for key, ids in written.items() if ids},
        "match": {"judge": {"instruction": policy.instruction}},
    }


def _one_line(text: str) -> str:
    # A comment ends at a line break: an id holding one must not write YAML of its own.
    return "".join(char if char.isprintable() else "?" for char in text)
