"""Exclusions judged per match: ``except`` inside ``all``, and the warning on a whole-text ``not``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.policy import PolicyError, Stage, evaluate, load_rules, load_ruleset
from gateway.policy.loader import BUILTIN_POLICY_DIR, rule_warnings
from gateway.policy.model import MAX_SPANS_PER_VIOLATION
from gateway.policy.ruleset import AllNode, ExceptNode
from gateway.streaming import holdback_chars

Write = Callable[[dict[str, str]], Path]
KEY = "AKIAIOSFODNN7EXAMPLE"
PLACEHOLDER = "AKIAXXXXXXXXXXXXXXXX"

RULE = """\
policies:
  - id: t.key
    name: Key
    severity: high
    action: block
    match:
      all:
        - regex: '(?:\\b|_)(?P<v>AKIA[A-Z2-7]{16})(?:\\b|_)'
        - except: {regex: '(?:\\b|_)AKIA[A-Z2-7]*X{5}'}
"""


def _spans(write: Write, policies: str, text: str, stage: Stage = Stage.PROMPT) -> dict[str, list[str]]:
    ruleset = load_ruleset([write({"p.yaml": policies})])
    decision = evaluate(ruleset, stage, text)
    return {v.rule_id: [text[s.start : s.end] for s in v.spans] for v in decision.violations}


def test_the_issues_decoy_request_is_blocked_on_both_stages() -> None:
    """Issue 12, item 3: a placeholder beside a real key no longer switches the pack's rule off."""
    text = f"deploy with {KEY} (placeholder {PLACEHOLDER})"
    ruleset = load_ruleset()
    for stage in Stage:
        decision = evaluate(ruleset, stage, text)
        assert decision.blocked
        (violation,) = [v for v in decision.violations if v.rule_id == "secrets.aws-access-key-id"]
        assert [text[s.start : s.end] for s in violation.spans] == [KEY]


def test_decoys_beyond_the_span_cap_do_not_hide_a_key(write_policies: Write) -> None:
    """Excluded matches do not count towards the cap: 64 and more decoys come before the key."""
    decoys = " ".join([PLACEHOLDER] * (MAX_SPANS_PER_VIOLATION + 10))
    assert _spans(write_policies, RULE, f"{decoys} {KEY}") == {"t.key": [KEY]}


def test_an_exclusion_anywhere_removes_only_the_matches_it_overlaps(write_policies: Write) -> None:
    """The exception is searched over the whole text, and takes out only what it overlaps."""
    policies = """\
policies:
  - id: t.assign
    name: Assigned key
    severity: high
    action: block
    match:
      all:
        - regex: 'key=(?P<v>[a-z0-9]{8})\\b'
        # Spans the name and the value: it overlaps the value it excuses.
        - except: {regex: 'key=[a-z0-9]*00000'}
"""
    text = "key=ab00000z key=q1w2e3r4 key=00000abc"
    assert _spans(write_policies, policies, text) == {"t.assign": ["q1w2e3r4"]}
    assert _spans(write_policies, policies, "key=ab00000z key=00000abc") == {}


def test_nested_alls_keep_their_own_exceptions_and_the_outer_ones(write_policies: Write) -> None:
    """An ``all`` inside an ``all``: the inner parts are filtered by both exceptions."""
    policies = """\
policies:
  - id: t.nested
    name: Nested
    severity: low
    action: log
    match:
      all:
        - any:
            - all:
                - regex: '\\bid-\\d{4}\\b'
                - except: {regex: 'id-0000'}
            - regex: '\\bref-\\d{4}\\b'
        - except: {keywords: [id-1111, ref-2222]}
"""
    assert _spans(write_policies, policies, "id-0000 id-1111 id-3333 ref-2222") == {"t.nested": ["id-3333"]}
    assert _spans(write_policies, policies, "id-0000 id-1111 ref-2222") == {}
    assert _spans(write_policies, policies, "id-0000 ref-4444") == {"t.nested": ["ref-4444"]}


def test_an_exception_with_a_detector_judges_validated_candidates(write_policies: Write) -> None:
    """A detector in an exception excludes only candidates its validator accepts."""
    policies = """\
policies:
  - id: t.number
    name: Long number
    severity: low
    action: log
    match:
      all:
        - regex: '\\b\\d{16}\\b'
        - except: {detector: credit_card}
"""
    # 4111111111111111 passes Luhn (a card, excused here); 4111111111111112 does not.
    text = "4111111111111111 and 4111111111111112"
    assert _spans(write_policies, policies, text) == {"t.number": ["4111111111111112"]}


def test_a_rule_with_exceptions_is_still_looked_at_only_when_its_patterns_hit(write_policies: Write) -> None:
    """Exceptions never make a rule match, so they never put it among the rules run on every text."""
    ruleset = load_ruleset([write_policies({"p.yaml": RULE})])
    plan = ruleset.plan(Stage.PROMPT)
    assert plan.always == frozenset()
    (compiled,) = plan.rules
    assert isinstance(compiled.node, AllNode)
    assert len(compiled.node.parts) == 1
    assert [type(e) for e in compiled.node.exceptions] == [ExceptNode]


def test_the_stream_holdback_covers_an_exceptions_width(write_policies: Write) -> None:
    """An exception longer than its rule's match is judged whole: the window holds it too."""
    policies = """\
policies:
  - id: t.short
    name: Short
    severity: high
    action: block
    match:
      all:
        - regex: 'ab\\d\\d'
        - except: {regex: 'example: ab\\d\\d, a sample of forty characters'}
"""
    ruleset = load_ruleset([write_policies({"p.yaml": policies})])
    assert holdback_chars(ruleset, Stage.RESPONSE, 256) == len("example: ab00, a sample of forty characters")


@pytest.mark.parametrize(
    ("match", "fragment", "line"),
    [
        pytest.param(
            "      except: {regex: 'x'}\n", "stands only directly inside 'all'", 7, id="except on its own"
        ),
        pytest.param(
            "      any:\n        - regex: 'y'\n        - except: {regex: 'x'}\n",
            "stands only directly inside 'all'",
            9,
            id="except inside any",
        ),
        pytest.param(
            "      all:\n        - except: {regex: 'x'}\n",
            "needs a part whose matches it excludes",
            8,
            id="an all of exceptions only",
        ),
        pytest.param(
            "      all:\n        - regex: 'y'\n        - except: {max_tokens: 5}\n",
            "takes regex, keywords, detector",
            9,
            id="an exception without a place in the text",
        ),
        pytest.param(
            "      all:\n        - regex: 'y'\n        - except: {not: {regex: 'x'}}\n",
            "takes regex, keywords, detector",
            9,
            id="an exception that is a not",
        ),
        pytest.param(
            "      all:\n        - regex: 'y'\n        - except: {regex: 'x*'}\n",
            "empty string",
            9,
            id="an exception matching the empty string",
        ),
    ],
)
def test_misplaced_or_empty_exceptions_are_refused_with_their_line(
    write_policies: Write, match: str, fragment: str, line: int
) -> None:
    text = "policies:\n  - id: t.bad\n    name: Bad\n    severity: low\n    action: log\n    match:\n" + match
    with pytest.raises(PolicyError) as raised:
        load_rules([write_policies({"p.yaml": text})])
    located = [(p.line, p.rule_id) for p in raised.value.problems if fragment in p.message]
    assert located == [(line, "t.bad")], raised.value.problems


WHOLE_TEXT_NOT = """\
policies:
  - id: t.old-style
    name: Old style
    severity: high
    action: block
    match:
      all:
        - regex: '\\bAKIA[A-Z2-7]{16}\\b'
        - not: {regex: 'AKIAX{5}'}
  - id: t.top-level-not
    name: A not on its own is a rule of its own
    severity: low
    action: log
    match:
      not: {keywords: [hello]}
"""


def test_check_warns_about_a_whole_text_not_beside_match_parts(
    write_policies: Write, capsys: pytest.CaptureFixture[str]
) -> None:
    """Located like an error (file, line of the not, rule id), and the exit status stays 0."""
    directory = write_policies({"p.yaml": WHOLE_TEXT_NOT})
    assert main(["check", str(directory)]) == 0
    captured = capsys.readouterr()
    (warning,) = captured.err.splitlines()
    assert warning.startswith(f"{directory / 'p.yaml'}:9: t.old-style: warning: 'not' inside 'all'")
    assert "write 'except:'" in warning
    assert "ok: 2 rules" in captured.out
    assert "1 warning(s)" in captured.out


def test_the_shipped_pack_has_no_whole_text_exclusion_left() -> None:
    rules, _ = load_rules([BUILTIN_POLICY_DIR])
    assert rule_warnings(rules) == []


def test_every_exclusion_of_the_pack_is_per_match() -> None:
    """No ``not`` remains in the pack: each placeholder or example exclusion is an ``except``."""
    source = "".join(path.read_text(encoding="utf-8") for path in sorted(BUILTIN_POLICY_DIR.glob("*.yaml")))
    assert "- not:" not in source
    assert source.count("- except:") >= 45
