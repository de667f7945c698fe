"""Measure the shipped policy pack against the labelled corpus, with the issue's targets.

    .venv/bin/python bench/eval.py [--corpus ../shared/corpus] [--policies DIR] [--json]

Runs `gateway eval --json` on each corpus file (and on the subsets a target names: Presidio's
credit card, email, SSN, IP and IBAN cases; the English rows of the injection sets) and prints
one table: recall and false-positive rate per set, the target, and whether it is met. The
corpus is read where it lies and never copied into the project.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]
PRESIDIO_TARGETS = ("credit_card", "email", "us_ssn", "ip", "iban")
_GERMAN = re.compile(
    r"\b(der|die|das|und|ist|nicht|ich|sie|mit|für|ein|eine|zu|auf|wie|was|bitte|du|wir|sind|"
    r"oder|auch|vergiss|alle|schreibe|mir|dich|über)\b",
    re.IGNORECASE,
)
_ENGLISH = re.compile(
    r"\b(the|and|is|not|you|with|for|a|to|on|how|what|please|are|or|all|write|me|about|of|in|your)\b",
    re.IGNORECASE,
)


def english(row: Row) -> bool:
    text = row["text"]
    return len(_ENGLISH.findall(text)) >= len(_GERMAN.findall(text))


@dataclass(frozen=True)
class Target:
    name: str
    file: str
    keep: Callable[[Row], bool] | None = None
    min_recall: float | None = None
    max_fpr: float | None = None
    min_action: str = "log"
    max_flagged: int | None = None  # at most this many texts flagged (with min_action)


TARGETS = (
    Target("gitleaks rule samples", "secrets/gitleaks_rule_samples.jsonl", min_recall=0.97, max_fpr=0.05),
    Target("detect-secrets cases", "secrets/detect_secrets_cases.jsonl", min_recall=0.80),
    *(
        Target(
            f"presidio {kind}",
            "pii/presidio_recognizer_cases.jsonl",
            keep=lambda row, kind=kind: row.get("recognizer_test") == f"test_{kind}_recognizer.py",
            min_recall=0.90,
        )
        for kind in PRESIDIO_TARGETS
    ),
    Target("presidio, all recognizers", "pii/presidio_recognizer_cases.jsonl"),
    Target("deepset injections, English", "injection/deepset_prompt_injections.jsonl", english, 0.50),
    Target("deepset injections, all", "injection/deepset_prompt_injections.jsonl"),
    Target("llm-guard injections, English", "injection/llm_guard_cases.jsonl", english, 0.50),
    Target("notinject benign", "injection/notinject_benign.jsonl", max_fpr=0.03),
    Target("benign pool", "benign/benign_pool.jsonl", max_fpr=0.01),
    Target("benign pool, block rules", "benign/benign_pool.jsonl", min_action="block", max_flagged=3),
    Target("jailbreakbench attacks (no target)", "topics/jbb_attacks.jsonl"),
    Target("jailbreakbench benign (no target)", "topics/jbb_benign.jsonl"),
)


def run_eval(files: list[Path], policies: list[str], min_action: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "gateway", "eval", "--json", "--min-action", min_action]
    for policy in policies:
        command += ["--policies", policy]
    result = subprocess.run([*command, *map(str, files)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"gateway eval failed:\n{result.stderr}")
    return dict(json.loads(result.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "corpus"
    )
    parser.add_argument("--policies", action="append", default=[], metavar="DIR")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, target in enumerate(TARGETS):
            source = args.corpus / target.file
            path = source
            if target.keep is not None:
                rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line]
                path = Path(scratch) / f"{index}.jsonl"
                path.write_text(
                    "".join(json.dumps(r) + "\n" for r in rows if target.keep(r)), encoding="utf-8"
                )
            counts = run_eval([path], args.policies, target.min_action)["files"][str(path)]
            results.append((target, counts))
    if args.json:
        print(json.dumps([{"set": t.name, **c} for t, c in results], indent=2))
        return
    print("| set | texts | flagged | recall | false-positive rate | target | met |")
    print("|---|---:|---:|---:|---:|---|---|")
    failed = 0
    for target, c in results:
        texts, flagged = c["tp"] + c["fp"] + c["fn"] + c["tn"], c["tp"] + c["fp"]
        goal, met = _judge(target, c, flagged)
        failed += met == "no"
        recall = "-" if c["recall"] is None else f"{c['recall']:.3f}"
        fpr = "-" if c["false_positive_rate"] is None else f"{c['false_positive_rate']:.3f}"
        print(f"| {target.name} | {texts} | {flagged} | {recall} | {fpr} | {goal} | {met} |")
    print(f"\n{failed} target(s) missed")


def _judge(target: Target, counts: dict[str, Any], flagged: int) -> tuple[str, str]:
    goals, ok = [], True
    if target.min_recall is not None:
        goals.append(f"recall ≥ {target.min_recall}")
        ok &= (counts["recall"] or 0) >= target.min_recall
    if target.max_fpr is not None:
        goals.append(f"fpr ≤ {target.max_fpr}")
        ok &= (counts["false_positive_rate"] or 0) <= target.max_fpr
    if target.max_flagged is not None:
        goals.append(f"≤ {target.max_flagged} blocked")
        ok &= flagged <= target.max_flagged
    if not goals:
        return "-", "-"
    return ", ".join(goals), "yes" if ok else "no"


if __name__ == "__main__":
    main()
