"""Running the ``tests`` each rule carries: every text checked against that rule alone.

A judge rule's case that only the model can decide is skipped and counted, never passed or
failed; a case its patterns decide (a gate that does not open) is run like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.policy.engine import evaluate
from gateway.policy.model import Rule, Scope
from gateway.policy.ruleset import compile_ruleset


@dataclass(frozen=True, slots=True)
class CaseFailure:
    rule_id: str
    source: str
    line: int
    text: str
    expected_match: bool

    def describe(self) -> str:
        want, got = ("match", "no match") if self.expected_match else ("no match", "match")
        return f"{self.source}:{self.line}: {self.rule_id}: expected {want}, got {got}: {self.text!r}"


@dataclass(frozen=True, slots=True)
class NeedsJudge:
    """The cases of one rule that were skipped: only the model could decide them."""

    rule_id: str
    source: str
    line: int
    cases: int

    def describe(self) -> str:
        counted = f"{self.cases} case{'' if self.cases == 1 else 's'}"
        return f"{self.source}:{self.line}: {self.rule_id}: needs the judge: skipped ({counted})"


@dataclass(frozen=True, slots=True)
class SelfTestReport:
    rules: int
    cases: int
    failures: tuple[CaseFailure, ...]
    skipped: tuple[NeedsJudge, ...] = ()

    @property
    def skipped_cases(self) -> int:
        return sum(rule.cases for rule in self.skipped)


def run_rule_tests(rules: tuple[Rule, ...]) -> SelfTestReport:
    failures: list[CaseFailure] = []
    skipped: list[NeedsJudge] = []
    cases = 0
    for rule in rules:
        # A rule's tests check what it matches, not where it applies: scope is left out.
        unscoped = replace(rule, scope=Scope())
        single = compile_ruleset((unscoped,), "selftest")
        undecided = 0
        for expected, texts in ((True, rule.tests.match), (False, rule.tests.no_match)):
            for text in texts:
                cases += 1
                decisions = [evaluate(single, stage, text) for stage in unscoped.stages]
                matched = any(decision.violations for decision in decisions)
                if not matched and any(decision.pending for decision in decisions):
                    undecided += 1
                elif matched != expected:
                    failures.append(CaseFailure(rule.id, rule.source, rule.line, text, expected))
        if undecided:
            skipped.append(NeedsJudge(rule.id, rule.source, rule.line, undecided))
    return SelfTestReport(len(rules), cases, tuple(failures), tuple(skipped))
