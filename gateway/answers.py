"""Inspecting the upstream's answers at stage ``response`` before the client sees them."""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web

from gateway import jsonlib
from gateway.audit import RequestInfo
from gateway.flashback import (
    EVALUATION_FAILED,
    RESPONSE_BLOCKED,
    block_body,
    error_body,
    extract_texts,
    withheld_notice,
)
from gateway.observe import Where
from gateway.policy import Action, Context, Decision, Stage, evaluate
from gateway.proxy import json_response, response_headers, stream_back
from gateway.state import STATE, GatewayState
from gateway.streaming import EventTooLarge, SSESplitter, StreamGuard, StreamStep, sse_event_text
from gateway.usage.accounting import Exchange

log = logging.getLogger("gateway.answers")


# The request's audit context (set by the routes' middleware).
INFO = web.RequestKey("info", RequestInfo)


class AnswerTooLarge(Exception):
    """The answer exceeds what the gateway holds in memory to inspect it."""


class EvaluationFailed(Exception):
    """The engine raised: the text was not evaluated, so it is refused (fail closed)."""


def decide(
    request: web.Request, stage: Stage, text: str, context: Context, where: Where | None = None
) -> Decision:
    """Evaluate, and make the decision visible (metrics, audit, alerts); fail closed on error.

    ``where`` names the place in the message (a JSON path) of an offset of ``text``.
    """
    state = request.app[STATE]
    info = request.get(INFO) or RequestInfo()
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
    state.observer.decision(decision, info, lambda start, end: text[start:end], where)
    _note_action(info, decision.action)
    return decision


def _note_action(info: RequestInfo, action: Action) -> None:
    if action > Action[info.decision.upper()]:
        info.decision = action.label


def strongest(stage: Stage, revision: str, decisions: Iterable[Decision]) -> Decision:
    violations = tuple(v for d in decisions for v in d.violations)
    action = max((v.effective_action for v in violations), default=Action.ALLOW)
    return Decision(stage, action, revision, violations)


async def read_bounded(content: aiohttp.StreamReader | web.BaseRequest, limit: int) -> bytes:
    """Read a whole body, refusing it as soon as it grows past ``limit`` bytes."""
    stream = content.content if isinstance(content, web.BaseRequest) else content
    parts: list[bytes] = []
    size = 0
    # readany() until EOF, as iter_any() does, without its iterator's cost on every request.
    while chunk := await stream.readany():
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge
        parts.append(chunk)
    return b"".join(parts)


def _is_json(upstream: aiohttp.ClientResponse) -> bool:
    kind = upstream.content_type
    return kind == "application/json" or kind.endswith("+json")


def _is_streamed_text(upstream: aiohttp.ClientResponse) -> bool:
    kind = upstream.content_type
    return kind == "text/event-stream" or (kind.startswith("text/") and upstream.content_length is None)


async def inspect_answer(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    context: Context,
    exchange: Exchange | None = None,
) -> web.StreamResponse:
    """The prompt's answer: evaluated whole, or event by event when it streams."""
    state = request.app[STATE]
    if upstream.status >= 400:
        return await stream_back(request, upstream)
    encoding = upstream.headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        state.observer.fallback("answer", "encoded")
        log.warning("answer not inspectable: content encoding %s", encoding)
        return json_response(502, error_body("Upstream answer is encoded and cannot be inspected"))
    if _is_streamed_text(upstream):
        return await guarded_stream(request, upstream, context, exchange)
    try:
        raw = await read_bounded(upstream.content, state.settings.response_limit)
    except AnswerTooLarge:
        state.observer.fallback("answer", "too_large")
        log.warning("answer not inspectable: over %d bytes", state.settings.response_limit)
        return json_response(502, error_body("Upstream answer too large to inspect"))
    texts, payload = _answer_texts(raw, state, json_answer=_is_json(upstream))
    if exchange is not None:
        exchange.response_texts = texts
        exchange.note_reported(payload)
    decision = strongest(
        Stage.RESPONSE,
        state.ruleset.revision,
        (decide(request, Stage.RESPONSE, text, context) for text in texts),
    )
    if decision.blocked:
        return json_response(403, block_body(decision))
    return web.Response(
        status=upstream.status,
        reason=upstream.reason,
        body=raw,
        headers=response_headers(upstream, keep_length=False),
    )


def _answer_texts(raw: bytes, state: GatewayState, *, json_answer: bool) -> tuple[list[str], Any]:
    """The texts to evaluate, and the parsed JSON answer (None when it is not JSON)."""
    if json_answer:
        try:
            payload = jsonlib.loads(raw)
        except ValueError:
            pass
        else:
            return extract_texts(payload, state.field_paths), payload
    # Not JSON, or JSON that does not parse: the whole body is what a client would read.
    return [raw.decode("utf-8", errors="replace")], None


async def guarded_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    context: Context,
    exchange: Exchange | None = None,
) -> web.StreamResponse:
    """Forward a streamed answer while evaluating it; a block ends it with an error event."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(response_headers(upstream, keep_length=False))
    await response.prepare(request)
    forwarder = _StreamForwarder(request, response, upstream, context, exchange)
    try:
        await forwarder.run(upstream)
    finally:
        forwarder.settle()
    await response.write_eof()
    return response


class _StreamForwarder:
    """One streamed answer: events evaluated in order, released once safe, or the stream ended."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        context: Context,
        exchange: Exchange | None,
    ) -> None:
        self.state = request.app[STATE]
        self.response = response
        self.exchange = exchange
        self.info = request.get(INFO) or RequestInfo()
        self.sse = upstream.content_type == "text/event-stream"
        self.splitter = SSESplitter(max_event_bytes=self.state.settings.response_limit)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.guard = StreamGuard(self.state.ruleset, context, holdback=self.state.holdback)
        self.strongest = Action.ALLOW

    async def run(self, upstream: aiohttp.ClientResponse) -> None:
        async for chunk in upstream.content.iter_any():
            try:
                events = self.splitter.feed(chunk) if self.sse else [chunk]
            except EventTooLarge:
                # Fail closed: an event too large to hold whole cannot be inspected.
                self.state.observer.fallback("answer", "event_too_large")
                log.warning(
                    "stream not inspectable: an event over %d bytes", self.state.settings.response_limit
                )
                await self.end(error_body(_TOO_LARGE, error_code=RESPONSE_BLOCKED))
                return
            if not await self.send(events):
                return
        tail = self.splitter.flush() if self.sse else b""
        if await self.send([tail] if tail or not self.sse else [], final=True):
            for released in self.guard.finish().release:
                await self.response.write(released)

    async def send(self, events: list[bytes], *, final: bool = False) -> bool:
        state = self.state
        for event in events:
            started = time.perf_counter()
            text = sse_event_text(event, state.field_paths) if self.sse else self.decoder.decode(event, final)
            if self.exchange is not None:
                _note_streamed(self.exchange, event, text, limit=state.settings.response_limit, sse=self.sse)
            try:
                step = self.guard.feed(event, text)
            except Exception as exc:
                # Fail closed, as for a whole answer: what was not evaluated is not sent.
                state.observer.fallback("policy", "evaluation_error")
                log.error("policy evaluation failed on a stream: %s", type(exc).__name__)
                return await self.end(error_body(_NOT_EVALUATED, error_code=EVALUATION_FAILED))
            self.info.response_own += time.perf_counter() - started
            self.observe(step)
            if step.blocked is not None:
                return await self.end(block_body(step.blocked))
            for released in step.release:
                await self.response.write(released)
        return True

    def observe(self, step: StreamStep) -> None:
        shown = step.blocked or Decision(Stage.RESPONSE, Action.ALLOW, self.state.ruleset.revision)
        found = (*step.violations, *(step.blocked.violations if step.blocked else ()))
        self.state.observer.violations(
            shown, found, self.info, lambda start, end: step.matched.get((start, end))
        )
        for violation in found:
            self.strongest = max(self.strongest, violation.effective_action)

    async def end(self, body: bytes) -> bool:
        """Close the stream with an error the client can read; nothing held back is sent."""
        self.strongest = Action.BLOCK
        await self.response.write(b"event: error\ndata: " + body + b"\n\n" if self.sse else b"\n" + body)
        return False

    def settle(self) -> None:
        """A streamed answer counts as one decision, its strongest action."""
        self.state.observer.stream_decision(Stage.RESPONSE, self.strongest)
        _note_action(self.info, self.strongest)


_NOT_EVALUATED = "Refused: the policy engine could not evaluate this answer"
_TOO_LARGE = "Upstream event too large to inspect"


def _note_streamed(exchange: Exchange, event: bytes, text: str, *, limit: int, sse: bool) -> None:
    if text and sum(map(len, exchange.response_texts)) < limit:
        exchange.response_texts.append(text)
    # Usage, when the upstream reports it, comes in one of the last events.
    if sse and (b'"usage"' in event or b"tokens" in event or b"tokenCount" in event):
        for line in event.splitlines():
            if line.startswith(b"data:"):
                try:
                    exchange.note_reported(jsonlib.loads(line[5:]))
                except ValueError:
                    continue


async def withhold_messages(
    request: web.Request, upstream: aiohttp.ClientResponse, context: Context
) -> web.StreamResponse:
    """The messages list: an assistant message that hits a block rule is withheld."""
    state = request.app[STATE]
    if upstream.status >= 400 or not _is_json(upstream):
        return await inspect_answer(request, upstream, context)
    try:
        raw = await read_bounded(upstream.content, state.settings.response_limit)
    except AnswerTooLarge:
        state.observer.fallback("answer", "too_large")
        return json_response(502, error_body("Upstream answer too large to inspect"))
    try:
        payload = jsonlib.loads(raw)
    except ValueError:
        payload = None
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        decision = decide(request, Stage.RESPONSE, raw.decode("utf-8", errors="replace"), context)
        if decision.blocked:
            return json_response(403, block_body(decision))
        body = raw
    else:
        withheld = 0
        for message in messages:
            if not isinstance(message, dict) or message.get("role") != "assistant":
                continue
            content = message.get("content")
            if not isinstance(content, str):
                continue
            decision = decide(request, Stage.RESPONSE, content, context)
            if decision.blocked:
                message["content"] = withheld_notice(decision)
                message["policyWithheld"] = True
                withheld += 1
        body = jsonlib.dumps(payload) if withheld else raw
    return web.Response(
        status=upstream.status,
        reason=upstream.reason,
        body=body,
        headers=response_headers(upstream, keep_length=False),
    )
