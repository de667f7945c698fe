"""Every string of a JSON value, keys included, as one text to evaluate, with each part's path.

A peer acts on every field of a message, not only the ones we expect text in: a secret in
``context`` or a key of ``attachments`` reaches the backend as surely as one in ``prompt``. So
the gateway evaluates all of them, in one pass over one text (one RE2 set match, not one per
field), and maps a match back to the JSON path of the value it fell in. Paths name keys only
when a key is a plain word; any other key is named by its position, so that a path can be
logged without quoting what a client put in a key.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Pieces are joined on a line break: patterns that stop at a line end do not run from one
# field into the next, and a match that does span two fields errs towards being reported.
SEPARATOR = "\n"
# An object's key and its string or number value are joined as a client showing the JSON
# reads them, the name beside its value: a rule that needs a secret's name before the secret
# ("GEMINI_API_KEY": "AIza...") matches there, though the strings are read apart.
MEMBER = ": "
# Deeper than any message of the conversation API; a deeper body is refused, not walked.
MAX_DEPTH = 64


class TooDeep(ValueError):
    """The value nests deeper than ``MAX_DEPTH``."""


# Not frozen: built for every body and answer, and a frozen dataclass's __init__ costs about
# five times a plain one's (nothing changes one once built).
@dataclass(slots=True)
class Texts:
    """The joined text, and where each piece of it starts and which path it came from.

    ``fields`` holds the non-empty strings found at the field paths ``collect`` was asked for
    (where a reply carries its text, for token counting), in document order.
    """

    text: str
    starts: tuple[int, ...]
    paths: tuple[str, ...]
    fields: tuple[str, ...] = ()

    def path_at(self, offset: int) -> str:
        """The path of the piece that holds character ``offset`` of ``text``."""
        if not self.paths:
            return "$"
        return self.paths[max(0, bisect.bisect_right(self.starts, offset) - 1)]

    def paths_of(self, spans: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> list[str]:
        return list(dict.fromkeys(self.path_at(start) for start, _ in spans))

    def paths_between(self, start: int, end: int) -> list[str]:
        """The paths of every piece that characters ``start`` to ``end`` touch."""
        if not self.paths:
            return ["$"]
        first = max(0, bisect.bisect_right(self.starts, start) - 1)
        last = max(first, bisect.bisect_left(self.starts, max(start + 1, end)) - 1)
        return list(self.paths[first : last + 1])


def collect(
    value: Any,
    *,
    max_depth: int = MAX_DEPTH,
    fields: Sequence[tuple[str, ...]] = (),
    apart: bool = False,
    root: str = "$",
) -> Texts:
    """Every string, number and object key of ``value``, in document order.

    ``fields`` are field paths as ``flashback.parse_field_path`` gives them; the strings found
    there are also listed in ``Texts.fields``, and with ``apart`` only there, not in the text.
    """
    if type(value) is dict and not apart and max_depth > 0:
        flat = _flat(value, root, fields)
        if flat is not None:
            return flat
    pieces: list[str] = []
    paths: list[str] = []
    found: list[str] = []
    members: list[int] = []
    _walk(value, root, 0, max_depth, pieces, paths, tuple(fields), found, apart, members)
    return _texts(pieces, paths, tuple(found), members)


def _flat(value: dict[Any, Any], root: str, fields: Sequence[tuple[str, ...]]) -> Texts | None:
    """``collect`` of an object with no object or list in it (most bodies and answers), in one
    loop that joins as it goes; None for any other object. The same text, pieces and paths as
    the walk (tests/test_json_texts.py holds them to it)."""
    ends = _ends(fields) if fields else ()
    parts: list[str] = []
    starts: list[int] = []
    paths: list[str] = []
    found: list[str] = []
    offset = 0
    for position, (key, item) in enumerate(value.items()):
        kind = type(item)
        if kind is str:
            text = item
        elif kind is int or kind is float:
            text = repr(item)
        elif item is None or kind is bool:
            text = None
        else:
            return None
        named = _KEY_PATHS.get((root, key)) or _key_paths(root, key, position)
        if parts:
            parts.append(SEPARATOR)
            offset += len(SEPARATOR)
        starts.append(offset)
        paths.append(named[1])
        parts.append(key)
        offset += len(key)
        if text is None:
            continue
        if kind is str and item and key in ends:
            found.append(item)
        parts.append(MEMBER)
        offset += len(MEMBER)
        starts.append(offset)
        paths.append(named[0])
        parts.append(text)
        offset += len(text)
    return Texts("".join(parts), tuple(starts), tuple(paths), tuple(found))


# The last ``fields`` asked about (held, so that no other object can take its identity), and
# the field paths of it that end at a key of the top object: every answer is read with the same
# tuple of paths, and working them out went through all of them each time. One tuple, replaced
# in one assignment: a reader never sees the paths of one with the ends of another.
_LAST_ENDS: list[tuple[Sequence[tuple[str, ...]] | None, frozenset[str]]] = [(None, frozenset())]


def _ends(fields: Sequence[tuple[str, ...]]) -> frozenset[str]:
    """The keys of a flat object where one of ``fields`` ends (the rest go deeper)."""
    last, ends = _LAST_ENDS[0]
    if fields is not last:
        ends = frozenset(path[0] for path in fields if len(path) == 1)
        if type(fields) is tuple:  # immutable: the same object always holds the same paths
            _LAST_ENDS[0] = (fields, ends)
    return ends


def piece(text: str, path: str) -> Texts:
    """A text of one piece."""
    return Texts(text, (0,), (path,))


def join(parts: Sequence[Texts]) -> Texts:
    """Several texts as one, each part's paths and fields kept, parts separated as pieces are."""
    if len(parts) == 1:
        return parts[0]
    starts: list[int] = []
    paths: list[str] = []
    offset = 0
    for part in parts:
        starts += (offset + start for start in part.starts)
        paths += part.paths
        offset += len(part.text) + len(SEPARATOR)
    text = SEPARATOR.join(part.text for part in parts)
    return Texts(text, tuple(starts), tuple(paths), tuple(f for part in parts for f in part.fields))


def _texts(
    pieces: list[str], paths: list[str], found: tuple[str, ...] = (), members: list[int] | None = None
) -> Texts:
    """The pieces joined; those listed in ``members`` (a value after its key) by ``MEMBER``."""
    starts: list[int] = []
    offset = 0
    if not members:
        for text in pieces:
            starts.append(offset)
            offset += len(text) + len(SEPARATOR)
        return Texts(SEPARATOR.join(pieces), tuple(starts), tuple(paths), found)
    joined: list[str] = []
    after = set(members)
    for index, text in enumerate(pieces):
        if index:
            separator = MEMBER if index in after else SEPARATOR
            joined.append(separator)
            offset += len(separator)
        starts.append(offset)
        joined.append(text)
        offset += len(text)
    return Texts("".join(joined), tuple(starts), tuple(paths), found)


# The paths of plain-word keys, worked out once: the same few keys come in every body and
# answer. Bounded (keys are a client's to choose); emptied when full, so the keys in use come
# back at once. Keys of other names are named by their position, and are not kept.
_KEY_PATHS: dict[tuple[str, str], tuple[str, str]] = {}
_KEY_PATHS_LIMIT = 4096


def _key_paths(path: str, key: str, position: int) -> tuple[str, str]:
    """The path of the value under ``key``, and the path of the key itself."""
    # A plain word ([A-Za-z_]{1,32}), told by string methods at a fraction of a regex's cost.
    if len(key) <= 32 and key.isascii() and key.replace("_", "a").isalpha():
        where = f"{path}.{key}"
        named = (where, where + " (key)")
        if len(path) <= 64:
            if len(_KEY_PATHS) >= _KEY_PATHS_LIMIT:
                _KEY_PATHS.clear()
            _KEY_PATHS[path, key] = named
        return named
    where = f"{path}.<key {position}>"
    return where, where + " (key)"


def _walk(
    value: Any,
    path: str,
    depth: int,
    limit: int,
    pieces: list[str],
    paths: list[str],
    cursors: tuple[tuple[str, ...], ...],
    found: list[str],
    apart: bool,
    members: list[int],
) -> None:
    # ``cursors``: what is left of each field path that led here; () means one ends here.
    # Strings, numbers, booleans and nulls inside an object or a list are taken here rather
    # than by one more call each: this runs on every request's body and answer.
    if isinstance(value, str):
        if cursors and () in cursors:
            if value:
                found.append(value)
            if apart:
                return
        pieces.append(value)
        paths.append(path)
    elif isinstance(value, dict):
        if depth >= limit:
            raise TooDeep(f"JSON nested deeper than {limit} levels")
        depth += 1
        # The keys the field paths go on with here, once for the object rather than per key.
        heads = {c[0] for c in cursors if c} if cursors else ()
        for position, (key, item) in enumerate(value.items()):
            named = _KEY_PATHS.get((path, key)) or _key_paths(path, key, position)
            where = named[0]
            pieces.append(key)
            paths.append(named[1])
            inner = tuple(c[1:] for c in cursors if c and c[0] == key) if key in heads else ()
            kind = type(item)
            if kind is str:
                if inner and () in inner:
                    if item:
                        found.append(item)
                    if apart:
                        continue
                members.append(len(pieces))
                pieces.append(item)
                paths.append(where)
            elif kind is int or kind is float:
                members.append(len(pieces))
                pieces.append(repr(item))
                paths.append(where)
            elif item is not None and kind is not bool:
                _walk(item, where, depth, limit, pieces, paths, inner, found, apart, members)
    elif isinstance(value, list):
        if depth >= limit:
            raise TooDeep(f"JSON nested deeper than {limit} levels")
        depth += 1
        inner = tuple(c[1:] for c in cursors if c and c[0] == "[]") if cursors else ()
        ends_here = bool(inner) and () in inner
        for index, item in enumerate(value):
            kind = type(item)
            if kind is str and not ends_here:
                pieces.append(item)
                paths.append(f"{path}[{index}]")
            elif item is not None and kind is not bool:
                _walk(item, f"{path}[{index}]", depth, limit, pieces, paths, inner, found, apart, members)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # A card or account number is as readable in a number as in a string.
        pieces.append(repr(value))
        paths.append(path)
