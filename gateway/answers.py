"""Inspecting the upstream's answers at stage ``response`` before the client sees them.

The gateway decides on the reading the client will act on, and releases exactly the bytes it
read. A whole answer is read in every way a client may read it (its declared charset; UTF-8;
what a byte order mark, or the encoding guess of RFC 4627, says), as JSON where it parses and
as text otherwise, and every string, key and number of every reading is evaluated in one text.
A streamed answer is evaluated event by event, every line of every event (gateway.streaming).
Upstream errors are answers like any other. ``response_fields`` says only where an answer's
text is: what is counted as response tokens, and what a stream joins across events.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.helpers import parse_content_type  # what ClientResponse.content_type reads with

from gateway import jsonlib
from gateway.audit import INFO, RequestInfo
from gateway.flashback import (
    ANSWER_NOT_INSPECTABLE,
    EVALUATION_FAILED,
    block_body,
    blocking,
    error_body,
    withheld_notice,
)
from gateway.json_texts import Texts, TooDeep, collect, join
from gateway.judge.runner import Judged, waits
from gateway.observe import Where
from gateway.policy import Action, Context, Decision, Stage, evaluate
from gateway.proxy import (
    UPSTREAM_ERRORS,
    answer_cut_short,
    json_response,
    response_headers,
    upstream_failure,
)
from gateway.state import STATE, GatewayState
from gateway.streaming import (
    EventTooLarge,
    SSESplitter,
    StreamGuard,
    StreamStep,
    read_event,
    sse_texts,
)
from gateway.usage.accounting import Exchange

log = logging.getLogger("gateway.answers")


FieldPaths = Sequence[tuple[str, ...]]


class AnswerTooLarge(Exception):
    """The answer exceeds what the gateway holds in memory to inspect it."""


class EvaluationFailed(Exception):
    """The engine raised: the text was not evaluated, so it is refused (fail closed)."""


class UpstreamBrokeOff(Exception):
    """Reading a whole answer failed at the upstream (``cause``): the client has none of it yet."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


class NotInspectable(Exception):
    """The answer cannot be read as its client reads it: refused with 502, never passed on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # the fallback metric's label
        self.message = message


def _info(request: web.Request) -> RequestInfo:
    try:
        return request[INFO]
    except KeyError:  # a handler called without the routes' middleware (tests)
        return RequestInfo()


def judge(request: web.Request, stage: Stage, text: str, context: Context) -> Decision:
    """Evaluate, failing closed (``EvaluationFailed``) when the engine raises; nothing is reported."""
    return _judge(request.app[STATE], _info(request), stage, text, context)


def _judge(state: GatewayState, info: RequestInfo, stage: Stage, text: str, context: Context) -> Decision:
    started = time.perf_counter()
    try:
        decision = evaluate(state.ruleset, stage, text, context)
    except Exception as exc:
        state.observer.fallback("policy", "evaluation_error")
        # SECURITY: the exception's text may quote the input; only its type is logged.
        log.error("policy evaluation failed at stage %s: %s", stage.value, type(exc).__name__)
        info.decision = "block"
        raise EvaluationFailed from None
    if stage is Stage.RESPONSE:
        info.response_own += time.perf_counter() - started
    return decision


def decide(
    request: web.Request, stage: Stage, text: str, context: Context, where: Where | None = None
) -> Decision:
    """Evaluate, and make the decision visible (metrics, audit, alerts); fail closed on error.

    ``where`` names the place in the message (a JSON path) of an offset of ``text``.
    """
    return decide_with(request.app[STATE], _info(request), stage, text, context, where)


def decide_with(
    state: GatewayState,
    info: RequestInfo,
    stage: Stage,
    text: str,
    context: Context,
    where: Where | None = None,
) -> Decision:
    """``decide``, with the state and the request's info the caller looked up (once, not in
    each step: every request is decided twice)."""
    decision = _judge(state, info, stage, text, context)
    _report(state, info, decision, text, where)
    return decision


def _report(
    state: GatewayState, info: RequestInfo, decision: Decision, text: str, where: Where | None
) -> None:
    if decision.violations:
        state.observer.decision(decision, info, lambda start, end: text[start:end], where)
    else:
        # Nothing found (most texts): counted, with no reader of matches to make.
        state.observer.decision(decision, info, _nothing_matched)
    _note_action(info, decision.action)


def _nothing_matched(start: int, end: int) -> str | None:
    return None


# Judge calls whose verdicts come after the answer: kept until done (a task without a
# reference may be collected), and awaited at shutdown (``judged_after``) before the audit
# file, the alerts and the judge's session close.
_AFTER: set[asyncio.Task[Decision]] = set()


def decide_first(
    state: GatewayState,
    info: RequestInfo,
    stage: Stage,
    text: str,
    context: Context,
    where: Where | None = None,
) -> Decision:
    """``decide_with``, unless a pending rule would block (and no cheap rule did): that decision
    is returned unreported, for ``decide_judged`` to complete, count and record once. The judge
    of rules that only log or alert runs after the answer, and records its violations then.
    Synchronous: most texts leave nothing pending, and pay for no coroutine."""
    decision = _judge(state, info, stage, text, context)
    if decision.pending and not decision.blocked:
        if waits(decision):
            return decision
        _report(state, info, decision, text, where)
        _after(_judged(state, info, decision, text, context, where), info)
        return decision
    _report(state, info, decision, text, where)
    return decision


def must_wait(decision: Decision) -> bool:
    """Whether ``decide_first`` left the decision to ``decide_judged``."""
    return bool(decision.pending) and not decision.blocked and waits(decision)


async def decide_judged(
    state: GatewayState,
    info: RequestInfo,
    decision: Decision,
    text: str,
    context: Context,
    where: Where | None = None,
) -> Decision:
    """A decision ``decide_first`` left waiting, completed by the judge, counted once (a text
    the judge blocks counts as a block, not as allowed) and recorded. Fails closed
    (``EvaluationFailed``) if completing it fails: what was not evaluated is not forwarded."""
    try:
        judged = await _complete(state, info, decision, text, context)
    except Exception as exc:
        state.observer.fallback("policy", "evaluation_error")
        log.error("completing a decision with the judge failed: %s", type(exc).__name__)
        raise EvaluationFailed from None
    decision = judged.decision
    state.observer.decision(decision, info, _slicer(text), where, notes=judged.notes)
    _note_action(info, decision.action)
    return decision


async def judge_pending(
    state: GatewayState,
    info: RequestInfo,
    decision: Decision,
    text: str,
    context: Context,
    where: Where | None = None,
) -> Decision:
    """``decision`` (already reported), completed by the judge when a pending rule would block;
    the judge of rules that only log or alert runs after the answer, and its violations are
    recorded then."""
    if not decision.pending:
        return decision
    if waits(decision):
        return await _judged(state, info, decision, text, context, where)
    _after(_judged(state, info, decision, text, context, where), info)
    return decision


def _after(judging: Coroutine[Any, Any, Decision], info: RequestInfo | None = None) -> None:
    """Judge once the answer is out: a served request's judging waits in its info for the
    bookkeeping after the answer (``start_after_answer``), so that the model's call does not
    share the event loop with the answer still on its way; other callers' starts at once."""
    if info is not None and info.after_answer is not None:
        info.after_answer.append(judging)
        return
    task = asyncio.ensure_future(judging)
    _AFTER.add(task)
    task.add_done_callback(_after_done)


def start_after_answer(info: RequestInfo) -> None:
    """Start the judging a request left for after its answer (called once it is out)."""
    waiting, info.after_answer = info.after_answer, None
    for judging in waiting or ():
        _after(judging)


def _after_done(task: asyncio.Task[Decision]) -> None:
    _AFTER.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # SECURITY: only the type: the exception's text may quote the judged text.
        log.error("judging after the answer failed: %s", type(task.exception()).__name__)


async def judged_after(timeout: float) -> None:
    """Wait (at most ``timeout`` seconds) for the judge calls still out after their answers."""
    if _AFTER:
        await asyncio.wait(set(_AFTER), timeout=timeout)


async def _complete(
    state: GatewayState, info: RequestInfo, decision: Decision, text: str, context: Context
) -> Judged:
    observer = state.observer
    return await state.judge.complete(
        state.ruleset, decision, text, context, observer.workspace_label(info.workspace or "unresolved")
    )


async def _judged(
    state: GatewayState,
    info: RequestInfo,
    decision: Decision,
    text: str,
    context: Context,
    where: Where | None,
) -> Decision:
    """``decision`` completed, and the violations of its pending rules recorded (the rest of it
    was reported already)."""
    judged = await _complete(state, info, decision, text, context)
    waiting = {rule.rule_id for rule in decision.pending}
    new = [violation for violation in judged.decision.violations if violation.rule_id in waiting]
    if new:
        state.observer.violations(judged.decision, new, info, _slicer(text), where, notes=judged.notes)
        _note_action(info, max(violation.effective_action for violation in new))
    return judged.decision


# Action by label, for the strongest action of a request (an enum lookup by name is a Python call).
_ACTIONS = {action.label: action for action in Action}


def _note_action(info: RequestInfo, action: Action) -> None:
    if action > _ACTIONS[info.decision]:
        info.decision = action.label


def read_buffered(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """A whole body that is all in already (a small one comes with its head), read without
    waiting: what ``read_bounded`` would return, with no coroutine to run. None while some of
    it is still to come; ``AnswerTooLarge`` past ``limit``."""
    if not stream.is_eof():
        return None
    body = stream.read_nowait()  # raises what a read would: a broken-off body's error
    if len(body) > limit:
        raise AnswerTooLarge
    return body


async def read_bounded(content: aiohttp.StreamReader | web.BaseRequest, limit: int) -> bytes:
    """Read a whole body, refusing it as soon as it grows past ``limit`` bytes."""
    stream = content.content if isinstance(content, web.BaseRequest) else content
    parts: list[bytes] = []
    size = 0
    # readany() until EOF, as iter_any() does, without its iterator's cost on every request;
    # a body that is all in (at_eof) ends without one more readany() to find it out.
    while chunk := await stream.readany():
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge
        parts.append(chunk)
        if stream.at_eof():
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


# How to read an answer.


@dataclass(frozen=True, slots=True)
class AnswerPlan:
    """How an answer is read: streamed or whole, as an event stream or not, in which charset."""

    stream: bool
    sse: bool
    codec: str | None  # the declared charset's codec; None when none is declared


def plan_answer(upstream: aiohttp.ClientResponse) -> AnswerPlan:
    """The plan for an answer, from its status and headers; ``NotInspectable`` if there is none."""
    headers = upstream.headers
    # Worked out once per combination of the headers that decide it: answers of one backend
    # come with the same few. (What raises is not remembered, and is worked out each time.)
    return _plan(
        tuple(headers.getall("Content-Encoding", ())),
        tuple(headers.getall("Content-Type", ())),
        upstream.status < 400,
        "Content-Length" in headers,
    )


@functools.lru_cache(maxsize=256)
def _plan(encoded: tuple[str, ...], kinds: tuple[str, ...], answered: bool, has_length: bool) -> AnswerPlan:
    encodings = {token.strip().lower() for value in encoded for token in value.split(",")}
    if encodings - {"identity", ""}:
        raise NotInspectable("encoded", "Upstream answer is encoded and cannot be inspected")
    if len(kinds) > 1:
        raise NotInspectable("content_type", "Upstream answer has several content types")
    codec = declared_codec(kinds[0]) if kinds else None
    # As aiohttp's ClientResponse.content_type reads it.
    kind = parse_content_type(kinds[0])[0] if kinds else "application/octet-stream"
    sse = kind == "text/event-stream"
    stream = answered and (sse or (kind.startswith("text/") and not has_length))
    # An event stream is cut into events on its bytes: only an ASCII-compatible charset keeps
    # them, and a client reads an event stream as UTF-8 whatever it declares.
    if sse and codec not in (None, "utf-8"):
        raise NotInspectable("charset", "Upstream event stream is not UTF-8")
    return AnswerPlan(stream, sse, codec)


_CHARSET = re.compile(r';\s*charset\s*=\s*"?([^";,\s]*)"?', re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def declared_codec(content_type: str) -> str | None:
    """The Python codec of a Content-Type's charset; None without one; ``NotInspectable`` if unknown."""
    found = {name.lower() for name in _CHARSET.findall(content_type)}
    if not found:
        return None
    if len(found) > 1:
        raise NotInspectable("charset", "Upstream answer declares several charsets")
    name = found.pop()
    try:
        info = codecs.lookup(name)
    except LookupError:
        info = None
    # Not every Python codec reads bytes into text (base64, zlib, rot13...).
    if info is None or not getattr(info, "_is_text_encoding", True):
        # The name is not quoted back: the upstream chose it, and it reaches the client.
        raise NotInspectable("charset", "Upstream answer in an unknown charset")
    return info.name


# Byte order marks, longest first: what a client that sniffs them reads instead.
_ORDER_MARKS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
# The first bytes of those marks: an answer that starts with none of them has no mark.
_MARK_STARTS = frozenset(mark[:1] for mark, _ in _ORDER_MARKS)
# RFC 4627 §3: JSON's encoding from the pattern of zero bytes in its first four.
_ZERO_PATTERNS = {
    (True, True, True, False): "utf-32-be",
    (False, True, True, True): "utf-32-le",
    (True, False, True, False): "utf-16-be",
    (False, True, False, True): "utf-16-le",
}


def readings(raw: bytes, declared: str | None) -> list[str]:
    """The codecs a client may read ``raw`` in: the declared one first, then UTF-8, then a guess."""
    if (declared is None or declared == "utf-8") and raw[:1] not in _MARK_STARTS and 0 not in raw[:4]:
        return ["utf-8"]  # most answers: no byte order mark, no zero byte to guess from
    found = [declared or "utf-8", "utf-8"]
    head = raw[:4]
    for mark, codec in _ORDER_MARKS:
        if head.startswith(mark):
            found.append(codec)
            break
    else:
        if len(head) == 4 and 0 in head:
            guess = _ZERO_PATTERNS.get(tuple(byte == 0 for byte in head))  # type: ignore[arg-type]
            if guess is not None:
                found.append(guess)
    return list(dict.fromkeys(found))


# Not frozen: built for every body and answer, and a frozen dataclass's __init__ costs about
# five times a plain one's (nothing changes one once built).
@dataclass(slots=True)
class InspectedAnswer:
    """A whole answer as read: every reading's texts joined, and the first reading's content."""

    texts: Texts  # what is evaluated
    payload: Any  # the first reading parsed as JSON, None when it is not JSON
    fields: tuple[str, ...]  # the first reading's answer text, for token counting
    plain: bool  # one reading, UTF-8 JSON: a body rewritten from ``payload`` reads the same


_NOT_JSON: Any = object()
_UTF8_MARK = b"\xef\xbb\xbf"
# A line of a text answer that may be JSON (JSON lines, NDJSON, a JSON log line).
_JSON_LINE = re.compile(r'^[ \t]*[\[{"].*$', re.MULTILINE)
# jsonlib's message for JSON too deeply nested for the standard library's parser.
_TOO_DEEP = "JSON nested too deeply"


def read_answer(raw: bytes, *, sse: bool, declared: str | None, paths: FieldPaths) -> InspectedAnswer:
    """Every reading of a whole answer; ``NotInspectable`` if its JSON nests too deeply."""
    if not sse and (declared is None or declared == "utf-8") and raw[:1] == b"{":
        # Most answers: a JSON object in UTF-8, read as the steps below read it, without them
        # (no order mark, and JSON holds no zero byte: one reading). Anything else takes them.
        try:
            payload = jsonlib.loads(raw)
        except ValueError:
            payload = None
        if type(payload) is dict:
            try:
                texts = collect(payload, fields=paths)
            except TooDeep:
                raise NotInspectable("too_deep", "Upstream answer nested too deeply to inspect") from None
            return InspectedAnswer(texts, payload, texts.fields, True)
    return read_readings(raw, sse=sse, declared=declared, paths=paths)


def read_readings(raw: bytes, *, sse: bool, declared: str | None, paths: FieldPaths) -> InspectedAnswer:
    """``read_answer`` by its steps: each reading a client may make of the answer."""
    names = readings(raw, declared)
    payload: Any = None
    if len(names) == 1:
        # One reading (most answers): the loop below, without its joins.
        try:
            texts, parsed = _reading(raw, names[0], sse=sse, paths=paths, prefix="")
        except TooDeep:
            raise NotInspectable("too_deep", "Upstream answer nested too deeply to inspect") from None
        payload = None if parsed is _NOT_JSON else parsed
        return InspectedAnswer(texts, payload, texts.fields, names == ["utf-8"] and payload is not None)
    parts: list[Texts] = []
    fields: tuple[str, ...] = ()
    for index, codec in enumerate(names):
        prefix = "" if index == 0 else f"{codec}:"
        try:
            texts, parsed = _reading(raw, codec, sse=sse, paths=paths if index == 0 else (), prefix=prefix)
        except TooDeep:
            raise NotInspectable("too_deep", "Upstream answer nested too deeply to inspect") from None
        if index == 0:
            payload, fields = (None if parsed is _NOT_JSON else parsed), texts.fields
        parts.append(texts)
    plain = names == ["utf-8"] and payload is not None
    return InspectedAnswer(join(parts), payload, fields, plain)


def _reading(raw: bytes, codec: str, *, sse: bool, paths: FieldPaths, prefix: str) -> tuple[Texts, Any]:
    if codec == "utf-8" and sse:
        return sse_texts(raw, paths), _NOT_JSON
    if codec == "utf-8":
        source: bytes | str = raw[len(_UTF8_MARK) :] if raw.startswith(_UTF8_MARK) else raw
    else:
        source = raw.decode(codec, errors="replace").removeprefix("\ufeff")
    payload = _parse(source)
    if payload is not _NOT_JSON:
        return collect(payload, fields=paths, root=f"{prefix}$"), payload
    text = source if isinstance(source, str) else source.decode("utf-8", errors="replace")
    if "\ufffd" in text and isinstance(source, bytes):
        # Bytes that are not UTF-8: a client's JSON parser reads them replaced, as here.
        payload = _parse(text)
        if payload is not _NOT_JSON:
            return collect(payload, fields=paths, root=f"{prefix}$"), payload
    return _text_texts(text, prefix), _NOT_JSON


def _parse(source: bytes | str) -> Any:
    try:
        return jsonlib.loads(source)
    except ValueError as exc:
        if str(exc) == _TOO_DEEP:
            raise TooDeep(_TOO_DEEP) from None
        return _NOT_JSON


def _text_texts(text: str, prefix: str) -> Texts:
    """A text answer, and any of its lines that parse as JSON read as JSON too."""
    parts = [Texts(text, (0,), (f"{prefix}text",), (text,) if text else ())]
    if "{" in text or "[" in text or '"' in text:
        for number, line in enumerate(_JSON_LINE.finditer(text)):
            payload = _parse(line.group())
            if payload is not _NOT_JSON:
                parts.append(collect(payload, root=f"{prefix}json line {number}:$"))
    whole = join(parts)
    return Texts(whole.text, whole.starts, whole.paths, parts[0].fields)


def _not_inspectable(state: GatewayState, refusal: NotInspectable) -> web.Response:
    state.observer.fallback("answer", refusal.reason)
    log.warning("answer not inspectable: %s", refusal.reason)
    return json_response(502, error_body(refusal.message, error_code=ANSWER_NOT_INSPECTABLE))


async def _read_whole(upstream: aiohttp.ClientResponse, state: GatewayState) -> bytes:
    try:
        return await read_bounded(upstream.content, state.settings.response_limit)
    except (AnswerTooLarge, *UPSTREAM_ERRORS) as exc:
        raise _unread(exc, state) from None


def _whole_now(upstream: aiohttp.ClientResponse, state: GatewayState) -> bytes | None:
    """``_read_whole`` without waiting, when the whole answer is in (None otherwise)."""
    try:
        return read_buffered(upstream.content, state.settings.response_limit)
    except (AnswerTooLarge, *UPSTREAM_ERRORS) as exc:
        raise _unread(exc, state) from None


def _unread(exc: BaseException, state: GatewayState) -> NotInspectable | UpstreamBrokeOff:
    """Why an answer could not be read, as ``inspect_answer`` answers it."""
    if isinstance(exc, AnswerTooLarge):
        log.warning("answer over %d bytes", state.settings.response_limit)
        return NotInspectable("too_large", "Upstream answer too large to inspect")
    return UpstreamBrokeOff(exc)


def _release(upstream: aiohttp.ClientResponse, body: bytes) -> web.Response:
    return web.Response(
        status=upstream.status,
        reason=upstream.reason,
        body=body,
        headers=response_headers(upstream, keep_length=False),
    )


# The prompt's answer.


async def inspect_answer(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    context: Context,
    exchange: Exchange | None = None,
    *,
    state: GatewayState | None = None,
    info: RequestInfo | None = None,
) -> web.StreamResponse:
    """The prompt's answer (or any intercepted answer): evaluated whole, or as it streams.

    ``state`` and ``info``, where the caller has them, save looking them up again."""
    if state is None:
        state = request.app[STATE]
    if exchange is not None:
        # Decides whether the exchange is counted: only what the backend served costs a budget.
        exchange.upstream_status = upstream.status
    try:
        plan = plan_answer(upstream)
        if plan.stream:
            return await guarded_stream(request, upstream, context, exchange, plan)
        raw = _whole_now(upstream, state)
        if raw is None:
            raw = await _read_whole(upstream, state)
        inspected = read_answer(raw, sse=plan.sse, declared=plan.codec, paths=state.field_paths)
    except NotInspectable as refusal:
        return _not_inspectable(state, refusal)
    except UpstreamBrokeOff as broken:
        return upstream_failure(request, broken.cause, answering=True)
    if exchange is not None:
        exchange.response_texts = list(inspected.fields)
        exchange.note_reported(inspected.payload)
    texts = inspected.texts
    info = info if info is not None else _info(request)
    decision = decide_first(state, info, Stage.RESPONSE, texts.text, context, texts.path_at)
    if must_wait(decision):
        decision = await decide_judged(state, info, decision, texts.text, context, texts.path_at)
    if decision.blocked:
        return json_response(403, block_body(decision))
    return _release(upstream, raw)


async def guarded_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    context: Context,
    exchange: Exchange | None = None,
    plan: AnswerPlan | None = None,
) -> web.StreamResponse:
    """Forward a streamed answer while evaluating it; a block ends it with an error event."""
    plan = plan or plan_answer(upstream)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(response_headers(upstream, keep_length=False))
    await response.prepare(request)
    forwarder = _StreamForwarder(request, response, context, exchange, plan)
    try:
        await forwarder.run(upstream)
    finally:
        forwarder.settle()
    await response.write_eof()
    return response


class _Lane:
    """One reading of a stream: its decoder (None for SSE: events are read whole) and its guard."""

    __slots__ = ("codec", "decoder", "guard", "released")

    def __init__(self, codec: str, decoder: codecs.IncrementalDecoder | None, guard: StreamGuard) -> None:
        self.codec = codec
        self.decoder = decoder
        self.guard = guard
        self.released = 0  # events this reading has let go, counted from the first


class _StreamForwarder:
    """One streamed answer: events evaluated in order, released once safe, or the stream ended.

    An event stream is read as UTF-8, by one guard (which reads its data raw as well once some
    of it is not a JSON object: ``StreamGuard``). Other streamed text is read in its declared
    charset and, if that is not UTF-8, as UTF-8 too (and as a byte order mark at its start
    says): each reading has its own guard, and an event leaves once every reading let it go.
    """

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        context: Context,
        exchange: Exchange | None,
        plan: AnswerPlan,
    ) -> None:
        self.request = request
        self.state = request.app[STATE]
        self.metrics = self.state.observer.metrics
        self.response = response
        self.context = context
        self.exchange = exchange
        self.info = request.get(INFO) or RequestInfo()
        self.sse = plan.sse
        self.splitter = SSESplitter(max_event_bytes=self.state.settings.response_limit)
        self.lanes = [self._lane(plan.codec or "utf-8")]
        if plan.codec not in (None, "utf-8"):
            self.lanes.append(self._lane("utf-8"))
        self.held: deque[bytes] = deque()  # events some reading still holds, in order
        self.sent = 0
        self.started = False
        self.strongest = Action.ALLOW
        # When the first event with text arrived, and its place among the events: the time it
        # waits before the client gets it is the hold-back's cost to the first word.
        self.first_text: tuple[float, int] | None = None
        # The whole streamed text, kept only under judge rules: the judge reads it at the end.
        rules = self.state.ruleset.plan(Stage.RESPONSE)
        self.judged: list[str] | None = [] if rules.judged else None
        self.judged_chars = 0
        # Under a judge rule that may block, the last event is held until the verdict: else the
        # stream's own end (`[DONE]`, the last chunk) reaches the client before a block can.
        self.hold_last = any(rules.rules[i].rule.effective_action is Action.BLOCK for i in rules.judged)
        # judge_stream_hold: nothing is sent until the verdict on the whole answer (as for a whole
        # answer), so that a block judge rule stops all of it, at the cost of the first word's wait.
        self.hold_all = self.hold_last and self.state.settings.judge_stream_hold

    def _lane(self, codec: str) -> _Lane:
        decoder = None if self.sse else codecs.getincrementaldecoder(codec)(errors="replace")
        state = self.state
        guard = StreamGuard(state.ruleset, self.context, holdback=state.stream_holdback)
        return _Lane(codec, decoder, guard)

    async def run(self, upstream: aiohttp.ClientResponse) -> None:
        content = upstream.content
        while True:
            # Only the read is guarded: a failed write to the client is not the upstream's failure.
            try:
                chunk = await content.readany()
            except UPSTREAM_ERRORS as exc:
                await self.cut_short(exc)
                return
            if not chunk:
                break
            if not self.started:
                self.started = True
                self._sniff(chunk)
            try:
                events = self.splitter.feed(chunk) if self.sse else [chunk]
            except EventTooLarge:
                # Fail closed: an event too large to hold whole cannot be inspected.
                self.state.observer.fallback("answer", "event_too_large")
                log.warning(
                    "stream not inspectable: an event over %d bytes", self.state.settings.response_limit
                )
                await self.end(error_body(_TOO_LARGE, error_code=ANSWER_NOT_INSPECTABLE))
                return
            if not await self.send(events):
                return
        tail = self.splitter.flush() if self.sse else b""
        if await self.send([tail] if tail or not self.sse else [], final=True) and await self.judge_whole():
            self.hold_last = self.hold_all = False
            for lane in self.lanes:
                lane.released += len(lane.guard.finish().release)
            await self.release()

    async def judge_whole(self) -> bool:
        """The judge rules, on the whole streamed text, before what is still held is sent: a
        block verdict ends the stream there (what was released is the client's already)."""
        if not self.judged:
            return True
        state, text = self.state, "".join(self.judged)
        try:
            decision = evaluate(state.ruleset, Stage.RESPONSE, text, self.context)
            decision = await judge_pending(state, self.info, decision, text, self.context)
        except Exception as exc:
            return await self.failed(exc)
        if decision.blocked:
            return await self.end(block_body(decision))
        return True

    def _sniff(self, chunk: bytes) -> None:
        """Streamed text that starts with a UTF-16 or UTF-32 byte order mark is read so too."""
        if self.sse:
            return
        for mark, codec in _ORDER_MARKS:
            if chunk.startswith(mark):
                if codec not in {lane.codec for lane in self.lanes}:
                    self.lanes.append(self._lane(codec))
                return

    async def send(self, events: list[bytes], *, final: bool = False) -> bool:
        state = self.state
        for event in events:
            started = time.perf_counter()
            side: Texts | None = None
            data: str | None = None  # an event's raw data, read too once some data is plain
            plain = False
            if self.sse:
                try:
                    read = read_event(event, state.field_paths)
                except TooDeep:
                    state.observer.fallback("answer", "too_deep")
                    return await self.end(error_body(_TOO_DEEP_EVENT, error_code=ANSWER_NOT_INSPECTABLE))
                texts = [read.text]
                data, plain = read.data, read.plain
                side = read.side if read.side.text else None
                if self.exchange is not None:
                    _note_streamed(
                        self.exchange, read.text, read.payload, limit=state.settings.response_limit
                    )
            else:
                texts = [lane.decoder.decode(event, final) if lane.decoder else "" for lane in self.lanes]
                if self.exchange is not None:
                    _note_streamed(self.exchange, texts[0], None, limit=state.settings.response_limit)
            self.held.append(event)
            if self.judged is not None and texts[0] and self.judged_chars < state.settings.response_limit:
                self.judged.append(texts[0])
                self.judged_chars += len(texts[0])
            if self.first_text is None and texts[0]:
                self.first_text = (started, self.sent + len(self.held) - 1)
            if side is not None:
                try:
                    decision = self.lanes[0].guard.side(side.text)
                except Exception as exc:
                    return await self.failed(exc)
                self.observe_side(decision, side)
                if decision.blocked:
                    return await self.end(block_body(decision))
            for lane, text in zip(self.lanes, texts, strict=True):
                try:
                    step = lane.guard.feed(event, text, data=data, plain=plain)
                except Exception as exc:
                    return await self.failed(exc)
                self.observe(step)
                if step.blocked is not None:
                    return await self.end(block_body(step.blocked))
                lane.released += len(step.release)
            if texts[0]:
                self.metrics.stream_holdback.observe(self.lanes[0].guard.held_chars)
            self.info.response_own += time.perf_counter() - started
            await self.release()
        return True

    async def release(self) -> None:
        """Send the events every reading has let go, in order."""
        if self.hold_all:
            return
        upto = min(lane.released for lane in self.lanes)
        if self.hold_last:
            upto = min(upto, self.sent + len(self.held) - 1)
        while self.sent < upto:
            await self.response.write(self.held.popleft())
            self.sent += 1
            if self.first_text is not None and self.sent == self.first_text[1] + 1:
                self.metrics.stream_first_byte_delay.observe(time.perf_counter() - self.first_text[0])

    async def failed(self, exc: Exception) -> bool:
        # Fail closed, as for a whole answer: what was not evaluated is not sent.
        self.state.observer.fallback("policy", "evaluation_error")
        log.error("policy evaluation failed on a stream: %s", type(exc).__name__)
        return await self.end(error_body(_NOT_EVALUATED, error_code=EVALUATION_FAILED))

    def observe(self, step: StreamStep) -> None:
        shown = step.blocked or Decision(Stage.RESPONSE, Action.ALLOW, self.state.ruleset.revision)
        found = (*step.violations, *(step.blocked.violations if step.blocked else ()))
        self.state.observer.violations(
            shown, found, self.info, lambda start, end: step.matched.get((start, end))
        )
        for violation in found:
            self.strongest = max(self.strongest, violation.effective_action)

    def observe_side(self, decision: Decision, side: Texts) -> None:
        """Violations in an event's side text, with the paths (or line kinds) they are in."""
        if not decision.violations:
            return
        text = side.text
        self.state.observer.violations(
            decision, decision.violations, self.info, lambda start, end: text[start:end], side.path_at
        )
        for violation in decision.violations:
            self.strongest = max(self.strongest, violation.effective_action)

    async def end(self, body: bytes) -> bool:
        """Close the stream with an error the client can read; nothing held back is sent."""
        self.strongest = Action.BLOCK
        await self.response.write(self._error(body))
        return False

    async def cut_short(self, exc: BaseException) -> None:
        """The upstream broke off: what every reading let go is sent, as at the stream's end
        (all of its text was evaluated, and no later text can complete a match with it), then
        an error the client can read. An event the upstream left unfinished is not sent."""
        body = answer_cut_short(self.request, exc)
        # What is held is released only once the judge, where one may block, has read it.
        if not await self.judge_whole():
            return
        self.hold_last = self.hold_all = False
        for lane in self.lanes:
            lane.released += len(lane.guard.finish().release)
        await self.release()
        await self.response.write(self._error(body))

    def _error(self, body: bytes) -> bytes:
        return b"event: error\ndata: " + body + b"\n\n" if self.sse else b"\n" + body

    def settle(self) -> None:
        """A streamed answer counts as one decision, its strongest action."""
        self.state.observer.stream_decision(Stage.RESPONSE, self.strongest)
        _note_action(self.info, self.strongest)


_NOT_EVALUATED = "Refused: the policy engine could not evaluate this answer"
_TOO_LARGE = "Upstream event too large to inspect"
_TOO_DEEP_EVENT = "Upstream event nested too deeply to inspect"


def _note_streamed(exchange: Exchange, text: str, payload: Any, *, limit: int) -> None:
    if text and sum(map(len, exchange.response_texts)) < limit:
        exchange.response_texts.append(text)
    # Usage, when the upstream reports it, comes in one of the last events.
    if isinstance(payload, dict):
        exchange.note_reported(payload)


# The messages list.


async def withhold_messages(
    request: web.Request, upstream: aiohttp.ClientResponse, context: Context
) -> web.StreamResponse:
    """The messages list: a message that hits a block rule, whatever its role, is withheld.

    The whole answer is evaluated as one text. When it blocks, the messages its block matches
    fall in are replaced by notices, and the rewritten answer is evaluated again, until it is
    clean; a block outside the messages (or one the messages cannot explain) refuses the whole
    answer. What is released is always the body last evaluated.
    """
    state = request.app[STATE]
    try:
        plan = plan_answer(upstream)
        if plan.stream or plan.sse or upstream.status >= 400:
            return await inspect_answer(request, upstream, context)
        raw = await _read_whole(upstream, state)
        inspected = read_answer(raw, sse=False, declared=plan.codec, paths=state.field_paths)
    except NotInspectable as refusal:
        return _not_inspectable(state, refusal)
    except UpstreamBrokeOff as broken:
        return upstream_failure(request, broken.cause, answering=True)
    texts = inspected.texts
    decision = decide(request, Stage.RESPONSE, texts.text, context, texts.path_at)
    if decision.pending:
        # A conversation's history is not sent to the judge (each of its texts was judged as it
        # passed): counted, never as passed.
        request.app[STATE].observer.metrics.fallbacks.labels("judge", "history_not_judged").inc(
            len(decision.pending)
        )
    if not decision.blocked:
        return _release(upstream, raw)
    payload = inspected.payload
    # Rewritten only where the rewritten body reads as the original did: one UTF-8 JSON reading.
    messages = payload.get("messages") if inspected.plain and isinstance(payload, dict) else None
    if not isinstance(messages, list):
        return json_response(403, block_body(decision))
    outcome = _withhold(request, context, payload, messages, texts, decision)
    if isinstance(outcome, bytes):
        return _release(upstream, outcome)
    return json_response(403, block_body(outcome))


_MESSAGE = re.compile(r"\$\.messages\[(\d+)\]")
# What a withheld message keeps of the original, where no block matched it.
_KEPT = ("id", "role", "createdAt")


def _withhold(
    request: web.Request,
    context: Context,
    payload: dict[str, Any],
    messages: list[Any],
    texts: Texts,
    decision: Decision,
) -> bytes | Decision:
    """The body with every hit message withheld, once clean; else the decision that refuses it."""
    hits: dict[int, set[str]] = {}
    notices: dict[int, str] = {}
    while True:
        found = _hit_messages(texts, decision)
        # A match outside the messages, or one that withholding more cannot remove: refused.
        if found is None or all(paths <= hits.get(index, set()) for index, paths in found.items()):
            return decision
        for index, paths in found.items():
            hits.setdefault(index, set()).update(paths)
            notices.setdefault(index, withheld_notice(decision))
        payload["messages"] = [
            _withheld(message, index, hits[index], notices[index]) if index in hits else message
            for index, message in enumerate(messages)
        ]
        texts = collect(payload)
        decision = judge(request, Stage.RESPONSE, texts.text, context)
        if not decision.blocked:
            return jsonlib.dumps(payload)
        # The rewritten body still blocks: its blocks are reported (its other violations were,
        # with the first decision), as they may be what refuses the answer.
        request.app[STATE].observer.violations(
            decision,
            blocking(decision),
            request.get(INFO) or RequestInfo(),
            _slicer(texts.text),
            texts.path_at,
        )


def _slicer(text: str) -> Callable[[int, int], str]:
    return lambda start, end: text[start:end]


def _hit_messages(texts: Texts, decision: Decision) -> dict[int, set[str]] | None:
    """The paths each message has under a block's matches; None if a match falls elsewhere."""
    hits: dict[int, set[str]] = {}
    for violation in blocking(decision):
        if not violation.spans:
            return None
        for span in violation.spans:
            for path in texts.paths_between(span.start, span.end):
                found = _MESSAGE.match(path)
                if found is None:
                    return None
                hits.setdefault(int(found[1]), set()).add(path)
    return hits


def _withheld(message: Any, index: int, hit: set[str], notice: str) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    if isinstance(message, dict):
        for name in _KEPT:
            value = message.get(name)
            where = f"$.messages[{index}].{name}"
            clean = where not in hit and f"{where} (key)" not in hit
            if clean and isinstance(value, str | int) and not isinstance(value, bool):
                kept[name] = value
    return {**kept, "content": notice, "policyWithheld": True}
