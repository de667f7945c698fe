"""RE2 compilation shared by the loader (to refuse bad patterns) and the rule set."""

from __future__ import annotations

import re2

from gateway.policy.normalize import normalize

# Room for the program and DFA cache of a thousand-rule set (bench/engine.py compiles one).
SET_MAX_MEM = 64 << 20
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
    return f"{_edge(folded[0], before=True)}(?P<v>(?i:{body})){_edge(folded[-1], before=False)}"


def _edge(char: str, *, before: bool) -> str:
    # RE2's \b is cheap but knows only ASCII words; a Unicode class with case folding costs
    # about 100 times more to compile and megabytes of DFA, so it is kept for non-ASCII edges.
    if not (char.isalnum() or char == "_"):
        return ""
    if char.isascii():
        return r"\b"
    return f"(?:^|{_WORD_EDGE})" if before else f"(?:$|{_WORD_EDGE})"
