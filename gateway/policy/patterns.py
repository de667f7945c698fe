"""RE2 compilation shared by the loader (to refuse bad patterns) and the rule set."""

from __future__ import annotations

import re2

from gateway.policy.normalize import normalize

# Room for the DFA of a thousand-rule set: RE2 gives up (no match) when it runs out of memory.
SET_MAX_MEM = 256 << 20
PATTERN_MAX_MEM = 8 << 20

_WORD_EDGE = r"[^\pL\pN_]"


def options(max_mem: int = PATTERN_MAX_MEM) -> re2.Options:
    opts = re2.Options()
    opts.max_mem = max_mem
    opts.log_errors = False
    return opts


def compile_pattern(pattern: str) -> re2.Regexp:
    """Compile with RE2 or raise ``ValueError`` explaining why the linear-time engine refused."""
    try:
        return re2.compile(pattern, options())
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(
            f"regex refused by RE2 ({reason}); RE2 runs in linear time and so has no "
            "lookaround or backreferences"
        ) from None


def keyword_pattern(word: str) -> str:
    """A case-insensitive, whole-word pattern for one literal; its group ``v`` is the word."""
    folded = normalize(word).text.strip()
    body = r"\s+".join(re2.escape(part) for part in folded.split())
    prefix = f"(?:^|{_WORD_EDGE})" if _is_word_char(folded[0]) else ""
    suffix = f"(?:$|{_WORD_EDGE})" if _is_word_char(folded[-1]) else ""
    return f"(?i){prefix}(?P<v>{body}){suffix}"


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"
