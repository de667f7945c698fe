"""Text normalisation that sees through simple evasions, with offsets mapped back.

Rules match the normalised text (NFKC, invisible format characters removed); spans are
reported in the caller's original text. ASCII and already-normal text take a fast path with
no per-character work, which is what keeps evaluation cheap on ordinary prompts.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from gateway.policy.model import Span

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties) plus the remaining format (Cf)
# characters: they render as nothing, so an attacker can put them inside a secret or keyword.
_INVISIBLE_RANGES = (
    "\u00ad\u034f\u061c\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2\u115f\u1160"
    "\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164"
    "\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
)
_INVISIBLE = re.compile(f"[{_INVISIBLE_RANGES}]")
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


def _is_invisible(char: str) -> bool:
    return _INVISIBLE.match(char) is not None or unicodedata.category(char) == "Cf"


@dataclass(frozen=True, slots=True)
class NormalizedText:
    """The text rules see, as UTF-8 bytes for RE2, and the way back to the original."""

    original: str
    text: str
    data: bytes
    # For each character of ``text``: the original range it came from. ``None``: identity.
    starts: tuple[int, ...] | None
    ends: tuple[int, ...] | None

    def char_offset(self, byte_offset: int) -> int:
        if len(self.data) == len(self.text):
            return byte_offset
        return len(self.data[:byte_offset].decode("utf-8", errors="replace"))

    def span(self, byte_start: int, byte_end: int) -> Span:
        """Map a byte range of ``data`` to a character range of the original text."""
        start = self.char_offset(byte_start)
        end = start + len(self.data[byte_start:byte_end].decode("utf-8", errors="replace"))
        if self.starts is None or self.ends is None:
            return Span(start, end)
        if start >= len(self.starts):
            return Span(len(self.original), len(self.original))
        if end <= start:
            return Span(self.starts[start], self.starts[start])
        return Span(self.starts[start], self.ends[end - 1])


def _utf8(text: str) -> bytes:
    # A lone surrogate (possible in JSON input) becomes one "?" byte: offsets stay aligned.
    return text.encode("utf-8", errors="replace")


def normalize(text: str) -> NormalizedText:
    if text.isascii():
        return NormalizedText(text, text, text.encode("ascii"), None, None)
    if unicodedata.is_normalized("NFKC", text) and _INVISIBLE.search(text) is None:
        return NormalizedText(text, text, _utf8(text), None, None)
    return _normalize_mapped(text)


def _normalize_mapped(text: str) -> NormalizedText:
    pieces: list[str] = []
    starts: list[int] = []
    ends: list[int] = []

    def keep(start: int, end: int) -> None:
        pieces.append(text[start:end])
        starts.extend(range(start, end))
        ends.extend(range(start + 1, end + 1))

    done = 0
    for run in _NON_ASCII_RUN.finditer(text):
        run_start, run_end = run.span()
        # A combining mark composes with the base character before it.
        if run_start > done and unicodedata.combining(text[run_start]):
            run_start -= 1
        keep(done, run_start)
        segment = text[run_start:run_end]
        if unicodedata.is_normalized("NFKC", segment) and _INVISIBLE.search(segment) is None:
            keep(run_start, run_end)
        else:
            _normalize_clusters(text, run_start, run_end, pieces, starts, ends)
        done = run_end
    keep(done, len(text))
    normalized = "".join(pieces)
    return NormalizedText(
        text,
        normalized,
        _utf8(normalized),
        tuple(starts),
        tuple(ends),
    )


def _normalize_clusters(
    text: str,
    start: int,
    end: int,
    pieces: list[str],
    starts: list[int],
    ends: list[int],
) -> None:
    index = start
    while index < end:
        stop = index + 1
        while stop < end and (unicodedata.combining(text[stop]) or _is_invisible(text[stop])):
            stop += 1
        cluster = "".join(char for char in text[index:stop] if not _is_invisible(char))
        folded = unicodedata.normalize("NFKC", cluster)
        pieces.append(folded)
        starts.extend([index] * len(folded))
        ends.extend([stop] * len(folded))
        index = stop
