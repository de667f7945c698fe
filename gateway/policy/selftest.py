"""Running the ``tests`` each rule carries: every text checked against that rule alone.

A judge rule's case that only the model can decide is decided by the ``judge`` the caller
passes (recorded verdicts or a model, gateway/judge/offline.py), and fails when the judge gives
no verdict; without one it is skipped and counted, never passed or failed. A case its patterns
decide (a gate that does not open) is run like any other and never reaches the judge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from gateway.policy.engine import evaluate
from gateway.policy.model import Decision, Rule, Scope
from gateway.policy.ruleset import RuleSet, compile_ruleset


class Unjudged(Exception):
    """The judge gave no verdict on a text. ``kind`` is short and bounded; the message names
    check keys, never the text."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# Completes a decision left pending (``engine.complete`` with the judge's verdicts), or raises Unjudged.
Judge = Callable[[RuleSet, Decision, str], Decision]


@dataclass(frozen=True, slots=True)
class CaseFailure:
    rule_id: str
    source: str
    line: int
    text: str
    expected_match: bool
    reason: str | None = None  # why the judge gave no verdict, when it gave none

    def describe(self) -> str:
        if self.reason is not None:
            return f"{self.source}:{self.line}: {self.rule_id}: {self.reason}: {self.text!r}"
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
    judged: int = 0  # cases the judge decided

    @property
    def skipped_cases(self) -> int:
        return sum(rule.cases for rule in self.skipped)


def run_rule_tests(rules: tuple[Rule, ...], judge: Judge | None = None) -> SelfTestReport:
    failures: list[CaseFailure] = []
    skipped: list[NeedsJudge] = []
    cases = judged = 0
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
                if not matched and judge is not None and any(d.pending for d in decisions):
                    try:
                        decisions = [judge(single, d, text) if d.pending else d for d in decisions]
                    except Unjudged as exc:
                        failures.append(
                            CaseFailure(rule.id, rule.source, rule.line, text, expected, str(exc))
                        )
                        continue
                    judged += 1
                    matched = any(decision.violations for decision in decisions)
                if not matched and any(decision.pending for decision in decisions):
                    undecided += 1
                elif matched != expected:
                    failures.append(CaseFailure(rule.id, rule.source, rule.line, text, expected))
        if undecided:
            skipped.append(NeedsJudge(rule.id, rule.source, rule.line, undecided))
    return SelfTestReport(len(rules), cases, tuple(failures), tuple(skipped), judged)
