"""Normalisation: evasions are folded away and offsets map back to the original text."""

from __future__ import annotations

import pytest

from gateway.policy.model import Span
from gateway.policy.normalize import normalize


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        pytest.param("plain ascii", "plain ascii", id="ASCII is left as it is"),
        pytest.param("pass\u200bword", "password", id="a zero-width space is removed"),
        pytest.param("pa\u00adss\u2060wo\ufeffrd", "password", id="soft hyphen, word joiner, BOM"),
        pytest.param("\U000e0041tag", "tag", id="tag characters are removed"),
        pytest.param("ｐａｓｓ", "pass", id="full-width letters fold"),
        pytest.param("e\u0301", "é", id="a combining accent composes"),
        pytest.param("ﬁle", "file", id="a ligature expands"),
        pytest.param("日本", "日本", id="already-normal text is untouched"),
    ],
)
def test_normalized_text(text: str, normalized: str) -> None:
    assert normalize(text).text == normalized


def test_spans_map_back_through_removed_and_expanded_characters() -> None:
    """A span over normalised text covers the original characters it came from."""
    text = "x ﬁ\u200bn y"
    result = normalize(text)
    assert result.text == "x fin y"
    start = result.text.index("fin")
    span = result.span(len(result.text[:start].encode()), len(result.text[: start + 3].encode()))
    assert span == Span(2, 5)
    assert text[span.start : span.end] == "ﬁ\u200bn"


def test_byte_offsets_after_multibyte_characters_become_character_offsets() -> None:
    """RE2 reports bytes; spans are in characters."""
    result = normalize("ü abc")
    assert result.span(3, 6) == Span(2, 5)


def test_a_lone_surrogate_keeps_offsets_aligned() -> None:
    """Surrogates from JSON input do not shift the offsets that follow them."""
    result = normalize("\ud800 abc")
    assert result.span(2, 5) == Span(2, 5)
