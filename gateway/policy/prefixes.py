"""Regexes that match every beginning of a match, for the stream hold-back (``holdback``).

A pattern is read into a syntax tree with Python's own parser, after RE2-only syntax (``\\pL``,
``[[:alpha:]]``, ``\\x{41}``, ``\\z``, ``\\Q..\\E``, ``x{,3}`` as text) is swapped for what
Python reads the same way; a pattern Python cannot read is ``Unreadable``. Anchors stay where
the text around them is known and match anything at either end of the text searched; large
counts are relaxed (``x{8,40}`` read as ``x{4,}``). Both only ever hold more.
The tree becomes a *prefix-closed* regex (``prefix(a b) = prefix(a) | a prefix(b)``,
``prefix(r{m,n}) = r{0,n-1} prefix(r)``), written backwards in RE2 syntax: matched anchored and
longest on a text reversed, it measures the longest suffix of the text that begins a match.
"""

from __future__ import annotations

import importlib
import re
import warnings
from dataclasses import dataclass
from typing import Any

# Python's own parser reads RE2 patterns once RE2-only syntax is swapped out; it has no stub.
_parser: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")


class Unreadable(ValueError):
    """A pattern this module cannot turn into a prefix regex: its rule holds a fixed window."""


# A regex as a tree: one character, a sequence, alternatives, a repetition, or a flag scope.


@dataclass(frozen=True, slots=True)
class _Char:
    text: str  # RE2 syntax matching exactly one character


@dataclass(frozen=True, slots=True)
class _Assert:
    text: str  # RE2 syntax of a zero-width assertion


@dataclass(frozen=True, slots=True)
class _Seq:
    items: tuple[_Re, ...]


@dataclass(frozen=True, slots=True)
class _Alt:
    items: tuple[_Re, ...]


@dataclass(frozen=True, slots=True)
class _Repeat:
    item: _Re
    low: int
    high: int | None  # None: unbounded


@dataclass(frozen=True, slots=True)
class _Flags:
    on: str
    off: str
    item: _Re


_Re = _Char | _Assert | _Seq | _Alt | _Repeat | _Flags
Regex = _Re
_EMPTY = _Seq(())
_ANY = _Flags("s", "", _Char("."))


def _seq(*items: _Re) -> _Re:
    flat: list[_Re] = []
    for item in items:
        flat.extend(item.items if isinstance(item, _Seq) else (item,))
    return flat[0] if len(flat) == 1 else _Seq(tuple(flat))


def _alt(*items: _Re) -> _Re:
    unique = list(dict.fromkeys(items))
    if len(unique) == 1:
        return unique[0]
    if _EMPTY in unique:
        rest = [item for item in unique if item != _EMPTY]
        return _repeat(rest[0] if len(rest) == 1 else _Alt(tuple(rest)), 0, 1)
    return _Alt(tuple(unique))


def _repeat(item: _Re, low: int, high: int | None) -> _Re:
    if item == _EMPTY or high == 0:
        return _EMPTY
    if low == high == 1:
        return item
    return _Repeat(item, low, high)


# Reading RE2 syntax with Python's parser.

_PLACEHOLDER = 0xF0000  # Unicode private use plane: a pattern never holds these
_CATEGORIES = {
    "CATEGORY_DIGIT": r"\d",
    "CATEGORY_NOT_DIGIT": r"\D",
    "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S",
    "CATEGORY_WORD": r"\w",
    "CATEGORY_NOT_WORD": r"\W",
}
_ASSERTIONS = {
    "AT_BEGINNING": "^",
    "AT_BEGINNING_STRING": r"\A",
    "AT_END": "$",
    "AT_END_STRING": r"\z",
    "AT_BOUNDARY": r"\b",
    "AT_NON_BOUNDARY": r"\B",
}
_FLAGS = {_c.SRE_FLAG_IGNORECASE: "i", _c.SRE_FLAG_MULTILINE: "m", _c.SRE_FLAG_DOTALL: "s"}


def _swap_re2_syntax(pattern: str) -> tuple[str, dict[int, str]]:
    """The pattern in Python's syntax, RE2's classes (``\\pL``, ``[:alpha:]``) as placeholders."""
    out: list[str] = []
    classes: dict[int, str] = {}
    index, size, in_class = 0, len(pattern), False
    while index < size:
        char = pattern[index]
        after = pattern[index + 1 : index + 2]
        if char == "\\":
            written, index = _escape_sequence(pattern, index, classes)
        elif in_class and char == "[" and after == ":":
            end = pattern.find(":]", index + 2)
            if end < 0:
                raise Unreadable("an unterminated [:class:]")
            written, index = _placeholder(pattern[index : end + 2], classes), end + 2
        elif in_class:
            in_class = char != "]"
            written, index = char, index + 1
        elif char == "[":
            in_class = True
            start = index + 1 + (after == "^")
            start += pattern[start : start + 1] == "]"  # a leading ] is a member
            written, index = pattern[index:start], start
        elif char == "{" and after == ",":
            written, index = "\\{", index + 1  # RE2 reads x{,n} as text, Python as a repetition
        elif pattern.startswith("(?<", index) and pattern[index + 3 : index + 4] not in ("=", "!"):
            written, index = "(?P<", index + 3
        else:
            written, index = char, index + 1
        out.append(written)
    return "".join(out), classes


def _escape_sequence(pattern: str, index: int, classes: dict[int, str]) -> tuple[str, int]:
    """One backslash escape at ``index`` in Python's syntax, and where the pattern goes on."""
    kind = pattern[index + 1 : index + 2]
    brace = pattern[index + 2 : index + 3] == "{"
    if kind in ("p", "P"):
        end = pattern.find("}", index) + 1 if brace else index + 3
        if end <= index:
            raise Unreadable("an unterminated \\p{...}")
        return _placeholder(pattern[index:end], classes), end
    if kind == "x" and brace:
        end = pattern.find("}", index)
        if end < 0:
            raise Unreadable("an unterminated \\x{...}")
        return f"\\U{int(pattern[index + 3 : end], 16):08X}", end + 1
    if kind == "z":
        return "\\Z", index + 2
    if kind == "Q":
        end = pattern.find("\\E", index + 2)
        end = len(pattern) if end < 0 else end
        return re.escape(pattern[index + 2 : end]), end + 2
    if kind == "C":
        raise Unreadable("\\C matches a byte, not a character")
    return pattern[index : index + 2], index + 2


def _placeholder(written: str, classes: dict[int, str]) -> str:
    code = _PLACEHOLDER + len(classes)
    classes[code] = written
    return chr(code)


def read(pattern: str) -> tuple[Regex, Regex, Regex]:
    """The pattern as a tree; from its group ``v`` on; and what precedes that group (empty when
    the pattern has no group ``v`` at its top level, and the tree from the group on is the whole).

    Raises ``Unreadable``.
    """
    python, classes = _swap_re2_syntax(pattern)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = _parser.parse(python)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise Unreadable(str(exc)) from None
    reader = _Reader(classes)
    items = list(parsed)
    whole = held = reader.seq(items)
    context: _Re = _EMPTY
    group = parsed.state.groupdict.get("v")
    for position, (op, av) in enumerate(items):
        if op is _c.SUBPATTERN and av[0] == group:
            held, context = reader.seq(items[position:]), reader.seq(items[:position])
            break
    flags = "".join(letter for bit, letter in _FLAGS.items() if parsed.state.flags & bit)
    if flags:
        return _Flags(flags, "", whole), _Flags(flags, "", held), _Flags(flags, "", context)
    return whole, held, context


class _Reader:
    def __init__(self, classes: dict[int, str]) -> None:
        self.classes = classes

    def seq(self, items: Any) -> _Re:
        return _seq(*(self.node(op, av) for op, av in items))

    def node(self, op: Any, av: Any) -> _Re:
        if op is _c.LITERAL:
            written = self.classes.get(av)
            if written is not None and written.startswith("[:"):
                return _Char(f"[{written}]")
            return _Char(written or _escape(av))
        if op is _c.NOT_LITERAL:
            return _Char(f"[^{self.member(av)}]")
        if op is _c.ANY:
            return _Char(".")
        if op is _c.IN:
            return _Char(self.char_class(av))
        if op is _c.BRANCH:
            return _alt(*(self.seq(branch) for branch in av[1]))
        if op is _c.SUBPATTERN:
            _group, on, off, items = av
            inner = self.seq(items)
            on_letters = "".join(letter for bit, letter in _FLAGS.items() if on & bit)
            off_letters = "".join(letter for bit, letter in _FLAGS.items() if off & bit)
            return _Flags(on_letters, off_letters, inner) if on_letters or off_letters else inner
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            low, high, items = av
            return _repeat(self.seq(items), low, None if high == _c.MAXREPEAT else high)
        if op is _c.AT and str(av) in _ASSERTIONS:
            return _Assert(_ASSERTIONS[str(av)])
        raise Unreadable(f"{op} is not RE2 syntax")

    def member(self, code: int) -> str:
        return self.classes.get(code) or _escape(code)

    def char_class(self, items: Any) -> str:
        parts = []
        negated = False
        for op, av in items:
            if op is _c.NEGATE:
                negated = True
            elif op is _c.LITERAL:
                parts.append(self.member(av))
            elif op is _c.RANGE:
                parts.append(f"{self.member(av[0])}-{self.member(av[1])}")
            elif op is _c.CATEGORY and str(av) in _CATEGORIES:
                parts.append(_CATEGORIES[str(av)])
            else:
                raise Unreadable(f"{op} {av} in a character class")
        return f"[{'^' if negated else ''}{''.join(parts)}]"


def _escape(code: int) -> str:
    char = chr(code)
    return char if char.isascii() and char.isalnum() else f"\\x{{{code:X}}}"


# Prefixes, reversal, width, and RE2 text.


def _prefix(regex: _Re) -> _Re:
    """A regex matching every beginning of a match of ``regex`` (the empty text included)."""
    match regex:
        case _Char():
            return _repeat(regex, 0, 1)
        case _Assert():
            return _EMPTY  # the text ends before it: what follows will decide
        case _Seq(items):
            held: _Re = _EMPTY
            for item in reversed(items):
                if held == _EMPTY:
                    held = _prefix(item)
                elif isinstance(item, _Char):
                    held = _repeat(_seq(item, held), 0, 1)
                elif _prefix_closed(item):
                    held = _seq(item, held)
                else:
                    held = _alt(_prefix(item), _seq(item, held))
            return held
        case _Alt(items):
            return _alt(*(_prefix(item) for item in items))
        case _Repeat(item, _low, high):
            if isinstance(item, _Char):
                return _repeat(item, 0, high)
            return _seq(_repeat(item, 0, None if high is None else high - 1), _prefix(item))
        case _Flags(on, off, item):
            return _Flags(on, off, _prefix(item))


# Counts above this are relaxed in the prefix regex (``x{8,40}`` is read as ``x{4,}``): a DFA
# state would otherwise remember each count (a new state at every character of a key), and
# holding a run shorter or longer than its bounds only holds more.
_COUNTED = 4


def _relax(regex: _Re) -> _Re:
    """A regex matching at least what ``regex`` matches, with no large counted repetition."""
    match regex:
        case _Char() | _Assert():
            return regex
        case _Seq(items):
            return _seq(*(_relax(item) for item in items))
        case _Alt(items):
            return _alt(*(_relax(item) for item in items))
        case _Repeat(item, low, high):
            if high is not None and high > _COUNTED:
                high = None
            return _repeat(_relax(item), min(low, _COUNTED), high)
        case _Flags(on, off, item):
            return _Flags(on, off, _relax(item))


def _prefix_closed(regex: _Re) -> bool:
    """Whether every beginning of a match is a match (the empty text included)."""
    match regex:
        case _Repeat(_Char(), 0, _high):
            return True
        case _Flags(_on, _off, item):
            return _prefix_closed(item)
        case _:
            return regex == _EMPTY


# An assertion read backwards; at either end of the text searched (the text so far ends there,
# or the search began there) what lies beyond is unknown, so a boundary may hold there.
_REVERSED = {
    "^": "$",
    "$": "^",
    r"\A": r"\z",
    r"\z": r"\A",
    r"\b": r"(?:\b|^|$)",
    r"\B": r"(?:\B|^|$)",
}


def _reverse(regex: _Re) -> _Re:
    match regex:
        case _Char():
            return regex
        case _Assert(text):
            return _Assert(_REVERSED[text])
        case _Seq(items):
            return _Seq(tuple(_reverse(item) for item in reversed(items)))
        case _Alt(items):
            return _Alt(tuple(_reverse(item) for item in items))
        case _Repeat(item, low, high):
            return _Repeat(_reverse(item), low, high)
        case _Flags(on, off, item):
            return _Flags(on, off, _reverse(item))


UNBOUNDED = 1 << 30


def _width(regex: _Re) -> int:
    match regex:
        case _Char():
            return 1
        case _Assert():
            return 0
        case _Seq(items):
            return sum(_width(item) for item in items)
        case _Alt(items):
            return max(_width(item) for item in items)
        case _Repeat(item, _low, high):
            return UNBOUNDED if high is None else min(UNBOUNDED, _width(item) * high)
        case _Flags(_on, _off, item):
            return _width(item)


def _text(regex: _Re) -> str:
    match regex:
        case _Char(text) | _Assert(text):
            return text
        case _Seq(items):
            return "".join(f"(?:{_text(item)})" if isinstance(item, _Alt) else _text(item) for item in items)
        case _Alt(items):
            return f"(?:{'|'.join(_text(item) for item in items)})"
        case _Repeat(item, low, high):
            inner = _text(item) if isinstance(item, _Char) else f"(?:{_text(item)})"
            if (low, high) == (0, None):
                return f"{inner}*"
            if (low, high) == (0, 1):
                return f"{inner}?"
            return f"{inner}{{{low},{'' if high is None else high}}}"
        case _Flags(on, off, item):
            return f"(?{on}{'-' + off if off else ''}:{_text(item)})"


def width(regex: Regex) -> int:
    """The longest match, in characters; ``UNBOUNDED`` or more when there is no bound."""
    return _width(regex)


def prefix_pattern(regex: Regex) -> str:
    """RE2 text matching, backwards, every beginning of a match of ``regex`` (relaxed)."""
    return _text(_reverse(_prefix(_relax(regex))))


def characters(regex: Regex) -> list[str]:
    """RE2 text of every one-character part of ``regex``, each under the flags it is read with."""
    found: list[str] = []

    def walk(node: _Re, wrap: tuple[tuple[str, str], ...]) -> None:
        match node:
            case _Char():
                text = _text(node)
                for on, off in reversed(wrap):
                    text = f"(?{on}{'-' + off if off else ''}:{text})"
                found.append(text)
            case _Seq(items) | _Alt(items):
                for item in items:
                    walk(item, wrap)
            case _Repeat(item, _low, _high):
                walk(item, wrap)
            case _Flags(on, off, item):
                walk(item, (*wrap, (on, off)))

    walk(regex, ())
    return list(dict.fromkeys(found))


def context_pattern(regex: Regex) -> str:
    """RE2 text matching, backwards, a whole match of ``regex`` (relaxed) and anything before it,
    or any beginning of a match at the start of the text searched (what lies before is unknown)."""
    backwards = _reverse(_relax(regex))
    return f"(?:{_text(backwards)}|(?:{_text(_prefix(backwards))})$)"


def part_pattern(regex: Regex) -> str:
    """RE2 text matching, backwards, a whole match of ``regex`` (relaxed) and anything after it."""
    return _text(_seq(_repeat(_ANY, 0, None), _reverse(_relax(regex))))
