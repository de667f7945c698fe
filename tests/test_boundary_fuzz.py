"""A property-based fuzzer of the enforcement boundary, against the real Express backend.

Requests: a canary secret is put in a prompt body and the request is mutated (target spelling,
charset, content encoding, JSON shape and escapes, what stands right before the key, chunking);
whatever the gateway answers, the backend's prompt handler never parses the canary. Answers: the
backend is programmed to answer with a canary in any JSON shape or SSE framing, split anyhow;
the client never reads it. CI runs a fixed example budget; ``FUZZ_EXAMPLES=20000`` runs long.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import threading
import zlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import public_runner
from gateway.config import Settings
from gateway.policy import load_ruleset
from gateway.state import GatewayState
from tests.express_fixtures import ExpressBackend, ExpressProcess
from tests.redis_fixtures import free_ports

CANARY = "AKIAIOSFODNN7EXAMPLE"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("FUZZ_EXAMPLES") is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class GatewayThread:
    """A gateway with the built-in pack on its own event loop, so that tests can stay synchronous."""

    def __init__(self, upstream: str) -> None:
        self.port = free_ports(1)[0]
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.runner: web.AppRunner | None = None
        settings_ = replace(Settings(), upstream=upstream)
        self.state = GatewayState(settings_, load_ruleset())
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.runner = public_runner(self.state)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(20):
            raise RuntimeError("the fuzzed gateway did not start")

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def fuzz_gateway(express_server: ExpressProcess) -> Iterator[tuple[GatewayThread, ExpressBackend]]:
    gateway = GatewayThread(express_server.url)
    gateway.start()
    try:
        yield gateway, ExpressBackend(express_server)
    finally:
        gateway.stop()


def exchange(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One request on its own connection; the status and the whole answer body as sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head + body)
        chunks = []
        while data := connection.recv(65536):
            chunks.append(data)
    answer = b"".join(chunks)
    status = int(answer.split(b" ", 2)[1])
    head_part, _, rest = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_part.lower():
        rest = _dechunk(rest)
    return status, rest


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


# What may stand right before the key: separators, escapes as pasted code holds them, encodings.
_BEFORE = ["", " ", "=", ":", "_", '"', "\\n", "\\t", "\\r", '\\"', "%3D", "%20", "/", "(", "\n", "\t"]
_TARGETS = [
    "/conversation/{id}/prompt",
    "/CONVERSATION/{id}/PROMPT",
    "/conversation/{id}/prompt/",
    "/Conversation/{id}/Prompt",
]
_CHARSETS: dict[str, tuple[str, bytes]] = {
    "": ("utf-8", b""),
    "utf-8": ("utf-8", b""),
    "UTF-8": ("utf-8", b"\xef\xbb\xbf"),
    "utf-16le": ("utf-16-le", b"\xff\xfe"),
    "utf-16be": ("utf-16-be", b""),
    "utf-16": ("utf-16-be", b"\xfe\xff"),
    "utf-32": ("utf-32-le", b"\xff\xfe\x00\x00"),
    "utf-7": ("utf-8", b""),
    "latin1": ("latin-1", b""),
}


def _escape_some(text: str, mask: list[bool]) -> str:
    """The JSON string of ``text`` with the characters under ``mask`` written as \\u escapes."""
    return "".join(
        f"\\u{ord(char):04x}" if escaped else json.dumps(char)[1:-1]
        for char, escaped in zip(text, mask + [False] * len(text), strict=False)
    )


@st.composite
def canary_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    before = draw(st.sampled_from(_BEFORE))
    filler = draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20))
    secret_text = f"{filler} {before}{CANARY} {draw(st.sampled_from(['', 'AKIAXXXXXXXXXXXXXXXX', '.']))}"
    escaped = _escape_some(secret_text, draw(st.lists(st.booleans(), max_size=len(secret_text))))
    place = draw(st.sampled_from(["prompt", "field", "nested", "list", "key"]))
    secret = f'"{escaped}"'
    if place == "prompt":
        document = f'{{"prompt":{secret}}}'
    elif place == "field":
        document = (
            f'{{"prompt":"hi","{draw(st.sampled_from(["context", "model", "system", "x"]))}":{secret}}}'
        )
    elif place == "nested":
        depth = draw(st.integers(1, 12))
        document = '{"prompt":"hi","a":' + '{"b":' * depth + secret + "}" * depth + "}"
    elif place == "list":
        document = '{"prompt":"hi","attachments":[1,"x",{"data":' + secret + "}]}"
    else:
        document = '{"prompt":"hi",' + secret + ":true}"
    charset = draw(st.sampled_from(list(_CHARSETS)))
    codec, bom = _CHARSETS[charset]
    try:
        body = bom + document.encode(codec)
    except UnicodeEncodeError:
        body = document.encode("utf-8")
    headers = ["Content-Type: application/json" + (f"; charset={charset}" if charset else "")]
    encoding = draw(st.sampled_from(["", "gzip", "deflate", "GZip"]))
    if encoding:
        body = gzip.compress(body) if encoding.lower() == "gzip" else zlib.compress(body)
        headers.append(f"Content-Encoding: {encoding}")
    target = draw(st.sampled_from(_TARGETS)).format(id=draw(st.sampled_from(["c1", "c-2", "x%41"])))
    target += draw(st.sampled_from(["", "?q=1", "#frag", "?q=1#f"]))
    if draw(st.booleans()):
        target = "http://gw.example" + target
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(body)))
        parts = [body[:cut], body[cut:]]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"
        headers.append("Transfer-Encoding: chunked")
    else:
        payload = body
        headers.append(f"Content-Length: {len(body)}")
    head = f"POST {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n" + "".join(
        h + "\r\n" for h in headers
    )
    return (head + "\r\n").encode(), payload


@FUZZ
@given(request=canary_requests())
def test_fuzzed_requests_never_carry_the_canary_to_the_backend(
    fuzz_gateway: tuple[GatewayThread, ExpressBackend], request: tuple[bytes, bytes]
) -> None:
    """Whatever the spelling, charset, encoding or shape, the backend never parses the canary."""
    gateway, express = fuzz_gateway
    express.reset()
    status, _ = exchange(gateway.port, *request)
    assert status != 500
    for record in express.received():
        if record["method"] == "POST" and (record.get("params") or {}).get("conversationId"):
            assert CANARY not in json.dumps(record.get("body"), ensure_ascii=False)


# Answers.


def _strings(value: Any, keys: bool = True) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in ([key] if keys else []) + _strings(item, keys)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item, keys)]
    return []


def _client_reading(body: bytes) -> str:
    """Everything a client could make of an answer: raw text, JSON strings, SSE data decoded,
    and the streamed text a client concatenates (the last string of each event's data)."""
    text = body.decode("utf-8", errors="replace")
    readings = [text]
    try:
        readings += _strings(json.loads(body))
    except ValueError:
        flow: list[str] = []
        for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            if not line.startswith("data:"):
                continue
            data = line[5:].removeprefix(" ")
            try:
                payload = json.loads(data)
            except ValueError:
                flow.append(data)
                continue
            readings += _strings(payload)
            flow += _strings(payload, keys=False)[-1:]
        readings.append("".join(flow))
    return "\n".join(readings)


@st.composite
def canary_answers(draw: st.DrawFn) -> dict[str, Any]:
    secret = CANARY
    kind = draw(st.sampled_from(["json", "sse", "text", "error"]))
    escaped = _escape_some(secret, draw(st.lists(st.booleans(), max_size=len(secret))))
    if kind in {"json", "error"}:
        shape = draw(
            st.sampled_from(
                [
                    '{"success":true,"message":"%s"}',
                    '{"success":true,"message":{"content":"%s"}}',
                    '"%s"',
                    '["a",["b","%s"]]',
                    '{"data":[{"x":1,"y":{"z":"%s"}}]}',
                    '{"%s":1}',
                    '{"choices":[{"message":{"content":"%s"}}]}',
                ]
            )
        )
        status = 200 if kind == "json" else draw(st.sampled_from([400, 404, 500, 503]))
        return {
            "status": status,
            "headers": {"Content-Type": "application/json"},
            "body": shape % escaped,
        }
    if kind == "text":
        charset = draw(st.sampled_from(["utf-8", "utf-16le", "utf-16be", "utf-32le"]))
        codec = {"utf-16le": "utf-16-le", "utf-16be": "utf-16-be", "utf-32le": "utf-32-le"}.get(
            charset, charset
        )
        return {
            "status": 200,
            "headers": {"Content-Type": f"text/plain; charset={charset}"},
            "body": f"here it is: {secret}".encode(codec),
        }
    # SSE: the secret split across events in a streamed field, or whole in any line of an event.
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    field = draw(
        st.sampled_from(["choices[0].delta.content", "delta.text", "message", "string", "comment", "event"])
    )
    cuts = sorted(draw(st.lists(st.integers(1, len(secret) - 1), max_size=3, unique=True)))
    pieces = [secret[a:b] for a, b in zip([0, *cuts], [*cuts, len(secret)], strict=True)]
    events = []
    for piece in pieces if field not in {"comment", "event"} else [secret]:
        if field == "choices[0].delta.content":
            data = json.dumps({"choices": [{"delta": {"content": piece}}]})
        elif field == "delta.text":
            data = json.dumps({"type": "content_block_delta", "delta": {"type": "text_delta", "text": piece}})
        elif field == "message":
            data = json.dumps({"message": {"content": piece}})
        elif field == "string":
            data = json.dumps(piece).replace("A", "\\u0041")
        elif field == "comment":
            events.append(f": {piece}{newline}data: hi{newline}{newline}")
            continue
        else:
            events.append(f"event: {piece}{newline}data: hi{newline}{newline}")
            continue
        events.append(f"data: {data}{newline}{newline}")
    stream = "".join(events)
    splits = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=4, unique=True)))
    chunks = [stream[a:b] for a, b in zip([0, *splits], [*splits, len(stream)], strict=True)]
    return {
        "status": 200,
        "headers": {"Content-Type": "text/event-stream"},
        "chunks": [chunk for chunk in chunks if chunk],
    }


@FUZZ
@given(answer=canary_answers(), route=st.sampled_from(["prompt", "messages"]))
def test_fuzzed_answers_never_carry_the_canary_to_the_client(
    fuzz_gateway: tuple[GatewayThread, ExpressBackend], answer: dict[str, Any], route: str
) -> None:
    """Whatever the shape, framing or split of an answer, the client never reads the canary."""
    gateway, express = fuzz_gateway
    express.reset()
    express.answer("prompt" if route == "prompt" else "messages", **answer)
    if route == "prompt":
        body = b'{"prompt":"hi"}'
        head = b"POST /conversation/c1/prompt HTTP/1.1\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: %d\r\n" % len(body)
    else:
        body = b""
        head = b"GET /conversation/c1/messages HTTP/1.1\r\n"
    status, received = exchange(gateway.port, head + b"Host: gw\r\nConnection: close\r\n\r\n", body)
    assert status != 500
    assert CANARY not in _client_reading(received)
    for codec in ("utf-16-le", "utf-16-be", "utf-32-le"):
        assert CANARY not in received.decode(codec, errors="ignore")
