"""Loading policy files: every error of every file, located, in one pass.

Files are composed into YAML nodes (not plain objects) so each problem can name its line.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import TypeVar

import yaml

from gateway.policy.detectors import BUILTIN
from gateway.policy.errors import PolicyError, Problem
from gateway.policy.model import (
    Action,
    AllSpec,
    AnySpec,
    DetectorSpec,
    KeywordsSpec,
    MatchSpec,
    MaxTokensSpec,
    Mode,
    NotSpec,
    RegexSpec,
    Rule,
    RuleTests,
    Scope,
    Severity,
    Stage,
)
from gateway.policy.patterns import compile_pattern
from gateway.policy.ruleset import RuleSet, compile_ruleset

BUILTIN_POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)+$")
_RULE_KEYS = frozenset(
    {"id", "name", "description", "severity", "action", "mode", "stages", "scope", "match", "tests"}
)
_MATCH_KINDS = ("regex", "keywords", "detector", "max_tokens", "any", "all", "not")
_ACTIONS = {"log": Action.LOG, "alert": Action.ALERT, "block": Action.BLOCK}
_EMPTY_PROBES = ("", " ", "a", "0", "\n")

T = TypeVar("T")
E = TypeVar("E", bound=Enum)


class _Invalid(Exception):
    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


def policy_files(paths: Iterable[Path]) -> tuple[list[Path], list[Problem]]:
    files: list[Path] = []
    problems: list[Problem] = []
    for path in paths:
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                problems.append(Problem(str(path), 0, "", "no *.yaml policy files in directory"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Problem(str(path), 0, "", "no such file or directory"))
    return files, problems


def load_rules(paths: Iterable[Path]) -> tuple[tuple[Rule, ...], str]:
    """Read and validate policy files; raise ``PolicyError`` with every problem found."""
    files, problems = policy_files(paths)
    rules: list[Rule] = []
    first_seen: dict[str, Rule] = {}
    digest = hashlib.sha256()
    for file in files:
        source = file.read_bytes()
        digest.update(f"{file.name}\0{len(source)}\0".encode())
        digest.update(source)
        file_rules, file_problems = _parse_file(str(file), source)
        problems.extend(file_problems)
        for rule in file_rules:
            earlier = first_seen.get(rule.id)
            if earlier is not None:
                problems.append(
                    Problem(
                        rule.source,
                        rule.line,
                        rule.id,
                        f"duplicate id, first defined at {earlier.source}:{earlier.line}",
                    )
                )
                continue
            first_seen[rule.id] = rule
            rules.append(rule)
    if problems:
        raise PolicyError(problems)
    return tuple(rules), digest.hexdigest()[:12]


def load_ruleset(paths: Iterable[Path] = (BUILTIN_POLICY_DIR,)) -> RuleSet:
    rules, revision = load_rules(paths)
    return compile_ruleset(rules, revision)


def _parse_file(path: str, source: bytes) -> tuple[list[Rule], list[Problem]]:
    try:
        root = yaml.compose(source.decode("utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError as exc:
        return [], [Problem(path, 1, "", f"not UTF-8 text: {exc.reason}")]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        return [], [Problem(path, line, "", f"YAML syntax: {exc.problem or exc}")]
    if root is None:
        return [], [Problem(path, 1, "", "empty file: expected 'policies: [...]'")]
    problems: list[Problem] = []
    rules: list[Rule] = []
    try:
        entries = _fields(root, {"policies"}, required={"policies"})["policies"]
        items = _sequence(entries)
    except _Invalid as exc:
        return [], [Problem(path, _line(exc.node), "", exc.message)]
    for item in items:
        rule, rule_problems = _parse_rule(path, item)
        problems.extend(rule_problems)
        if rule is not None:
            rules.append(rule)
    return rules, problems


def _parse_rule(path: str, node: yaml.Node) -> tuple[Rule | None, list[Problem]]:
    if not isinstance(node, yaml.MappingNode):
        return None, [Problem(path, _line(node), "", "a policy must be a mapping")]
    rule_id = ""
    id_node = _lookup(node, "id")
    if id_node is not None and isinstance(id_node, yaml.ScalarNode):
        rule_id = str(id_node.value)
    problems: list[Problem] = []

    def report(exc: _Invalid) -> None:
        problems.append(Problem(path, _line(exc.node), rule_id, exc.message))

    def field(parse: Callable[[], T], default: T) -> T:
        try:
            return parse()
        except _Invalid as exc:
            report(exc)
            return default

    fields, invalid = _collect_fields(
        node, _RULE_KEYS, required={"id", "name", "severity", "action", "match"}
    )
    for exc in invalid:
        report(exc)
    if not {"id", "name", "severity", "action", "match"} <= fields.keys():
        return None, problems
    rule = Rule(
        id=field(lambda: _rule_id(fields["id"]), rule_id),
        name=field(lambda: _text(fields["name"]), ""),
        description=field(lambda: _text(fields["description"], allow_empty=True), "")
        if "description" in fields
        else "",
        severity=field(lambda: _severity(fields["severity"]), Severity.LOW),
        action=field(lambda: _action(fields["action"]), Action.LOG),
        mode=field(lambda: _choice(fields["mode"], Mode), Mode.ENFORCE) if "mode" in fields else Mode.ENFORCE,
        stages=field(lambda: _stages(fields["stages"]), frozenset(Stage))
        if "stages" in fields
        else frozenset(Stage),
        scope=field(lambda: _scope(fields["scope"]), Scope()) if "scope" in fields else Scope(),
        match=_match_collecting(fields["match"], report),
        tests=field(lambda: _tests(fields["tests"]), RuleTests()) if "tests" in fields else RuleTests(),
        source=path,
        line=_line(node),
    )
    return (None if problems else rule), problems


# Node helpers.


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _pairs(node: yaml.MappingNode) -> Iterator[tuple[str, yaml.Node]]:
    for key, value in node.value:
        yield str(key.value), value


def _lookup(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    return next((value for name, value in _pairs(node) if name == key), None)


def _collect_fields(
    node: yaml.Node, allowed: Iterable[str], required: Iterable[str] = ()
) -> tuple[dict[str, yaml.Node], list[_Invalid]]:
    """The known keys of a mapping, and every unknown, repeated or missing key as an error."""
    allowed = sorted(allowed)
    if not isinstance(node, yaml.MappingNode):
        return {}, [_Invalid(node, f"expected a mapping with keys {', '.join(allowed)}")]
    fields: dict[str, yaml.Node] = {}
    invalid: list[_Invalid] = []
    for key_node, value in node.value:
        key = str(key_node.value)
        if key not in allowed:
            invalid.append(_Invalid(key_node, f"unknown key '{key}' (allowed: {', '.join(allowed)})"))
        elif key in fields:
            invalid.append(_Invalid(key_node, f"key '{key}' given twice"))
        else:
            fields[key] = value
    missing = [key for key in required if key not in fields]
    if missing:
        invalid.append(_Invalid(node, f"missing {', '.join(repr(key) for key in sorted(missing))}"))
    return fields, invalid


def _fields(node: yaml.Node, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, yaml.Node]:
    fields, invalid = _collect_fields(node, allowed, required)
    if invalid:
        raise invalid[0]
    return fields


def _scalar(node: yaml.Node) -> object:
    if not isinstance(node, yaml.ScalarNode):
        raise _Invalid(node, "expected a single value")
    return yaml.constructor.SafeConstructor().construct_object(node)


def _text(node: yaml.Node, *, allow_empty: bool = False) -> str:
    value = _scalar(node)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise _Invalid(node, "expected non-empty text")
    return value


def _sequence(node: yaml.Node, *, what: str = "list") -> list[yaml.Node]:
    if not isinstance(node, yaml.SequenceNode):
        raise _Invalid(node, f"expected a {what}")
    return list(node.value)


def _texts(node: yaml.Node, *, non_empty: bool) -> tuple[str, ...]:
    items = _sequence(node)
    if non_empty and not items:
        raise _Invalid(node, "expected a non-empty list")
    return tuple(_text(item) for item in items)


# Field parsers.


def _rule_id(node: yaml.Node) -> str:
    value = _text(node)
    if not _ID.match(value):
        raise _Invalid(node, f"id '{value}' must be dotted lowercase words, like 'secrets.aws-key'")
    return value


def _choice(node: yaml.Node, enum: type[E]) -> E:
    value = _scalar(node)
    for member in enum:
        if value == member.value:
            return member
    names = " | ".join(str(member.value) for member in enum)
    raise _Invalid(node, f"expected {names}, got {value!r}")


def _severity(node: yaml.Node) -> Severity:
    value = _scalar(node)
    if (
        isinstance(value, str)
        and value.lower() in {s.value for s in Severity}
        and (value.islower() or value.isupper())
    ):
        return Severity(value.lower())
    raise _Invalid(node, f"severity must be low | medium | high (or LOW | MEDIUM | HIGH), got {value!r}")


def _action(node: yaml.Node) -> Action:
    value = _scalar(node)
    if isinstance(value, str) and value in _ACTIONS:
        return _ACTIONS[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return Action(value)
    raise _Invalid(node, f"action must be log | alert | block (or 0 | 1 | 2), got {value!r}")


def _stages(node: yaml.Node) -> frozenset[Stage]:
    items = _sequence(node)
    if not items:
        raise _Invalid(node, "stages must list prompt and/or response")
    stages = [_choice(item, Stage) for item in items]
    if len(set(stages)) != len(stages):
        raise _Invalid(node, "a stage is listed twice")
    return frozenset(stages)


def _scope(node: yaml.Node) -> Scope:
    fields = _fields(node, {"orgs", "workspaces", "repos"})
    values = {key: _texts(value, non_empty=True) for key, value in fields.items()}
    return Scope(**values)


def _tests(node: yaml.Node) -> RuleTests:
    fields = _fields(node, {"match", "no_match"})
    return RuleTests(
        match=_texts(fields["match"], non_empty=False) if "match" in fields else (),
        no_match=_texts(fields["no_match"], non_empty=False) if "no_match" in fields else (),
    )


def _match_collecting(node: yaml.Node, report: Callable[[_Invalid], None]) -> MatchSpec:
    """Parse a match spec, reporting every error inside it rather than only the first."""
    placeholder = RegexSpec("x")
    try:
        fields = _fields(node, _MATCH_KINDS)
    except _Invalid as exc:
        report(exc)
        return placeholder
    if len(fields) != 1:
        report(_Invalid(node, f"match needs exactly one of {', '.join(_MATCH_KINDS)}"))
        return placeholder
    ((kind, value),) = fields.items()
    try:
        match kind:
            case "any" | "all":
                items = _sequence(value)
                if not items:
                    raise _Invalid(value, f"'{kind}' needs a non-empty list of match specs")
                parts = tuple(_match_collecting(item, report) for item in items)
                return AnySpec(parts) if kind == "any" else AllSpec(parts)
            case "not":
                return NotSpec(_match_collecting(value, report))
            case "regex":
                return _regex(value)
            case "keywords":
                return KeywordsSpec(_texts(value, non_empty=True))
            case "detector":
                return _detector(value)
            case _:
                return _max_tokens(value)
    except _Invalid as exc:
        report(exc)
        return placeholder


def _regex(node: yaml.Node) -> RegexSpec:
    pattern = _text(node)
    try:
        regex = compile_pattern(pattern)
    except ValueError as exc:
        raise _Invalid(node, str(exc)) from None
    for probe in _EMPTY_PROBES:
        if any(m.start() == m.end() for m in regex.finditer(probe.encode())):
            raise _Invalid(node, "regex can match the empty string, so it would match every text")
    return RegexSpec(pattern)


def _detector(node: yaml.Node) -> DetectorSpec:
    if isinstance(node, yaml.ScalarNode):
        name, params_node = _text(node), None
    else:
        fields = _fields(node, {"name", "params"}, required={"name"})
        name, params_node = _text(fields["name"]), fields.get("params")
    detector = BUILTIN.get(name)
    if detector is None:
        raise _Invalid(node, f"unknown detector '{name}' (built-in: {', '.join(sorted(BUILTIN))})")
    params: list[tuple[str, object]] = []
    if params_node is not None:
        if not detector.params:
            raise _Invalid(params_node, f"detector '{name}' takes no parameters")
        for key, value_node in _fields(params_node, detector.params).items():
            spec = detector.params[key]
            value = _scalar(value_node)
            if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not spec.kind:
                raise _Invalid(value_node, f"parameter '{key}' must be {spec.kind.__name__}")
            assert isinstance(value, int | float)
            if spec.minimum is not None and value < spec.minimum:
                raise _Invalid(value_node, f"parameter '{key}' must be at least {spec.minimum}")
            params.append((key, value))
    return DetectorSpec(name, tuple(params))


def _max_tokens(node: yaml.Node) -> MaxTokensSpec:
    value = _scalar(node)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _Invalid(node, "max_tokens must be a positive integer")
    return MaxTokensSpec(value)
