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

A client may also read every data line as raw text. Once some data is not a JSON object (plain
text, a number, a JSON string or list: ``EventTexts.plain``), the raw data of every event (its
data lines joined with "\n", the SSE spec's join), joined from event to event, is a second reading
held back and evaluated the same way, wherever it differs from the stream text: ``data: "x"``
then ``data: AKIA…`` is ``xAKIA…`` decoded but a key read raw. An event leaves once neither
reading holds it; a block in either ends the stream. Streams of JSON objects are read once: when
plain data follows them, the raw reading starts with their raw data as context, already released
(a match running from it into plain data blocks, but its first characters were sent).
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
    # The data as raw text (its lines joined with "\n"), and whether it is plain: data that is not
    # a JSON object (nor the closing ``[DONE]``), which a client may well read as raw text.
    data: str = ""
    plain: bool = False


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
        return EventTexts("", side, None, joined)
    try:
        payload = jsonlib.loads(joined)
    except ValueError:
        return EventTexts(joined, side, None, joined, True)
    if isinstance(payload, str):
        return EventTexts(payload, side, payload, joined, True)
    if not isinstance(payload, dict | list):
        return EventTexts(joined, side, payload, joined, True)
    texts = collect(payload, fields=paths, apart=True, root="data")
    whole = join((side, texts)) if lines else texts
    return EventTexts("".join(texts.fields), whole, payload, joined, isinstance(payload, list))


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
    """A whole event stream read at once: the stream text, the raw data when some data is plain
    (see ``StreamGuard``) and reads otherwise, then every event's side text.

    ``Texts.fields`` holds each event's stream text. Raises ``json_texts.TooDeep``.
    """
    splitter = SSESplitter(max_event_bytes=len(body) + 1)
    events = [*splitter.feed(body), splitter.flush()]
    read = [read_event(event, paths) for event in events if event]
    stream = [texts.text for texts in read if texts.text]
    joined = "".join(stream)
    parts = [Texts(joined, (0,), ("stream text",))]
    if any(texts.plain for texts in read):
        raw = "".join(texts.data for texts in read)
        if raw != joined:
            parts.append(Texts(raw, (0,), ("raw data",)))
    whole = join((*parts, *(t.side for t in read if t.side.text)))
    return Texts(whole.text, whole.starts, whole.paths, tuple(stream))


def holdback_chars(ruleset: RuleSet, stage: Stage, cap: int) -> int:
    """The longest match any enforced block rule of the stage can make, at most ``cap``."""
    return plan_holdback(ruleset, stage, cap).window


@dataclass(frozen=True, slots=True)
class StreamStep:
    """What the caller does after one event: send ``release``, or end the stream if ``blocked``."""

    release: tuple[bytes, ...]
    blocked: Decision | None = None
    # Log/alert violations first seen now, spans in offsets of the whole stream text (a block
    # found in the raw data reading has its spans in offsets of that reading).
    violations: tuple[Violation, ...] = ()
    # (start, end) of each span above, and of the block's -> the text it matched.
    matched: Mapping[tuple[int, int], str] = dataclasses.field(default_factory=dict)


class _Reading:
    """One joined text of a stream as it grows: its length, the end still evaluated, where its
    held text begins, and how far each rule's reported spans reach."""

    __slots__ = ("end", "hold", "reported", "tail", "tail_start")

    def __init__(self, before: str = "") -> None:
        # ``before``: text already released that a new match may still begin in.
        self.end = self.hold = len(before)
        self.tail, self.tail_start = before, 0  # the text from the next window's start
        # Per rule, the end of the furthest span reported: a later window that sees that match
        # again, cut at the window's start or grown at its end, is the same match.
        self.reported: dict[str, int] = {}

    def copy(self) -> _Reading:
        twin = _Reading()
        twin.end, twin.hold, twin.tail, twin.tail_start = self.end, self.hold, self.tail, self.tail_start
        twin.reported = dict(self.reported)
        return twin


class StreamGuard:
    """Holds events back while their text could still be part of a block match, then releases them.

    ``holdback`` is the rule set's ``Holdback`` (``plan_holdback``), or a number of characters
    always held (a fixed window).

    An event stream is read twice once its data is not all JSON objects: as the stream text, and
    as its raw data (what a client that reads every data line as text joins). ``feed`` takes the
    event's ``data`` and whether it is ``plain`` (``read_event``); the raw reading starts at the
    first plain data, and only where it differs from the stream text (so a plain-text stream is
    read once until a data line parses as a JSON string, list or object). Started late, it is
    evaluated from the raw data of the events before, which were released already. An event
    leaves once neither reading holds it, and a block in either ends the stream. Only the stream
    text reports log and alert matches: the raw reading mostly repeats it.
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
        self._text = _Reading()  # the stream text
        self._raw: _Reading | None = None  # the raw data, once read apart from the stream text
        self._same = True  # the raw data so far is the stream text
        self._plain = False  # some data was plain
        # Before the raw reading starts apart: the last raw data, as much as a match may reach back.
        self._before: deque[str] = deque()
        self._before_chars = 0
        self._held: deque[tuple[int, int, bytes]] = deque()  # (end of its text, of its raw data, event)
        self._released = 0  # end of the text of the last event released
        self._closed = False
        self._clean_sides: set[str] = set()
        self._allowed = Decision(stage, Action.ALLOW, ruleset.revision)

    @property
    def held_chars(self) -> int:
        """Characters of stream text received and not released yet."""
        return self._text.end - self._released

    def feed(self, event: bytes, text: str, *, data: str | None = None, plain: bool = False) -> StreamStep:
        """Take the next event and its stream text; ``data`` is its raw data for an event stream."""
        self._check_open()
        if data is not None and self._raw is None:
            self._follow(text, data, plain)
        step = self._read(self._text, text, report=True)
        if self._raw is not None and (step is None or step.blocked is None):
            raw = self._read(self._raw, data or "", report=False)
            if raw is not None:
                # The raw reading only blocks: the stream text reports what it found besides.
                found = () if step is None else step.violations
                matched = raw.matched if step is None else {**step.matched, **raw.matched}
                step = dataclasses.replace(raw, violations=found, matched=matched)
        if step is not None and step.blocked is not None:
            self._closed = True
            self._held.clear()
            return step
        reading = self._raw
        self._held.append((self._text.end, 0 if reading is None else reading.end, event))
        released = self._release(self._text.hold, 0 if reading is None else reading.hold)
        return StreamStep(released) if step is None else dataclasses.replace(step, release=released)

    def _follow(self, text: str, data: str, plain: bool) -> None:
        """Start the raw reading when the stream's data is plain and reads apart from its text."""
        self._plain = self._plain or plain
        if self._same and data == text:
            return
        if self._plain:
            if self._same:
                # Until now the raw data was the stream text: it is read, and held, as that was.
                self._raw = self._text.copy()
                self._held = deque((end, end, event) for end, _, event in self._held)
            else:
                self._raw = _Reading("".join(self._before))
                self._before.clear()
            return
        self._same = False
        if data:
            reach = self._plan.window + WINDOW_CONTEXT
            self._before.append(data)
            self._before_chars += len(data)
            while self._before_chars - len(self._before[0]) >= reach:
                self._before_chars -= len(self._before.popleft())

    def _read(self, reading: _Reading, text: str, *, report: bool) -> StreamStep | None:
        """Evaluate what ``text`` adds to ``reading``: a step with its block or violations, if any."""
        if not text:  # without new text no new match is possible
            return None
        reading.end += len(text)
        reading.tail += text
        # The tail starts where a match ending in the new text may start, less the context.
        start = reading.tail_start
        decision = evaluate(self._ruleset, self._stage, reading.tail, self._context)
        violations = self._fresh(reading, decision, start) if report else ()
        shifted = tuple(_shift(v, start) for v in decision.violations) if decision.blocked else ()
        # The matched texts, for the caller's fingerprints, before the tail forgets them.
        matched = {
            (span.start, span.end): reading.tail[span.start - start : span.end - start]
            for violation in (*violations, *shifted)
            for span in violation.spans
        }
        if decision.blocked:
            return StreamStep((), dataclasses.replace(decision, violations=shifted), violations, matched)
        reading.hold = start + self._plan.start(reading.tail)
        keep = max(0, reading.end - self._plan.window - WINDOW_CONTEXT)
        reading.tail, reading.tail_start = reading.tail[keep - start :], keep
        return StreamStep((), None, violations, matched) if violations else None

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
        return StreamStep(self._release(self._text.end, 0 if self._raw is None else self._raw.end))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the stream was blocked or finished; nothing more may pass")

    def _release(self, upto: int, raw_upto: int) -> tuple[bytes, ...]:
        released: list[bytes] = []
        while self._held and self._held[0][0] <= upto and self._held[0][1] <= raw_upto:
            end, _, event = self._held.popleft()
            released.append(event)
            self._released = end
        return tuple(released)

    def _fresh(self, reading: _Reading, decision: Decision, offset: int) -> tuple[Violation, ...]:
        fresh: list[Violation] = []
        reported = reading.reported
        for violation in decision.violations:
            if violation.effective_action is Action.BLOCK:
                continue
            rule_id = violation.rule_id
            if not violation.spans:
                if rule_id not in reported:
                    reported[rule_id] = -1
                    fresh.append(violation)
                continue
            shifted = _shift(violation, offset)
            frontier = reported.get(rule_id, -1)
            new = tuple(s for s in shifted.spans if s.start >= frontier and s.end > frontier)
            reported[rule_id] = max(frontier, *(s.end for s in shifted.spans))
            if new:
                fresh.append(dataclasses.replace(shifted, spans=new))
        return tuple(fresh)


def _shift(violation: Violation, offset: int) -> Violation:
    spans = tuple(Span(s.start + offset, s.end + offset) for s in violation.spans)
    return dataclasses.replace(violation, spans=spans)
