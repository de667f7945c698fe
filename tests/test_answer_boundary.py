"""The answer side of the enforcement boundary: what an upstream puts anywhere in an answer is
inspected as the client will read it, and the client gets exactly what was inspected.

Each row is one answer an upstream sends behind a real gateway (real aiohttp servers on
loopback). Whatever the answer's shape (any JSON field, key or number, a bare string or list),
framing (SSE lines of every kind, CRLF, split events, chunked text) or charset, no canary may
reach the client in any spelling (plain, JSON-escaped, UTF-16/32, UTF-7); and a clean answer
passes byte for byte.
"""

from __future__ import annotations

import asyncio
import codecs
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import answers as gateway_answers
from gateway.flashback import parse_field_path
from gateway.json_texts import collect, join
from tests.proxy_fixtures import Upstream, start_gateway, start_upstream

KEY = "AKIAIOSFODNN7EXAMPLE"
ESCAPED_KEY = "\\u0041KIAIOSFODNN7EXAMPLE"  # the same key as JSON text may spell it
GHP = "ghp_Xq2dM4tVn8Lk1RbZ7yW3cPf6HsJ0aEo9Gu5T"
ESCAPED_GHP = "\\u0067hp_Xq2dM4tVn8Lk1RbZ7yW3cPf6HsJ0aEo9Gu5T"
CARD = 4111111111111111
# Keys a rule takes only after their name: in JSON the name may be the member's key.
GEMINI = "AIzaSy_n0wYW68pFQkBeDDGV6E4UN_6Gv7pw08C"
AWS_SECRET = "G6oEYNabB4ILBVXMxF/CxC3ZrGO3gLc+X0PQuRxy"
# No piece of a canary, in any reading of the bytes the client got.
FRAGMENTS = ("AKIA", "IOSFODNN7EXAMPLE", "ghp_Xq2d", "Vn8Lk1RbZ7yW3cPf6HsJ0aEo9Gu5T", str(CARD))
# A key of [A-Z2-7] that plain-text data can spell with JSON numbers.
DIGIT_KEY = "AKIA" + "234567" * 2 + "2345"

POLICIES = r"""
policies:
  - {id: t.aws-key, name: AWS key, severity: high, action: block, match: {regex: '\bAKIA[A-Z2-7]{16}\b'}}
  - {id: t.github, name: GitHub token, severity: high, action: block,
     match: {regex: '\bgh[pousr]_[A-Za-z0-9]{36,255}\b'}}
  - {id: t.card, name: Test card, severity: high, action: block, match: {regex: '\b4111111111111111\b'}}
  - {id: t.ticket, name: Ticket, severity: low, action: alert, match: {regex: 'TICKET-\d+'}}
  # As the pack's named-key rules: only after the key's name (GEMINI_API_KEY=..., "api_key": ...).
  - {id: t.named, name: Named key, severity: high, action: block,
     match: {regex: '(?i)(?:api_key|secret_access_key)["'']?\s*[:=]\s*["'']?(?P<v>[A-Za-z0-9/+_-]{30,})'}}
"""

JSON = (("Content-Type", "application/json"),)
JSON_UTF8 = (("Content-Type", "application/json; charset=utf-8"),)
SSE = (("Content-Type", "text/event-stream"),)


@dataclass(frozen=True)
class Answer:
    """What the upstream sends: a whole ``body``, or ``chunks`` written one by one."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = JSON
    body: bytes = b""
    chunks: tuple[bytes, ...] | None = None


@dataclass(frozen=True)
class Expect:
    """What the client gets, besides no canary: ``kind`` is one of the outcomes below."""

    kind: str
    withheld: tuple[int, ...] = field(default=())


BLOCKED = Expect("blocked")  # 403 RESPONSE_BLOCKED instead of the answer
STREAM_BLOCKED = Expect("stream blocked")  # the stream ends with an error carrying RESPONSE_BLOCKED
REFUSED = Expect("refused")  # 502 ANSWER_NOT_INSPECTABLE
STREAM_REFUSED = Expect("stream refused")  # the stream ends with an error carrying ANSWER_NOT_INSPECTABLE
UNCHANGED = Expect("unchanged")  # status and bytes as the upstream sent them


def withheld(*indices: int) -> Expect:
    """200, the messages at ``indices`` replaced by notices, the others as they were."""
    return Expect("withheld", indices)


def js(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def event(payload: Any, *, field_name: str = "data", end: str = "\n") -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{field_name}: {data}{end}{end}".encode()


def delta(text: str) -> bytes:
    return event({"choices": [{"delta": {"content": text}}]})


def anthropic(text: str) -> bytes:
    return event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


def nested(depth: int, value: Any) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def listing(*messages: Any, **extra: Any) -> bytes:
    return js({"success": True, "messages": list(messages), **extra})


def plain(*lines: str) -> tuple[bytes, ...]:
    """A plain-text event stream: each line is the raw data of its own event."""
    return tuple(f"data: {line}\n\n".encode() for line in lines)


def text(charset: str, kind: str = "text/plain") -> tuple[tuple[str, str], ...]:
    return (("Content-Type", f"{kind}; charset={charset}"),)


def row(route: str, answer: Answer, expect: Expect, sentence: str) -> Any:
    return pytest.param(route, answer, expect, id=sentence)


WHOLE = [
    # The prompt's answer, whole: every string, key and number of any JSON shape.
    row("prompt", Answer(body=js({"message": {"content": f"here {KEY}"}})), BLOCKED,
        "a key in message.content is blocked"),
    row("prompt", Answer(body=js(f"the key is {KEY}")), BLOCKED, "a top-level JSON string answer is blocked"),
    row("prompt", Answer(body=js(["fine", f"{GHP}"])), BLOCKED, "a top-level JSON array answer is blocked"),
    row("prompt", Answer(body=js([[["a", [{"deep": [f"x {KEY}"]}]]]])), BLOCKED,
        "a key in nested arrays is blocked"),
    row("prompt", Answer(body=js({"success": True, "data": {KEY: "value"}})), BLOCKED,
        "a key in an object key is blocked"),
    row("prompt", Answer(body=js({"success": True, "result": {"card": CARD}})), BLOCKED,
        "a card number in a JSON number is blocked"),
    # A key named by its JSON key: a client showing the JSON reads the name beside the value.
    row("prompt", Answer(body=js({"success": True, "config": {"GEMINI_API_KEY": GEMINI}})), BLOCKED,
        "a key named by the key of its JSON member is blocked"),
    row("prompt", Answer(body=b'{"env": {"GEMINI_API_KEY": "\\u0041' + GEMINI[1:].encode() + b'"}}'), BLOCKED,
        "a JSON-escaped key named by the key of its member is blocked"),
    row("prompt", Answer(body=js([{"aws_secret_access_key": AWS_SECRET}])), BLOCKED,
        "a secret named by its member's key inside a list is blocked"),
    row("prompt", Answer(body=b'{"success": true, "detail": "' + ESCAPED_KEY.encode() + b'"}'), BLOCKED,
        "a JSON-escaped key in an unlisted field is blocked"),
    row("prompt", Answer(body=b'{"message": "' + ESCAPED_GHP.encode() + b'"}'), BLOCKED,
        "a JSON-escaped token in the message field is blocked"),
    row("prompt", Answer(body=b'\xef\xbb\xbf{"note": "' + ESCAPED_KEY.encode() + b'"}'), BLOCKED,
        "JSON after a UTF-8 byte order mark is read as JSON and blocked"),
    row("prompt", Answer(body=js({"success": False, "error": {"message": f"bad {KEY}"}})), BLOCKED,
        "a key in an error object of a 200 answer is blocked"),
    row("prompt", Answer(headers=text("utf-8"), body=b'"' + ESCAPED_KEY.encode() + b'"'), BLOCKED,
        "a JSON string sent as text/plain is read as JSON too and blocked"),
    row("prompt",
        Answer(headers=(("Content-Type", "application/x-ndjson"),),
               body=b'{"a": "fine"}\n{"b": "' + ESCAPED_KEY.encode() + b'"}\n'),
        BLOCKED, "a JSON-escaped key on one line of NDJSON is blocked"),
    row("prompt", Answer(headers=text("utf-8", "text/html"), body=f"<p>{KEY}</p>".encode()), BLOCKED,
        "a key in an HTML answer is blocked"),
    # Charsets: the declared one, and UTF-8 as well; a byte order mark says what it says.
    row("prompt", Answer(headers=text("utf-16le"), body=f"key {KEY}".encode("utf-16-le")), BLOCKED,
        "text/plain in utf-16le is read in utf-16le and blocked"),
    row("prompt", Answer(headers=text("utf-16be"), body=f"key {GHP}".encode("utf-16-be")), BLOCKED,
        "text/plain in utf-16be is read in utf-16be and blocked"),
    row("prompt", Answer(headers=text("utf-32"), body=f"key {KEY}".encode("utf-32")), BLOCKED,
        "text/plain in utf-32 is read in utf-32 and blocked"),
    row("prompt", Answer(headers=text("utf-16", "application/json"),
                         body=js({"m": KEY}).decode().encode("utf-16")),
        BLOCKED, "JSON in utf-16 with its byte order mark is blocked"),
    row("prompt", Answer(headers=(("Content-Type", "text/plain"),), body=f"key {KEY}".encode("utf-16")),
        BLOCKED, "undeclared text with a UTF-16 byte order mark is read as UTF-16 and blocked"),
    row("prompt", Answer(headers=JSON, body=js({"m": KEY}).decode().encode("utf-16-le")), BLOCKED,
        "JSON in utf-16le without a charset, as a client may guess it, is blocked"),
    row("prompt", Answer(headers=text("utf-7"), body=b"key +AEEASwBJAEE-IOSFODNN7EXAMPLE"), BLOCKED,
        "text/plain in utf-7 is read in utf-7 and blocked"),
    row("prompt", Answer(headers=text("iso-8859-1"), body=f"cl\xe9 {KEY}".encode("latin-1")), BLOCKED,
        "text/plain in latin-1 is read in latin-1 and blocked"),
    row("prompt", Answer(headers=text("x-no-such-charset"), body=f"key {KEY}".encode()), REFUSED,
        "an unknown charset is refused as not inspectable"),
    row("prompt", Answer(headers=text("base64"), body=b"QUtJQUlPU0ZPRE5ON0VYQU1QTEU="), REFUSED,
        "a codec that is not a text encoding is refused as not inspectable"),
    row("prompt", Answer(headers=(("Content-Type", "text/plain; charset=utf-8; charset=utf-16le"),),
                         body=f"key {KEY}".encode("utf-16-le")),
        REFUSED, "two charsets in one content type are refused as not inspectable"),
    row("prompt", Answer(headers=(("Content-Type", "application/json"), ("Content-Type", "text/plain")),
                         body=js({"m": KEY})),
        REFUSED, "two content types are refused as not inspectable"),
    row("prompt", Answer(headers=(*JSON, ("Content-Encoding", "gzip")), body=gzip.compress(js({"m": KEY}))),
        REFUSED, "a compressed answer is refused as not inspectable"),
    row("prompt", Answer(body=js({"a": nested(100, f"x {KEY}")})), REFUSED,
        "JSON nested deeper than the gateway walks is refused as not inspectable"),
    row("prompt", Answer(body=b"[" * 5000 + b'"' + ESCAPED_KEY.encode() + b'"' + b"]" * 5000), REFUSED,
        "JSON nested deeper than a parser recurses is refused as not inspectable"),
    # Upstream errors are answers too.
    row("prompt", Answer(status=404, body=js({"success": False, "message": f"no {KEY}"})), BLOCKED,
        "a key in a 404 answer to a prompt is blocked"),
    row("prompt", Answer(status=500, headers=text("utf-8"), body=f"Traceback: {GHP}".encode()), BLOCKED,
        "a token in a 500 text answer to a prompt is blocked"),
    row("prompt", Answer(status=503, body=b'{"error": {"detail": "' + ESCAPED_KEY.encode() + b'"}}'), BLOCKED,
        "a JSON-escaped key in a 503 answer to a prompt is blocked"),
    row("prompt", Answer(status=500, headers=SSE, body=b": " + KEY.encode() + b"\n\ndata: x\n\n"), BLOCKED,
        "a key in a comment of a 500 event stream is blocked"),
    row("messages", Answer(status=404, body=js({"success": False, "message": f"gone {KEY}"})), BLOCKED,
        "a key in a 404 answer to a messages list is blocked"),
    row("messages", Answer(status=500, headers=text("utf-16le"), body=f"err {GHP}".encode("utf-16-le")),
        BLOCKED, "a token in a utf-16le 500 answer to a messages list is blocked"),
    # Clean answers pass byte for byte.
    row("prompt",
        Answer(body=b'{"success":true,  "message":"fine", "n": [1, 2.5, {"k": null}], "t": "TICKET-7"}'),
        UNCHANGED, "a clean JSON answer with an alert match passes unchanged"),
    row("prompt", Answer(body=b'"just words"'), UNCHANGED, "a clean top-level JSON string passes unchanged"),
    row("prompt", Answer(headers=text("utf-16le"), body="caf\xe9 au lait".encode("utf-16-le")), UNCHANGED,
        "a clean utf-16le text answer passes unchanged"),
    row("prompt", Answer(headers=text("iso-8859-1"), body="cr\xe8me".encode("latin-1")), UNCHANGED,
        "a clean latin-1 text answer passes unchanged"),
    row("prompt", Answer(status=404, body=b'{"success": false, "message": "Conversation not found"}'),
        UNCHANGED,        "a clean 404 passes unchanged"),
    row("messages", Answer(status=500, headers=text("utf-8"), body=b"Internal error"), UNCHANGED,
        "a clean 500 to a messages list passes unchanged"),
    row("prompt", Answer(headers=JSON, body=b"\xef\xbb\xbf{\"message\": \"ok\"}"), UNCHANGED,
        "a clean JSON answer with a byte order mark passes unchanged"),
]  # fmt: skip


STREAMS = [
    row("prompt", Answer(headers=SSE, chunks=(event({"GEMINI_API_KEY": GEMINI}),)), STREAM_BLOCKED,
        "an event whose member's key names the key it holds is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b'data: {"GEMINI_API_KEY": "\\u0041' + GEMINI[1:].encode()
                                               + b'"}\n\n',)),
        STREAM_BLOCKED, "the same with the key JSON-escaped is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b'data: "' + ESCAPED_KEY.encode() + b'"\n\n',)), STREAM_BLOCKED,
        "an SSE data payload that is a JSON string is decoded and blocked"),
    row("prompt", Answer(headers=SSE, chunks=(anthropic("here "), anthropic(KEY), anthropic(" end"))),
        STREAM_BLOCKED, "a key in delta.text, Anthropic's shape, is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(anthropic("the key "), anthropic(KEY[:9]), anthropic(KEY[9:]),
                                               anthropic(" and more words after it"))),
        STREAM_BLOCKED, "a key split across two events in delta.text is blocked before any of it is sent"),
    row("prompt", Answer(headers=SSE, chunks=(
            event({"type": "response.output_text.delta", "delta": "token "}),
            event({"type": "response.output_text.delta", "delta": GHP[:10]}),
            event({"type": "response.output_text.delta", "delta": GHP[10:]}),
            event({"type": "response.output_text.delta", "delta": " done"}))),
        STREAM_BLOCKED, "a token split across Responses API delta events is blocked"),
    row("prompt", Answer(headers=SSE, chunks=tuple(
            event({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}}]})
            for part in ('{"key": "', KEY[:5], KEY[5:], '"}'))),
        STREAM_BLOCKED, "a key split across streamed tool call arguments is blocked"),
    row("prompt", Answer(headers=SSE, chunks=tuple(
            event({"candidates": [{"content": {"parts": [{"text": part}]}}]})
            for part in ("key ", KEY[:12], KEY[12:], " end"))),
        STREAM_BLOCKED, "a key split across Gemini parts is blocked"),
    row("prompt",
        Answer(headers=SSE, chunks=(delta("hello "), b": " + KEY.encode() + b"\n\n", delta("world"))),
        STREAM_BLOCKED, "a key in an SSE comment line is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(delta("hello "), b"event: " + GHP.encode() + b"\ndata: x\n\n")),
        STREAM_BLOCKED, "a token in an event: line is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b"id: " + KEY.encode() + b"\ndata: x\n\n",)), STREAM_BLOCKED,
        "a key in an id: line is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b"retry: 10\nx-debug: " + KEY.encode() + b"\ndata: x\n\n",)),
        STREAM_BLOCKED, "a key in an unknown field line is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(KEY.encode() + b"\ndata: x\n\n",)), STREAM_BLOCKED,
        "a key as a field name without a colon is blocked"),
    row("prompt",
        Answer(headers=SSE, chunks=(b'data: {"usage": {"note": "' + KEY.encode() + b'"}}\r\n\r\n',)),
        STREAM_BLOCKED, "a key in an unlisted field with CRLF framing is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b'data: {"a":\ndata: "' + ESCAPED_KEY.encode() + b'"}\n\n',)),
        STREAM_BLOCKED, "a JSON-escaped key in multi-line data is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b'data:"' + ESCAPED_GHP.encode() + b'"\n\n',)), STREAM_BLOCKED,
        "a JSON-escaped token in data: without a space is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b'data: {"' + KEY.encode() + b'": 1}\n\n',)), STREAM_BLOCKED,
        "a key in a JSON key of an event is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b'data: {"n": ' + str(CARD).encode() + b"}\n\n",)),
        STREAM_BLOCKED, "a card number in a JSON number of an event is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b'\xef\xbb\xbfdata: "' + ESCAPED_KEY.encode() + b'"\n\n',)),
        STREAM_BLOCKED, "a stream that starts with a byte order mark is read as the client reads it"),
    row("prompt", Answer(headers=SSE, chunks=(b'data: {"x": "' + KEY.encode() + b'"}\r\r',)), STREAM_BLOCKED,
        "a key in an event framed by lone CRs is blocked"),
    row("prompt", Answer(headers=SSE, chunks=(b'data: {"x": "' + KEY.encode() + b'"}',)), STREAM_BLOCKED,
        "a key in an unterminated last event is blocked"),
    row("prompt",
        Answer(headers=SSE, chunks=(delta("the key "), delta(KEY[:9]), delta(KEY[9:]), delta(" end"))),
        STREAM_BLOCKED, "a key split across two OpenAI deltas is still blocked"),
    # Plain-text data that happens to parse as JSON: a client reading each data line raw joins
    # its raw text, one that JSON-decodes lines joins the decoded string; either reading blocks.
    row("prompt", Answer(headers=SSE, chunks=plain('"in"', KEY[:8], KEY[8:], " and more")), STREAM_BLOCKED,
        "a key after a JSON string line of plain-text data is blocked as raw lines read it"),
    row("prompt", Answer(headers=SSE, chunks=plain('"x"', "AKIA", "234567", "234567", "2345", " end")),
        STREAM_BLOCKED, "a key spelled with JSON number lines of plain-text data is blocked"),
    row("prompt", Answer(headers=SSE, chunks=plain('"n"', KEY[:13], "234567", "2", " end")), STREAM_BLOCKED,
        "a key ending in JSON number lines after a JSON string line is blocked"),
    row("prompt", Answer(headers=SSE, chunks=plain("null", '"x"', KEY[:8], KEY[8:])), STREAM_BLOCKED,
        "a key after null and a JSON string line is blocked"),
    row("prompt", Answer(headers=SSE, chunks=plain("true", "[]", KEY[:8], KEY[8:13], KEY[13:])),
        STREAM_BLOCKED, "a key after true and an empty list line is blocked"),
    row("prompt", Answer(headers=SSE, chunks=plain("x", '[1, "two"]', KEY[:4], KEY[4:13], KEY[13:])),
        STREAM_BLOCKED, "a key after a JSON list line of plain-text data is blocked"),
    row("prompt", Answer(headers=SSE, chunks=plain("x", '{"n": 1}', KEY[:8], KEY[8:])), STREAM_BLOCKED,
        "a key after a JSON object line of plain-text data is blocked"),
    row("prompt", Answer(headers=SSE, chunks=plain("ok", "[2]", DIGIT_KEY[:4], "234567", "234567", "2345")),
        STREAM_BLOCKED, "a key of number lines after a list line is blocked"),
    row("prompt", Answer(headers=SSE, chunks=plain(KEY[:8], f'"{KEY[8:]}"', " end")), STREAM_BLOCKED,
        "a key completed by a JSON string line is blocked as JSON-decoding clients read it"),
    row("prompt", Answer(headers=(("Content-Type", "text/event-stream; charset=utf-16le"),),
                         chunks=(f"data: {KEY}\n\n".encode("utf-16-le"),)),
        REFUSED, "an event stream in a charset other than UTF-8 is refused"),
    row("prompt", Answer(headers=SSE, chunks=(delta("fine "), event(nested(100, KEY)), delta(" end"))),
        STREAM_REFUSED, "an event nested deeper than the gateway walks ends the stream"),
    # Chunked text: decoded by its declared charset, incrementally.
    row("prompt", Answer(headers=text("utf-16le"), chunks=tuple(
            part.encode("utf-16-le") for part in ("The key is ", KEY[:7], KEY[7:], " and more words."))),
        STREAM_BLOCKED, "a key split across chunks of utf-16le text is blocked"),
    row("prompt", Answer(headers=text("utf-16be"), chunks=(
            "The key ".encode("utf-16-be") + KEY[:3].encode("utf-16-be") + b"\x00",
            KEY[3:].encode("utf-16-be")[1:] + " and more words".encode("utf-16-be"))),
        STREAM_BLOCKED, "a key in utf-16be text cut inside a code unit is blocked"),
    row("prompt", Answer(headers=text("utf-7"), chunks=(b"key +AEEASwBJ", b"AEE-IOSFODNN7EXAMPLE end")),
        STREAM_BLOCKED, "a key in chunked utf-7 text is blocked"),
    row("prompt", Answer(headers=text("x-no-such-charset"), chunks=(KEY.encode(),)), REFUSED,
        "chunked text in an unknown charset is refused"),
    # Clean streams pass byte for byte.
    row("prompt", Answer(headers=SSE, chunks=(
            b": keep-alive\r\n\r\n", b"event: message\r\nid: 7\r\nretry: 100\r\n",
            b"data: {\"a\": 1}\r\n\r\n",
            anthropic("hello "), anthropic("world TICKET-3"), delta("!"), b'data: "done"\n\n',
            b"data: [DONE]\n\n")),
        UNCHANGED, "a clean stream of every line kind passes unchanged"),
    row("prompt", Answer(headers=text("utf-16le"), chunks=tuple(
            part.encode("utf-16-le") for part in ("caf\xe9 ", "au ", "lait"))),
        UNCHANGED, "a clean chunked utf-16le text passes unchanged"),
]  # fmt: skip


def message(index: int, role: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"id": f"m{index}", "role": role, "content": content, "createdAt": f"t{index}", **extra}


MESSAGES = [
    row("messages", Answer(body=listing(message(0, "user", "hi"),
                                        message(1, "assistant", [{"type": "text", "text": f"key {KEY}"}]))),
        withheld(1), "a key in a content array of parts is withheld"),
    row("messages", Answer(body=listing(message(0, "Assistant", f"key {KEY}"))), withheld(0),
        "a message of role Assistant is withheld"),
    row("messages", Answer(body=listing(message(0, "system", f"key {GHP}"))), withheld(0),
        "a system message is withheld"),
    row("messages", Answer(body=listing(message(0, "tool", f"{KEY}"))), withheld(0),
        "a tool message is withheld"),
    row("messages", Answer(body=listing(message(0, "user", f"my {KEY}"))), withheld(0),
        "a user message is withheld"),
    row("messages", Answer(body=listing({"id": "a", "role": "assistant", "text": f"key {KEY}"})), withheld(0),
        "a text field is withheld"),
    row("messages", Answer(body=listing(message(0, "assistant", "fine", metadata={"note": KEY}))),
        withheld(0),        "a key in a message's metadata is withheld"),
    row("messages", Answer(body=listing(message(0, "assistant", "fine", model=CARD))), withheld(0),
        "a card number in a message field is withheld"),
    row("messages", Answer(body=listing(message(0, KEY, "fine"))), withheld(0),
        "a key in a role is withheld with its role"),
    row("messages",
        Answer(body=b'{"messages": [{"role": "assistant", "content": "' + ESCAPED_KEY.encode() + b'"}]}'),
        withheld(0), "a JSON-escaped key in a content is withheld"),
    row("messages", Answer(body=listing(
            message(0, "user", "what is it?"), message(1, "assistant", f"It is {KEY}"),
            message(2, "tool", [{"type": "text", "text": "ok"}, {"type": "text", "text": GHP}]),
            message(3, "system", "be nice"), message(4, "ASSISTANT", "Anything else? TICKET-9"))),
        withheld(1, 2), "of mixed roles only the messages with a canary are withheld"),
    row("messages", Answer(body=listing(*(message(i, "assistant", f"{KEY} again") for i in range(70)))),
        withheld(*range(70)), "more hit messages than a violation reports spans are all withheld"),
    row("messages", Answer(body=listing(message(0, "assistant", "fine"), title=f"about {KEY}")), BLOCKED,
        "a key outside the messages refuses the whole list"),
    row("messages", Answer(body=listing(message(0, "assistant", "fine"), **{KEY: 1})), BLOCKED,
        "a key in a top-level key refuses the whole list"),
    row("messages", Answer(body=js([message(0, "assistant", f"{KEY}")])), BLOCKED,
        "a bare list of messages with a key is refused whole"),
    row("messages", Answer(body=js({"messages": f"{KEY}"})), BLOCKED,
        "messages that are not a list are refused whole"),
    row("messages", Answer(headers=text("utf-16le", "application/json"),
                           body=listing(message(0, "assistant", f"{KEY}")).decode().encode("utf-16-le")),
        BLOCKED, "a utf-16le messages list with a key is refused whole"),
    row("messages", Answer(body=listing(message(0, "user", "hi"), message(1, "assistant", ["a", {"b": "c"}]),
                                        message(2, "Tool", [{"type": "text", "text": "done TICKET-2"}]),
                                        title="T")),
        UNCHANGED, "a clean list of mixed roles passes unchanged"),
    row("messages",
        Answer(body=b'{"success": true,   "messages": [{"role": "assistant", "content": "hello"}]}'),
        UNCHANGED, "a clean list passes byte for byte"),
]  # fmt: skip


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[Upstream, TestServer]:
    return await start_upstream(aiohttp_server)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "rules.yaml").write_text(POLICIES, encoding="utf-8")
    return directory


@pytest.fixture
async def gateway(aiohttp_server: Any, upstream: tuple[Upstream, TestServer], policies: Path) -> TestServer:
    public, _, _ = await start_gateway(aiohttp_server, str(upstream[1].make_url("/")), policies=[policies])
    return public


def serve(recorder: Upstream, answer: Answer, *, trickled: bool = False) -> None:
    """``trickled``: a whole body sent in two writes 20 ms apart, with its Content-Length, so
    that the gateway has the head before the body is all in (and reads it waiting)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if answer.chunks is None and trickled:
            slow = web.StreamResponse(status=answer.status)
            for name, value in answer.headers:
                slow.headers.add(name, value)
            slow.content_length = len(answer.body)
            await slow.prepare(request)
            half = len(answer.body) // 2
            await slow.write(answer.body[:half])
            await asyncio.sleep(0.02)
            await slow.write(answer.body[half:])
            await slow.write_eof()
            return slow
        if answer.chunks is None:
            response = web.Response(status=answer.status, body=answer.body)
            for name, value in answer.headers:
                response.headers.add(name, value)
            return response
        streamed = web.StreamResponse(status=answer.status)
        for name, value in answer.headers:
            streamed.headers.add(name, value)
        await streamed.prepare(request)
        for chunk in answer.chunks:
            await streamed.write(chunk)
            await asyncio.sleep(0.005)
        await streamed.write_eof()
        return streamed

    recorder.handler = handler


async def fetch(server: TestServer | str, route: str) -> tuple[int, dict[str, str], bytes]:
    base = server if isinstance(server, str) else str(server.make_url("/")).rstrip("/")
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        if route == "prompt":
            request = client.post(f"{base}/conversation/c1/prompt", json={"prompt": "hi"})
        else:
            request = client.get(f"{base}/conversation/c1/messages")
        async with request as response:
            return response.status, dict(response.headers), await response.read()


def _unescape(text: str) -> str:
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda found: chr(int(found[1], 16)), text)


def readings(raw: bytes) -> list[str]:
    """Every way a client might read the bytes: several charsets, each also JSON-unescaped."""
    texts = []
    for codec, width in (
        ("utf-8", 1),
        ("utf-16-le", 2),
        ("utf-16-be", 2),
        ("utf-32-le", 4),
        ("utf-32-be", 4),
    ):
        for shift in range(width):
            texts.append(raw[shift:].decode(codec, errors="ignore"))
    texts.append(raw.decode("utf-7", errors="ignore"))
    return texts + [_unescape(text) for text in texts] + data_readings(raw)


def data_readings(raw: bytes) -> list[str]:
    """An event stream's data joined from event to event, as clients join it: every data line
    raw (lines of one event joined with a newline), or each JSON string data decoded."""
    events = re.split(r"\r\n\r\n|\n\n|\r\r", raw.decode("utf-8", errors="ignore"))
    lines = [
        [line[5:].removeprefix(" ") for line in re.split(r"\r\n|\n|\r", event) if line.startswith("data:")]
        for event in events
    ]
    data = ["\n".join(event) for event in lines if event]
    decoded = []
    for value in data:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        decoded.append(parsed if isinstance(parsed, str) else value)
    return ["".join(data), "".join(decoded)]


def leaked(raw: bytes) -> list[str]:
    return sorted({fragment for text in readings(raw) for fragment in FRAGMENTS if fragment in text})


def check(expect: Expect, answer: Answer, status: int, body: bytes) -> None:
    sent = answer.body if answer.chunks is None else b"".join(answer.chunks)
    assert not leaked(body), f"canary reached the client: {body[:300]!r}"
    if expect.kind == "unchanged":
        assert (status, body) == (answer.status, sent)
    elif expect.kind == "blocked":
        assert status == 403, body[:300]
        assert json.loads(body)["error_code"] == "RESPONSE_BLOCKED"
    elif expect.kind == "refused":
        assert status == 502, body[:300]
        assert json.loads(body)["error_code"] == "ANSWER_NOT_INSPECTABLE"
    elif expect.kind in {"stream blocked", "stream refused"}:
        assert status == answer.status
        error = body.rstrip(b"\n").rsplit(b"\n", 1)[-1].removeprefix(b"data: ")
        code = "RESPONSE_BLOCKED" if expect.kind == "stream blocked" else "ANSWER_NOT_INSPECTABLE"
        assert json.loads(error)["error_code"] == code, body[-300:]
    else:
        assert status == 200, body[:300]
        original = json.loads(codecs.decode(sent, "utf-8-sig"))["messages"]
        got = json.loads(body)["messages"]
        assert len(got) == len(original)
        for index, (before, after) in enumerate(zip(original, got, strict=True)):
            if index in expect.withheld:
                assert after["policyWithheld"] is True
                assert after["content"].startswith("[This message was withheld by policy: ")
                # The id and the role stay, where they are clean.
                for name in ("id", "role"):
                    if name in before and not leaked(json.dumps(before[name]).encode()):
                        assert after[name] == before[name]
            else:
                assert after == before


@pytest.mark.parametrize(("route", "answer", "expect"), WHOLE + STREAMS + MESSAGES)
async def test_no_canary_reaches_the_client(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], route: str, answer: Answer, expect: Expect
) -> None:
    """The client gets the expected outcome, and no piece of a canary in any reading of it."""
    serve(upstream[0], answer)
    status, _, body = await fetch(gateway, route)
    check(expect, answer, status, body)


@pytest.mark.parametrize(
    ("route", "answer", "expect"), [case for case in WHOLE + MESSAGES if case.values[1].chunks is None]
)
async def test_no_canary_reaches_the_client_from_an_answer_still_arriving(
    gateway: TestServer,
    upstream: tuple[Upstream, TestServer],
    route: str,
    answer: Answer,
    expect: Expect,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every whole answer of the table decides the same when its body is not all in once its
    head is (read waiting, not at once): the reading that waits is the one taken."""
    waited: list[int] = []
    read_bounded = gateway_answers.read_bounded

    async def counted(content: Any, limit: int) -> bytes:
        waited.append(limit)
        return await read_bounded(content, limit)

    monkeypatch.setattr(gateway_answers, "read_bounded", counted)
    serve(upstream[0], answer, trickled=True)
    status, _, body = await fetch(gateway, route)
    check(expect, answer, status, body)
    # Read waiting, unless its headers alone had it refused (encoded, an unknown charset...).
    assert waited or b"ANSWER_NOT_INSPECTABLE" in body


async def test_the_audit_record_names_where_in_the_answer_the_key_was(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], policies: Path, tmp_path: Path
) -> None:
    """A blocked answer's audit record carries the JSON path of the match, never the match."""
    audit = tmp_path / "audit.jsonl"
    gateway, _, _ = await start_gateway(
        aiohttp_server, str(upstream[1].make_url("/")), policies=[policies], audit_file=audit
    )
    serve(upstream[0], Answer(body=js({"data": {"items": [{"note": f"x {KEY}"}]}, "t": "TICKET-4"})))
    assert (await fetch(gateway, "prompt"))[0] == 403
    serve(upstream[0], Answer(headers=SSE, chunks=(delta("hi "), b"id: " + GHP.encode() + b"\ndata: x\n\n")))
    assert b"RESPONSE_BLOCKED" in (await fetch(gateway, "prompt"))[2]
    written = audit.read_text()
    records = {(r["policyId"], tuple(r["paths"])) for r in map(json.loads, written.splitlines())}
    assert records == {
        ("t.aws-key", ("$.data.items[0].note",)),
        ("t.ticket", ("$.t",)),
        ("t.github", ("id line",)),
    }
    assert not leaked(written.encode())


# The same rows against the real Express backend: the gateway as it runs in production.
EXPRESS_ROWS = {
    "a key in message.content is blocked",
    "a JSON-escaped key in an unlisted field is blocked",
    "text/plain in utf-16le is read in utf-16le and blocked",
    "an unknown charset is refused as not inspectable",
    "a key in a 404 answer to a prompt is blocked",
    "a token in a 500 text answer to a prompt is blocked",
    "a key in a 404 answer to a messages list is blocked",
    "a clean JSON answer with an alert match passes unchanged",
    "a key split across two events in delta.text is blocked before any of it is sent",
    "a key in an SSE comment line is blocked",
    "a JSON-escaped key in multi-line data is blocked",
    "a key split across chunks of utf-16le text is blocked",
    "a clean stream of every line kind passes unchanged",
    "of mixed roles only the messages with a canary are withheld",
    "a key outside the messages refuses the whole list",
    "a clean list passes byte for byte",
}


@pytest.mark.parametrize(
    ("route", "answer", "expect"), [row for row in WHOLE + STREAMS + MESSAGES if row.id in EXPRESS_ROWS]
)
async def test_no_canary_reaches_the_client_from_express(
    aiohttp_server: Any, express: Any, policies: Path, route: str, answer: Answer, expect: Expect
) -> None:
    """As above, the answers sent by the real Express backend the gateway is deployed in front of."""
    headers: dict[str, list[str]] = {}
    for name, value in answer.headers:
        headers.setdefault(name, []).append(value)
    if answer.chunks is None:
        express.answer(route, status=answer.status, headers=headers, body=answer.body)
    else:
        express.answer(route, status=answer.status, headers=headers, chunks=answer.chunks, chunk_delay_ms=5)
    gateway, _, _ = await start_gateway(aiohttp_server, express.url, policies=[policies])
    status, _, body = await fetch(gateway, route)
    check(expect, answer, status, body)


async def test_an_answer_over_the_response_limit_is_refused_as_not_inspectable(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], policies: Path
) -> None:
    """An answer too large to hold whole is not passed on uninspected: 502 ANSWER_NOT_INSPECTABLE."""
    gateway, _, _ = await start_gateway(
        aiohttp_server, str(upstream[1].make_url("/")), policies=[policies], response_limit=4096
    )
    answer = Answer(status=500, body=js({"message": "x" * 5000 + KEY}))
    serve(upstream[0], answer)
    for route in ("prompt", "messages"):
        check(REFUSED, answer, *(await fetch(gateway, route))[::2])


def test_every_express_row_is_in_the_table() -> None:
    assert {row.id for row in WHOLE + STREAMS + MESSAGES} >= EXPRESS_ROWS


# The pieces the answer side builds on: json_texts' field paths, spans and joins.


def test_collect_lists_the_answer_fields_and_can_leave_them_out_of_the_text() -> None:
    """Strings at the field paths are listed in document order; ``apart`` keeps them out of the text."""
    value = {"id": "c1", "choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b", "n": 1}}]}
    fields = (parse_field_path("choices[].delta.content"), parse_field_path("id.x"))
    whole = collect(value, fields=fields)
    assert whole.fields == ("a", "b")
    # A key and its string or number value read as a client showing the JSON reads them.
    assert whole.text == "id: c1\nchoices\ndelta\ncontent: a\ndelta\ncontent: b\nn: 1"
    apart = collect(value, fields=fields, apart=True, root="data")
    assert apart.fields == ("a", "b")
    assert apart.text == "id: c1\nchoices\ndelta\ncontent\ndelta\ncontent\nn: 1"
    assert apart.path_at(apart.text.index("n: 1") + 3) == "data.choices[1].delta.n"
    assert apart.path_at(apart.text.index("n: 1")) == "data.choices[1].delta.n (key)"


def test_paths_between_names_every_piece_a_span_touches() -> None:
    """A match running over a separator belongs to both pieces; one inside a piece to that one."""
    texts = collect({"a": "xx", "b": ["yy", "zz"]})  # a: xx\nb\nyy\nzz
    assert texts.text == "a: xx\nb\nyy\nzz"
    assert texts.paths_between(3, 5) == ["$.a"]
    assert texts.paths_between(4, 7) == ["$.a", "$.b (key)"]
    assert texts.paths_between(0, 4) == ["$.a (key)", "$.a"]
    assert texts.paths_between(0, len(texts.text)) == ["$.a (key)", "$.a", "$.b (key)", "$.b[0]", "$.b[1]"]
    assert texts.paths_between(6, 6) == ["$.b (key)"]


def test_join_keeps_each_part_s_paths_at_their_offsets() -> None:
    """Joined texts map an offset back to the part, and the path within it, it came from."""
    first, second = collect({"k": "v"}), collect(["w"], root="utf-16-le:$")
    joined = join((first, second))
    assert joined.text == "k: v\nw"
    assert [joined.path_at(i) for i in (0, 3, 5)] == ["$.k (key)", "$.k", "utf-16-le:$[0]"]
