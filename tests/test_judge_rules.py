"""Judge rules in the policy engine: loaded, evaluated three-valued, completed with verdicts."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import policy
from gateway.cli import main, render_decision
from gateway.policy import (
    Action,
    Context,
    Decision,
    Mode,
    PolicyError,
    Severity,
    Stage,
    evaluate,
    load_rules,
    load_ruleset,
)
from gateway.policy.loader import BUILTIN_POLICY_DIR
from gateway.policy.redaction import redaction_ruleset

Write = Callable[[dict[str, str]], Path]
CASES = Path(__file__).parent / "cases" / "engine.yaml"

GATED = "the contract says net 30"  # "contract" is 4-12
CLEAN = "hello there"
JUDGE = {"judge": "Do not share contract terms."}
GATE = {"keywords": ["contract"]}


def _rule(match: Any, rule_id: str = "t.rule", **fields: Any) -> dict[str, Any]:
    return {"id": rule_id, "name": "Rule", "severity": "high", "action": "block", "match": match, **fields}


def _ruleset(tmp_path: Path, *rules: dict[str, Any]) -> policy.RuleSet:
    directory = tmp_path / "judge-rules"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(yaml.safe_dump({"policies": list(rules)}), encoding="utf-8")
    return load_ruleset([directory])


def _outcome(decision: Decision, rule_id: str = "t.rule") -> tuple[str, list[Any]]:
    """("violation", spans), ("pending", keys of the checks needed) or ("none", [])."""
    for violation in decision.violations:
        if violation.rule_id == rule_id:
            return "violation", [(s.start, s.end) for s in violation.spans]
    for pending in decision.pending:
        if pending.rule_id == rule_id:
            return "pending", [check.key for check in pending.checks]
    return "none", []


# Loading.


def test_a_judge_is_loaded_in_its_short_and_its_rich_form(write_policies: Write) -> None:
    """The short form is an instruction; the rich form adds examples and on_error."""
    directory = write_policies(
        {
            "judge.yaml": """\
policies:
  - id: t.short
    name: Short
    severity: high
    action: block
    match: {judge: "Do not share customer personal data."}
  - id: t.rich
    name: Rich
    severity: medium
    action: alert
    match:
      all:
        - keywords: [contract]
        - judge:
            instruction: Do not share contract terms.
            examples:
              violating: ["the contract pays 5% a month"]
              compliant: ["we signed a contract"]
            on_error: block
"""
        }
    )
    short, rich = load_rules([directory])[0]
    assert short.match == policy.JudgeSpec("Do not share customer personal data.")
    assert short.match.on_error is policy.OnError.ALLOW
    judge = rich.match.parts[1]
    assert judge == policy.JudgeSpec(
        "Do not share contract terms.",
        violating=("the contract pays 5% a month",),
        compliant=("we signed a contract",),
        on_error=policy.OnError.BLOCK,
    )


BAD_JUDGES = """\
policies:
  - id: bad.empty
    name: Empty
    severity: low
    action: log
    match: {judge: "  "}
  - id: bad.keys
    name: Keys
    severity: low
    action: log
    match:
      judge:
        instructions: Do not swear.
        on_error: deny
  - id: bad.examples
    name: Examples
    severity: low
    action: log
    match:
      judge:
        instruction: Do not swear.
        examples: {violating: "damn", neutral: []}
  - id: bad.except
    name: Except
    severity: low
    action: log
    match:
      all:
        - keywords: [contract]
        - except: {judge: Do not swear.}
  - id: bad.list
    name: List
    severity: low
    action: log
    match:
      any:
        - judge: [Do not swear.]
        - judge: {instruction: ""}
  - id: bad.alone
    name: Except beside a judge only
    severity: low
    action: log
    match:
      all:
        - judge: Do not swear.
        - except: {keywords: [damn]}
"""


def test_bad_judges_are_refused_each_error_located(write_policies: Write) -> None:
    """Empty instructions, unknown keys, bad on_error, bad examples, a judge in except: all reported."""
    with pytest.raises(PolicyError) as raised:
        load_rules([write_policies({"bad.yaml": BAD_JUDGES})])
    got = [(p.line, p.rule_id, p.message) for p in raised.value.problems]
    assert all(Path(p.path).name == "bad.yaml" for p in raised.value.problems)
    empty = "a judge needs an instruction: what the rule forbids, in plain language"
    assert got == [
        (6, "bad.empty", empty),
        (13, "bad.keys", "unknown key 'instructions' (allowed: examples, instruction, on_error)"),
        (13, "bad.keys", "missing 'instruction'"),
        (14, "bad.keys", "expected allow | block, got 'deny'"),
        (22, "bad.examples", "unknown key 'neutral' (allowed: compliant, violating)"),
        (22, "bad.examples", "expected a list"),
        (
            30,
            "bad.except",
            "'except' takes regex, keywords, detector, or 'any' of them: something a match can overlap",
        ),
        (
            37,
            "bad.list",
            "judge takes an instruction, or a mapping of instruction, examples and on_error",
        ),
        (38, "bad.list", empty),
        (45, "bad.alone", "an 'all' with 'except' needs a part whose matches it excludes"),
    ]


def test_check_validates_judge_rules_like_any_other(
    write_policies: Write, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway check` accepts judge rules and refuses a bad one, located."""
    good = write_policies({"good.yaml": yaml.safe_dump({"policies": [_rule(JUDGE)]})})
    assert main(["check", str(good)]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 rules, revision ")
    (good / "bad.yaml").write_text(BAD_JUDGES, encoding="utf-8")
    assert main(["check", str(good)]) == 1
    assert f"{good / 'bad.yaml'}:6: bad.empty: a judge needs an instruction" in capsys.readouterr().err


# Compilation: only rules that can be true without a probe are looked at on every text.


def test_a_judge_only_rule_is_evaluated_on_every_text_and_a_gated_one_only_after_its_gate(
    tmp_path: Path,
) -> None:
    """A bare judge joins plan.always; a judge behind a keyword does not; both are marked judged."""
    ruleset = _ruleset(
        tmp_path,
        _rule(JUDGE, "t.bare"),
        _rule({"all": [GATE, JUDGE]}, "t.gated"),
        _rule({"regex": "x\\d+"}, "t.plain"),
    )
    plan = ruleset.plan(Stage.PROMPT)
    ids = [compiled.rule.id for compiled in plan.rules]
    assert {ids[i] for i in plan.always} == {"t.bare"}
    assert {ids[i] for i in plan.judged} == {"t.bare", "t.gated"}


def test_plans_without_judge_rules_mark_nothing_judged() -> None:
    """The shipped pack has no judge rule: its plans take the path they always took."""
    ruleset = load_ruleset([BUILTIN_POLICY_DIR])
    for stage in Stage:
        assert ruleset.plan(stage).judged == frozenset()


# Three-valued evaluation: a table of shapes and verdicts.

J1 = {"judge": "Do not share contract terms."}
J2 = {"judge": "Do not share prices."}
ALL = {"all": [GATE, JUDGE]}
ANY = {"any": [GATE, JUDGE]}
NOT = {"not": JUDGE}
NOT_ALL = {"not": ALL}
NDA = {"keywords": ["nda"]}
EXCEPTED = {"all": [GATE, JUDGE, {"except": {"keywords": ["contract template"]}}]}
EXCEPTED_ELSEWHERE = {"all": [GATE, JUDGE, {"except": {"keywords": ["template"]}}]}
ENCODED = "the%20contract"  # "contract" is 6-14, seen only once decoded
YES, NO = {"t.rule": True}, {"t.rule": False}
PENDING = ("pending", ["t.rule"])
NOTHING: tuple[str, list[Any]] = ("none", [])
WHOLE = ("violation", [(0, len(CLEAN))])
GATE_SPAN = ("violation", [(4, 12)])

KLEENE = [
    ("a bare judge without a verdict is pending", JUDGE, CLEAN, {}, PENDING),
    ("a bare judge found violated covers the whole text", JUDGE, CLEAN, YES, WHOLE),
    ("a bare judge found clean is nothing", JUDGE, CLEAN, NO, NOTHING),
    ("all with a failing gate is decided without the judge", ALL, CLEAN, {}, NOTHING),
    ("all with a failing gate ignores a verdict", ALL, CLEAN, YES, NOTHING),
    ("all with a passing gate is pending", ALL, GATED, {}, PENDING),
    ("all with a violating verdict reports the gate's spans", ALL, GATED, YES, GATE_SPAN),
    ("all with a clean verdict is nothing", ALL, GATED, NO, NOTHING),
    ("not judge without a verdict is pending", NOT, CLEAN, {}, PENDING),
    ("not judge found violated is nothing", NOT, CLEAN, YES, NOTHING),
    ("not judge found clean covers the whole text", NOT, CLEAN, NO, WHOLE),
    ("any with a true probe is decided without the judge", ANY, GATED, {}, GATE_SPAN),
    ("any with no probe is pending", ANY, CLEAN, {}, PENDING),
    ("any with a violating verdict covers the whole text", ANY, CLEAN, YES, WHOLE),
    ("any with a clean verdict is nothing", ANY, CLEAN, NO, NOTHING),
    (
        "two judges are keyed rule#1 and rule#2",
        {"all": [J1, J2]},
        CLEAN,
        {},
        ("pending", ["t.rule#1", "t.rule#2"]),
    ),
    ("all of two judges, one clean, is nothing", {"all": [J1, J2]}, CLEAN, {"t.rule#1": False}, NOTHING),
    (
        "any of two judges, one clean, needs only the other",
        {"any": [J1, J2]},
        CLEAN,
        {"t.rule#1": False},
        ("pending", ["t.rule#2"]),
    ),
    ("any of two judges, one violated, needs neither", {"any": [J1, J2]}, CLEAN, {"t.rule#1": True}, WHOLE),
    (
        "a judge under a false branch is not asked",
        {"any": [{"all": [NDA, J1]}, J2]},
        CLEAN,
        {},
        ("pending", ["t.rule#2"]),
    ),
    ("not of a failing gate is true without the judge", NOT_ALL, CLEAN, {}, WHOLE),
    ("not of a passing gate is pending", NOT_ALL, GATED, {}, PENDING),
    (
        "not of a passing gate and a clean verdict covers the whole text",
        NOT_ALL,
        GATED,
        NO,
        ("violation", [(0, 24)]),
    ),
    (
        "a second probe decides an any under all",
        {"all": [GATE, {"any": [JUDGE, NDA]}]},
        "contract and nda",
        {},
        ("violation", [(0, 8), (13, 16)]),
    ),
    ("an excepted gate is decided without the judge", EXCEPTED, "use the contract template", {}, NOTHING),
    ("a gate beside an exception elsewhere is pending", EXCEPTED_ELSEWHERE, GATED, {}, PENDING),
    ("a gate seen only in a decoded view is pending", ALL, ENCODED, {}, PENDING),
    ("a decoded view's gate spans map back to the text", ALL, ENCODED, YES, ("violation", [(6, 14)])),
]


@pytest.mark.parametrize(
    ("match", "text", "verdicts", "want"),
    [pytest.param(match, text, verdicts, want, id=note) for note, match, text, verdicts, want in KLEENE],
)
def test_judge_rules_combine_with_kleene_logic(
    tmp_path: Path, match: Any, text: str, verdicts: Mapping[str, bool], want: tuple[str, list[Any]]
) -> None:
    """A judge is unknown until its verdict is given; all/any/not combine three-valued."""
    ruleset = _ruleset(tmp_path, _rule(match))
    assert _outcome(evaluate(ruleset, Stage.PROMPT, text, Context(verdicts=verdicts))) == want


def test_a_judge_rule_out_of_scope_is_not_pending(tmp_path: Path) -> None:
    """Scope is applied before the judge is needed."""
    ruleset = _ruleset(tmp_path, _rule(JUDGE, scope={"workspaces": ["ws-1"]}))
    assert _outcome(evaluate(ruleset, Stage.PROMPT, CLEAN, Context(workspace="ws-2"))) == ("none", [])
    assert _outcome(evaluate(ruleset, Stage.PROMPT, CLEAN, Context(workspace="ws-1")))[0] == "pending"


def test_pending_entries_carry_the_rule_and_its_checks(tmp_path: Path) -> None:
    """Each pending rule names its outcome and every check it needs, with examples and on_error."""
    rich = {
        "judge": {
            "instruction": "Do not share contract terms.",
            "examples": {"violating": ["net 30 on the contract"], "compliant": ["a contract exists"]},
            "on_error": "block",
        }
    }
    ruleset = _ruleset(
        tmp_path,
        _rule({"all": [GATE, rich]}, "t.contracts", severity="medium", mode="shadow", stages=["prompt"]),
    )
    decision = evaluate(ruleset, Stage.PROMPT, GATED)
    assert decision.pending == (
        policy.PendingRule(
            rule_id="t.contracts",
            name="Rule",
            severity=Severity.MEDIUM,
            action=Action.BLOCK,
            mode=Mode.SHADOW,
            stage=Stage.PROMPT,
            checks=(
                policy.JudgeCheck(
                    key="t.contracts",
                    instruction="Do not share contract terms.",
                    violating=("net 30 on the contract",),
                    compliant=("a contract exists",),
                    on_error=policy.OnError.BLOCK,
                ),
            ),
        ),
    )
    assert decision.pending[0].effective_action is Action.LOG


def test_the_action_counts_decided_violations_only(tmp_path: Path) -> None:
    """A pending block rule does not block: the caller completes it."""
    ruleset = _ruleset(
        tmp_path,
        _rule(JUDGE, "t.judged"),
        {"id": "t.word", "name": "Word", "severity": "low", "action": "log", "match": GATE},
    )
    decision = evaluate(ruleset, Stage.PROMPT, GATED)
    assert decision.action is Action.LOG
    assert [v.rule_id for v in decision.violations] == ["t.word"]
    assert [p.rule_id for p in decision.pending] == ["t.judged"]


# Completing a decision with the judge's verdicts.


@pytest.mark.parametrize(
    ("on_error", "verdicts", "want"),
    [
        pytest.param("allow", {"t.rule": True}, Action.BLOCK, id="a violating verdict blocks"),
        pytest.param("block", {"t.rule": False}, Action.ALLOW, id="a clean verdict allows"),
        pytest.param("allow", {}, Action.ALLOW, id="no verdict with on_error allow allows"),
        pytest.param("block", {}, Action.BLOCK, id="no verdict with on_error block blocks"),
    ],
)
def test_verdicts_complete_the_decision(
    tmp_path: Path, on_error: str, verdicts: dict[str, bool], want: Action
) -> None:
    """complete() decides every pending rule; a check without a verdict takes its on_error."""
    judge = {"judge": {"instruction": "Do not share contract terms.", "on_error": on_error}}
    ruleset = _ruleset(tmp_path, _rule({"all": [GATE, judge]}))
    pending = evaluate(ruleset, Stage.PROMPT, GATED)
    assert pending.action is Action.ALLOW
    assert pending.pending
    completed = policy.complete(ruleset, pending, GATED, verdicts)
    assert completed.action is want
    assert completed.pending == ()
    assert completed.revision == pending.revision
    if want is Action.BLOCK:
        assert _outcome(completed) == ("violation", [(4, 12)])


def test_completing_equals_evaluating_with_the_verdicts(tmp_path: Path) -> None:
    """The completed decision is the one evaluate gives with every verdict in the context."""
    ruleset = _ruleset(tmp_path, _rule({"any": [J1, J2]}), _rule(GATE, "t.word", action="log"))
    context = Context(workspace="ws-1")
    decision = evaluate(ruleset, Stage.PROMPT, GATED, context)
    verdicts = {"t.rule#1": False, "t.rule#2": True}
    direct = evaluate(ruleset, Stage.PROMPT, GATED, Context(workspace="ws-1", verdicts=verdicts))
    assert policy.complete(ruleset, decision, GATED, verdicts, context) == direct
    assert direct.action is Action.BLOCK
    assert direct.pending == ()


def test_completing_a_decision_with_nothing_pending_returns_it(tmp_path: Path) -> None:
    """No pending rule: nothing to do, the same decision comes back."""
    ruleset = _ruleset(tmp_path, _rule(GATE))
    decision = evaluate(ruleset, Stage.PROMPT, GATED)
    assert policy.complete(ruleset, decision, GATED, {}) is decision


# Rule sets without judge rules evaluate as before.


def _engine_groups() -> list[Any]:
    data = yaml.safe_load(CASES.read_text(encoding="utf-8"))
    return [pytest.param(group, id=group["note"]) for group in data["groups"]]


@pytest.mark.parametrize("group", _engine_groups())
def test_judge_rules_beside_others_change_none_of_their_decisions(
    tmp_path: Path, group: dict[str, Any]
) -> None:
    """Over tests/cases/engine.yaml, adding judge rules (pending) leaves every other result as it was,
    and verdicts in the context change nothing for a rule set without judges."""
    plain = _ruleset(tmp_path / "plain", *group["policies"])
    judged = _ruleset(
        tmp_path / "judged",
        *group["policies"],
        _rule(JUDGE, "zz.bare"),
        _rule({"all": [GATE, JUDGE]}, "zz.gated"),
    )
    for case in group["cases"]:
        stage = Stage(case.get("stage", "prompt"))
        context = case.get("context", {})
        before = evaluate(plain, stage, case["text"], Context(**context))
        with_verdicts = evaluate(plain, stage, case["text"], Context(**context, verdicts={"zz.bare": True}))
        beside = evaluate(judged, stage, case["text"], Context(**context))
        assert before.pending == ()
        assert with_verdicts == before
        assert (beside.action, beside.violations) == (before.action, before.violations)
        assert "zz.bare" in [p.rule_id for p in beside.pending]


def test_the_pack_decides_its_samples_as_before_beside_a_judge_rule(tmp_path: Path) -> None:
    """Every test sample of the shipped pack: the same decision with a judge rule loaded beside it."""
    rules, _ = load_rules([BUILTIN_POLICY_DIR])
    judge_dir = tmp_path / "judge"
    judge_dir.mkdir()
    (judge_dir / "judge.yaml").write_text(
        yaml.safe_dump({"policies": [_rule(JUDGE, "zz.bare"), _rule({"all": [GATE, JUDGE]}, "zz.gated")]}),
        encoding="utf-8",
    )
    plain = load_ruleset([BUILTIN_POLICY_DIR])
    beside = load_ruleset([BUILTIN_POLICY_DIR, judge_dir])
    for rule in rules:
        for text in (*rule.tests.match, *rule.tests.no_match):
            for stage in Stage:
                before = evaluate(plain, stage, text)
                after = evaluate(beside, stage, text)
                assert before.pending == ()
                same = (after.action, after.violations) == (before.action, before.violations)
                assert same, (rule.id, stage)


# Redaction.


def test_redaction_leaves_judge_rules_out(tmp_path: Path) -> None:
    """Judge rules, bare or gated, find no span of their own to redact."""
    ruleset = _ruleset(
        tmp_path,
        _rule(JUDGE, "t.bare"),
        _rule({"all": [GATE, JUDGE]}, "t.gated"),
        _rule({"regex": "x\\d+"}, "t.plain"),
    )
    assert [rule.id for rule in redaction_ruleset(ruleset).rules] == ["t.plain"]


# The command.


def test_explain_shows_the_judge_checks_a_text_would_trigger(
    write_policies: Write, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each needed check is one line: its key, severity, action and instruction (shortened)."""
    long = "Do not share the terms of any customer contract: prices, discounts, durations or penalties."
    directory = write_policies(
        {
            "house.yaml": yaml.safe_dump(
                {
                    "policies": [
                        _rule({"all": [GATE, {"judge": long}]}, "house.contracts"),
                        _rule({"any": [J1, J2]}, "house.two", action="alert", mode="shadow", severity="low"),
                    ]
                }
            )
        }
    )
    assert main(["explain", "--policies", str(directory), GATED]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        r"decision: allow \(stage prompt, revision [0-9a-f]{12}, 0 rule\(s\) matched, 2 pending the judge\)",
        lines[0],
    )
    assert lines[1:] == [
        '- pending judge: house.contracts [high] block: "Do not share the terms of any customer contract: '
        'prices, discounts, ..."',
        '- pending judge: house.two#1 [low] alert (shadow: would alert): "Do not share contract terms."',
        '- pending judge: house.two#2 [low] alert (shadow: would alert): "Do not share prices."',
    ]


def test_explain_of_a_decision_without_pending_rules_is_unchanged() -> None:
    """No pending rule: the header and lines read as they always did."""
    decision = Decision(Stage.PROMPT, Action.ALLOW, "abc")
    assert render_decision(decision) == "decision: allow (stage prompt, revision abc, 0 rule(s) matched)"


def test_test_skips_the_cases_only_the_judge_can_decide(
    write_policies: Write, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cases the gate decides are run; the others are reported as needing the judge, not failed."""
    directory = write_policies(
        {
            "house.yaml": yaml.safe_dump(
                {
                    "policies": [
                        _rule(
                            {"all": [GATE, JUDGE]},
                            "house.contracts",
                            tests={"match": [GATED], "no_match": [CLEAN]},
                        ),
                        _rule(JUDGE, "house.bare", tests={"match": [GATED, CLEAN]}),
                    ]
                },
                sort_keys=False,
            )
        }
    )
    contracts, bare = load_rules([directory])[0]
    assert main(["test", str(directory)]) == 0
    out = capsys.readouterr().out.splitlines()
    path = directory / "house.yaml"
    assert out == [
        f"SKIP {path}:{contracts.line}: house.contracts: needs the judge: skipped (1 case)",
        f"SKIP {path}:{bare.line}: house.bare: needs the judge: skipped (2 cases)",
        f"ok: 2 rules, 4 cases, 0 failures, 3 skipped (policies: {directory})",
    ]


def test_test_fails_a_match_case_that_the_gate_already_refuses(
    write_policies: Write, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gate that does not pass decides the case offline: a wrong expectation still fails."""
    rule = _rule({"all": [GATE, JUDGE]}, tests={"match": [CLEAN]})
    directory = write_policies({"house.yaml": yaml.safe_dump({"policies": [rule]})})
    assert main(["test", str(directory)]) == 1
    out = capsys.readouterr().out
    assert "t.rule: expected match, got no match: 'hello there'" in out
    assert "FAILED: 1 rules, 1 cases, 1 failures" in out
