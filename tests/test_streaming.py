"""Streamed answers: SSE events, their text, the holdback and the guard that releases events."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import streaming
from gateway.flashback import DEFAULT_RESPONSE_FIELDS, parse_field_path
from gateway.policy import Action, Context, RuleSet, Span, Stage, Violation, compile_ruleset, load_ruleset
from gateway.policy.holdback import plan_holdback
from gateway.streaming import (
    EventTooLarge,
    SSESplitter,
    StreamGuard,
    StreamStep,
    holdback_chars,
    read_event,
    sse_event_text,
    sse_texts,
)

KEY = "AKIAIOSFODNN7EXAMPLE"
DELTA = (parse_field_path("choices[].delta.content"),)
FIELDS = tuple(parse_field_path(path) for path in DEFAULT_RESPONSE_FIELDS)

POLICIES = r"""
policies:
  - {id: t.aws-key, name: AWS key, severity: high, action: block, match: {regex: '\bAKIA[A-Z2-7]{16}\b'}}
  - {id: t.ticket, name: Ticket, severity: low, action: alert, match: {regex: 'TICKET-\d+'}}
"""


def _ruleset(directory: Path, text: str) -> RuleSet:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(text, encoding="utf-8")
    return load_ruleset([directory])


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    return _ruleset(tmp_path_factory.mktemp("streaming"), POLICIES)


@pytest.fixture(scope="module")
def holdback(ruleset: RuleSet) -> int:
    return holdback_chars(ruleset, Stage.RESPONSE, 1000)


def _guard(ruleset: RuleSet, holdback: int) -> StreamGuard:
    return StreamGuard(ruleset, Context(), holdback=holdback)


def _feed_texts(guard: StreamGuard, texts: list[str]) -> tuple[str, list[StreamStep]]:
    """Feed each text as its own event until a block; the text released, and every step."""
    steps = []
    for text in texts:
        steps.append(guard.feed(text.encode(), text))
        if steps[-1].blocked is not None:
            break
    else:
        steps.append(guard.finish())
    return b"".join(event for step in steps for event in step.release).decode(), steps


def _delta(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


# SSESplitter


@pytest.mark.parametrize(
    ("chunks", "events", "rest"),
    [
        pytest.param(
            [b"data: he", b"llo\n", b"\n"],
            [b"data: hello\n\n"],
            b"",
            id="an event split across chunks is returned once whole",
        ),
        pytest.param(
            [b"data: a\n\ndata: b\n\n"],
            [b"data: a\n\n", b"data: b\n\n"],
            b"",
            id="several events in one chunk are returned in order",
        ),
        pytest.param(
            [b"data: a\r\n\r\ndata: b\r\n", b"\r\n"],
            [b"data: a\r\n\r\n", b"data: b\r\n\r\n"],
            b"",
            id="a blank line ended by CRLF ends an event",
        ),
        pytest.param(
            [b"data: a\r\rdata: b\r\rx"],
            [b"data: a\r\r", b"data: b\r\r"],
            b"x",
            id="a blank line ended by CR ends an event",
        ),
        pytest.param(
            [b"data: a\r\n\r", b"\ndata: b\n\n"],
            [b"data: a\r\n\r\n", b"data: b\n\n"],
            b"",
            id="a CRLF cut between chunks is not taken for a lone CR",
        ),
        pytest.param(
            [b"data: a\n\ndata: b"],
            [b"data: a\n\n"],
            b"data: b",
            id="a trailing partial event is returned by flush",
        ),
        pytest.param(
            [b"data: a\r\r"],
            [],
            b"data: a\r\r",
            id="an event ended by a CR at the end of the stream is returned by flush",
        ),
    ],
)
def test_splitter(chunks: list[bytes], events: list[bytes], rest: bytes) -> None:
    """Chunks come out as whole events, each with its terminating blank line."""
    splitter = SSESplitter(max_event_bytes=1000)
    assert [event for chunk in chunks for event in splitter.feed(chunk)] == events
    assert splitter.flush() == rest
    assert splitter.flush() == b""


def _reference_events(body: bytes) -> tuple[list[bytes], bytes]:
    """Events as the SSE spec reads them: lines end with CRLF, LF or CR; a blank line ends one."""
    events, current = [], b""
    for line in re.findall(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", body):
        # A blank first line dispatches nothing: the splitter keeps it with the event that follows.
        if line in (b"\r\n", b"\r", b"\n") and current:
            events.append(current + line)
            current = b""
        else:
            current += line
    return events, current


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from([b"data: x", b"\n", b"\r", b"\r\n", b": c", b"id: 1"]), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=200)),
)
def test_splitting_follows_the_spec_whatever_the_chunking(parts: list[bytes], cuts: list[int]) -> None:
    """However the bytes are chunked, events end exactly where the SSE spec ends them."""
    # A trailing CR could be half a CRLF; the final data line settles it, as the end of a stream would.
    body = b"".join(parts) + b"data: end"
    splitter = SSESplitter(max_event_bytes=1000)
    bounds = [0, *sorted(c for c in cuts if c < len(body)), len(body)]
    events = [e for a, b in itertools.pairwise(bounds) for e in splitter.feed(body[a:b])]
    assert (events, splitter.flush()) == _reference_events(body)


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([b"data: " + b"x" * 20], id="an unterminated event over the limit is refused"),
        pytest.param([b"data: x", b"x" * 20], id="an event growing over the limit chunk by chunk is refused"),
        pytest.param([b"data: " + b"x" * 20 + b"\n\n"], id="a complete event over the limit is refused"),
    ],
)
def test_splitter_refuses_a_too_large_event(chunks: list[bytes]) -> None:
    """An event longer than max_event_bytes raises EventTooLarge, a ValueError."""
    splitter = SSESplitter(max_event_bytes=16)
    for chunk in chunks[:-1]:
        splitter.feed(chunk)
    with pytest.raises(EventTooLarge):
        splitter.feed(chunks[-1])
    assert issubclass(EventTooLarge, ValueError)


# sse_event_text


@pytest.mark.parametrize(
    ("event", "text"),
    [
        pytest.param(_delta("hello"), "hello", id="a JSON delta gives its content"),
        pytest.param(
            b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n',
            "",
            id="a JSON delta without content gives nothing",
        ),
        pytest.param(
            b'data: {"choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b"}}]}\n\n',
            "ab",
            id="several choices are joined",
        ),
        pytest.param(
            b'data: {"choices": [{"delta":\ndata:  {"content": "x"}}]}\n\n',
            "x",
            id="JSON spread over several data lines is joined before parsing",
        ),
        pytest.param(b"data: one\ndata: two\r\n\r\n", "one\ntwo", id="data lines are joined by newlines"),
        pytest.param(b"data: plain words\n\n", "plain words", id="data that is not JSON is the text itself"),
        pytest.param(b"data:  indented\n\n", " indented", id="only one space after the colon is dropped"),
        pytest.param(b"data: [DONE]\n\n", "", id="the DONE marker carries no text"),
        pytest.param(
            b": keep-alive\nevent: message\nid: 7\nretry: 10\ndata: x\n\n",
            "x",
            id="comments and other fields are ignored",
        ),
        pytest.param(b": keep-alive\n\n", "", id="a comment-only event carries no text"),
        pytest.param(b"data: caf\xc3\n\n", "caf\ufffd", id="invalid UTF-8 is replaced"),
    ],
)
def test_event_text(event: bytes, text: str) -> None:
    """An event's text is what a user reading the stream would see."""
    assert sse_event_text(event, DELTA) == text


@pytest.mark.parametrize(
    ("event", "text", "side", "paths"),
    [
        pytest.param(
            b'data: {"id": "c1", "choices": [{"delta": {"content": "hi"}}]}\n\n',
            "hi",
            "id: c1\nchoices\ndelta\ncontent",
            ["data.id (key)", "data.id", "data.choices (key)", "data.choices[0].delta (key)",
             "data.choices[0].delta.content (key)"],
            id="the answer field is stream text and every other key and value is side text",
        ),
        pytest.param(
            b'data: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}\n\n',
            "hi",
            "type: content_block_delta\ndelta\ntype: text_delta\ntext",
            None,
            id="Anthropic's delta.text is stream text",
        ),
        pytest.param(b'data: "\\u0041B"\n\n', "AB", "", [], id="a JSON string payload is decoded"),
        pytest.param(b"data: [1, 2]\n\n", "", "1\n2", None, id="a JSON list's numbers are side text"),
        pytest.param(
            b": ping\r\nevent: delta\r\nid: 7\r\nretry: 5\r\nx: y\r\nbare\r\ndata: t\r\n\r\n",
            "t",
            ": ping\nevent: delta\nid: 7\nretry: 5\nx: y\nbare",
            ["comment line", "event line", "id line", "retry line", "field line", "field line"],
            id="every line other than data is side text, named by its kind only",
        ),
        pytest.param(
            b'\xef\xbb\xbfdata: "x"\n\n', "x", "", [], id="a byte order mark before the field is dropped"
        ),
        pytest.param(b"data: 42\n\n", "42", "", [], id="a JSON number payload is stream text as it is"),
        pytest.param(b": a comment\n\n", "", ": a comment", None, id="a comment alone is side text"),
    ],
)  # fmt: skip
def test_read_event(event: bytes, text: str, side: str, paths: list[str] | None) -> None:
    """Stream text is what a client joins across events; the side text is all the rest."""
    read = read_event(event, FIELDS)
    assert (read.text, read.side.text) == (text, side)
    if paths is not None:
        assert list(read.side.paths) == paths


def test_a_whole_event_stream_reads_its_stream_text_then_its_side_texts() -> None:
    """Read at once, a stream's text is joined across events and followed by each side text."""
    body = _delta("AKIAIOSF") + b": note\n" + _delta("ODNN7EXAMPLE") + b"data: [DONE]"
    texts = sse_texts(body, DELTA)
    assert texts.text.split("\n")[0] == KEY
    assert texts.fields == ("AKIAIOSF", "ODNN7EXAMPLE")
    assert texts.path_at(0) == "stream text"
    assert ": note" in texts.text


# holdback_chars


def _rule(rule_id: str, action: str, match: str, extra: str = "") -> str:
    return (
        f"  - {{id: {rule_id}, name: {rule_id}, severity: high, action: {action}, match: {match}{extra}}}\n"
    )


AKIA = r"{regex: '\bAKIA[A-Z2-7]{16}\b'}"


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param([_rule("t.a", "block", AKIA)], 20, id="a bounded block regex holds back its width"),
        pytest.param(
            [_rule("t.a", "block", r"{regex: 'TICKET-\d+'}")],
            100,
            id="an unbounded block regex holds back the cap",
        ),
        pytest.param(
            [_rule("t.a", "block", r"{regex: '\pL{4}[[:digit:]]\x{41}'}")],
            6,
            id="RE2's own classes and escapes are measured as RE2 reads them",
        ),
        pytest.param(
            [_rule("t.a", "block", "{regex: '(?U)x{3}'}")],
            100,
            id="a pattern Python's parser cannot read holds back the cap",
        ),
        pytest.param(
            [_rule("t.a", "block", "{regex: 'x{,3}'}")],
            5,
            id="a brace RE2 reads as a literal is measured as text",
        ),
        pytest.param(
            [_rule("t.a", "block", "{keywords: [nightjar, falcon]}")],
            8,
            id="block keywords hold back their longest word",
        ),
        pytest.param(
            [_rule("t.a", "block", "{keywords: [blue falcon]}")],
            100,
            id="a keyword of several words holds back the cap as any run of spaces joins them",
        ),
        pytest.param(
            [_rule("t.a", "block", "{regex: 'x{30}'}"), _rule("t.b", "block", AKIA)],
            30,
            id="the widest block rule sets the holdback",
        ),
        pytest.param([_rule("t.a", "block", "{regex: 'x{300}'}")], 100, id="a width above the cap is capped"),
        pytest.param(
            [_rule("t.a", "block", f"{{all: [{AKIA}, {{not: {{regex: 'y{{25}}'}}}}]}}")],
            25,
            id="patterns inside all and not count",
        ),
        pytest.param(
            [_rule("t.a", "block", AKIA, ", mode: shadow")], 0, id="a shadow block rule holds nothing"
        ),
        pytest.param([_rule("t.a", "alert", AKIA)], 0, id="an alert rule holds nothing"),
        pytest.param(
            [_rule("t.a", "block", AKIA, ", stages: [prompt]")],
            0,
            id="a block rule of the prompt stage holds nothing",
        ),
        pytest.param(
            [_rule("t.a", "block", "{max_tokens: 5}")], 0, id="a max_tokens block rule holds nothing"
        ),
    ],
)
def test_holdback(tmp_path: Path, rules: list[str], expected: int) -> None:
    """The holdback is the longest match of an enforced block rule of the stage, capped."""
    ruleset = _ruleset(tmp_path, "policies:\n" + "".join(rules))
    assert holdback_chars(ruleset, Stage.RESPONSE, 100) == expected


def test_holdback_without_rules_is_zero() -> None:
    """A rule set without rules holds nothing back."""
    assert holdback_chars(compile_ruleset((), "empty"), Stage.RESPONSE, 100) == 0


# StreamGuard


def test_the_fixture_key_rule_holds_back_twenty(holdback: int) -> None:
    """The AWS key rule of these tests is twenty characters wide."""
    assert holdback == 20


def test_a_secret_split_at_any_character_is_blocked_before_any_of_it_is_released(
    ruleset: RuleSet, holdback: int
) -> None:
    """Wherever a key is cut between two events, the guard blocks and released text holds none of it."""
    text = f"Here is the key you asked for: {KEY} and more words after it."
    start = text.index(KEY)
    for cut in range(start, start + len(KEY) + 1):
        released, steps = _feed_texts(_guard(ruleset, holdback), [text[:cut], text[cut:]])
        blocked = steps[-1].blocked
        assert blocked is not None, cut
        assert blocked.action is Action.BLOCK
        assert len(released) <= start
        assert "AKIA" not in released
        assert [v.spans for v in blocked.violations if v.rule_id == "t.aws-key"] == [
            (Span(start, start + len(KEY)),)
        ]


@pytest.mark.parametrize(
    ("feeds", "released"),
    [
        pytest.param(
            [(b"e1", "hello"), (b"e2", " "), (b"e3", "world"), (b"e4", "!!")],
            [[], [], [b"e1", b"e2"], [], [b"e3", b"e4"]],
            id="an event is released once holdback characters follow it",
        ),
        pytest.param(
            [(b"e1", "hello"), (b": ping", ""), (b"e2", "world"), (b"[DONE]", "")],
            [[], [], [b"e1", b": ping"], [], [b"e2", b"[DONE]"]],
            id="events without text are held in their place",
        ),
        pytest.param(
            [(b": ping", ""), (b"e1", "abcdefghij")],
            [[b": ping"], [], [b"e1"]],
            id="an event without text before any text leaves at once: no text before it is held",
        ),
    ],
)
def test_release_order(ruleset: RuleSet, feeds: list[tuple[bytes, str]], released: list[list[bytes]]) -> None:
    """Events leave the guard in the order they came, each step what is far enough behind."""
    guard = StreamGuard(ruleset, Context(), holdback=5)
    steps = [guard.feed(event, text) for event, text in feeds] + [guard.finish()]
    assert [list(step.release) for step in steps] == released


def test_with_no_holdback_every_event_is_released_at_once(ruleset: RuleSet) -> None:
    """A holdback of zero releases each event right after evaluating it."""
    guard = StreamGuard(ruleset, Context(), holdback=0)
    assert [guard.feed(e, t).release for e, t in [(b"a", "abc"), (b"b", ""), (b"c", "d")]] == [
        (b"a",),
        (b"b",),
        (b"c",),
    ]
    assert guard.finish().release == ()


def test_text_without_secrets_is_all_released_in_order(ruleset: RuleSet, holdback: int) -> None:
    """Feeding then finishing releases every event of a clean stream, in order."""
    texts = [f"chunk {i} of a clean answer. " for i in range(30)]
    released, steps = _feed_texts(_guard(ruleset, holdback), texts)
    assert released == "".join(texts)
    assert all(step.blocked is None for step in steps)
    assert any(step.release for step in steps[:-1]), "nothing was released before the end"


def test_an_alert_is_reported_once_with_stream_offsets(ruleset: RuleSet, holdback: int) -> None:
    """An alert match seen again by overlapping windows is reported once, spans in stream offsets."""
    prefix = "x " * 60
    texts = [prefix, "see TICK", "ET-4", "2 and", " more", " words", " then TICKET-7", " end", "."]
    _, steps = _feed_texts(_guard(ruleset, holdback), texts)
    reported = [(v.rule_id, v.action, v.spans) for step in steps for v in step.violations]
    first = len(prefix) + len("see ")
    second = len("".join(texts)) - len("7 end.") - len("TICKET-")
    assert reported == [
        ("t.ticket", Action.ALERT, (Span(first, first + len("TICKET-4")),)),
        ("t.ticket", Action.ALERT, (Span(second, second + len("TICKET-7")),)),
    ]


def test_a_blocking_window_still_reports_its_alerts(ruleset: RuleSet, holdback: int) -> None:
    """The step that blocks carries the block decision and the window's other violations."""
    step = _guard(ruleset, holdback).feed(b"e", f"TICKET-9 {KEY}")
    assert step.blocked is not None
    assert [v.rule_id for v in step.blocked.violations if v.effective_action is Action.BLOCK] == ["t.aws-key"]
    assert [(v.rule_id, v.spans) for v in step.violations] == [("t.ticket", (Span(0, 8),))]
    assert step.release == ()


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(lambda g: g.feed(b"more", "more"), id="feeding after a block raises"),
        pytest.param(lambda g: g.finish(), id="finishing after a block raises"),
    ],
)
def test_a_blocked_guard_refuses_more(ruleset: RuleSet, holdback: int, after: object) -> None:
    """Once blocked, the guard lets nothing more through."""
    guard = _guard(ruleset, holdback)
    assert guard.feed(b"k", KEY).blocked is not None
    with pytest.raises(RuntimeError):
        after(guard)  # type: ignore[operator]


def test_a_side_text_with_a_key_blocks_and_closes_the_guard(ruleset: RuleSet, holdback: int) -> None:
    """A block in an event's side text ends the stream: the held events are never released."""
    guard = _guard(ruleset, holdback)
    assert guard.feed(b"e1", "hello").release == ()
    decision = guard.side(f"id: {KEY}")
    assert decision.blocked
    assert [v.spans for v in decision.violations] == [(Span(4, 4 + len(KEY)),)]
    with pytest.raises(RuntimeError):
        guard.finish()


def test_a_side_text_alert_is_reported_and_the_stream_goes_on(ruleset: RuleSet, holdback: int) -> None:
    """A side text with only an alert match is allowed; the guard stays open."""
    guard = _guard(ruleset, holdback)
    decision = guard.side("event: TICKET-5")
    assert (decision.action, [v.rule_id for v in decision.violations]) == (Action.ALERT, ["t.ticket"])
    assert guard.feed(b"e", "x" * 30).blocked is None
    assert guard.finish().release == (b"e",)


def test_a_clean_side_text_is_evaluated_once(
    ruleset: RuleSet, holdback: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events of a stream repeat their side text: a clean one is not evaluated again."""
    calls: list[str] = []
    real = streaming.evaluate

    def counting(*args: object) -> object:
        calls.append(str(args[2]))
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(streaming, "evaluate", counting)
    guard = _guard(ruleset, holdback)
    for _ in range(3):
        assert not guard.side("id\nc1\nchoices").violations
    assert calls == ["id\nc1\nchoices"]
    guard.side("event: TICKET-1")
    guard.side("event: TICKET-1")
    assert calls.count("event: TICKET-1") == 2, "a side text with violations is reported every time"


def test_a_finished_guard_refuses_more(ruleset: RuleSet, holdback: int) -> None:
    """After finish, feeding raises."""
    guard = _guard(ruleset, holdback)
    guard.finish()
    with pytest.raises(RuntimeError):
        guard.feed(b"x", "x")


def test_a_negative_holdback_is_refused(ruleset: RuleSet) -> None:
    """A negative holdback is a configuration error."""
    with pytest.raises(ValueError, match="holdback"):
        StreamGuard(ruleset, Context(), holdback=-1)


filler = st.text(alphabet="abcxyz .,\n", max_size=80)
cuts = st.lists(st.integers(min_value=0, max_value=200), max_size=12)


def _pieces(text: str, points: list[int]) -> list[str]:
    bounds = [0, *sorted(p for p in points if p < len(text)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(before=filler, after=filler, points=cuts)
def test_no_part_of_a_secret_is_released_whatever_the_split(
    ruleset: RuleSet, holdback: int, before: str, after: str, points: list[int]
) -> None:
    """However the text is cut into events, the stream blocks before releasing any of the key."""
    text = f"{before} {KEY} {after}"
    released, steps = _feed_texts(_guard(ruleset, holdback), _pieces(text, points))
    assert steps[-1].blocked is not None
    assert KEY not in released
    assert KEY[: len(KEY) // 2] not in released
    assert text.startswith(released)
    assert len(released) <= text.index(KEY)


@settings(max_examples=150, deadline=None)
@given(
    words=st.lists(
        st.sampled_from(["hello", " world", "\n", "TICKET-3", "ünï", " AKIA", "é\u200b"]), max_size=25
    ),
    points=cuts,
)
def test_a_clean_sse_stream_is_forwarded_byte_for_byte(
    ruleset: RuleSet, holdback: int, words: list[str], points: list[int]
) -> None:
    """Split, read and guarded, a stream without a key reaches the client unchanged."""
    body = b"".join(_delta(w) for w in words) + b": keep-alive\n\ndata: [DONE]\n\n"
    splitter = SSESplitter(max_event_bytes=1000)
    guard = _guard(ruleset, holdback)
    sent: list[bytes] = []
    alerts: list[Violation] = []
    bounds = [0, *sorted(p for p in points if p < len(body)), len(body)]
    for a, b in itertools.pairwise(bounds):
        for event in splitter.feed(body[a:b]):
            read = read_event(event, DELTA)
            assert not guard.side(read.side.text).violations
            step = guard.feed(event, read.text)
            assert step.blocked is None
            sent += step.release
            alerts += step.violations
    assert splitter.flush() == b""
    sent += guard.finish().release
    assert b"".join(sent) == body
    assert sum(len(v.spans) for v in alerts) == words.count("TICKET-3")


_LINE_KINDS = {
    "comment": lambda secret: f": {secret}\n".encode(),
    "event": lambda secret: f"event: {secret}\n".encode(),
    "id": lambda secret: f"id: {secret}\n".encode(),
    "other field": lambda secret: f"x-trace: {secret}\n".encode(),
    "data key": lambda secret: b"data: " + json.dumps({secret: 1}).encode() + b"\n",
    "data value": lambda secret: b"data: " + json.dumps({"meta": {"note": secret}}).encode() + b"\n",
    "escaped data string": lambda secret: b'data: " \\u0041' + secret[1:].encode() + b'"\n',
}


@settings(max_examples=200, deadline=None)
@given(
    before=st.lists(st.sampled_from(["hello", " world", "TICKET-3", "ünï"]), max_size=8),
    kind=st.sampled_from(sorted(_LINE_KINDS)),
    line_end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    points=cuts,
)
def test_a_key_in_any_line_of_an_event_is_never_released(
    ruleset: RuleSet, holdback: int, before: list[str], kind: str, line_end: bytes, points: list[int]
) -> None:
    """Whatever line of an event holds the key, however the stream is cut, none of it is sent."""
    secret_event = (_LINE_KINDS[kind](KEY) + b"\n").replace(b"\n", line_end)
    body = b"".join(_delta(w) for w in before) + secret_event + _delta(" after") * 5
    splitter = SSESplitter(max_event_bytes=10_000)
    guard = _guard(ruleset, holdback)
    sent: list[bytes] = []
    blocked = False
    bounds = [0, *sorted(p for p in points if p < len(body)), len(body)]
    pieces = [body[a:b] for a, b in itertools.pairwise(bounds)]
    events = [event for piece in pieces for event in splitter.feed(piece)] + [splitter.flush()]
    for event in events:
        read = read_event(event, FIELDS)
        if guard.side(read.side.text).blocked:
            blocked = True
            break
        step = guard.feed(event, read.text)
        sent += step.release
        if step.blocked is not None:
            blocked = True
            break
    assert blocked
    assert b"IOSFODNN7EXAMPLE" not in b"".join(sent)


# The raw reading: plain-text data that parses as JSON is joined as a client reading raw lines joins it.


def _plain(*lines: str) -> list[bytes]:
    return [f"data: {line}\n\n".encode() for line in lines]


def _guarded(guard: StreamGuard, events: list[bytes]) -> tuple[list[bytes], StreamStep | None]:
    """The events released, and the blocking step if one ended the stream."""
    sent: list[bytes] = []
    for event in events:
        read = read_event(event, FIELDS)
        step = guard.feed(event, read.text, data=read.data, plain=read.plain)
        sent += step.release
        if step.blocked is not None:
            return sent, step
    return sent + list(guard.finish().release), None


@pytest.mark.parametrize(
    "events",
    [
        pytest.param(_plain('"in"', KEY[:8], KEY[8:], " more"), id="after a JSON string"),
        pytest.param(_plain('"x"', "AKIA", "234567", "234567", "2345", " end"), id="of JSON numbers"),
        pytest.param(_plain("null", '"x"', KEY[:8], KEY[8:]), id="after null and a JSON string"),
        pytest.param(_plain("true", "[]", KEY[:8], KEY[8:13], KEY[13:]), id="after true and a list"),
        pytest.param(_plain("x", '[1, "two"]', KEY[:4], KEY[4:13], KEY[13:]), id="after a list"),
        pytest.param(_plain("x", '{"n": 1}', KEY[:8], KEY[8:]), id="after an object"),
        pytest.param(_plain(KEY[:8], f'"{KEY[8:]}"', " end"), id="completed by a JSON string"),
        pytest.param([_delta("a"), *_plain('"x"', KEY[:8], KEY[8:])], id="after JSON objects"),
    ],
)  # fmt: skip
def test_a_key_in_plain_data_is_blocked_in_either_reading(
    ruleset: RuleSet, holdback: int, events: list[bytes]
) -> None:
    """Split across plain-text data lines that parse as JSON, a key read as raw lines join it, or
    as JSON-decoding clients join it, blocks before any line from its first piece on is sent."""
    sent, blocked = _guarded(_guard(ruleset, holdback), events)
    assert blocked is not None
    assert b"AKIA" not in b"".join(sent)


def test_a_match_may_begin_in_raw_data_released_before_the_raw_reading_started(tmp_path: Path) -> None:
    """Data read apart from the stream text before any plain data (JSON objects) is read raw
    once plain data comes: a match running from it into plain data blocks."""
    rules = _ruleset(tmp_path, "policies:\n" + _rule("t.s", "block", r"{regex: 'secret\W+[0-9]{6}\b'}"))
    guard = StreamGuard(rules, Context(), holdback=plan_holdback(rules, Stage.RESPONSE, 100))
    events = [_delta("fine"), b'data: {"note": "secret"}\n\n', *_plain("123456")]
    assert _guarded(guard, events)[1] is not None


def _evaluated(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = streaming.evaluate

    def counting(*args: object) -> object:
        calls.append(str(args[2]))
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(streaming, "evaluate", counting)
    return calls


def test_an_object_stream_is_read_once(
    ruleset: RuleSet, holdback: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSON-object events (OpenAI, Anthropic) are not read raw: one evaluation per event's text."""
    calls = _evaluated(monkeypatch)
    events = [_delta(word) for word in ("hello", " world", "", " again")] + [b"data: [DONE]\n\n"]
    sent, blocked = _guarded(_guard(ruleset, holdback), events)
    assert (b"".join(sent), blocked) == (b"".join(events), None)
    assert len(calls) == 3


def test_plain_text_data_is_read_twice_only_once_it_reads_apart(
    ruleset: RuleSet, holdback: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain data that is not JSON, or a JSON number, is the stream text itself: read once. From
    a data line that parses as a JSON string, list or object on, the raw data is read as well."""
    calls = _evaluated(monkeypatch)
    sent, _ = _guarded(_guard(ruleset, holdback), _plain("hello", " world", "42"))
    assert len(calls) == 3
    calls.clear()
    sent, blocked = _guarded(_guard(ruleset, holdback), _plain("hello", '"x"', " y"))
    assert blocked is None
    assert len(sent) == 3
    assert calls == ["hello", "hellox", 'hello"x"', "hellox y", 'hello"x" y']


@pytest.mark.parametrize(
    ("event", "data", "plain"),
    [
        pytest.param(b"data: words\n\n", "words", True, id="data that is not JSON"),
        pytest.param(b"data: 42\n\n", "42", True, id="a JSON number"),
        pytest.param(b'data: "a"\n\n', '"a"', True, id="a JSON string"),
        pytest.param(b"data: [1]\n\n", "[1]", True, id="a JSON list"),
        pytest.param(b'data: {"a":\ndata: 1}\n\n', '{"a":\n1}', False, id="a JSON object"),
        pytest.param(b"data: [DONE]\n\n", "[DONE]", False, id="the DONE marker"),
        pytest.param(b": only a comment\n\n", "", False, id="no data"),
    ],
)
def test_read_event_data(event: bytes, data: str, plain: bool) -> None:
    """An event's raw data, and whether it is plain (what may start the raw reading)."""
    read = read_event(event, FIELDS)
    assert (read.data, read.plain) == (data, plain)


def test_a_whole_event_stream_reads_its_plain_data_raw_too() -> None:
    """Read at once, a stream whose data is plain and reads apart is read as raw data as well."""
    texts = sse_texts(b'data: "x"\n\ndata: ' + KEY.encode() + b"\n\n", DELTA)
    assert texts.text.split("\n")[:2] == ["x" + KEY, '"x"' + KEY]
    assert sse_texts(b"data: a\n\ndata: b\n\n", DELTA).text == "ab"
    assert "raw data" not in sse_texts(_delta("a") + b"data: [DONE]\n\n", DELTA).paths
