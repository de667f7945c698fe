"""Policy enforcement on a streamed answer, as pure logic that the proxy drives event by event.

Guarantee: no character of a match of an enforced block rule reaches the client, even when the
match is split across events, as long as the match is at most ``window`` characters long (the
longest match any block rule can make, capped by ``stream_holdback``); a longer match may have
its first characters released before the block ends the stream. Lengths count characters of
the stream text, so invisible characters or combining marks inside a match make it longer.

Cost: only the end of the text that could still become a match is held back
(``gateway.policy.holdback``): ordinary prose leaves at once, or one event later when an event
ends in the middle of a word that could begin a key; text that looks like the beginning of a
key is held until it completes a match (block) or can no longer become one (release).

Why it holds: events are released in order, and an event only once all its text lies before
the held suffix. A match that ends in newly arrived text was, before that text arrived, a
beginning of a match at the end of the text, so none of it was released; and it starts at
most ``window`` characters back, so the text evaluated on each arrival (``window`` characters
before the new text, plus ``WINDOW_CONTEXT``) sees it whole. A rule of several parts reports
every part's span: a part matched whole stays held while the others may still follow. Rules
that judge the whole text (``not``, ``max_tokens``) judge only that window, and hold a fixed
window instead.

The stream text is what a client joins from event to event: the answer fields of each event's
JSON data (``response_fields``), a JSON string data payload, or data that is not JSON. Everything
else of an event (object keys and other values, comment, ``event:``, ``id:`` and other lines) is
its side text: nothing joins it across events, so it is evaluated whole, on its own, before the
event enters the guard (``StreamGuard.side``); a block there ends the stream the same way.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import jsonlib
from gateway.json_texts import Texts, collect, join
from gateway.policy import Action, Context, Decision, RuleSet, Span, Stage, Violation, evaluate
from gateway.policy.holdback import Holdback, plan_holdback

# Characters evaluated before the earliest possible start of a new match, so that ``\b`` and
# combining marks at the window's edge read as they do in the whole text.
WINDOW_CONTEXT = 16

# An empty line ends an event; a line ends with CRLF, LF or CR, and a CRLF is never two ends.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_LINE_END = re.compile(r"\r\n|\n|\r")


# Clean side texts a guard remembers, and the longest it remembers.
_REMEMBERED_SIDES = 64
_REMEMBERED_SIDE = 4096


class EventTooLarge(ValueError):
    """An event outgrew ``max_event_bytes``: holding it whole would leave memory unbounded."""


class SSESplitter:
    """Cuts a ``text/event-stream`` body, chunked anyhow, into whole events."""

    def __init__(self, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._pending = bytearray()
        self._scan = 0  # where an event end may still begin

    def feed(self, chunk: bytes) -> list[bytes]:
        self._pending += chunk
        events: list[bytes] = []
        start = 0
        while (found := _EVENT_END.search(self._pending, max(start, self._scan))) is not None:
            end = found.end()
            # A CR at the very end may be the first half of a CRLF still on its way.
            if end == len(self._pending) and self._pending.endswith(b"\r"):
                self._scan = found.start()
                break
            events.append(self._checked(bytes(self._pending[start:end])))
            start = self._scan = end
        else:
            self._scan = max(start, len(self._pending) - 3)
        del self._pending[:start]
        self._scan -= start
        self._checked(self._pending)
        return events

    def flush(self) -> bytes:
        """The remainder at end of stream: an unterminated event, or one ended by a lone CR."""
        rest, self._pending, self._scan = bytes(self._pending), bytearray(), 0
        return rest

    def _checked(self, event: bytes | bytearray) -> bytes:
        if len(event) > self._max:
            raise EventTooLarge(f"a streamed event exceeds {self._max} bytes")
        return bytes(event)


@dataclass(frozen=True, slots=True)
class EventTexts:
    """One event as a client reads it: ``text`` continues the stream text, ``side`` is the rest."""

    text: str
    side: Texts
    payload: Any = None  # the data, parsed, when it is JSON


_NO_SIDE = Texts("", (), ())
# Where a line of an event sits, for audit records (a field name is never quoted: the upstream
# chose it, and it may be the secret itself).
_LINE_PATHS = {"": "comment line", "event": "event line", "id": "id line", "retry": "retry line"}


def read_event(event: bytes, paths: Sequence[tuple[str, ...]]) -> EventTexts:
    """Every line of one event: the data decoded as JSON when it is JSON, the others as they are.

    Raises ``json_texts.TooDeep`` for data nested too deeply to walk.
    """
    decoded = event.decode("utf-8", errors="replace")
    # A client drops a byte order mark at the start of the stream; reading the line without it
    # wherever it is reads at least what the client reads.
    if decoded.startswith("\ufeff"):
        decoded = decoded[1:]
    data: list[str] = []
    lines: list[str] = []
    line_paths: list[str] = []
    for line in _LINE_END.split(decoded):
        if not line:
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
        else:
            lines.append(line)
            line_paths.append(_LINE_PATHS.get(field, "field line"))
    side = _NO_SIDE if not lines else Texts("\n".join(lines), _starts(lines), tuple(line_paths))
    if not data:
        return EventTexts("", side)
    joined = "\n".join(data)
    if joined == "[DONE]":
        return EventTexts("", side)
    try:
        payload = jsonlib.loads(joined)
    except ValueError:
        return EventTexts(joined, side)
    if isinstance(payload, str):
        return EventTexts(payload, side, payload)
    if not isinstance(payload, dict | list):
        return EventTexts(joined, side, payload)
    texts = collect(payload, fields=paths, apart=True, root="data")
    whole = join((side, texts)) if lines else texts
    return EventTexts("".join(texts.fields), whole, payload)


def _starts(pieces: list[str]) -> tuple[int, ...]:
    starts, offset = [], 0
    for line in pieces:
        starts.append(offset)
        offset += len(line) + 1
    return tuple(starts)


def sse_event_text(event: bytes, paths: Sequence[tuple[str, ...]]) -> str:
    """The text of one event that continues the stream text (see ``read_event``)."""
    return read_event(event, paths).text


def sse_texts(body: bytes, paths: Sequence[tuple[str, ...]]) -> Texts:
    """A whole event stream read at once: the stream text, then every event's side text.

    ``Texts.fields`` holds each event's stream text. Raises ``json_texts.TooDeep``.
    """
    splitter = SSESplitter(max_event_bytes=len(body) + 1)
    events = [*splitter.feed(body), splitter.flush()]
    read = [read_event(event, paths) for event in events if event]
    stream = [texts.text for texts in read if texts.text]
    whole = join((Texts("".join(stream), (0,), ("stream text",)), *(t.side for t in read if t.side.text)))
    return Texts(whole.text, whole.starts, whole.paths, tuple(stream))


def holdback_chars(ruleset: RuleSet, stage: Stage, cap: int) -> int:
    """The longest match any enforced block rule of the stage can make, at most ``cap``."""
    return plan_holdback(ruleset, stage, cap).window


@dataclass(frozen=True, slots=True)
class StreamStep:
    """What the caller does after one event: send ``release``, or end the stream if ``blocked``."""

    release: tuple[bytes, ...]
    blocked: Decision | None = None
    # Log/alert violations first seen now, spans in offsets of the whole stream text.
    violations: tuple[Violation, ...] = ()
    # (start, end) of each span above, and of the block's -> the text it matched.
    matched: Mapping[tuple[int, int], str] = dataclasses.field(default_factory=dict)


class StreamGuard:
    """Holds events back while their text could still be part of a block match, then releases them.

    ``holdback`` is the rule set's ``Holdback`` (``plan_holdback``), or a number of characters
    always held (a fixed window).
    """

    def __init__(
        self,
        ruleset: RuleSet,
        context: Context,
        *,
        holdback: Holdback | int,
        stage: Stage = Stage.RESPONSE,
    ) -> None:
        plan = Holdback.fixed_window(holdback) if isinstance(holdback, int) else holdback
        self._ruleset, self._context, self._stage, self._plan = ruleset, context, stage, plan
        self._end = 0  # length of the stream text so far
        self._tail, self._tail_start = "", 0  # the stream text from the next window's start
        self._held: deque[tuple[int, bytes]] = deque()  # (end of its text, event)
        self._hold = 0  # where the held text begins: events ending at or before it may leave
        self._released = 0  # end of the text of the last event released
        # Per rule, the end of the furthest span reported: a later window that sees that match
        # again, cut at the window's start or grown at its end, is the same match.
        self._reported: dict[str, int] = {}
        self._closed = False
        self._clean_sides: set[str] = set()
        self._allowed = Decision(stage, Action.ALLOW, ruleset.revision)

    @property
    def held_chars(self) -> int:
        """Characters of stream text received and not released yet."""
        return self._end - self._released

    def feed(self, event: bytes, text: str) -> StreamStep:
        self._check_open()
        self._end += len(text)
        self._tail += text
        self._held.append((self._end, event))
        if not text:  # without new text no new match is possible, nor is more released
            return StreamStep(self._release(self._hold))
        # The tail starts where a match ending in the new text may start, less the context.
        start = self._tail_start
        decision = evaluate(self._ruleset, self._stage, self._tail, self._context)
        violations = self._fresh(decision, start)
        shifted = tuple(_shift(v, start) for v in decision.violations) if decision.blocked else ()
        # The matched texts, for the caller's fingerprints, before the tail forgets them.
        matched = {
            (span.start, span.end): self._tail[span.start - start : span.end - start]
            for violation in (*violations, *shifted)
            for span in violation.spans
        }
        if decision.blocked:
            self._closed = True
            self._held.clear()
            blocked = dataclasses.replace(decision, violations=shifted)
            return StreamStep((), blocked, violations, matched)
        self._hold = start + self._plan.start(self._tail)
        keep = max(0, self._end - self._plan.window - WINDOW_CONTEXT)
        self._tail, self._tail_start = self._tail[keep - start :], keep
        return StreamStep(self._release(self._hold), None, violations, matched)

    def side(self, text: str) -> Decision:
        """Evaluate the side text of the next event, before ``feed`` takes the event.

        Nothing joins side text across events, so it is evaluated on its own; a block closes
        the guard as a block in the stream text does. Clean side texts are remembered (events
        of one stream mostly repeat theirs), so that each is evaluated once.
        """
        self._check_open()
        if not text or text in self._clean_sides:
            return self._allowed
        decision = evaluate(self._ruleset, self._stage, text, self._context)
        if decision.blocked:
            self._closed = True
            self._held.clear()
        elif not decision.violations and len(text) <= _REMEMBERED_SIDE:
            if len(self._clean_sides) >= _REMEMBERED_SIDES:
                self._clean_sides.clear()
            self._clean_sides.add(text)
        return decision

    def finish(self) -> StreamStep:
        """Release every held event: all their text has already been evaluated."""
        self._check_open()
        self._closed = True
        return StreamStep(self._release(self._end))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the stream was blocked or finished; nothing more may pass")

    def _release(self, upto: int) -> tuple[bytes, ...]:
        released: list[bytes] = []
        while self._held and self._held[0][0] <= upto:
            end, event = self._held.popleft()
            released.append(event)
            self._released = end
        return tuple(released)

    def _fresh(self, decision: Decision, offset: int) -> tuple[Violation, ...]:
        fresh: list[Violation] = []
        for violation in decision.violations:
            if violation.effective_action is Action.BLOCK:
                continue
            rule_id = violation.rule_id
            if not violation.spans:
                if rule_id not in self._reported:
                    self._reported[rule_id] = -1
                    fresh.append(violation)
                continue
            shifted = _shift(violation, offset)
            frontier = self._reported.get(rule_id, -1)
            new = tuple(s for s in shifted.spans if s.start >= frontier and s.end > frontier)
            self._reported[rule_id] = max(frontier, *(s.end for s in shifted.spans))
            if new:
                fresh.append(dataclasses.replace(shifted, spans=new))
        return tuple(fresh)


def _shift(violation: Violation, offset: int) -> Violation:
    spans = tuple(Span(s.start + offset, s.end + offset) for s in violation.spans)
    return dataclasses.replace(violation, spans=spans)
