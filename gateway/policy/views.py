"""Decoded views of a text: backslash escapes and percent-encoding read the way a program would.

A key written ``\\u0041KIA…``, ``\\nAKIA…`` (a backslash and an ``n``, as in pasted JSON or
code) or ``aws_key%3DAKIA…`` is a key to whatever later decodes that text; rules are also run
on the decoded text, and their spans mapped back to the text as given. Decoding is one pass,
left to right; a text that is still encoded after it (``\\\\n``, ``%253D``) gets a second
view decoded from the first. Text without a backslash or a percent sign has no view, and costs
nothing more than two ``in`` tests.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.policy.model import Span

# Views decoded from a text, each from the one before: ``\\\\n`` needs two.
MAX_DEPTH = 2

_SIMPLE = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "0": "\0",
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
}
# Matched at a backslash or a percent sign, which ``str.find`` reaches far faster than a scan.
_ESCAPE = re.compile(
    r"\\(?:"
    r"u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"  # a surrogate pair
    r"|u[0-9a-fA-F]{4}|u\{[0-9a-fA-F]{1,6}\}|x[0-9a-fA-F]{2}"
    r"|[ntrbfv0\"'\\/]"
    r")"
    r"|%[0-9a-fA-F]{2}(?:%[0-9a-fA-F]{2})*"
)


@dataclass(frozen=True, slots=True)
class DecodedView:
    """``text`` decoded from ``source``, and where each decoded character came from.

    ``decoded`` lists, in order, each character that decoding produced (one character for an
    escape, or for one to four percent bytes) with the range of ``source`` it replaces; every
    other character of ``text`` is copied from ``source`` as it was.
    """

    source: str
    text: str
    decoded: tuple[tuple[int, int], ...]  # (start, end) in ``source`` of each decoded character
    # Where each decoded character stands in ``text``: built on the first span mapped back.
    _offsets: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def span(self, span: Span) -> Span:
        """The range of ``source`` that ``span`` (a range of ``text``) was decoded from."""
        if span.start >= len(self.text):
            return Span(len(self.source), len(self.source))
        start = self._origin(span.start)[0]
        if span.end <= span.start:
            return Span(start, start)
        return Span(start, self._origin(span.end - 1)[1])

    def _origin(self, offset: int) -> tuple[int, int]:
        offsets = self._offsets
        if not offsets:
            shrunk = 0
            for start, end in self.decoded:
                offsets.append(start - shrunk)
                shrunk += end - start - 1
        index = bisect_right(offsets, offset) - 1
        if index < 0:
            return offset, offset + 1
        start, end = self.decoded[index]
        if offsets[index] == offset:
            return start, end
        origin = end + offset - offsets[index] - 1  # copied, after the decoded character
        return origin, origin + 1


def decoded_views(text: str) -> Iterator[DecodedView]:
    """The views of ``text``: decoded once, then again while it still changes, at most twice."""
    source = text
    for _ in range(MAX_DEPTH):
        if "\\" not in source and "%" not in source:
            return
        view = decode(source)
        if view is None:
            return
        yield view
        source = view.text


def decode(text: str) -> DecodedView | None:
    """One pass of decoding, left to right, or ``None`` when the text holds nothing to decode."""
    pieces: list[str] = []
    decoded: list[tuple[int, int]] = []
    done = 0  # of the source copied or decoded so far
    match, find = _ESCAPE.match, text.find
    backslash, percent = find("\\"), find("%")
    while backslash >= 0 or percent >= 0:
        # Escapes are found from a backslash or a percent sign: ``find`` is far faster than a scan.
        position = backslash if percent < 0 or 0 <= backslash < percent else percent
        found = match(text, position)
        after = position + 1
        if found is not None:
            after = found.end()
            escape = found.group()
            if escape[0] == "%" and len(escape) == 3 and escape[1] < "8":  # one ASCII byte: usual
                pieces += (text[done:position], chr(int(escape[1:], 16)))
                decoded.append((position, after))
                done = after
            elif escape[0] == "%":
                for char, start, end in _percent(escape, position):
                    if char is not None:
                        pieces += (text[done:start], char)
                        decoded.append((start, end))
                        done = end
            else:
                char = _SIMPLE.get(escape[1]) if len(escape) == 2 else _unescape(escape)
                if char is not None:
                    pieces += (text[done:position], char)
                    decoded.append((position, after))
                    done = after
        if 0 <= backslash < after:
            backslash = find("\\", after)
        if 0 <= percent < after:
            percent = find("%", after)
    if not decoded:
        return None
    pieces.append(text[done:])
    return DecodedView(text, "".join(pieces), tuple(decoded))


def _unescape(escape: str) -> str | None:
    """The character of a ``\\u`` or ``\\x`` escape (or a simple one); ``None``: no code point."""
    kind = escape[1]
    if kind == "u" and escape[2] == "{":
        code = int(escape[3:-1], 16)
        return chr(code) if code <= 0x10FFFF else None
    if kind == "u" and len(escape) == 12:
        high, low = int(escape[2:6], 16), int(escape[8:12], 16)
        return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
    if kind in "ux":
        return chr(int(escape[2:], 16))
    return _SIMPLE[kind]


def _percent(run: str, offset: int) -> Iterator[tuple[str | None, int, int]]:
    """Each character of a run of ``%XX`` bytes decoded as UTF-8, with its range in the text.

    A byte that does not start a valid UTF-8 sequence comes back as ``None`` with its range.
    """
    data = bytes.fromhex(run.replace("%", ""))
    try:
        chars = data.decode("utf-8")
    except UnicodeDecodeError:
        yield from _percent_bytes(data, offset)
        return
    start = offset
    for char in chars:
        code = ord(char)
        end = start + (3 if code < 0x80 else 6 if code < 0x800 else 9 if code < 0x10000 else 12)
        yield char, start, end
        start = end


def _percent_bytes(data: bytes, offset: int) -> Iterator[tuple[str | None, int, int]]:
    """As ``_percent``, byte by byte, for a run that is not UTF-8 throughout."""
    index = 0
    while index < len(data):
        lead = data[index]
        size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        char = None
        if 0xC2 <= lead < 0xF5 or lead < 0x80:
            try:
                char = data[index : index + size].decode("utf-8")
            except UnicodeDecodeError:
                char = None
        start = offset + 3 * index
        if char is None or len(char) != 1:
            yield None, start, start + 3
            index += 1
        else:
            yield char, start, start + 3 * size
            index += size
