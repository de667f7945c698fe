"""Benchmark of the policy engine: ``evaluate`` against synthetic rule sets and text sizes.

Run from the project root:

    .venv/bin/python bench/engine.py            # full run, markdown tables
    .venv/bin/python bench/engine.py --quick    # smoke run, fewer repetitions
    .venv/bin/python bench/engine.py --json     # results as JSON

Rule sets of 10, 100 and 1000 rules (secret-like regexes, keyword rules, detectors) and texts
of 1, 16 and 256 KB are generated from a fixed seed. Every text carries planted matches near
its end, checked once per cell, so a set that RE2 silently gave up on would fail loudly.
Cells are interleaved over rounds and the median of all per-call samples is reported.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import time

from gateway.policy import Action, Rule, RuleSet, Severity, Stage, compile_ruleset, evaluate, load_ruleset
from gateway.policy.model import DetectorSpec, KeywordsSpec, RegexSpec

SEED = 20240611
RULE_COUNTS = (10, 100, 1000)
SIZES = {"1 KB": 1 << 10, "16 KB": 16 << 10, "256 KB": 256 << 10}
# Nested sets: the rule at index i is the same in every set that holds it.
DETECTORS = {3: "credit_card", 7: "email", 30: "jwt", 50: "iban", 70: "us_ssn", 90: "generic_secret"}
# Character class of a secret's body -> the characters it allows.
CLASSES = {
    "0-9a-f": string.hexdigits[:16],
    "A-Za-z0-9": string.ascii_letters + string.digits,
    "A-Z2-7": string.ascii_uppercase + "234567",
    "0-9A-Z": string.digits + string.ascii_uppercase,
    "A-Za-z0-9_": string.ascii_letters + string.digits + "_",
}
EMAIL = "ops.team@example.org"
# No credential-like names (pass, secret, token, ...): prose must not trip generic_secret.
_PROSE = """the a of and to in is it that for on with as was by this be are from at or an have not
which but all were when we there can more if has will one about up out so what their would
into been them some could time only new these other may then first any like now such over
system request response model policy gateway user service cluster latency budget review draft
report change deploy release version branch merge commit build test config value result error
retry queue worker cache index table schema field record batch stream event handler client
server network region storage bucket object message payload header method route path session
customer account invoice order product price team meeting quarter plan roadmap metric alert
quickly carefully usually already often still again later soon never always today tomorrow
simple large small stable slow fast clear final internal external public shared default"""
WORDS = _PROSE.split()
CODE = (
    "def {a}_{b}({c}, {d}=None):",
    "    {a} = {b}.{c}({d}, timeout={n})",
    "    if {a} is not None:",
    "        return {a}[{n}]",
    "for {a} in {b}.{c}():",
    "{a}_{b}: int = {n}",
    "import {a}.{b}",
    "    {a}.{b}_{c}.append({d})",
    "# {a} {b} {c} {d}",
)


def secret_rule(index: int, rng: random.Random, prefixes: set[str]) -> tuple[Rule, str]:
    """A secret-like regex rule with a distinct prefix, and a string it matches."""
    prefix = ""
    while not prefix or prefix in prefixes:
        letters = rng.choice(("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
        prefix = "".join(rng.choices(letters, k=rng.randint(2, 4))) + rng.choice(("_", "-", ""))
    prefixes.add(prefix)
    cls, length = rng.choice(sorted(CLASSES)), rng.randint(16, 48)
    infixes = tuple(rng.sample(("live_", "test_", "prod_", "dev_"), 2)) if rng.random() < 0.2 else ()
    pattern = rf"\b{prefix}{'(?:' + '|'.join(infixes) + ')' if infixes else ''}[{cls}]{{{length}}}\b"
    sample = prefix + (infixes[0] if infixes else "") + "".join(rng.choices(CLASSES[cls], k=length))
    rule = Rule(
        f"bench.rule-{index + 1:04d}", f"secret {prefix}", Severity.HIGH, Action.BLOCK, RegexSpec(pattern)
    )
    return rule, sample


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(3, 4)))


def build_rules(count: int, rng: random.Random) -> tuple[list[Rule], dict[str, str]]:
    """``count`` rules and, for each regex rule, a string it matches."""
    rules: list[Rule] = []
    samples: dict[str, str] = {}
    prefixes: set[str] = set()
    for index in range(count):
        rule_id = f"bench.rule-{index + 1:04d}"
        if index in DETECTORS:
            name = DETECTORS[index]
            rules.append(Rule(rule_id, name, Severity.MEDIUM, Action.ALERT, DetectorSpec(name)))
        elif index == 0 or rng.random() < 0.66:
            rule, samples[rule_id] = secret_rule(index, rng, prefixes)
            rules.append(rule)
        else:
            words = [pseudo_word(rng) for _ in range(rng.randint(2, 4))]
            if rng.random() < 0.2:
                words[0] += " " + pseudo_word(rng)
            assert not set(words) & set(WORDS)
            rules.append(Rule(rule_id, "keywords", Severity.LOW, Action.LOG, KeywordsSpec(tuple(words))))
    return rules, samples


def build_text(size: int, rng: random.Random, plant: str) -> str:
    """Prose and code-like lines, ``size`` characters, with ``plant`` ~150 characters from the end."""
    parts: list[str] = []
    length = 0
    while length < size:
        sentences = (
            " ".join(rng.choices(WORDS, k=rng.randint(6, 18))).capitalize() + "."
            for _ in range(rng.randint(3, 6))
        )
        block = " ".join(sentences) + "\n\n"
        if rng.random() < 0.5:
            lines = (
                rng.choice(CODE).format(**{k: rng.choice(WORDS[80:]) for k in "abcd"}, n=rng.randint(1, 999))
                for _ in range(rng.randint(3, 8))
            )
            block += "\n".join(lines) + "\n\n"
        parts.append(block)
        length += len(block)
    body = "".join(parts)
    cut = max(0, size - len(plant) - 150)
    return (body[:cut] + plant + body[cut:])[:size]


def run(quick: bool) -> dict[str, object]:
    rng = random.Random(SEED)
    rules, samples = build_rules(max(RULE_COUNTS), rng)
    last_regex = max(samples)  # a regex rule near the end of the largest set
    plant = (
        f"\nPlease revoke {samples['bench.rule-0001']} and {samples[last_regex]} before Friday, "
        f"questions to {EMAIL} thanks.\n"
    )
    texts = {label: build_text(size, rng, plant) for label, size in SIZES.items()}
    planted = {"bench.rule-0001", last_regex, "bench.rule-0008"}  # rule 0008 is the email detector

    sets: dict[str, RuleSet] = {}
    compile_ms: dict[str, float] = {}
    for count in RULE_COUNTS:
        subset = tuple(rules[:count])
        times = []
        for _ in range(1 if quick else 3):
            start = time.perf_counter_ns()
            sets[str(count)] = compile_ruleset(subset, f"bench-{count}")
            times.append((time.perf_counter_ns() - start) / 1e6)
        compile_ms[str(count)] = statistics.median(times)
    start = time.perf_counter_ns()
    builtin = load_ruleset()  # YAML loading included
    sets[name := f"built-in ({len(builtin.rules)})"] = builtin
    compile_ms[name] = (time.perf_counter_ns() - start) / 1e6

    # Once per cell: the planted matches, and on the synthetic sets nothing else, must be found.
    first_call_ms: dict[str, float] = {}
    for row, ruleset in sets.items():
        ids = {rule.id for rule in ruleset.rules}
        expected = planted & ids if row != name else {"pii.email"} & ids
        for label, text in texts.items():
            start = time.perf_counter_ns()
            decision = evaluate(ruleset, Stage.PROMPT, text)
            first_call_ms.setdefault(row, (time.perf_counter_ns() - start) / 1e6)
            found = {violation.rule_id for violation in decision.violations}
            if not expected <= found or (row != name and found != expected):
                raise SystemExit(f"{row} rules / {label}: expected {sorted(expected)}, got {sorted(found)}")

    rounds, budget_s, min_reps = (1, 0.03, 5) if quick else (3, 0.2, 5)
    cells = [(row, label) for row in sets for label in texts]
    results: dict[tuple[str, str], list[int]] = {cell: [] for cell in cells}
    for _ in range(rounds):
        for row, label in cells:
            ruleset, text = sets[row], texts[label]
            start = time.perf_counter_ns()
            evaluate(ruleset, Stage.PROMPT, text)
            reps = max(min_reps, int(budget_s * 1e9 / max(time.perf_counter_ns() - start, 1)))
            for _ in range(reps):
                start = time.perf_counter_ns()
                evaluate(ruleset, Stage.PROMPT, text)
                results[row, label].append(time.perf_counter_ns() - start)

    table = {row: {label: statistics.median(results[row, label]) / 1000 for label in texts} for row in sets}
    big, small = table["1000"]["16 KB"], table["10"]["16 KB"]
    return {
        "median_us": table,
        "samples": {f"{row} / {label}": len(results[row, label]) for row, label in cells},
        "compile_ms": compile_ms,
        "first_call_ms": first_call_ms,
        "target": {
            "us_1000_16kb": big,
            "ratio_1000_to_10_16kb": big / small,
            "met": big <= 150 and big / small <= 3,
        },
    }


def print_markdown(result: dict[str, object]) -> None:
    table = result["median_us"]
    assert isinstance(table, dict)
    print("| rules | " + " | ".join(SIZES) + " |")
    print("|---" * (len(SIZES) + 1) + "|")
    for row, cells in table.items():
        print(f"| {row} | " + " | ".join(f"{cells[label]:.1f}" for label in SIZES) + " |")
    target = result["target"]
    assert isinstance(target, dict)
    print(
        f"\n1000 rules on 16 KB: {target['us_1000_16kb']:.1f} µs (target ≤ 150 µs), "
        f"ratio to 10 rules: {target['ratio_1000_to_10_16kb']:.2f} (target ≤ 3x)"
        f" -> {'met' if target['met'] else 'MISSED'}\n"
    )
    compile_ms, first_call = result["compile_ms"], result["first_call_ms"]
    assert isinstance(compile_ms, dict)
    assert isinstance(first_call, dict)
    print("| rules | compile (ms) | first evaluate, 1 KB, cold DFA (ms) |\n|---|---|---|")
    for row, ms in compile_ms.items():
        print(f"| {row} | {ms:.1f} | {first_call[row]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, for a smoke run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    result = run(args.quick)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_markdown(result)


if __name__ == "__main__":
    main()
