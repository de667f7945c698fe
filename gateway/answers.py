"""Inspecting the upstream's answers at stage ``response`` before the client sees them."""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web

from gateway.flashback import (
    RESPONSE_BLOCKED,
    block_body,
    error_body,
    extract_texts,
    withheld_notice,
)
from gateway.policy import Action, Context, Decision, Stage, evaluate
from gateway.proxy import json_response, response_headers, stream_back
from gateway.state import STATE, GatewayState
from gateway.streaming import EventTooLarge, SSESplitter, StreamGuard, sse_event_text
from gateway.usage.accounting import Exchange

log = logging.getLogger("gateway.answers")


class AnswerTooLarge(Exception):
    """The answer exceeds what the gateway holds in memory to inspect it."""


class EvaluationFailed(Exception):
    """The engine raised: the text was not evaluated, so it is refused (fail closed)."""


def decide(state: GatewayState, stage: Stage, text: str, context: Context) -> Decision:
    try:
        decision = evaluate(state.ruleset, stage, text, context)
    except Exception as exc:
        # SECURITY: the exception's text may quote the input; only its type is logged.
        log.error("policy evaluation failed at stage %s: %s", stage.value, type(exc).__name__)
        raise EvaluationFailed from None
    record(decision)
    return decision


def record(decision: Decision) -> None:
    # SECURITY: rule ids, actions and offsets only; never the text that matched.
    for v in decision.violations:
        log.info(
            "violation stage=%s rule=%s action=%s mode=%s spans=%s",
            v.stage.value,
            v.rule_id,
            v.action.label,
            v.mode.value,
            [(s.start, s.length) for s in v.spans],
        )


def strongest(stage: Stage, revision: str, decisions: Iterable[Decision]) -> Decision:
    violations = tuple(v for d in decisions for v in d.violations)
    action = max((v.effective_action for v in violations), default=Action.ALLOW)
    return Decision(stage, action, revision, violations)


async def read_bounded(content: aiohttp.StreamReader | web.BaseRequest, limit: int) -> bytes:
    """Read a whole body, refusing it as soon as it grows past ``limit`` bytes."""
    stream = content.content if isinstance(content, web.BaseRequest) else content
    parts: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
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
        log.warning("answer not inspectable: content encoding %s", encoding)
        return json_response(502, error_body("Upstream answer is encoded and cannot be inspected"))
    if _is_streamed_text(upstream):
        return await guarded_stream(request, upstream, context, exchange)
    try:
        raw = await read_bounded(upstream.content, state.settings.response_limit)
    except AnswerTooLarge:
        log.warning("answer not inspectable: over %d bytes", state.settings.response_limit)
        return json_response(502, error_body("Upstream answer too large to inspect"))
    texts, payload = _answer_texts(raw, state, json_answer=_is_json(upstream))
    if exchange is not None:
        exchange.response_texts = texts
        exchange.note_reported(payload)
    decision = strongest(
        Stage.RESPONSE,
        state.ruleset.revision,
        (decide(state, Stage.RESPONSE, text, context) for text in texts),
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
            payload = json.loads(raw)
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
    state = request.app[STATE]
    sse = upstream.content_type == "text/event-stream"
    splitter = SSESplitter(max_event_bytes=state.settings.response_limit)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    guard = StreamGuard(state.ruleset, context, holdback=state.holdback)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(response_headers(upstream, keep_length=False))
    await response.prepare(request)

    async def send(events: list[bytes], *, final: bool = False) -> bool:
        for event in events:
            text = sse_event_text(event, state.field_paths) if sse else decoder.decode(event, final)
            if exchange is not None:
                _note_streamed(exchange, event, text, limit=state.settings.response_limit, sse=sse)
            step = guard.feed(event, text)
            for v in step.violations:
                log.info("stream violation rule=%s action=%s", v.rule_id, v.action.label)
            if step.blocked is not None:
                record(step.blocked)
                body = block_body(step.blocked)
                await response.write(b"event: error\ndata: " + body + b"\n\n" if sse else b"\n" + body)
                return False
            for released in step.release:
                await response.write(released)
        return True

    async for chunk in upstream.content.iter_any():
        try:
            events = splitter.feed(chunk) if sse else [chunk]
        except EventTooLarge:
            # Fail closed: an event too large to hold whole cannot be inspected.
            log.warning("stream not inspectable: an event over %d bytes", state.settings.response_limit)
            body = error_body("Upstream event too large to inspect", error_code=RESPONSE_BLOCKED)
            await response.write(b"event: error\ndata: " + body + b"\n\n")
            await response.write_eof()
            return response
        if not await send(events):
            await response.write_eof()
            return response
    tail = splitter.flush() if sse else b""
    if await send([tail] if tail or not sse else [], final=True):
        for released in guard.finish().release:
            await response.write(released)
    await response.write_eof()
    return response


def _note_streamed(exchange: Exchange, event: bytes, text: str, *, limit: int, sse: bool) -> None:
    if text and sum(map(len, exchange.response_texts)) < limit:
        exchange.response_texts.append(text)
    # Usage, when the upstream reports it, comes in one of the last events.
    if sse and (b'"usage"' in event or b"tokens" in event or b"tokenCount" in event):
        for line in event.splitlines():
            if line.startswith(b"data:"):
                try:
                    exchange.note_reported(json.loads(line[5:]))
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
        return json_response(502, error_body("Upstream answer too large to inspect"))
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        decision = decide(state, Stage.RESPONSE, raw.decode("utf-8", errors="replace"), context)
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
            decision = decide(state, Stage.RESPONSE, content, context)
            if decision.blocked:
                message["content"] = withheld_notice(decision)
                message["policyWithheld"] = True
                withheld += 1
        body = json.dumps(payload).encode() if withheld else raw
    return web.Response(
        status=upstream.status,
        reason=upstream.reason,
        body=body,
        headers=response_headers(upstream, keep_length=False),
    )
