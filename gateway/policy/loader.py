"""Loading policy files: every error of every file, located, in one pass.

Files are composed into YAML nodes (not plain objects) so each problem can name its line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TypeVar

import yaml

from gateway.policy import nodes
from gateway.policy.detectors import BUILTIN
from gateway.policy.errors import PolicyError, Problem
from gateway.policy.model import (
    Action,
    AllSpec,
    AnySpec,
    DetectorSpec,
    ExceptSpec,
    JudgeSpec,
    KeywordsSpec,
    MatchSpec,
    MaxTokensSpec,
    Mode,
    NotSpec,
    OnError,
    RegexSpec,
    Rule,
    RuleTests,
    Scope,
    Severity,
    Stage,
    walk_specs,
)
from gateway.policy.overrides import Override, apply_overrides, parse_overrides
from gateway.policy.patterns import compile_pattern
from gateway.policy.ruleset import RuleSet, compile_ruleset

BUILTIN_POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"

_RULE_KEYS = frozenset(
    {"id", "name", "description", "severity", "action", "mode", "stages", "scope", "match", "tests"}
    | {"reference"}
)
_MATCH_KINDS = ("regex", "keywords", "detector", "max_tokens", "judge", "any", "all", "not")
# ``except`` is a part of an ``all``, never a match on its own.
_PART_KINDS = (*_MATCH_KINDS, "except")
_EMPTY_PROBES = ("", " ", "a", "0", "\n")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Declared:
    """A policy as its file declares it: its id and place, and the rule when it is valid.

    A refused rule still owns its id, so a duplicate of it is reported in the same run.
    """

    rule_id: str
    source: str
    line: int
    rule: Rule | None


def policy_files(paths: Iterable[Path]) -> tuple[list[Path], list[Problem]]:
    files: list[Path] = []
    problems: list[Problem] = []
    # "builtin" names the shipped pack, so a team can list its own directory after it.
    for path in (BUILTIN_POLICY_DIR if str(given) == "builtin" else given for given in paths):
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
    refused: list[str] = []  # ids of rules refused for errors of their own
    overrides: list[Override] = []
    first_seen: dict[str, _Declared] = {}
    digest = hashlib.sha256()
    for file in files:
        try:
            source = file.read_bytes()
        except OSError as exc:
            problems.append(Problem(str(file), 0, "", f"cannot read: {exc.strerror or type(exc).__name__}"))
            continue
        digest.update(f"{file.name}\0{len(source)}\0".encode())
        digest.update(source)
        declared, file_overrides, file_problems = _parse_file(str(file), source)
        problems.extend(file_problems)
        overrides.extend(file_overrides)
        for policy in declared:
            earlier = first_seen.get(policy.rule_id)
            if earlier is not None:
                problems.append(
                    Problem(
                        policy.source,
                        policy.line,
                        policy.rule_id,
                        f"duplicate id, first defined at {earlier.source}:{earlier.line}",
                    )
                )
                continue
            first_seen[policy.rule_id] = policy
            if policy.rule is None:
                refused.append(policy.rule_id)
            else:
                rules.append(policy.rule)
    # An override aimed only at refused rules is not "unknown" too: its rule's error says enough.
    loaded = [rule.id for rule in rules]
    overrides = [o for o in overrides if _names_any(loaded, o) or not _names_any(refused, o)]
    result, override_problems = apply_overrides(rules, overrides)
    problems.extend(override_problems)
    if problems:
        raise PolicyError(problems)
    return result, digest.hexdigest()[:12]


def _names_any(rule_ids: Iterable[str], override: Override) -> bool:
    return any(fnmatchcase(rule_id, override.pattern) for rule_id in rule_ids)


def load_ruleset(paths: Iterable[Path] = (BUILTIN_POLICY_DIR,)) -> RuleSet:
    rules, revision = load_rules(paths)
    return compile_ruleset(rules, revision)


def _parse_file(path: str, source: bytes) -> tuple[list[_Declared], list[Override], list[Problem]]:
    try:
        root = yaml.compose(source.decode("utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError as exc:
        return [], [], [Problem(path, 1, "", f"not UTF-8 text: {exc.reason}")]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        return [], [], [Problem(path, line, "", f"YAML syntax: {exc.problem or exc}")]
    if root is None:
        return [], [], [Problem(path, 1, "", "empty file: expected 'policies: [...]'")]
    top, invalid = nodes.collect_fields(root, {"policies", "overrides"})
    if not top and not invalid:
        invalid.append(nodes.Invalid(root, "expected 'policies: [...]' and/or 'overrides: [...]'"))
    problems = [Problem(path, nodes.line(exc.node), "", exc.message) for exc in invalid]
    items: list[yaml.Node] = []
    if "policies" in top:
        try:
            items = nodes.sequence(top["policies"])
        except nodes.Invalid as exc:
            problems.append(Problem(path, nodes.line(exc.node), "", exc.message))
    declared: list[_Declared] = []
    for item in items:
        policy, rule_problems = _parse_rule(path, item)
        problems.extend(rule_problems)
        if policy is not None:
            declared.append(policy)
    overrides: list[Override] = []
    if "overrides" in top:
        overrides, override_problems = parse_overrides(path, top["overrides"])
        problems.extend(override_problems)
    return declared, overrides, problems


def _parse_rule(path: str, node: yaml.Node) -> tuple[_Declared | None, list[Problem]]:
    if not isinstance(node, yaml.MappingNode):
        return None, [Problem(path, nodes.line(node), "", "a policy must be a mapping")]
    rule_id = ""
    id_node = nodes.lookup(node, "id")
    if id_node is not None and isinstance(id_node, yaml.ScalarNode):
        rule_id = str(id_node.value)
    problems: list[Problem] = []

    def report(exc: nodes.Invalid) -> None:
        problems.append(Problem(path, nodes.line(exc.node), rule_id, exc.message))

    def field(key: str, parse: Callable[[yaml.Node], T], default: T) -> T:
        if key not in fields:
            return default
        try:
            return parse(fields[key])
        except nodes.Invalid as exc:
            report(exc)
            return default

    fields, invalid = nodes.collect_fields(
        node, _RULE_KEYS, required={"id", "name", "severity", "action", "match"}
    )
    for exc in invalid:
        report(exc)
    declared = _Declared(rule_id, path, nodes.line(node), None) if rule_id else None
    if not {"id", "name", "severity", "action", "match"} <= fields.keys():
        return declared, problems
    rule = Rule(
        id=field("id", nodes.rule_id, rule_id),
        name=field("name", nodes.text, ""),
        description=field("description", lambda n: nodes.text(n, allow_empty=True), ""),
        severity=field("severity", nodes.severity, Severity.LOW),
        action=field("action", nodes.action, Action.LOG),
        mode=field("mode", lambda n: nodes.choice(n, Mode), Mode.ENFORCE),
        stages=field("stages", nodes.stages, frozenset(Stage)),
        scope=field("scope", nodes.scope, Scope()),
        match=_match_collecting(fields["match"], report),
        tests=_tests_collecting(fields["tests"], report) if "tests" in fields else RuleTests(),
        reference=field("reference", _reference, ""),
        source=path,
        line=nodes.line(node),
    )
    if problems:
        return declared, problems
    return _Declared(rule.id, path, rule.line, rule), problems


MAX_REFERENCE = 128


def _reference(node: yaml.Node) -> str:
    """A short, one-line name of where a rule comes from (the platform's policy id, say)."""
    value = nodes.scalar(node) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise nodes.Invalid(node, "reference must be non-empty text on one line")
    if len(value) > MAX_REFERENCE:
        raise nodes.Invalid(node, f"reference must be at most {MAX_REFERENCE} characters")
    return value


def _tests_collecting(node: yaml.Node, report: Callable[[nodes.Invalid], None]) -> RuleTests:
    fields, invalid = nodes.collect_fields(node, {"match", "no_match"})
    for exc in invalid:
        report(exc)

    def texts(key: str) -> tuple[str, ...]:
        try:
            return nodes.texts(fields[key], non_empty=False) if key in fields else ()
        except nodes.Invalid as exc:
            report(exc)
            return ()

    return RuleTests(match=texts("match"), no_match=texts("no_match"))


def _match_collecting(
    node: yaml.Node, report: Callable[[nodes.Invalid], None], *, in_all: bool = False
) -> MatchSpec:
    """Parse a match spec, reporting every error inside it rather than only the first."""
    placeholder = RegexSpec("x")
    kinds = _PART_KINDS if in_all else _MATCH_KINDS
    fields, invalid = nodes.collect_fields(node, _PART_KINDS)
    for exc in invalid:
        report(exc)
    if invalid and not fields:
        return placeholder
    if len(fields) != 1:
        report(nodes.Invalid(node, f"match needs exactly one of {', '.join(kinds)}"))
        return placeholder
    ((kind, value),) = fields.items()
    try:
        match kind:
            case "any":
                return AnySpec(tuple(_match_collecting(item, report) for item in _parts(value, kind)))
            case "all":
                return _all(value, report)
            case "not":
                return NotSpec(_match_collecting(value, report), line=nodes.line(node))
            case "except":
                if not in_all:
                    raise nodes.Invalid(
                        node,
                        "'except' drops the matches of the other parts of an 'all' that it overlaps: "
                        "it stands only directly inside 'all'",
                    )
                return _except(value, report)
            case "regex":
                return _regex(value)
            case "keywords":
                return KeywordsSpec(nodes.texts(value, non_empty=True))
            case "detector":
                return _detector(value)
            case "judge":
                return _judge(value, report)
            case _:
                return _max_tokens(value)
    except nodes.Invalid as exc:
        report(exc)
        return placeholder


def _parts(node: yaml.Node, kind: str) -> list[yaml.Node]:
    items = nodes.sequence(node)
    if not items:
        raise nodes.Invalid(node, f"'{kind}' needs a non-empty list of match specs")
    return items


# The parts of an ``all`` that match something (``not`` and ``except`` do not).
_MATCH_PARTS = (RegexSpec, KeywordsSpec, DetectorSpec, MaxTokensSpec, AnySpec, AllSpec)


def _all(node: yaml.Node, report: Callable[[nodes.Invalid], None]) -> AllSpec:
    parts = tuple(_match_collecting(item, report, in_all=True) for item in _parts(node, "all"))
    if any(isinstance(part, ExceptSpec) for part in parts) and not any(
        isinstance(part, _MATCH_PARTS) for part in parts
    ):
        raise nodes.Invalid(node, "an 'all' with 'except' needs a part whose matches it excludes")
    return AllSpec(parts)


def _except(node: yaml.Node, report: Callable[[nodes.Invalid], None]) -> ExceptSpec:
    part = _match_collecting(node, report)
    if not _has_spans(part):
        raise nodes.Invalid(
            node, "'except' takes regex, keywords, detector, or 'any' of them: something a match can overlap"
        )
    return ExceptSpec(part)


def _has_spans(spec: MatchSpec) -> bool:
    """Whether every match of the spec is a located part of the text."""
    match spec:
        case RegexSpec() | KeywordsSpec() | DetectorSpec():
            return True
        case AnySpec(parts):
            return all(_has_spans(part) for part in parts)
        case _:
            return False


def rule_warnings(rules: Iterable[Rule]) -> list[Problem]:
    """What loads but is likely wrong: a whole-text ``not`` beside match parts of an ``all``.

    Such a ``not`` is judged on the whole text, so an example value anywhere (a placeholder,
    a documented test key) switches the rule off for a real match beside it; ``except``
    judges each match instead.
    """
    warnings: list[Problem] = []
    for rule in rules:
        for spec in walk_specs(rule.match):
            if not isinstance(spec, AllSpec) or not any(isinstance(p, _MATCH_PARTS) for p in spec.parts):
                continue
            warnings.extend(
                Problem(rule.source, part.line or rule.line, rule.id, NOT_BESIDE_MATCHES)
                for part in spec.parts
                if isinstance(part, NotSpec)
            )
    return warnings


NOT_BESIDE_MATCHES = (
    "warning: 'not' inside 'all' is judged on the whole text: one excluded value anywhere "
    "(a placeholder, an example key) switches the rule off for a real match beside it; "
    "to exclude the matches themselves, write 'except:' (judged per match)"
)


def _regex(node: yaml.Node) -> RegexSpec:
    pattern = nodes.text(node)
    try:
        regex = compile_pattern(pattern)
    except ValueError as exc:
        raise nodes.Invalid(node, str(exc)) from None
    for probe in _EMPTY_PROBES:
        if any(m.start() == m.end() for m in regex.finditer(probe.encode())):
            raise nodes.Invalid(node, "regex can match the empty string, so it would match every text")
    return RegexSpec(pattern)


def _detector(node: yaml.Node) -> DetectorSpec:
    if isinstance(node, yaml.ScalarNode):
        name, params_node = nodes.text(node), None
    else:
        fields = nodes.fields(node, {"name", "params"}, required={"name"})
        name, params_node = nodes.text(fields["name"]), fields.get("params")
    detector = BUILTIN.get(name)
    if detector is None:
        raise nodes.Invalid(node, f"unknown detector '{name}' (built-in: {', '.join(sorted(BUILTIN))})")
    params: list[tuple[str, object]] = []
    if params_node is not None:
        if not detector.params:
            raise nodes.Invalid(params_node, f"detector '{name}' takes no parameters")
        for key, value_node in nodes.fields(params_node, detector.params).items():
            spec = detector.params[key]
            value = nodes.scalar(value_node)
            if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not spec.kind:
                raise nodes.Invalid(value_node, f"parameter '{key}' must be {spec.kind.__name__}")
            assert isinstance(value, int | float)
            if spec.minimum is not None and value < spec.minimum:
                raise nodes.Invalid(value_node, f"parameter '{key}' must be at least {spec.minimum}")
            params.append((key, value))
    return DetectorSpec(name, tuple(params))


_NO_INSTRUCTION = "a judge needs an instruction: what the rule forbids, in plain language"


def _judge(node: yaml.Node, report: Callable[[nodes.Invalid], None]) -> JudgeSpec:
    """``judge: INSTRUCTION``, or ``judge: {instruction, examples: {violating, compliant}, on_error}``."""
    if isinstance(node, yaml.ScalarNode):
        return JudgeSpec(_instruction(node))
    if not isinstance(node, yaml.MappingNode):
        raise nodes.Invalid(
            node, "judge takes an instruction, or a mapping of instruction, examples and on_error"
        )
    fields, invalid = nodes.collect_fields(node, {"instruction", "examples", "on_error"}, {"instruction"})
    for exc in invalid:
        report(exc)

    def parsed(key: str, parse: Callable[[yaml.Node], T], default: T) -> T:
        try:
            return parse(fields[key]) if key in fields else default
        except nodes.Invalid as exc:
            report(exc)
            return default

    no_examples: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    violating, compliant = parsed("examples", lambda n: _examples(n, report), no_examples)
    return JudgeSpec(
        instruction=parsed("instruction", _instruction, ""),
        violating=violating,
        compliant=compliant,
        on_error=parsed("on_error", lambda n: nodes.choice(n, OnError), OnError.ALLOW),
    )


def _instruction(node: yaml.Node) -> str:
    value = nodes.scalar(node) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, str) or not value.strip():
        raise nodes.Invalid(node, _NO_INSTRUCTION)
    return value


def _examples(
    node: yaml.Node, report: Callable[[nodes.Invalid], None]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    fields, invalid = nodes.collect_fields(node, {"violating", "compliant"})
    for exc in invalid:
        report(exc)
    found: dict[str, tuple[str, ...]] = {}
    for key, value in fields.items():
        try:
            found[key] = nodes.texts(value, non_empty=False)
        except nodes.Invalid as exc:
            report(exc)
    return found.get("violating", ()), found.get("compliant", ())


def _max_tokens(node: yaml.Node) -> MaxTokensSpec:
    value = nodes.scalar(node)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise nodes.Invalid(node, "max_tokens must be a positive integer")
    return MaxTokensSpec(value)
