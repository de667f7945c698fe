"""Compilation of loaded rules into an immutable, per-stage rule set.

Every regex, keyword and detector candidate of a stage becomes one probe in a single
``re2.Set``: one pass over the text says which probes hit, and only the rules owning those
probes are looked at again. Rules that can match with no probe hitting (``not``,
``max_tokens``, a ``judge`` that no pattern gates) are evaluated on every text of their stage.
The patterns of an ``except`` join the set too: they are searched only in a text where the set
saw them and the rule found a match.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import re2

from gateway.policy.detectors import BUILTIN, Validator
from gateway.policy.errors import PolicyError, Problem
from gateway.policy.model import (
    AllSpec,
    AnySpec,
    DetectorSpec,
    ExceptSpec,
    JudgeCheck,
    JudgeSpec,
    KeywordsSpec,
    MatchSpec,
    MaxTokensSpec,
    NotSpec,
    RegexSpec,
    Rule,
    Stage,
    walk_specs,
)
from gateway.policy.patterns import SET_MAX_MEM, compile_pattern, keyword_pattern, options


@dataclass(frozen=True, slots=True)
class Probe:
    """One pattern of the stage's set, with what confirms a candidate and which part to report."""

    index: int
    regex: Any
    group: int
    validate: Validator | None = None
    params: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProbeNode:
    probe: Probe


@dataclass(frozen=True, slots=True)
class AnyNode:
    parts: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class ExceptNode:
    """Spans of ``part`` (probes outside the set) that the other parts' matches must not overlap."""

    part: Node


@dataclass(frozen=True, slots=True)
class AllNode:
    parts: tuple[Node, ...]
    # Written as parts of the ``all``; kept apart, since they match nothing themselves.
    exceptions: tuple[ExceptNode, ...] = ()


@dataclass(frozen=True, slots=True)
class NotNode:
    part: Node


@dataclass(frozen=True, slots=True)
class MaxTokensNode:
    limit: int


@dataclass(frozen=True, slots=True)
class JudgeNode:
    """The model's verdict on the whole text: unknown until the caller supplies it."""

    check: JudgeCheck


Node = ProbeNode | AnyNode | AllNode | NotNode | MaxTokensNode | ExceptNode | JudgeNode


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule: Rule
    node: Node


@dataclass(frozen=True, slots=True)
class StagePlan:
    rules: tuple[CompiledRule, ...]
    matcher: Any  # re2.Set, or None when the stage has no probe
    owner: tuple[int, ...]  # probe index -> index in ``rules``
    always: frozenset[int]  # rules evaluated whatever the set reports
    # Rules holding a judge, evaluated three-valued; empty, the plan evaluates as it always did.
    judged: frozenset[int] = frozenset()

    @property
    def probe_count(self) -> int:
        return len(self.owner)


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    revision: str
    plans: Mapping[Stage, StagePlan]

    def plan(self, stage: Stage) -> StagePlan:
        return self.plans[stage]


class _PlanBuilder:
    def __init__(self, set_max_mem: int) -> None:
        self.matcher = re2.Set.SearchSet(options(set_max_mem))
        self.owner: list[int] = []
        self.rules: list[CompiledRule] = []
        self.always: set[int] = set()
        self.judged: set[int] = set()
        self._judge_keys: Iterator[str] = iter(())

    def add(self, rule: Rule) -> None:
        rule_index = len(self.rules)
        judges = sum(isinstance(spec, JudgeSpec) for spec in walk_specs(rule.match))
        if judges:
            self.judged.add(rule_index)
        # Keyed in the order written, which is the order ``_node`` meets them in.
        keys = [rule.id] if judges == 1 else [f"{rule.id}#{n}" for n in range(1, judges + 1)]
        self._judge_keys = iter(keys)
        node = self._node(rule.match, rule_index)
        self.rules.append(CompiledRule(rule, node))
        if may_match_without_probes(node):
            self.always.add(rule_index)

    def _probe(
        self,
        pattern: str,
        rule_index: int,
        validate: Validator | None = None,
        params: Mapping[str, object] | None = None,
    ) -> ProbeNode:
        regex = compile_pattern(pattern)
        index = self.matcher.Add(pattern)
        self.owner.append(rule_index)
        group = regex.groupindex.get("v", 0)
        return ProbeNode(Probe(index, regex, group, validate, MappingProxyType(dict(params or {}))))

    def _node(self, spec: MatchSpec, rule_index: int) -> Node:
        match spec:
            case RegexSpec(pattern):
                return self._probe(pattern, rule_index)
            case KeywordsSpec(words):
                return AnyNode(tuple(self._probe(keyword_pattern(w), rule_index) for w in words))
            case DetectorSpec(name, params):
                detector = BUILTIN[name]
                resolved: dict[str, object] = {key: param.default for key, param in detector.params.items()}
                resolved.update(params)
                return self._probe(detector.pattern, rule_index, detector.validate, resolved)
            case MaxTokensSpec(limit):
                return MaxTokensNode(limit)
            case JudgeSpec(instruction, violating, compliant, on_error):
                key = next(self._judge_keys)
                return JudgeNode(JudgeCheck(key, instruction, violating, compliant, on_error))
            case AnySpec(parts):
                return AnyNode(tuple(self._node(part, rule_index) for part in parts))
            case AllSpec(parts):
                return AllNode(
                    tuple(self._node(p, rule_index) for p in parts if not isinstance(p, ExceptSpec)),
                    tuple(
                        ExceptNode(self._node(p.part, rule_index)) for p in parts if isinstance(p, ExceptSpec)
                    ),
                )
            case NotSpec(part):
                return NotNode(self._node(part, rule_index))
            case ExceptSpec():
                raise AssertionError("the loader accepts 'except' only inside 'all'")

    def build(self, stage: Stage, set_max_mem: int) -> StagePlan:
        matcher = None
        if self.owner:
            try:
                self.matcher.Compile()
            except re2.error:
                # Once compiled, a set never fails at match time (RE2's many-match DFA flushes
                # its cache instead of bailing out), so a too-small budget shows here, loudly.
                raise PolicyError(
                    [
                        Problem(
                            "<rule set>",
                            0,
                            "",
                            f"stage {stage.value}: {len(self.owner)} patterns do not fit RE2's "
                            f"{set_max_mem / 2**20:g} MiB budget; remove or merge rules",
                        )
                    ]
                ) from None
            matcher = self.matcher
        return StagePlan(
            tuple(self.rules), matcher, tuple(self.owner), frozenset(self.always), frozenset(self.judged)
        )


def may_match_without_probes(node: Node) -> bool:
    """Whether the node could match on a text where no probe of the set hit."""
    match node:
        case ProbeNode():
            return False
        case MaxTokensNode():
            return True
        case AnyNode(parts):
            return any(may_match_without_probes(part) for part in parts)
        case AllNode(parts):
            # Exceptions only take matches away: they never make a rule match.
            return all(may_match_without_probes(part) for part in parts)
        case NotNode():
            return True
        case JudgeNode():
            # Unknown on any text, and possibly true: only a pattern beside it in an ``all`` gates it.
            return True
        case ExceptNode():
            return False


def holds_judge(node: Node) -> bool:
    match node:
        case JudgeNode():
            return True
        case AnyNode(parts) | AllNode(parts):
            return any(holds_judge(part) for part in parts)
        case NotNode(part):
            return holds_judge(part)
        case _:
            return False


def compile_ruleset(rules: tuple[Rule, ...], revision: str, *, set_max_mem: int = SET_MAX_MEM) -> RuleSet:
    """Compile loaded rules; patterns are expected to have been checked by the loader."""
    builders = {stage: _PlanBuilder(set_max_mem) for stage in Stage}
    for rule in rules:
        for stage in Stage:
            if stage in rule.stages:
                builders[stage].add(rule)
    plans = {stage: builder.build(stage, set_max_mem) for stage, builder in builders.items()}
    return RuleSet(rules, revision, MappingProxyType(plans))
