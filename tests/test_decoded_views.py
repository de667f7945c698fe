"""Decoded views: rules also read the text with backslash escapes and percent-encoding decoded."""

from __future__ import annotations

import json
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy import RuleSet, Span, Stage, evaluate, load_ruleset
from gateway.policy.views import MAX_DEPTH, decode, decoded_views

KEY = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture(scope="module")
def pack() -> RuleSet:
    return load_ruleset()


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        pytest.param("a\\nb\\tc\\rd", "a\nb\tc\rd", id="newline, tab, carriage return"),
        pytest.param('say \\"hi\\" \\/ \\\\', 'say "hi" / \\', id="quote, slash, backslash"),
        pytest.param("\\u0041\\u00e9", "Aé", id="four-digit escapes"),
        pytest.param("\\ud83d\\ude00", "\U0001f600", id="a surrogate pair is one character"),
        pytest.param("\\u{1F600}\\x41", "\U0001f600A", id="braced and two-digit escapes"),
        pytest.param("k%3Dv%20w", "k=v w", id="percent-encoded ASCII"),
        pytest.param("%C3%A9t%E2%82%AC", "ét€", id="percent-encoded UTF-8 bytes"),
        pytest.param("%FFa%C3", "%FFa%C3", id="bytes that are not UTF-8 stay as written"),
        pytest.param("C:\\Users 50% \\q", "C:\\Users 50% \\q", id="no escape: no view"),
    ],
)
def test_one_decoding_pass(text: str, decoded: str) -> None:
    view = decode(text)
    assert (view.text if view is not None else text) == decoded
    assert view is None or view.text != text


def test_every_character_of_a_view_maps_back_to_what_it_was_decoded_from() -> None:
    text = "x\\u0041%42\\ud83d\\ude00%E2%82%AC\\n!"
    view = decode(text)
    assert view is not None
    pieces = [
        text[view.span(Span(i, i + 1)).start : view.span(Span(i, i + 1)).end] for i in range(len(view.text))
    ]
    assert pieces == ["x", "\\u0041", "%42", "\\ud83d\\ude00", "%E2%82%AC", "\\n", "!"]
    assert view.span(Span(1, 3)) == Span(1, 10)
    assert view.span(Span(len(view.text), len(view.text))) == Span(len(text), len(text))


def test_a_text_still_encoded_after_one_pass_gets_a_second_view_and_no_more() -> None:
    """``\\\\n`` is JSON inside JSON; ``%25`` is an encoded percent sign."""
    assert [v.text for v in decoded_views("a\\\\nb")] == ["a\\nb", "a\nb"]
    assert [v.text for v in decoded_views("%252541")] == ["%2541", "%41"]
    assert len(list(decoded_views("%25252541"))) == MAX_DEPTH


def test_a_text_without_backslash_or_percent_has_no_view() -> None:
    assert list(decoded_views("plain prompt, nothing to decode")) == []


@pytest.mark.parametrize(
    "text",
    [
        # An escape before the key (the three texts first).
        'config = "line1\\nAKIAIOSFODNN7EXAMPLE"',
        "aws_key%3DAKIAIOSFODNN7EXAMPLE",
        "key_AKIAIOSFODNN7EXAMPLE",
        "value:\\tAKIAIOSFODNN7EXAMPLE",
        'payload = "{\\"key\\":\\"AKIAIOSFODNN7EXAMPLE\\"}"',
        "line1\\r\\nAKIAIOSFODNN7EXAMPLE",
        # A percent-encoded separator before it.
        "https://x.test/?aws_key%3dAKIAIOSFODNN7EXAMPLE&b=1",
        "key:%20AKIAIOSFODNN7EXAMPLE",
        "key%0AAKIAIOSFODNN7EXAMPLE",
        # An underscore before or after it.
        "AWS_KEY_AKIAIOSFODNN7EXAMPLE",
        "AKIAIOSFODNN7EXAMPLE_old",
        # Its own characters encoded.
        "\\u0041KIAIOSFODNN7EXAMPLE",
        "%41%4B%49%41IOSFODNN7EXAMPLE",
        "\\x41KIAIOSFODNN7EXAMPLE",
        # An escaped invisible character inside it: decoded, then normalised away.
        "AKIA\\u200bIOSFODNN7EXAMPLE",
        "AKIA%E2%80%8BIOSFODNN7EXAMPLE",
        # Encoded twice.
        '"k=\\\\nAKIAIOSFODNN7EXAMPLE"',
        "k%253DAKIAIOSFODNN7EXAMPLE",
    ],
)
def test_evasions_of_the_aws_key_are_blocked_on_both_stages(pack: RuleSet, text: str) -> None:
    for stage in Stage:
        decision = evaluate(pack, stage, text)
        assert decision.blocked, (stage, text)
        (violation,) = [v for v in decision.violations if v.rule_id == "secrets.aws-access-key-id"]
        (span,) = violation.spans
        assert 0 <= span.start < span.end <= len(text)
        # The span is the key as written: plain, or with the escapes it was written with.
        reported = text[span.start : span.end]
        assert reported.endswith(KEY[-12:]), reported
        assert not reported.startswith(("_", "=", "%3D", "\\n")), reported


TOKENS = {
    "secrets.github-token": "ghp_Xq2dM4tVn8Lk1RbZ7yW3cPf6HsJ0aEo9Gu5T",
    "secrets.slack-token": "xoxb-923109288764-5628605263726-u5bW3mWOA8hazgb5aNb8UHBs",
    "secrets.stripe-key": "sk_live_51L1jMJk9cSPXIIVgOnGs1iTIS3CJDOKPQ5sC2cx3M4vKlHVBu5VmKyGhA2urkqW",
    "secrets.openai-api-key": "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",
    "secrets.gitlab-token": "glpat-UsbCwv3w77pB96otKtFB",
    "secrets.huggingface-token": "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",
    "secrets.npm-token": "npm_65CFRyhdjZEMTWPNAVlrZVg2WHr0F7BIrGcR",
    "secrets.groq-api-key": "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",
    "secrets.digitalocean-token": "dop_v1_f2401249e9edc5d4a2eba20c7444adb5d14de9f5110e09b3925a6afccacd723b",
}
EVASIONS = {
    "escape before": 'cfg = "a\\n{}"',
    "percent-encoded separator": "token%3D{}",
    "underscore before": "MY_TOKEN_{}",
    "tab escape before": "token:\\t{}",
    "escaped twice": '"token=\\\\n{}"',
}


@pytest.mark.parametrize("rule_id", sorted(TOKENS))
@pytest.mark.parametrize("evasion", sorted(EVASIONS))
def test_prefixed_tokens_are_caught_through_each_evasion_with_the_token_as_span(
    pack: RuleSet, rule_id: str, evasion: str
) -> None:
    token = TOKENS[rule_id]
    text = EVASIONS[evasion].format(token)
    decision = evaluate(pack, Stage.PROMPT, text)
    assert decision.blocked
    spans = [s for v in decision.violations if v.rule_id == rule_id for s in v.spans]
    assert [text[s.start : s.end] for s in spans] == [token]


def test_a_rule_found_in_the_text_and_in_a_view_is_reported_once(pack: RuleSet) -> None:
    text = f"{KEY} and again {KEY} in a text with a %20 and a \\n"
    decision = evaluate(pack, Stage.PROMPT, text)
    ids = [v.rule_id for v in decision.violations]
    assert ids.count("secrets.aws-access-key-id") == 1
    (violation,) = [v for v in decision.violations if v.rule_id == "secrets.aws-access-key-id"]
    assert [(s.start, s.end) for s in violation.spans] == [(0, 20), (31, 51)]


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda t: json.dumps(t)[1:-1], id="JSON-escaped"),
        pytest.param(lambda t: urllib.parse.quote(t, safe=""), id="percent-encoded"),
    ],
)
def test_encoded_benign_text_is_not_blocked(pack: RuleSet, encode: object) -> None:
    """Decoding adds no block on ordinary text with quotes, paths, newlines and percentages."""
    assert callable(encode)
    for text in (
        'She said "50% off", then left.\nNext line\twith a tab.',
        "C:\\Users\\me\\notes.txt and https://example.com/a?b=c&d=%7Be%7D",
        "The regex \\bAKIA[A-Z0-9]{16}\\b finds AWS key ids; AKIAXXXXXXXXXXXXXXXX is a placeholder.",
    ):
        assert not evaluate(pack, Stage.PROMPT, encode(text)).blocked
        assert not evaluate(pack, Stage.PROMPT, text).blocked


_pieces = st.sampled_from(
    [
        *("\\", "\\n", "\\u00", "\\u0041", "\\ud83d", "\\ude00", "\\x4"),
        *("%", "%4", "%41", "%E2%82", "%AC", "%25"),
        *(KEY, "_", "é", "\u200b"),
    ]
)
_texts = st.lists(st.one_of(_pieces, st.text(max_size=4)), max_size=24).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_texts)
def test_views_map_every_span_inside_the_text(text: str) -> None:
    """Whatever the escapes, each character of each view maps back to a range of its source."""
    for view in decoded_views(text):
        for index in range(len(view.text) + 1):
            span = view.span(Span(index, min(index + 1, len(view.text))))
            assert 0 <= span.start <= span.end <= len(view.source)


@settings(max_examples=200, deadline=None)
@given(prefix=_texts, suffix=_texts)
def test_an_escaped_key_is_found_wherever_it_stands(pack: RuleSet, prefix: str, suffix: str) -> None:
    """A key with its first letter escaped, set apart by spaces, is found and its span covers it."""
    text = f"{prefix} \\u0041{KEY[1:]} {suffix}"
    decision = evaluate(pack, Stage.PROMPT, text)
    start = len(prefix) + 1
    spans = {
        (s.start, s.end)
        for v in decision.violations
        if v.rule_id == "secrets.aws-access-key-id"
        for s in v.spans
    }
    assert (start, start + len(KEY) + 5) in spans
