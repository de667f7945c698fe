"""A whole answer read by ``read_answer``'s short way (a UTF-8 JSON object) reads as its steps
read it: the same texts, paths, answer fields, payload and plainness, or the same refusal."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.answers import InspectedAnswer, NotInspectable, read_answer, read_readings
from gateway.config import Settings

# As the boundary fuzz: a fixed budget in CI, FUZZ_EXAMPLES=N for a long run.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
PATHS = Settings().field_paths

SCALARS = st.one_of(
    st.text(max_size=10),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
KEYS = st.one_of(
    st.sampled_from(["message", "content", "choices", "delta", "usage", "text"]), st.text(max_size=6)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
OBJECTS = st.dictionaries(KEYS, VALUES, max_size=5)


def _encoded(value: Any, ascii_only: bool, spaced: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":"))
    return text.encode("utf-8", errors="surrogatepass")


def _either(raw: bytes, sse: bool, declared: str | None) -> tuple[str, InspectedAnswer | str]:
    def outcome(read: Any) -> tuple[str, InspectedAnswer | str]:
        try:
            return "read", read(raw, sse=sse, declared=declared, paths=PATHS)
        except NotInspectable as refusal:
            return "refused", refusal.reason

    short, steps = outcome(read_answer), outcome(read_readings)
    assert short == steps
    return short


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(
    value=OBJECTS,
    ascii_only=st.booleans(),
    spaced=st.booleans(),
    declared=st.sampled_from([None, "utf-8", "latin-1", "utf-16"]),
    sse=st.booleans(),
)
def test_a_json_object_reads_the_same_either_way(
    value: dict[str, Any], ascii_only: bool, spaced: bool, declared: str | None, sse: bool
) -> None:
    _either(_encoded(value, ascii_only, spaced), sse, declared)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(tail=st.binary(max_size=24), declared=st.sampled_from([None, "utf-8"]))
def test_bytes_that_start_like_an_object_read_the_same_either_way(tail: bytes, declared: str | None) -> None:
    """Not JSON, not UTF-8, zero bytes, a trailing extra: whatever follows the brace."""
    _either(b"{" + tail, False, declared)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"message": "\\ud800 lone surrogate"}',  # orjson refuses it; the standard library reads it
        b'{"a": 1} {"b": 2}',  # two values: not one JSON object
        b'{\x00"\x00',  # UTF-16 with no order mark: a second reading is guessed
        b'{"message": "caf\xe9"}',  # not UTF-8: read with replacement characters
        b"{" + b'"a":' * 0 + b'{"a":' * 70 + b"1" + b"}" * 70 + b"}",  # nested deeper than the walk goes
        b'{"message": {"content": "hi"}, "usage": {"completion_tokens": 3}}',
    ],
)
def test_answers_at_the_edges_read_the_same_either_way(raw: bytes) -> None:
    _either(raw, False, None)


def test_a_plain_answer_takes_the_short_way_and_is_plain() -> None:
    kind, read = _either(b'{"success": true, "message": "Prompt received"}', False, None)
    assert kind == "read"
    assert isinstance(read, InspectedAnswer)
    assert read.plain
    assert read.fields == ("Prompt received",)
    assert read.texts.text == "success\nmessage: Prompt received"
