"""Running the ``tests`` each rule carries: every text checked against that rule alone."""

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
class SelfTestReport:
    rules: int
    cases: int
    failures: tuple[CaseFailure, ...]


def run_rule_tests(rules: tuple[Rule, ...]) -> SelfTestReport:
    failures: list[CaseFailure] = []
    cases = 0
    for rule in rules:
        # A rule's tests check what it matches, not where it applies: scope is left out.
        unscoped = replace(rule, scope=Scope())
        single = compile_ruleset((unscoped,), "selftest")
        for expected, texts in ((True, rule.tests.match), (False, rule.tests.no_match)):
            for text in texts:
                cases += 1
                matched = any(evaluate(single, stage, text).violations for stage in unscoped.stages)
                if matched != expected:
                    failures.append(CaseFailure(rule.id, rule.source, rule.line, text, expected))
    return SelfTestReport(len(rules), cases, tuple(failures))
