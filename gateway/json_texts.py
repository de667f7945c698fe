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
import re
from dataclasses import dataclass
from typing import Any

# Pieces are joined on a line break: patterns that stop at a line end do not run from one
# field into the next, and a match that does span two fields errs towards being reported.
SEPARATOR = "\n"
# Deeper than any message of the conversation API; a deeper body is refused, not walked.
MAX_DEPTH = 64

_PLAIN_KEY = re.compile(r"[A-Za-z_]{1,32}")


class TooDeep(ValueError):
    """The value nests deeper than ``MAX_DEPTH``."""


@dataclass(frozen=True, slots=True)
class Texts:
    """The joined text, and where each piece of it starts and which path it came from."""

    text: str
    starts: tuple[int, ...]
    paths: tuple[str, ...]

    def path_at(self, offset: int) -> str:
        """The path of the piece that holds character ``offset`` of ``text``."""
        if not self.paths:
            return "$"
        return self.paths[max(0, bisect.bisect_right(self.starts, offset) - 1)]

    def paths_of(self, spans: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> list[str]:
        return list(dict.fromkeys(self.path_at(start) for start, _ in spans))


def collect(value: Any, *, max_depth: int = MAX_DEPTH) -> Texts:
    """Every string, number and object key of ``value``, in document order."""
    pieces: list[str] = []
    paths: list[str] = []
    _walk(value, "$", 0, max_depth, pieces, paths)
    starts: list[int] = []
    offset = 0
    for piece in pieces:
        starts.append(offset)
        offset += len(piece) + len(SEPARATOR)
    return Texts(SEPARATOR.join(pieces), tuple(starts), tuple(paths))


def _key_path(path: str, key: str, position: int) -> str:
    return f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}.<key {position}>"


def _walk(value: Any, path: str, depth: int, limit: int, pieces: list[str], paths: list[str]) -> None:
    if isinstance(value, str):
        pieces.append(value)
        paths.append(path)
    elif isinstance(value, dict):
        if depth >= limit:
            raise TooDeep(f"JSON nested deeper than {limit} levels")
        for position, (key, item) in enumerate(value.items()):
            where = _key_path(path, key, position)
            pieces.append(key)
            paths.append(where + " (key)")
            _walk(item, where, depth + 1, limit, pieces, paths)
    elif isinstance(value, list):
        if depth >= limit:
            raise TooDeep(f"JSON nested deeper than {limit} levels")
        for index, item in enumerate(value):
            _walk(item, f"{path}[{index}]", depth + 1, limit, pieces, paths)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # A card or account number is as readable in a number as in a string.
        pieces.append(repr(value))
        paths.append(path)
