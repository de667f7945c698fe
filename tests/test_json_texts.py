"""``collect``'s one-loop reading of a flat object gives what the walk gives, piece for piece."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import json_texts
from gateway.json_texts import Texts, collect

# As the boundary fuzz: a fixed budget in CI, FUZZ_EXAMPLES=N for a long run.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))

SCALARS = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
KEYS = st.one_of(
    st.sampled_from(["prompt", "message", "model", "x_y", "", "a b", "ключ"]), st.text(max_size=8)
)
FLAT = st.dictionaries(KEYS, SCALARS, max_size=6)


def _walked(value: Any, fields: tuple[tuple[str, ...], ...], monkeypatch: pytest.MonkeyPatch) -> Texts:
    with monkeypatch.context() as patched:
        patched.setattr(json_texts, "_flat", lambda *args: None)
        return collect(value, fields=fields)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(value=FLAT, extra=st.lists(st.lists(KEYS, min_size=1, max_size=3).map(tuple), max_size=3))
def test_a_flat_object_reads_as_the_walk_reads_it(
    value: dict[str, Any], extra: list[tuple[str, ...]]
) -> None:
    fields = (("message",), *extra)
    with pytest.MonkeyPatch.context() as monkeypatch:
        walked = _walked(value, fields, monkeypatch)
    assert json_texts._flat(value, "$", fields) is not None
    assert collect(value, fields=fields) == walked


@pytest.mark.parametrize(
    "value",
    [
        {"prompt": "hi", "context": {"GEMINI_API_KEY": "x"}},
        {"prompt": "hi", "files": ["a", "b"]},
        {"message": {"tokenCount": 3}},
    ],
)
def test_an_object_with_depth_is_walked(value: dict[str, Any]) -> None:
    """Nested values leave the one-loop reading to the walk (which names their paths)."""
    assert json_texts._flat(value, "$", ()) is None
    texts = collect(value)
    assert texts.paths[-1].startswith("$.")
    assert "\n" in texts.text or ": " in texts.text


def test_the_members_and_found_fields_of_a_flat_answer() -> None:
    texts = collect({"success": True, "message": "Prompt received", "tokenCount": 7}, fields=(("message",),))
    assert texts.text == "success\nmessage: Prompt received\ntokenCount: 7"
    assert texts.fields == ("Prompt received",)
    assert texts.path_at(texts.text.index("Prompt")) == "$.message"
    assert texts.path_at(0) == "$.success (key)"


def test_the_top_keys_of_the_answer_paths_follow_the_paths_asked_about() -> None:
    """The paths' top keys are remembered for the last tuple of paths only: other paths, or a
    list of paths changed in place, are never read with the keys of earlier ones."""
    assert collect({"message": "a", "text": "b"}, fields=(("message",),)).fields == ("a",)
    assert collect({"message": "a", "text": "b"}, fields=(("text",),)).fields == ("b",)
    paths = [("message",)]
    assert collect({"message": "a", "text": "b"}, fields=paths).fields == ("a",)
    paths[0] = ("text",)
    assert collect({"message": "a", "text": "b"}, fields=paths).fields == ("b",)
