"""Streamed answers hold back only what could still become a block match, and never leak one.

The guarantee, property-tested on the built-in pack: for every block rule of the response stage,
each of its ``tests.match`` samples (as written, as a JSON string literal, and with its first
matched character written as a ``\\u`` escape) is streamed through the real guard as SSE events of
every answer shape, split at every position, one character per event, and at random multi-way
split points; no character that a block reports reaches the client. CI runs every position in
one shape each (rotating) and a derandomized example budget; ``FUZZ_EXAMPLES=N`` runs every
position in every shape and N random examples.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway import streaming
from gateway.cli import main
from gateway.config import Settings
from gateway.flashback import DEFAULT_RESPONSE_FIELDS, parse_field_path
from gateway.policy import Action, Context, Decision, RuleSet, Span, Stage, evaluate, load_ruleset
from gateway.policy.holdback import Holdback, plan_holdback
from gateway.streaming import StreamGuard, read_event
from tests.proxy_fixtures import start_gateway, start_upstream

FUZZ = os.environ.get("FUZZ_EXAMPLES")
EXAMPLES = int(FUZZ or "300")
RANDOM = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=FUZZ is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

PACK = load_ruleset()
CAP = Settings().stream_holdback
HOLDBACK = plan_holdback(PACK, Stage.RESPONSE, CAP)
FIELDS = tuple(parse_field_path(path) for path in DEFAULT_RESPONSE_FIELDS)
BLOCK_RULES = [
    rule for rule in PACK.rules if Stage.RESPONSE in rule.stages and rule.effective_action is Action.BLOCK
]


def _data(value: str) -> bytes:
    return f"data: {value}\n\n".encode()


def _plain(piece: str) -> bytes:
    # A client splits data at CR too: a piece with one cannot be sent as plain text.
    assert "\r" not in piece
    return b"".join(b"data: " + line.encode() + b"\n" for line in piece.split("\n")) + b"\n"


# Each supported answer shape: how an upstream puts one piece of the answer's text in an event.
SHAPES: dict[str, Callable[[str], bytes]] = {
    "content": lambda piece: _data(json.dumps({"content": piece})),
    "openai delta": lambda piece: _data(json.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]})),
    "anthropic delta": lambda piece: _data(
        json.dumps(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        )
    ),
    "json string": lambda piece: _data(json.dumps(piece)),
    "plain text": _plain,
}


def _block_spans(decision: Decision) -> list[Span]:
    return [s for v in decision.violations if v.effective_action is Action.BLOCK for s in v.spans]


def _escape_first(text: str) -> str | None:
    """The text with the first character a block reports written as a JSON ``\\u`` escape."""
    spans = _block_spans(evaluate(PACK, Stage.RESPONSE, text))
    if not spans:
        return None
    at = min(span.start for span in spans)
    return f"{text[:at]}\\u{ord(text[at]):04x}{text[at + 1 :]}"


@dataclass(frozen=True)
class Case:
    """One text to stream: a rule's sample in one form, and what a block reports in it whole."""

    rule_id: str
    form: str
    text: str
    spans: tuple[Span, ...]


def _cases() -> list[Case]:
    cases = []
    for rule in BLOCK_RULES:
        for sample in rule.tests.match:
            forms = {
                "as written": sample,
                "json string": json.dumps(sample),
                "escaped": _escape_first(sample),
            }
            for form, text in forms.items():
                if text is None:
                    continue
                decision = evaluate(PACK, Stage.RESPONSE, text)
                # A form may no longer block (an escape inside an escape is decoded twice at most).
                if decision.blocked:
                    cases.append(Case(rule.id, form, text, tuple(_block_spans(decision))))
    return cases


CASES = _cases()


@dataclass(frozen=True)
class Outcome:
    released: str  # the text of the events the client got, as it reads them
    blocked: Decision | None
    sent: int = 0  # how many events it got


def stream(pieces: list[str], shape: str, holdback: Holdback | int = HOLDBACK) -> Outcome:
    """Each piece in its own event, through the guard as the gateway drives it (answers.py)."""
    guard = StreamGuard(PACK, Context(), holdback=holdback)
    sent = 0

    def outcome(blocked: Decision | None) -> Outcome:
        return Outcome("".join(pieces[:sent]), blocked, sent)

    for piece in pieces:
        event = SHAPES[shape](piece)
        read = read_event(event, FIELDS)
        if read.side.text and (side := guard.side(read.side.text)).blocked:
            return outcome(side)
        step = guard.feed(event, read.text, data=read.data, plain=read.plain)
        if step.blocked is not None:
            return outcome(step.blocked)
        sent += len(step.release)
    sent += len(guard.finish().release)
    return outcome(None)


def check(case: Case, pieces: list[str], shape: str, holdback: Holdback | int = HOLDBACK) -> None:
    """The stream blocks, and no character a block reports (whole or streamed) was released.

    Plain-text pieces are released as a client reading raw data lines reads them, whether they
    parse as JSON or not; a piece with a CR, which ends a data line, goes as a JSON string."""
    if shape == "plain text" and any("\r" in piece for piece in pieces):
        shape = "json string"
    outcome = stream(pieces, shape, holdback)
    where = f"{case.rule_id} ({case.form}) cut {[len(p) for p in pieces]} as {shape}"
    assert outcome.blocked is not None, f"{where}: not blocked"
    decoded = (
        [read_event(_plain(piece), FIELDS).text for piece in pieces] if shape == "plain text" else pieces
    )
    if decoded == pieces:
        _within(outcome.released, [*case.spans, *_block_spans(outcome.blocked)], where)
        return
    # Two readings, the raw lines and the lines JSON-decoded: each holds back its own matches
    # (a block's spans are in offsets of the reading that found it).
    _within(outcome.released, case.spans, f"{where}, read raw")
    whole = evaluate(PACK, Stage.RESPONSE, "".join(decoded))
    _within("".join(decoded[: outcome.sent]), _block_spans(whole), f"{where}, read as JSON")


def _within(released: str, reported: list[Span] | tuple[Span, ...], where: str) -> None:
    # The guarantee covers matches up to the window; a longer one may have its start released.
    for first in sorted(span.start for span in reported if span.length <= HOLDBACK.window)[:1]:
        assert len(released) <= first, f"{where}: released {len(released)} > {first}"


@pytest.fixture(scope="module")
def remembered() -> Iterator[None]:
    """The engine is pure, and the windows of one text's splits recur: each is evaluated once."""
    real = streaming.evaluate

    @functools.lru_cache(maxsize=1 << 14)
    def decided(text: str) -> Decision:
        return real(PACK, Stage.RESPONSE, text)

    def evaluate_once(ruleset: RuleSet, stage: Stage, text: str, context: Context | None = None) -> Decision:
        if ruleset is PACK and stage is Stage.RESPONSE:
            return decided(text)
        return real(ruleset, stage, text, context or Context())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streaming, "evaluate", evaluate_once)
        yield


def _pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(text)}), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("rule_id", [rule.id for rule in BLOCK_RULES])
@pytest.mark.usefixtures("remembered")
def test_a_sample_split_anywhere_never_reaches_the_client(rule_id: str) -> None:
    """Every sample of the rule, cut in two at every position and into one-character events,
    in every answer shape, blocks before any character a block reports is released."""
    cases = [case for case in CASES if case.rule_id == rule_id]
    assert cases, f"{rule_id} has no tests.match sample that blocks"
    names = list(SHAPES)
    split_points = 0
    for number, case in enumerate(cases):
        # In CI each position, and each text's one-character events, go in one shape, in turn.
        for cut in range(1, len(case.text)):
            for shape in names if FUZZ else [names[(number + cut) % len(names)]]:
                check(case, [case.text[:cut], case.text[cut:]], shape)
                split_points += 1
        for shape in names if FUZZ else [names[number % len(names)]]:
            check(case, list(case.text), shape)
            split_points += len(case.text) - 1
    print(f"{rule_id}: {len(cases)} texts, {split_points} split points")


words = st.sampled_from(
    ["Sure", " here", " is", " the", " config", ":", "\n", " `", "value", " A", "s", ". "]
)


@pytest.mark.usefixtures("remembered")
@RANDOM
@given(
    case=st.sampled_from(CASES),
    shape=st.sampled_from(list(SHAPES)),
    before=st.lists(words, max_size=6),
    after=st.lists(words, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=800), max_size=16),
)
def test_a_sample_amid_prose_cut_anyhow_never_reaches_the_client(
    case: Case, shape: str, before: list[str], after: list[str], cuts: list[int]
) -> None:
    """A sample with prose around it, cut at random points into many events, never leaks."""
    head = "".join(before)
    text = head + case.text + "".join(after)
    decision = evaluate(PACK, Stage.RESPONSE, text)
    assume(decision.blocked)  # prose run into a key can make it a longer word, and no key
    shifted = Case(case.rule_id, case.form, text, tuple(_block_spans(decision)))
    check(shifted, _pieces(text, cuts), shape)


json_lines = st.sampled_from(['"see"', "[1]", '{"n": 2}', "42", "null", "true", '"x y"', "[]"])


@pytest.mark.usefixtures("remembered")
@RANDOM
@given(
    case=st.sampled_from([c for c in CASES if c.form == "as written"]),
    before=st.lists(json_lines, min_size=1, max_size=3),
    after=st.lists(json_lines, max_size=3),
    cuts=st.lists(st.integers(min_value=1, max_value=800), max_size=8),
)
def test_a_sample_amid_plain_data_that_parses_as_json_never_reaches_the_client(
    case: Case, before: list[str], after: list[str], cuts: list[int]
) -> None:
    """Plain-text data lines that parse as JSON (strings, numbers, lists, objects) around a sample:
    a client reading the data lines raw never gets a character a block reports."""
    text = "".join(before) + case.text + "".join(after)
    decision = evaluate(PACK, Stage.RESPONSE, text)
    assume(decision.blocked)
    shifted = Case(case.rule_id, case.form, text, tuple(_block_spans(decision)))
    check(shifted, [*before, *_pieces(case.text, cuts), *after], "plain text")


def test_the_check_catches_a_leak_when_too_little_is_held() -> None:
    """The same check fails when the guard holds back a window too small for the key."""
    case = next(c for c in CASES if c.rule_id == "secrets.aws-access-key-id" and c.form == "as written")
    with pytest.raises(AssertionError, match="released"):
        check(case, list(case.text), "openai delta", holdback=8)


# Prose leaves at once.

PROSE = [
    "Sure",
    ",",
    " here",
    " is",
    " the",
    " plan",
    ":",
    " first",
    ",",
    " ship",
    " it",
    "; ",
    "then",
    " rest",
    "!",
]


def test_prose_is_released_as_it_arrives() -> None:
    """An event of ordinary prose leaves when it arrives, even when it ends inside a word, unless
    the word could begin a key: " ship" could become a Shippo token ("shippo_live_...")."""
    guard = StreamGuard(PACK, Context(), holdback=HOLDBACK)
    released_at: dict[int, int] = {}
    for index, word in enumerate(PROSE):
        for event in guard.feed(str(index).encode(), word).release:
            released_at[int(event)] = index
    late = {word for index, word in enumerate(PROSE) if released_at.get(index) != index}
    assert late == {" ship"}
    assert released_at[PROSE.index(" ship")] == PROSE.index(" ship") + 1


@pytest.mark.parametrize(
    ("text", "held"),
    [
        pytest.param("Sure, here is the plan. ", "", id="prose ending after a space holds nothing"),
        pytest.param("Sure, here is the plan:", "", id="prose ending after punctuation holds nothing"),
        pytest.param("Then rest.", "", id="a full stop that only context could follow is not held"),
        pytest.param(
            "The migration", "", id="a last letter that no reported part can take composed is not held"
        ),
        pytest.param("The8", "8", id="an Azure AD secret's free characters are context, its digit is held"),
        pytest.param("The8Q~abc", "8Q~abc", id="and so is what follows the digit"),
        pytest.param("aws_secret_access_key = AKxy", "AKxy", id="a key's long context is not held"),
        pytest.param("SC5d4r_hcv", "_hcv", id="a MaxMind key is held from its reported part"),
        pytest.param("Here is the key AKIAIOSF", "AKIAIOSF", id="the beginning of an AWS key is held"),
        pytest.param("AKIAIOSFODNN7EXAMPLE and", "", id="a finished key is no longer held"),
        pytest.param("use ghp_Xq2dM4tV", "ghp_Xq2dM4tV", id="the beginning of a GitHub token is held"),
        pytest.param(
            "DATABASE_URL=postgres://app:5im9", "app:5im9", id="a URL's credentials are held, not its scheme"
        ),
        pytest.param("-----BEGIN RSA PRIV", "-----BEGIN RSA PRIV", id="a PEM header is held"),
        pytest.param("an \\u00", "\\u00", id="an escape cut short is held"),
        pytest.param('key = "\\u00', "\\u00", id="and not the context its character could follow"),
        pytest.param(
            "id: \\u0041KIAIOS", "\\u0041KIAIOS", id="a key behind an escape is held from the escape"
        ),
        pytest.param("id=%41KIAIOSF", "%41KIAIOSF", id="a key behind a percent escape is held from it"),
        pytest.param("rate: %E2%82", "%E2%82", id="a UTF-8 sequence cut short in percent bytes is held"),
        pytest.param("GEMINI_API_KEY=AIza", "GEMINI_API_KEY=AIza", id="a key's name and its start are held"),
        pytest.param("a ≮", "≮", id="a character a combining mark may still change is held"),
        pytest.param("x AKIAIO", "AKIAIO", id="the context before a key is not held"),
        pytest.param("xAKIAIO", "", id="a key that cannot begin there is not held"),
        pytest.param(
            "fullwidth ＡＫＩＡ", "ＡＫＩＡ", id="text read through normalisation is held as written"
        ),
    ],
)
def test_what_is_held(text: str, held: str) -> None:
    """The held suffix of a text under the built-in pack."""
    assert text[HOLDBACK.start(text) :] == held


def test_the_hold_never_exceeds_the_window() -> None:
    """A key-like run is held while it could still become a match, at most ``window`` characters."""
    header = "Here: -----BEGIN RSA PRIVATE KEY-----\n"
    assert HOLDBACK.start(header + "A" * 200) == len("Here: ")
    text = header + "A" * 1000
    assert len(text) - HOLDBACK.start(text) <= HOLDBACK.window == CAP


# Several rules: the earliest start of any.


def _ruleset(tmp_path: Path, rules: str) -> RuleSet:
    (tmp_path / "rules.yaml").write_text("policies:\n" + rules, encoding="utf-8")
    return load_ruleset([tmp_path])


def _rule(rule_id: str, match: str, extra: str = "") -> str:
    return f"  - {{id: {rule_id}, name: {rule_id}, severity: high, action: block, match: {match}{extra}}}\n"


THREE = (
    _rule("t.abcd", "{regex: 'abcd'}")
    + _rule("t.cdef", r"{regex: 'c+d[e-g]{2}'}")
    + _rule("t.word", "{keywords: [bcd xyz]}")
)


@dataclass(frozen=True)
class Three:
    ruleset: RuleSet
    holdback: Holdback
    singles: tuple[Holdback, ...]  # each rule's alone


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Three:
    def plan(rules: str) -> tuple[RuleSet, Holdback]:
        ruleset = _ruleset(tmp_path_factory.mktemp("rules"), rules)
        return ruleset, plan_holdback(ruleset, Stage.RESPONSE, 64)

    ruleset, holdback = plan(THREE)
    singles = tuple(plan(rule)[1] for rule in THREE.splitlines(keepends=True))
    return Three(ruleset, holdback, singles)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abcdefgxyz ", max_size=30))
def test_the_hold_starts_where_the_earliest_rule_would(three: Three, text: str) -> None:
    """With several rules, the held suffix is the longest any one of them holds (RE2's longest
    match over the reversed union finds the earliest start, not the first alternative's)."""
    assert three.holdback.start(text) == min(single.start(text) for single in three.singles)


@settings(max_examples=300, deadline=None)
@given(
    before=st.text(alphabet="ab cd_-=", max_size=12),
    key=st.sampled_from(["cdef", "ccdgg", "abcd", "bcd xyz", "BCD  XYZ"]),
    cut=st.integers(min_value=1, max_value=8),
)
def test_a_cut_inside_a_match_holds_it(three: Three, before: str, key: str, cut: int) -> None:
    """Cut anywhere inside a match, the text from the match's start on is held."""
    text = before + key
    for span in _block_spans(evaluate(three.ruleset, Stage.RESPONSE, text)):
        end = min(span.end - 1, span.start + cut)
        assert three.holdback.start(text[:end]) <= span.start


# How each rule is held, as `gateway check --holdback` shows it.


@pytest.mark.parametrize(
    ("rules", "shown"),
    [
        pytest.param(
            _rule("t.a", r"{regex: '\bAKIA[A-Z2-7]{16}\b'}"),
            ["t.a: hold-back: prefix (longest 20)"],
            id="a regex is held by prefix, as long as its longest match",
        ),
        pytest.param(
            _rule("t.a", r"{regex: '(?:\b|_)(?P<v>ghp_[A-Za-z0-9]{36})'}"),
            ["t.a: hold-back: prefix (longest 40)"],
            id="the context before a reported group is not held",
        ),
        pytest.param(
            _rule("t.a", r"{all: [{regex: 'key='}, {regex: 'AIza\w{4}'}]}"),
            ["t.a: hold-back: prefix (longest 8), and each part's match while the others may follow"],
            id="an all of several parts holds a matched part while the others may follow",
        ),
        pytest.param(
            _rule("t.a", "{not: {regex: 'hello'}}"),
            [
                "t.a: hold-back: fixed window 5 (not or judge: it matches without any of its patterns, "
                "on the whole evaluated window)"
            ],
            id="a not rule holds a fixed window",
        ),
        pytest.param(
            _rule("t.a", "{all: [{keywords: [contract]}, {judge: 'Do not share contract terms.'}]}"),
            ["t.a: hold-back: prefix (longest 8)"],
            id="a judge gated by a pattern is held by the pattern's prefix",
        ),
        pytest.param(
            _rule("t.a", "{judge: 'Do not share contract terms.'}"),
            [
                "t.a: hold-back: fixed window 0 (not or judge: it matches without any of its patterns, "
                "on the whole evaluated window)"
            ],
            id="a judge alone holds a fixed window",
        ),
        pytest.param(
            _rule("t.a", "{max_tokens: 5}"),
            ["t.a: hold-back: fixed window 0 (max_tokens: its span is the whole evaluated window)"],
            id="a max_tokens rule holds a fixed window of nothing",
        ),
        pytest.param(
            _rule("t.a", "{regex: '(?U)x{3}'}"),
            [
                "t.a: hold-back: fixed window 64 "
                "(the prefix analysis cannot read it: unknown extension ?U at position 1)"
            ],
            id="a pattern Python's parser cannot read holds the cap",
        ),
        pytest.param(
            _rule("t.a", "{regex: 'x{3}'}", ", mode: shadow")
            + "  - {id: t.b, name: b, severity: high, action: alert, match: {regex: 'y'}}\n",
            [],
            id="shadow and alert rules are not held",
        ),
    ],
)
def test_each_rule_says_how_it_is_held(tmp_path: Path, rules: str, shown: list[str]) -> None:
    """Each enforced block rule of the response stage says how streams are held for it."""
    holdback = plan_holdback(_ruleset(tmp_path, rules), Stage.RESPONSE, 64)
    assert [f"{rule.rule_id}: {rule.describe()}" for rule in holdback.rules] == shown


def test_a_fixed_window_holds_the_last_characters(tmp_path: Path) -> None:
    """A rule held by a fixed window holds that many characters of any text."""
    holdback = plan_holdback(_ruleset(tmp_path, _rule("t.a", "{not: {regex: 'hello'}}")), Stage.RESPONSE, 64)
    assert holdback.start("any text at all") == len("any text at all") - 5


@pytest.mark.parametrize(
    ("pattern", "text", "held"),
    [
        pytest.param(r"\pL{3}9", "xx ab", "ab", id="RE2's Unicode classes"),
        pytest.param(r"[[:digit:]]{2}!", "a 1", "1", id="RE2's POSIX classes"),
        pytest.param(r"\x{41}BC", "xAB", "AB", id="RE2's braced code points"),
        pytest.param(r"ab\z", "cab", "ab", id="RE2's end of text"),
        pytest.param(r"a{,2}z", "a{,", "a{,", id="a brace RE2 reads as text"),
        pytest.param(r"(?<k>qq)r", "xqq", "qq", id="RE2's named groups without P"),
        pytest.param(r"\Q+*\Ez", "a+*", "+*", id="RE2's quoted text"),
        pytest.param(r"(?i)SECRET", "my secr", "secr", id="case-insensitive patterns"),
    ],
)
def test_re2_syntax_is_read_as_re2_reads_it(tmp_path: Path, pattern: str, text: str, held: str) -> None:
    """Patterns written in RE2's own syntax are held as RE2 matches them."""
    ruleset = _ruleset(tmp_path, _rule("t.a", "{regex: '" + pattern.replace("'", "''") + "'}"))
    holdback = plan_holdback(ruleset, Stage.RESPONSE, 64)
    assert holdback.rules[0].fixed is None
    assert text[holdback.start(text) :] == held


def test_gateway_check_lists_each_rules_hold_back(capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway check --holdback` lists every block rule of the pack and how it is held."""
    assert main(["check", "--holdback"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"stream hold-back: at most {CAP} characters, 0 whatever the text"
    assert len(lines) == 2 + len(BLOCK_RULES)
    assert "  secrets.aws-access-key-id: hold-back: prefix (longest 21)" in lines
    assert all("hold-back: prefix" in line for line in lines[2:])


# Through a real gateway.


def _sse(events: list[bytes]) -> Callable[[web.Request], Any]:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    return answer


GATEWAY_CASES = [
    case
    for case in CASES
    if case.form in ("as written", "escaped")
    and case.rule_id in {"secrets.aws-access-key-id", "secrets.private-key", "secrets.database-url"}
][:8]


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_through_a_gateway_no_sample_reaches_the_client(aiohttp_server: Any, shape: str) -> None:
    """Samples streamed one character per event through a real gateway: the client never gets
    a character a block reports, and the stream ends with the block."""
    upstream, upstream_server = await start_upstream(aiohttp_server)
    public, _, _ = await start_gateway(aiohttp_server, str(upstream_server.make_url("/")))
    async with aiohttp.ClientSession() as client:
        for case in GATEWAY_CASES:
            events = [
                SHAPES["json string" if shape == "plain text" and "\r" in c else shape](c) for c in case.text
            ]
            upstream.handler = _sse(events)
            async with client.post(
                str(public.make_url("/conversation/c/prompt")), json={"prompt": "hi"}
            ) as answer:
                body = await answer.read()
            got, _, error = body.rpartition(b"event: error\ndata: ")
            assert json.loads(error)["error_code"] == "RESPONSE_BLOCKED", case
            # Events arrive whole and in order: the client got the first ``sent`` characters.
            sent = next(n for n in range(len(events) + 1) if sum(map(len, events[:n])) == len(got))
            assert got == b"".join(events[:sent])
            assert sent <= min(span.start for span in case.spans), (case.rule_id, case.form, sent)


async def test_through_a_gateway_prose_reaches_the_client_before_the_upstream_goes_on(
    aiohttp_server: Any,
) -> None:
    """The first words of an answer reach the client while the upstream still waits to send more."""
    upstream, upstream_server = await start_upstream(aiohttp_server)
    public, admin, _ = await start_gateway(aiohttp_server, str(upstream_server.make_url("/")))
    first = SHAPES["openai delta"]("Sure, here is the plan. ")
    rest = SHAPES["openai delta"]("Ship it!")
    go_on = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        await go_on.wait()
        await response.write(rest)
        await response.write_eof()
        return response

    upstream.handler = answer
    async with aiohttp.ClientSession() as client:
        async with client.post(str(public.make_url("/conversation/c/prompt")), json={"prompt": "hi"}) as got:
            # A fail-safe, not a measure: with the whole window held, the first event never comes.
            early = await asyncio.wait_for(got.content.readexactly(len(first)), 10)
            go_on.set()
            assert early + await got.read() == first + rest
        async with client.get(str(admin.make_url("/metrics"))) as metrics:
            exposition = await metrics.text()
    assert _sample(exposition, "policy_gateway_stream_first_byte_delay_seconds_count") == 1
    assert _sample(exposition, "policy_gateway_stream_holdback_chars_count") == 2
    assert _sample(exposition, 'policy_gateway_stream_holdback_chars_bucket{le="0.0"}') == 2


def _sample(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the exposition")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param('{"GEMINI_API_KEY": "AIzaSy_n0wYW68pFQkBeDDGV6E4UN_6Gv7pw08C"}', id="as written"),
        pytest.param('{"GEMINI_API_KEY": "\\u0041IzaSy_n0wYW68pFQkBeDDGV6E4UN_6Gv7pw08C"}', id="escaped"),
        pytest.param(
            '[{"key": "x", "GEMINI_API_KEY": "AIzaSy_n0wYW68pFQkBeDDGV6E4UN_6Gv7pw08C"}]', id="in a list"
        ),
    ],
)
def test_a_key_named_by_the_key_of_a_json_event_is_blocked(data: str) -> None:
    """A client that shows an event's data raw reads a JSON key beside its value: so does the
    gateway (json_texts joins a member as "key: value"), and a rule that needs the name matches."""
    assert stream([data], "plain text").blocked is not None
