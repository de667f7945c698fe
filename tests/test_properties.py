"""Properties of evaluation on any text: it never raises and spans stay inside the text."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.policy import RuleSet, Stage, evaluate, load_ruleset

EVERY_KIND = """\
policies:
  - {id: p.regex, name: R, severity: low, action: log, match: {regex: '[a-z]{3}\\d'}}
  - {id: p.words, name: W, severity: low, action: alert, match: {keywords: [abc, "é x", ß]}}
  - {id: p.not, name: N, severity: low, action: log, match: {not: {regex: 'zz'}}}
  - {id: p.tokens, name: T, severity: low, action: log, match: {max_tokens: 3}}
  - id: p.all
    name: A
    severity: high
    action: block
    match: {all: [{regex: '\\d'}, {any: [{detector: email}, {keywords: [k]}]}]}
  - id: p.except
    name: E
    severity: high
    action: block
    match: {all: [{regex: '[a-z]\\d'}, {except: {any: [{regex: 'z\\d'}, {keywords: [k]}]}}]}
"""

_DETECTORS = ("credit_card", "iban", "us_ssn", "email", "private_key", "jwt", "generic_secret")


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    directory = tmp_path_factory.mktemp("props")
    detectors = "".join(
        f"  - {{id: d.{n.replace('_', '-')}, name: {n}, severity: low, action: log, "
        f"match: {{detector: {n}}}}}\n"
        for n in _DETECTORS
    )
    (directory / "p.yaml").write_text(EVERY_KIND + detectors, encoding="utf-8")
    pack = Path(__file__).parent.parent / "policies"
    return load_ruleset([directory, pack])


# Text built from pieces that trigger rules, mixed with arbitrary Unicode (invisible, combining,
# full-width, surrogates, astral) so that mapping spans back is exercised.
_pieces = st.sampled_from(
    [
        "abc1",
        "ABC",
        "é x",
        "e\u0301",
        "\u200b",
        "\ufeff",
        "ＡＢＣ",
        "ﬁ",
        "ß",
        "4111 1111 1111 1111",
        "a@b.co",
        "-----BEGIN RSA PRIVATE KEY-----\n",
        "eyJhbGciOiJub25lIn0.eyJ4IjoxfQ.",
        "k",
        " ",
        "\n",
        "AKIAIOSFODNN7EXAMPLE",
        "password = 'Zx81!qWm0Lp3'",
        "\ud800",
        "\U0001f600",
        # Escapes that decoded views read, whole and cut short.
        "\\n",
        "\\u0041",
        "\\ud83d\\ude00",
        "\\u00",
        "%3D",
        "%E2%80%8B",
        "%E2",
        "%25",
        "\\",
    ]
)
texts = st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=30).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, stage=st.sampled_from(list(Stage)))
def test_evaluation_never_raises_and_spans_lie_inside_the_text(
    ruleset: RuleSet, text: str, stage: Stage
) -> None:
    """Any text gives a decision whose every span lies inside that text."""
    decision = evaluate(ruleset, stage, text)
    for violation in decision.violations:
        for span in violation.spans:
            assert 0 <= span.start <= span.end <= len(text)


@settings(max_examples=200, deadline=None)
@given(prefix=texts, suffix=texts)
def test_a_key_is_found_and_its_span_is_exact_whatever_surrounds_it(
    ruleset: RuleSet, prefix: str, suffix: str
) -> None:
    """A key set apart by spaces is found, and its span covers exactly the key."""
    key = "AKIAIOSFODNN7EXAMPLE"
    text = f"{prefix} {key} {suffix}"
    decision = evaluate(ruleset, Stage.PROMPT, text)
    spans = {
        (s.start, s.end)
        for v in decision.violations
        if v.rule_id == "secrets.aws-access-key-id"
        for s in v.spans
    }
    start = len(prefix) + 1
    assert (start, start + len(key)) in spans


def test_catastrophic_pattern_runs_in_linear_time(tmp_path: Path) -> None:
    """(a+)+$ on 100,000 a's and a '!' returns promptly: RE2 does not backtrack."""
    (tmp_path / "p.yaml").write_text(
        "policies:\n  - {id: r.redos, name: R, severity: low, action: log, match: {regex: '(a+)+$'}}\n",
        encoding="utf-8",
    )
    ruleset = load_ruleset([tmp_path])
    started = time.perf_counter()
    decision = evaluate(ruleset, Stage.PROMPT, "a" * 100_000 + "!")
    elapsed = time.perf_counter() - started
    assert decision.violations == ()
    # Python's backtracking engine needs about 50 s for 30 a's; any sane bound shows linearity.
    assert elapsed < 2.0
    assert evaluate(ruleset, Stage.PROMPT, "a" * 100_000).violations
