"""Measuring a rule set on labelled text: JSON lines ``{"text": ..., "label": 0 | 1}``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.policy import Action, RuleSet, Stage, evaluate


class EvalInputError(ValueError):
    """A labelled file could not be read; the message names file and line."""


@dataclass(slots=True)
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, *, flagged: bool, label: bool) -> None:
        if flagged and label:
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

    def as_dict(self) -> dict[str, int | float | None]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "precision": _rounded(self.precision),
            "recall": _rounded(self.recall),
            "false_positive_rate": _rounded(self.false_positive_rate),
        }


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass(slots=True)
class EvalReport:
    files: dict[str, Counts] = field(default_factory=dict)
    rules: dict[str, Counts] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "files": {name: counts.as_dict() for name, counts in self.files.items()},
                "rules": {rule: counts.as_dict() for rule, counts in self.rules.items()},
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


def flagged_rules(ruleset: RuleSet, text: str, min_action: Action) -> set[str]:
    """Rules that flag the text at any stage, counting a shadow rule as the log it acts as."""
    return {
        violation.rule_id
        for stage in Stage
        for violation in evaluate(ruleset, stage, text).violations
        if violation.effective_action >= min_action
    }


def eval_files(ruleset: RuleSet, paths: Iterable[Path], *, min_action: str = "log") -> EvalReport:
    threshold = Action[min_action.upper()]
    report = EvalReport(rules={rule.id: Counts() for rule in ruleset.rules})
    for path in paths:
        counts = report.files.setdefault(str(path), Counts())
        for text, label in read_labelled(path):
            hits = flagged_rules(ruleset, text, threshold)
            counts.add(flagged=bool(hits), label=label)
            for rule_id, rule_counts in report.rules.items():
                rule_counts.add(flagged=rule_id in hits, label=label)
    return report


def render_eval(report: EvalReport) -> str:
    header = f"{'':<48} {'tp':>5} {'fp':>5} {'fn':>5} {'tn':>5} {'prec':>6} {'recall':>6} {'fpr':>6}"
    lines = [header.replace(" " * 48, "file".ljust(48), 1)]
    lines += [_row(name, counts) for name, counts in report.files.items()]
    lines += ["", header.replace(" " * 48, "rule".ljust(48), 1)]
    lines += [_row(rule, counts) for rule, counts in report.rules.items()]
    return "\n".join(lines)


def _row(name: str, counts: Counts) -> str:
    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return (
        f"{name[-48:]:<48} {counts.tp:>5} {counts.fp:>5} {counts.fn:>5} {counts.tn:>5} "
        f"{show(counts.precision):>6} {show(counts.recall):>6} {show(counts.false_positive_rate):>6}"
    )
