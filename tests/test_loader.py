"""Loading policy files: what is refused, and that every error is located."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.policy import (
    Action,
    Mode,
    PolicyError,
    Severity,
    Stage,
    compile_ruleset,
    load_rules,
    load_ruleset,
)
from gateway.policy.loader import BUILTIN_POLICY_DIR

Write = Callable[[dict[str, str]], Path]

GOOD = """\
policies:
  - id: a.one
    name: One
    severity: HIGH
    action: 2
    match: {regex: 'x\\d+'}
"""

SEVERAL_ERRORS = """\
policies:
  - id: bad.lookahead
    name: Lookahead
    severity: high
    action: block
    match: {regex: 'foo(?=bar)'}
  - id: bad.fields
    name: Fields
    severity: extreme
    action: shout
    colour: red
    match: {keywords: []}
  - id: bad.detector
    name: Detector
    severity: low
    action: log
    match: {detector: {name: credit_card, params: {nope: 1}}}
  - id: bad.unknown-detector
    name: Unknown detector
    severity: low
    action: log
    match: {detector: horoscope}
  - id: bad.backref
    name: Backreference
    severity: low
    action: log
    match:
      any:
        - regex: '(a)\\1'
        - keywords: [ok]
        - max_tokens: -3
  - id: bad.missing
    name: Missing match
    severity: low
    action: log
"""


def _problems(directory: Path) -> list[tuple[str, int, str, str]]:
    with pytest.raises(PolicyError) as raised:
        load_rules([directory])
    return [(Path(p.path).name, p.line, p.rule_id, p.message) for p in raised.value.problems]


def test_one_file_with_several_errors_reports_all_of_them_with_lines(write_policies: Write) -> None:
    """Every error of the file is reported in one run, each with its line and rule id."""
    problems = _problems(write_policies({"bad.yaml": SEVERAL_ERRORS}))
    located = [(line, rule_id) for _, line, rule_id, _ in problems]
    assert located == [
        (6, "bad.lookahead"),
        (11, "bad.fields"),
        (9, "bad.fields"),
        (10, "bad.fields"),
        (12, "bad.fields"),
        (17, "bad.detector"),
        (22, "bad.unknown-detector"),
        (29, "bad.backref"),
        (31, "bad.backref"),
        (32, "bad.missing"),
    ]
    messages = {(rule_id, line): message for _, line, rule_id, message in problems}
    assert "linear" in messages[("bad.lookahead", 6)]
    assert "lookaround" in messages[("bad.lookahead", 6)]
    assert "unknown key 'colour'" in messages[("bad.fields", 11)]
    assert "extreme" in messages[("bad.fields", 9)]
    assert "shout" in messages[("bad.fields", 10)]
    assert "non-empty" in messages[("bad.fields", 12)]
    assert "takes no parameters" in messages[("bad.detector", 17)]
    assert "unknown detector 'horoscope'" in messages[("bad.unknown-detector", 22)]
    assert "backreferences" in messages[("bad.backref", 29)]
    assert "positive" in messages[("bad.backref", 31)]
    assert "'match'" in messages[("bad.missing", 32)]


def test_errors_of_every_file_are_reported_and_formatted_as_path_line_id(write_policies: Write) -> None:
    """Two bad files: both files' errors come out, as path:line: rule-id: message."""
    directory = write_policies(
        {
            "a.yaml": GOOD.replace("x\\d+", "(?<=a)b"),
            "b.yaml": GOOD.replace("a.one", "b.two").replace("HIGH", "huge"),
        }
    )
    with pytest.raises(PolicyError) as raised:
        load_rules([directory])
    lines = str(raised.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{directory / 'a.yaml'}:6: a.one: regex refused by RE2")
    assert lines[1].startswith(f"{directory / 'b.yaml'}:4: b.two: severity must be")


def test_duplicate_ids_across_files_are_refused(write_policies: Write) -> None:
    """An id used in two files is an error at the second, naming the first."""
    directory = write_policies({"a.yaml": GOOD, "b.yaml": GOOD})
    ((name, line, rule_id, message),) = _problems(directory)
    assert (name, line, rule_id) == ("b.yaml", 2, "a.one")
    assert "duplicate id" in message
    assert "a.yaml:2" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("policies: [\n  - id: x\n", "YAML syntax", id="broken YAML is located"),
        pytest.param("", "empty file", id="an empty file is refused"),
        pytest.param("rules: []\n", "unknown key 'rules'", id="a top level other than policies"),
        pytest.param("policies: {}\n", "expected a list", id="policies must be a list"),
        pytest.param(GOOD.replace("a.one", "Not Dotted"), "dotted", id="an id must be dotted"),
        pytest.param(GOOD.replace("'x\\d+'", "'x*'"), "empty string", id="a regex matching nothing"),
        pytest.param(GOOD + "    stages: [prompt, prompt]\n", "twice", id="a stage listed twice"),
        pytest.param(GOOD + "    mode: loud\n", "enforce | shadow", id="an unknown mode"),
        pytest.param(GOOD + "    scope: {teams: [a]}\n", "unknown key 'teams'", id="an unknown scope"),
        pytest.param(GOOD + "    tests: {match: [1]}\n", "non-empty text", id="a test text must be text"),
        pytest.param(
            GOOD.replace("{regex: 'x\\d+'}", "{regex: 'a', keywords: [b]}"),
            "exactly one",
            id="two match kinds at once",
        ),
        pytest.param(GOOD.replace("action: 2", "action: true"), "action must be", id="a bool action"),
    ],
)
def test_malformed_policy_files_are_refused(write_policies: Write, text: str, fragment: str) -> None:
    """Each malformed file is refused with a message naming the problem."""
    problems = _problems(write_policies({"p.yaml": text}))
    assert any(fragment in message for *_, message in problems), problems
    assert all(line >= 0 for _, line, _, _ in problems)


def test_missing_paths_and_empty_directories_are_refused(tmp_path: Path) -> None:
    """A path that does not exist, or a directory without policy files, is an error."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError) as raised:
        load_rules([tmp_path / "empty", tmp_path / "absent"])
    messages = [p.message for p in raised.value.problems]
    assert messages == ["no *.yaml policy files in directory", "no such file or directory"]


def test_backend_aliases_and_defaults_are_accepted(write_policies: Write) -> None:
    """LOW/MEDIUM/HIGH and actionType 0/1/2 load; mode and stages have defaults."""
    rules, _ = load_rules([write_policies({"p.yaml": GOOD})])
    (rule,) = rules
    assert rule.severity is Severity.HIGH
    assert rule.action is Action.BLOCK
    assert rule.mode is Mode.ENFORCE
    assert rule.stages == frozenset(Stage)


def test_revision_follows_the_sources(write_policies: Write) -> None:
    """The revision is stable for the same files and changes when a file changes."""
    directory = write_policies({"p.yaml": GOOD})
    first = load_ruleset([directory]).revision
    assert load_ruleset([directory]).revision == first
    (directory / "p.yaml").write_text(GOOD.replace("One", "Uno"), encoding="utf-8")
    assert load_ruleset([directory]).revision != first


def test_the_builtin_pack_loads() -> None:
    """The pack shipped inside the package loads and is the default."""
    ruleset = load_ruleset()
    assert BUILTIN_POLICY_DIR.is_dir()
    assert {
        "secrets.aws-access-key-id",
        "secrets.github-token",
        "secrets.private-key",
        "pii.credit-card",
        "pii.email",
    } <= {rule.id for rule in ruleset.rules}


def test_a_rule_set_too_large_for_the_re2_budget_is_refused_loudly(write_policies: Write) -> None:
    """A set that does not fit its memory budget is a located error, not a silent no-match."""
    rules = "".join(
        f"  - {{id: r.k{i}, name: K, severity: low, action: log, match: {{regex: 'k{i}[a-z]{{40}}x'}}}}\n"
        for i in range(200)
    )
    loaded, revision = load_rules([write_policies({"p.yaml": "policies:\n" + rules})])
    with pytest.raises(PolicyError) as raised:
        compile_ruleset(loaded, revision, set_max_mem=256 << 10)
    (problem,) = raised.value.problems
    assert "200 patterns do not fit RE2's 0.25 MiB budget" in problem.message
    assert compile_ruleset(loaded, revision).plans[Stage.PROMPT].probe_count == 200


OVERRIDES = """\
overrides:
  - {id: a.one, action: log, mode: shadow}
  - {id: "b.*", enabled: false}
"""


def test_overrides_change_or_switch_off_rules_without_editing_them(write_policies: Write) -> None:
    """A later file's overrides change an action and mode, and switch off a family by glob."""
    directory = write_policies(
        {
            "a.yaml": GOOD,
            "b.yaml": GOOD.replace("a.one", "b.two")
            + GOOD.replace("policies:\n", "").replace("a.one", "b.three"),
            "z-overrides.yaml": OVERRIDES,
        }
    )
    rules, _ = load_rules([directory])
    assert [(r.id, r.action, r.mode) for r in rules] == [("a.one", Action.LOG, Mode.SHADOW)]


def test_the_builtin_pack_can_be_named_and_overridden(tmp_path: Path) -> None:
    """`builtin` names the shipped pack; a team's directory after it has the last word."""
    (tmp_path / "team.yaml").write_text("overrides:\n  - {id: pii.email, enabled: false}\n")
    rules, _ = load_rules([Path("builtin"), tmp_path])
    ids = {r.id for r in rules}
    assert "pii.email" not in ids
    assert "secrets.aws-access-key-id" in ids


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param(
            "overrides:\n  - {id: nope.rule, action: log}\n", "names no loaded rule", id="unknown id"
        ),
        pytest.param("overrides:\n  - {id: a.one, colour: red}\n", "unknown key 'colour'", id="unknown key"),
        pytest.param("overrides:\n  - {id: a.one, enabled: maybe}\n", "true or false", id="bad enabled"),
        pytest.param("overrides:\n  - {id: a.one, action: shout}\n", "action must be", id="bad action"),
        pytest.param("overrides: {}\n", "expected a list", id="not a list"),
    ],
)
def test_bad_overrides_are_refused_with_their_line(write_policies: Write, text: str, fragment: str) -> None:
    problems = _problems(write_policies({"a.yaml": GOOD, "o.yaml": text}))
    assert any(name == "o.yaml" and fragment in message for name, _, _, message in problems), problems


UNKNOWN_KEY_THEN_SAME_ID = """\
policies:
  - id: a.one
    name: One
    severity: high
    action: block
    colour: red
    match: {regex: 'x\\d+'}
  - id: a.one
    name: One again
    severity: high
    action: block
    match: {regex: 'y\\d+'}
"""


def _located(problems: list[tuple[str, int, str, str]]) -> list[tuple[str, int, str, str]]:
    """Each problem as (file, line, rule id, the message's first words)."""
    return [(name, line, rule_id, " ".join(message.split()[:2])) for name, line, rule_id, message in problems]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"p.yaml": UNKNOWN_KEY_THEN_SAME_ID},
            [("p.yaml", 6, "a.one", "unknown key"), ("p.yaml", 8, "a.one", "duplicate id,")],
            id="an unknown key does not hide the same id repeated in the next rule",
        ),
        pytest.param(
            {
                "p.yaml": UNKNOWN_KEY_THEN_SAME_ID.replace("    colour: red\n", "").replace(
                    "'x\\d+'", "'(a)\\1'"
                )
            },
            [("p.yaml", 6, "a.one", "regex refused"), ("p.yaml", 7, "a.one", "duplicate id,")],
            id="a pattern error does not hide a duplicate id",
        ),
        pytest.param(
            {
                "p.yaml": UNKNOWN_KEY_THEN_SAME_ID.replace(
                    "    colour: red\n    match: {regex: 'x\\d+'}\n", ""
                )
            },
            [("p.yaml", 2, "a.one", "missing 'match'"), ("p.yaml", 6, "a.one", "duplicate id,")],
            id="a missing key does not hide a duplicate id",
        ),
        pytest.param(
            {"a.yaml": GOOD.replace("action: 2", "action: shout"), "b.yaml": GOOD},
            [("a.yaml", 5, "a.one", "action must"), ("b.yaml", 2, "a.one", "duplicate id,")],
            id="an invalid rule in one file still owns its id against another file",
        ),
        pytest.param(
            {"p.yaml": "colour: red\n" + GOOD.replace("HIGH", "huge")},
            [("p.yaml", 1, "", "unknown key"), ("p.yaml", 5, "a.one", "severity must")],
            id="an unknown top-level key does not hide the rules' errors",
        ),
        pytest.param(
            {"p.yaml": "policies: {}\noverrides:\n  - {id: a.one, colour: red}\n"},
            [("p.yaml", 1, "", "expected a"), ("p.yaml", 3, "a.one", "unknown key")],
            id="policies that are not a list do not hide the overrides' errors",
        ),
        pytest.param(
            {"a.yaml": "policies: [\n  - id: x\n", "b.yaml": GOOD.replace("HIGH", "huge")},
            [("a.yaml", 2, "", "YAML syntax:"), ("b.yaml", 4, "a.one", "severity must")],
            id="a YAML error in one file does not hide the errors of another",
        ),
        pytest.param(
            {
                "a.yaml": GOOD.replace("x\\d+", "(?<=a)b"),
                "o.yaml": "overrides:\n  - {id: a.one, action: log}\n",
            },
            [("a.yaml", 6, "a.one", "regex refused")],
            id="an override of a rule refused for its own error is not also called unknown",
        ),
        pytest.param(
            {"p.yaml": GOOD.replace("{regex: 'x\\d+'}", "{regex: 'x\\d+', colour: red, size: 3}")},
            [("p.yaml", 6, "a.one", "unknown key"), ("p.yaml", 6, "a.one", "unknown key")],
            id="every unknown key of a match is reported",
        ),
        pytest.param(
            {"p.yaml": GOOD + "    tests: {match: [1], no_match: [2], colour: red}\n"},
            [
                ("p.yaml", 7, "a.one", "unknown key"),
                ("p.yaml", 7, "a.one", "expected non-empty"),
                ("p.yaml", 7, "a.one", "expected non-empty"),
            ],
            id="every error of a rule's tests is reported",
        ),
    ],
)
def test_one_error_never_hides_another(
    write_policies: Write, files: dict[str, str], expected: list[tuple[str, int, str, str]]
) -> None:
    """Each error of a run is reported, located by file, line and rule id, whatever else is wrong."""
    assert _located(_problems(write_policies(files))) == expected


def test_an_unreadable_file_does_not_hide_the_errors_of_another(write_policies: Write) -> None:
    """A policy path that cannot be read is one located error among the others, not the end of the run."""
    directory = write_policies({"b.yaml": GOOD.replace("HIGH", "huge")})
    (directory / "a.yaml").mkdir()  # unreadable as a file, even for root
    located = _located(_problems(directory))
    assert located == [("a.yaml", 0, "", "cannot read:"), ("b.yaml", 4, "a.one", "severity must")]
