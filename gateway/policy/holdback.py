"""How much of a stream's end could still become a block: the precise hold-back.

A streamed answer is released event by event; the end of the text so far is held back while
it could still be the beginning of a match of an enforced block rule. This module says, for a
rule set and a stage, where that held suffix begins (``Holdback.start``), and why each rule is
held the way it is (``Holdback.rules``).

How: each pattern of a block rule becomes a regex matching every beginning of a match
(``prefixes``). All of them are joined into one RE2 regex, written backwards, and run anchored
and longest-match on the end of the text reversed: the longest match is the longest suffix that
begins some match, whichever alternative RE2 would prefer. One match over at most ``window``
characters per event: a few microseconds for prose.

What a rule reports is held, not the one character of context a pattern may ask for before
its group ``v`` (``(?:^|[^\\w])``): a second regex, from the group on, says whether the longest
match began with such a character. A rule of several parts (``all``) reports every part's span:
a part's whole match is held too, as long as it lies within ``window`` characters of the end
(the other parts may still follow).

The text is also read as the engine reads it: normalised (NFKC, invisible characters dropped;
its last character may still compose with a combining mark, so it counts as unknown) and in
every decoded view (JSON and percent escapes; an escape cut short at the end is held whole,
since the view could still complete a match with it).

A rule whose patterns cannot be read this way, or that can match without any of its patterns
(``not``, ``max_tokens``, a ``judge``: judged on the whole evaluated window), falls back to a fixed window of
its longest match: the last characters of every stream are held, as many as the widest such
rule needs.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import re2

from gateway.policy.model import Action, Rule, Span, Stage
from gateway.policy.normalize import normalize
from gateway.policy.patterns import SET_MAX_MEM, options
from gateway.policy.prefixes import (
    Regex,
    Unreadable,
    characters,
    context_pattern,
    part_pattern,
    prefix_pattern,
    read,
    width,
)
from gateway.policy.ruleset import (
    AllNode,
    AnyNode,
    ExceptNode,
    JudgeNode,
    MaxTokensNode,
    Node,
    NotNode,
    ProbeNode,
    RuleSet,
    may_match_without_probes,
)
from gateway.policy.views import DecodedView, decoded_views

# Rules.


@dataclass(frozen=True, slots=True)
class RuleHoldback:
    """How streams are held for one block rule: by prefix (``fixed`` None), or a fixed window."""

    rule_id: str
    longest: int  # the most characters the rule holds back
    fixed: int | None = None  # the window it always holds, when it cannot be held by prefix
    reason: str = ""  # why it holds a fixed window
    parts: bool = False  # an ``all`` of several parts: a part's whole match is held too

    def describe(self) -> str:
        if self.fixed is not None:
            return f"hold-back: fixed window {self.fixed} ({self.reason})"
        parts = ", and each part's match while the others may follow" if self.parts else ""
        return f"hold-back: prefix (longest {self.longest}){parts}"


@dataclass(frozen=True, slots=True)
class _Analysis:
    # Each pattern, whole, from its reported group on, and the context before that group:
    # held while a suffix of the text begins a match of one.
    prefixes: tuple[tuple[Regex, Regex, Regex], ...]
    parts: tuple[Regex, ...]  # held from a whole match on, while other parts may follow
    width: int  # the longest match of any pattern of the rule, exceptions included


def _analyse(node: Node) -> _Analysis:
    """Raises ``Unreadable`` for a pattern that cannot be read."""
    match node:
        case ProbeNode(probe):
            whole, held, context = read(probe.regex.pattern)
            return _Analysis(((whole, held, context),), (), width(whole))
        case AnyNode(parts):
            found = [_analyse(part) for part in parts]
            return _Analysis(
                tuple(r for a in found for r in a.prefixes),
                tuple(r for a in found for r in a.parts),
                max((a.width for a in found), default=0),
            )
        case AllNode(parts, exceptions):
            found = [_analyse(part) for part in parts]
            widths = [a.width for a in found] + [_analyse(e).width for e in exceptions]
            positive = [a for part, a in zip(parts, found, strict=True) if _reports(part)]
            prefixes = tuple(r for a in positive for r in a.prefixes)
            inner = tuple(r for a in positive for r in a.parts)
            # Each part's match is reported when the last part arrives: the early ones are held.
            # (Whole, with a wide context: the group alone is no match without it.)
            early = (
                tuple(whole if _wide(context) else held for whole, held, context in prefixes)
                if len(positive) > 1
                else ()
            )
            return _Analysis(prefixes, inner + early, max(widths, default=0))
        case NotNode(part) | ExceptNode(part):
            # Nothing they match is reported; only the window's width counts.
            return _Analysis((), (), _analyse(part).width)
        case MaxTokensNode() | JudgeNode():
            # A judge is a verdict on the whole text: it reports no span of its own.
            return _Analysis((), (), 0)
        case _:
            raise Unreadable(f"a {type(node).__name__} part is not known to it")


def _wide(context: Regex) -> bool:
    """Whether the context before a reported group is more than one character, or may be a
    letter or digit. Such a pattern is held on its own (``Holdback.wide``): held with the others,
    where one character of context is dropped, a keyword before a key would be held, or a
    letter that only another rule's reported part could begin."""
    if width(context) > 1:
        return True
    classes = [re2.compile(f"(?s:{char})") for char in characters(context)]
    return any(cls.fullmatch(char) is not None for cls in classes for char in _ALNUM)


_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _reports(node: Node) -> bool:
    return not isinstance(node, NotNode | MaxTokensNode | JudgeNode)


def _fallback(node: Node) -> str | None:
    """Why the rule cannot be held by prefix, if it cannot: what it reports is no pattern's match."""
    if _counts_tokens(node):
        return "max_tokens: its span is the whole evaluated window"
    if may_match_without_probes(node):
        return "not or judge: it matches without any of its patterns, on the whole evaluated window"
    return None


def _counts_tokens(node: Node) -> bool:
    match node:
        case MaxTokensNode():
            return True
        case AnyNode(parts) | AllNode(parts):
            return any(_counts_tokens(part) for part in parts)
        case _:
            return False


# The hold-back of a rule set.


@dataclass(frozen=True, slots=True)
class Holdback:
    """Where the held end of a stream's text begins, for the block rules of one stage.

    ``window`` is the longest match any block rule can make (capped): the most that is ever
    held, and how far back each new piece of text is evaluated. ``fixed`` is the part of it
    held whatever the text (rules that cannot be held by prefix).
    """

    window: int
    fixed: int
    rules: tuple[RuleHoldback, ...] = ()
    # Reversed, anchored, longest match: every prefix of a match, and every part's match then
    # anything; ``reported`` the same from each reported group on, without its context.
    regex: Any = None
    reported: Any = None
    # What a combining mark still to come could turn the text's last letter into, one
    # character for each way the block rules' character classes tell such characters apart
    # (None: not worked out, and the last letter is held).
    composed: tuple[str, ...] | None = None
    # Patterns with wide context before what they report (``_wide``), each searched alone:
    # every beginning of a match, of the reported part, and the context, backwards (anchored);
    # ``any_wide`` is the first of them all joined, for the common case that none begins here.
    wide: tuple[tuple[Any, Any, Any], ...] = ()
    any_wide: Any = None

    @classmethod
    def fixed_window(cls, window: int) -> Holdback:
        """Hold the last ``window`` characters, whatever they are."""
        if window < 0:
            raise ValueError("holdback must be >= 0")
        return cls(window, window)

    def start(self, text: str) -> int:
        """Where the held suffix of ``text`` (the stream text so far, or its end) begins."""
        size = len(text)
        floor = max(0, size - self.window)
        held = size - self.fixed
        if (self.regex is None and not self.wide) or held <= floor:
            return max(floor, held)
        end = text[floor:] if floor else text
        return floor + min(held - floor, self._levels(end))

    def _levels(self, text: str) -> int:
        """The held start in the text, and in each decoded view of it, mapped back."""
        found = self._level(text)
        if "\\" in text or "%" in text:
            chain: list[DecodedView] = []
            for view in decoded_views(text):
                chain.append(view)
                position = self._level(view.text)
                for earlier in reversed(chain):
                    position = _origin(earlier, position)
                found = min(found, position)
        return found

    def _level(self, text: str) -> int:
        cut = _cut_escape(text)
        if cut == len(text):
            return self._search(text)
        # The escape may decode to a character that continues what precedes it.
        return min(cut, self._search(text), self._search(text[:cut]))

    def _search(self, text: str) -> int:
        found = self._search_as_is(text)
        if self.composed and text and text[-1] in _COMPOSING:
            # Held as the text would read with the last letter composed, in each way that matters.
            head = text[:-1]
            found = min(found, *(self._search_as_is(head + char, composed=True) for char in self.composed))
        return found

    def _search_as_is(self, text: str, *, composed: bool = False) -> int:
        normalized = normalize(text)
        data = normalized.text
        # A combining mark still to come may turn the last character into any other: it is
        # held, and what precedes it is held if it begins a match (whatever would follow).
        settled = _settled(data, letters=self.composed is not None, composed=composed)
        ascii_only = normalized.starts is None and data.isascii()
        backwards = (
            normalized.data[:settled][::-1]
            if ascii_only
            else data[:settled][::-1].encode("utf-8", errors="replace")
        )
        kept = 0
        if self.regex is not None:
            kept = self._held(self.regex, self.reported, backwards, ascii_only)
        if self.any_wide is not None and self.any_wide.match(backwards).end():
            # Bytes are cut by character only when every character is one byte.
            chars = backwards if ascii_only else backwards.decode("utf-8", errors="replace")
            for regex, reported, context in self.wide:
                kept = max(kept, _held_wide(regex, reported, context, chars))
        found = settled - kept
        if found >= len(data):
            return len(text)
        return found if normalized.starts is None else normalized.starts[found]

    @staticmethod
    def _held(regex: Any, reported: Any, backwards: bytes, ascii_only: bool) -> int:
        """How many characters at the end of the text (``backwards``) to hold for these rules."""
        taken = backwards[: regex.match(backwards).end()]
        if taken and reported is not None and reported.fullmatch(taken) is None:
            # The match ends with the character of context before a reported group: that
            # character is not part of what a block reports, so it is not held.
            taken = taken[:-1] if ascii_only else taken.decode("utf-8", errors="replace")[:-1].encode()
        return len(taken) if ascii_only else len(taken.decode("utf-8", errors="replace"))


def _held_wide(regex: Any, reported: Any, context: Any, backwards: bytes | str) -> int:
    """How many characters at the end of the text to hold for one pattern with wide context:
    the longest end that begins its reported part right after a match of its context."""
    for held in range(regex.match(backwards).end(), 0, -1):
        if reported.fullmatch(backwards[:held]) is not None and context.match(backwards[held:]) is not None:
            return held
    return 0


# Plans by (rules, stage, cap): each gateway, worker and reload of the same rules builds one once.
_PLANS: dict[tuple[tuple[Rule, ...], Stage, int], Holdback] = {}
_PLANS_KEPT = 8


def plan_holdback(ruleset: RuleSet, stage: Stage, cap: int) -> Holdback:
    """The hold-back of the enforced block rules of ``stage``, holding at most ``cap`` characters."""
    key = (ruleset.rules, stage, cap)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_KEPT:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(ruleset, stage, cap)
    return plan


def _plan(ruleset: RuleSet, stage: Stage, cap: int) -> Holdback:
    rules: list[RuleHoldback] = []
    prefixes: list[str] = []
    reported: list[str] = []
    parts: list[str] = []
    accepted: list[str] = []  # every character class of what a prefix-held rule reports
    wide: list[tuple[str, str, str]] = []
    window = fixed = 0
    for compiled in ruleset.plan(stage).rules:
        if compiled.rule.effective_action is not Action.BLOCK:
            continue
        rule_id = compiled.rule.id
        try:
            analysis = _analyse(compiled.node)
        except (ValueError, RecursionError) as exc:  # Unreadable, or a pattern deeper than Python reads
            rules.append(RuleHoldback(rule_id, cap, cap, f"the prefix analysis cannot read it: {exc}"))
            window = fixed = cap
            continue
        longest_match = min(analysis.width, cap)
        window = max(window, longest_match)
        reason = _fallback(compiled.node)
        narrow = [(whole, held) for whole, held, context in analysis.prefixes if not _wide(context)]
        rule_wide = [
            (prefix_pattern(whole), prefix_pattern(held), context_pattern(context))
            for whole, held, context in analysis.prefixes
            if _wide(context)
        ]
        rule_prefixes = [prefix_pattern(whole) for whole, _held in narrow]
        rule_reported = [prefix_pattern(held) for _whole, held in narrow]
        rule_parts = [part_pattern(part) for part in analysis.parts]
        patterns = rule_prefixes + rule_reported + rule_parts + [text for both in rule_wide for text in both]
        if reason is None and not _compiles(patterns):
            reason = "its prefix regex exceeds RE2's memory budget"
        if reason is not None:
            rules.append(RuleHoldback(rule_id, longest_match, longest_match, reason))
            fixed = max(fixed, longest_match)
            continue
        longest = min(cap, max((width(held) for _whole, held, _context in analysis.prefixes), default=0))
        rules.append(RuleHoldback(rule_id, longest, parts=bool(rule_parts)))
        accepted += [char for _whole, held, _context in analysis.prefixes for char in characters(held)]
        wide += rule_wide
        prefixes += rule_prefixes
        reported += rule_reported
        parts += rule_parts
    if not prefixes and not parts and not wide:
        return Holdback(window, fixed, tuple(rules))
    regex = _compile(prefixes + parts) if prefixes or parts else None
    context = _compile(reported + parts) if reported != prefixes else None
    compiled_wide = tuple((_compile([w]), _compile([r]), _compile([c])) for w, r, c in wide)
    return Holdback(
        window,
        fixed,
        tuple(rules),
        regex,
        context,
        _composed_kinds(accepted),
        compiled_wide,
        _compile([w for w, _r, _c in wide]) if wide else None,
    )


def _compiles(patterns: list[str]) -> bool:
    try:
        _compile(patterns)
    except re2.error:
        return False
    return True


def _compile(patterns: list[str]) -> Any:
    opts = options(SET_MAX_MEM)
    opts.longest_match = True
    return re2.compile("|".join(f"(?:{pattern})" for pattern in patterns), opts)


# The end of a text as the engine will read it once more text arrives.

# The beginning of an escape (views.py) at the very end of a text: what follows decides it.
_OPEN_ESCAPE = re.compile(
    r"\\(?:u(?:[dD][89abAB][0-9a-fA-F]{2}(?:\\(?:u(?:[dD](?:[c-fC-F][0-9a-fA-F]?)?)?)?)?"
    r"|\{[0-9a-fA-F]{0,6}|[0-9a-fA-F]{0,3})?|x[0-9a-fA-F]?)?\Z"
    r"|%[0-9a-fA-F]?\Z"
)
_PERCENT_RUN = re.compile(r"(?:%[0-9a-fA-F]{2}){1,3}\Z")
_LONGEST_ESCAPE = 14
# Characters that a combining mark turns into another (NFKC): ASCII letters and < = >.
_COMPOSING = frozenset("<=>ABCDEFGHIJKLMNOPRSTUVWXYZabcdefghijklmnoprstuvwxyz")


def _composed() -> tuple[str, ...]:
    """Every character that a character of ``_COMPOSING`` composes into with marks (NFKC)."""
    # The highest such character is U+226F (NOT GREATER-THAN).
    return tuple(
        char
        for char in map(chr, range(0x80, 0x2300))
        if unicodedata.normalize("NFKC", char) == char
        and len(decomposed := unicodedata.normalize("NFD", char)) > 1
        and decomposed[0] in _COMPOSING
    )


_COMPOSED = _composed()
_COMPOSED_SET = frozenset(_COMPOSED)


def _composed_kinds(accepted: list[str]) -> tuple[str, ...]:
    """One composed character for each set of ``accepted`` classes that take it (none: left out).

    Two characters taken by the same classes are the same to every pattern of the rules: a
    text ending in one begins a match exactly when it ends in the other.
    """
    # Rules share most classes ([A-Za-z0-9], \\w, ...): each is tried once.
    classes = [re2.compile(f"(?s:{char})") for char in dict.fromkeys(accepted)]
    kinds: dict[tuple[bool, ...], str] = {}
    for char in _COMPOSED:
        taken = tuple(cls.fullmatch(char) is not None for cls in classes)
        if any(taken):
            kinds.setdefault(taken, char)
    return tuple(kinds.values())


def _cut_escape(text: str) -> int:
    """Where an escape left open at the end of ``text`` begins, or ``len(text)``."""
    offset = max(0, len(text) - _LONGEST_ESCAPE)
    tail = text[offset:]
    if "\\" not in tail and "%" not in tail:
        return len(text)
    found = _OPEN_ESCAPE.search(tail)
    cut = len(text) if found is None else offset + found.start()
    run = _PERCENT_RUN.search(tail)
    if run is not None:
        data = bytes.fromhex(run.group().replace("%", ""))
        # A UTF-8 sequence still missing its last bytes: the run decodes differently once whole.
        for index in range(len(data) - 1, -1, -1):
            lead = data[index]
            if lead < 0x80:
                break
            if lead >= 0xC0:
                needed = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
                if len(data) - index < needed:
                    cut = min(cut, offset + run.start() + 3 * index)
                break
    return cut


def _settled(text: str, *, letters: bool, composed: bool) -> int:
    """How much of ``text`` a combining mark still to come cannot change (NFKC composes it
    with the last character that is not one, and any marks after it). With ``letters`` the
    caller also reads the text with its last letter composed: a last ASCII character counts as
    settled; with ``composed`` this is such a reading, and its composed last character does."""
    end = len(text)
    while end and unicodedata.combining(text[end - 1]):
        end -= 1
    if end == len(text) and end:
        last = text[-1]
        if (last.isascii() and (letters or last not in _COMPOSING)) or (composed and last in _COMPOSED_SET):
            return end
    return max(0, end - 1)


def _origin(view: DecodedView, position: int) -> int:
    return view.span(Span(position, position + 1)).start
