"""Measuring a rule set on labelled text: JSON lines ``{"text": ..., "label": 0 | 1}``.

A text that a judge rule leaves pending (no judge given, no recorded verdict, or the model gave
none) is counted ``unjudged``, apart from tp/fp/fn/tn: precision and recall are over the texts
that were decided, and a text the judge never saw is not counted as passed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.policy import Action, RuleSet, Stage, evaluate
from gateway.policy.selftest import Judge, Unjudged


class EvalInputError(ValueError):
    """A labelled file could not be read; the message names file and line."""


@dataclass(slots=True)
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    unjudged: int = 0

    def add(self, *, flagged: bool | None, label: bool) -> None:
        """``flagged`` None: only the judge could say, and it did not."""
        if flagged is None:
            self.unjudged += 1
        elif flagged and label:
            self.tp += 1
        elif flagged:
            self.fp += 1
        elif label:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def false_positive_rate(self) -> float | None:
        return _ratio(self.fp, self.fp + self.tn)

    def as_dict(self, *, judged: bool = False) -> dict[str, int | float | None]:
        counts: dict[str, int | float | None] = {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "precision": _rounded(self.precision),
            "recall": _rounded(self.recall),
            "false_positive_rate": _rounded(self.false_positive_rate),
        }
        if judged:
            counts["unjudged"] = self.unjudged
        return counts


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass(slots=True)
class EvalReport:
    files: dict[str, Counts] = field(default_factory=dict)
    rules: dict[str, Counts] = field(default_factory=dict)
    # A rule set with judge rules reports unjudged counts; one without keeps the columns it had.
    judged: bool = False
    # Texts some rule was left pending on, by why: "no judge", "missing", or the judge error's kind.
    unjudged: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> str:
        judged = self.judged
        return json.dumps(
            {
                "files": {name: counts.as_dict(judged=judged) for name, counts in self.files.items()},
                "rules": {rule: counts.as_dict(judged=judged) for rule, counts in self.rules.items()},
            },
            indent=2,
        )


def read_labelled(path: Path) -> Iterator[tuple[str, bool]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise EvalInputError(f'{path}:{number}: expected {{"text", "label"}}: {exc}') from None
            if not isinstance(text, str) or label not in (0, 1):
                raise EvalInputError(f"{path}:{number}: text must be a string and label 0 or 1")
            yield text, bool(label)


def flagged_rules(
    ruleset: RuleSet, text: str, min_action: Action, judge: Judge | None = None
) -> tuple[set[str], set[str], str | None]:
    """Rules that flag the text at any stage, counting a shadow rule as the log it acts as; the
    rules left pending (flagging nowhere else); and why they are, when some are."""
    flagged: set[str] = set()
    pending: set[str] = set()
    why: str | None = None
    for stage in Stage:
        decision = evaluate(ruleset, stage, text)
        # Only rules that could flag at this threshold are worth a model's call.
        if any(rule.effective_action >= min_action for rule in decision.pending):
            if judge is None:
                why = "no judge"
            else:
                try:
                    decision = judge(ruleset, decision, text)
                except Unjudged as exc:
                    why = exc.kind
        flagged.update(v.rule_id for v in decision.violations if v.effective_action >= min_action)
        pending.update(p.rule_id for p in decision.pending if p.effective_action >= min_action)
    pending -= flagged
    return flagged, pending, why if pending else None


def eval_files(
    ruleset: RuleSet, paths: Iterable[Path], *, min_action: str = "log", judge: Judge | None = None
) -> EvalReport:
    threshold = Action[min_action.upper()]
    report = EvalReport(
        rules={rule.id: Counts() for rule in ruleset.rules},
        judged=any(ruleset.plan(stage).judged for stage in Stage),
    )
    for path in paths:
        counts = report.files.setdefault(str(path), Counts())
        for text, label in read_labelled(path):
            hits, pending, why = flagged_rules(ruleset, text, threshold, judge)
            counts.add(flagged=True if hits else (None if pending else False), label=label)
            for rule_id, rule_counts in report.rules.items():
                rule_counts.add(flagged=None if rule_id in pending else rule_id in hits, label=label)
            if why is not None:
                report.unjudged[why] += 1
    return report


def render_eval(report: EvalReport) -> str:
    header = f"{'':<48} {'tp':>5} {'fp':>5} {'fn':>5} {'tn':>5} {'prec':>6} {'recall':>6} {'fpr':>6}"
    if report.judged:
        header += f" {'unjudged':>8}"
    lines = [header.replace(" " * 48, "file".ljust(48), 1)]
    lines += [_row(name, counts, report.judged) for name, counts in report.files.items()]
    lines += ["", header.replace(" " * 48, "rule".ljust(48), 1)]
    lines += [_row(rule, counts, report.judged) for rule, counts in report.rules.items()]
    return "\n".join(lines)


def _row(name: str, counts: Counts, judged: bool) -> str:
    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    unjudged = f" {counts.unjudged:>8}" if judged else ""
    return (
        f"{name[-48:]:<48} {counts.tp:>5} {counts.fp:>5} {counts.fn:>5} {counts.tn:>5} "
        f"{show(counts.precision):>6} {show(counts.recall):>6} {show(counts.false_positive_rate):>6}"
        f"{unjudged}"
    )
