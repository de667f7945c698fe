"""The request side of the enforcement boundary, tried as an attacker would, against real Express.

Each row sends a prompt route request that carries a canary secret in one spelling, encoding,
field or request target, through the gateway to a real Express 4 backend (``express.json()``
with its defaults). Whatever the gateway answers, the canary must never arrive in a body that
the backend's prompt handler parsed. Clean rows check the other half of the promise: what the
gateway lets through, the backend reads exactly as the client meant it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.express_fixtures import ExpressBackend
from tests.proxy_fixtures import start_gateway

CANARY = "AKIAIOSFODNN7EXAMPLE"
# A key the pack takes only after its name (secrets.gcp-api-key): in JSON the name may be a key.
NAMED = "AIzaSy_n0wYW68pFQkBeDDGV6E4UN_6Gv7pw08C"
GITHUB = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"


@dataclass(frozen=True)
class Attempt:
    """One raw HTTP/1.1 request, written byte for byte (no client normalises it)."""

    target: str
    body: bytes
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    chunked: bool = False
    # The refusals that may answer it; empty for a request that may also pass unharmed.
    expect: frozenset[int] = frozenset({400, 403, 413, 415})


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _prompt(text: str) -> bytes:
    return _json({"prompt": text})


def _utf16(text: str, codec: str, bom: bytes) -> bytes:
    return bom + _prompt(text).decode().encode(codec)


def _ct(value: str) -> tuple[tuple[str, str], ...]:
    return (("Content-Type", value),)


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for index in range(depth):
        value = {f"level{'abcdefghij'[index % 10]}": value}
    return value


ATTACKS = [
    # 1. The request target: every spelling that reaches the prompt route is inspected.
    pytest.param(Attempt("/conversation/c1/prompt#x", _prompt(CANARY)), id="a fragment on the target"),
    pytest.param(Attempt("/conversation/c1/prompt?a=1#x", _prompt(CANARY)), id="a query and a fragment"),
    pytest.param(Attempt("/conversation/c1/prompt#", _prompt(CANARY)), id="an empty fragment"),
    pytest.param(Attempt("/conversation/c1/prompt/#/x", _prompt(CANARY)), id="a fragment holding a path"),
    pytest.param(Attempt("http://x/conversation/c1/prompt", _prompt(CANARY)), id="an absolute-form target"),
    pytest.param(
        Attempt("HTTP://X:81/conversation/c1/prompt?q=1#f", _prompt(CANARY)),
        id="an absolute-form target with port, query and fragment",
    ),
    pytest.param(Attempt("/CONVERSATION/c1/PROMPT/", _prompt(CANARY)), id="upper case and a trailing slash"),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt(CANARY), method="post"), id="a lower-case method"
    ),
    pytest.param(Attempt("/conversation/c1/Prompt#%2F", _prompt(CANARY)), id="mixed case and a fragment"),
    # 2. The charset: the backend decodes what it is told; the gateway must read the same.
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            b'{"prompt":"deploy with +AEEASwBJAEE-IOSFODNN7EXAMPLE"}',
            headers=_ct("application/json; charset=utf-7"),
        ),
        id="utf-7",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            b'{"prompt":"deploy with +AEEASwBJAEE-IOSFODNN7EXAMPLE"}',
            headers=_ct('application/json; CHARSET="UTF-7"'),
        ),
        id="utf-7 quoted and in upper case",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CANARY, "utf-16-le", b"\xff\xfe"),
            headers=_ct("application/json; charset=utf-16le"),
        ),
        id="utf-16le with a byte order mark",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CANARY, "utf-16-le", b""),
            headers=_ct("application/json;charset=utf-16le"),
        ),
        id="utf-16le without a byte order mark",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CANARY, "utf-16-be", b"\xfe\xff"),
            headers=_ct("application/json; charset=utf-16"),
        ),
        id="utf-16 big-endian by its byte order mark",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CANARY, "utf-16-be", b""),
            headers=_ct("application/json; charset=utf-16"),
        ),
        id="utf-16 with no byte order mark, big-endian",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CANARY, "utf-32-le", b"\xff\xfe\x00\x00"),
            headers=_ct("application/json; charset=utf-32"),
        ),
        id="utf-32 with a byte order mark",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CANARY, "utf-32-be", b""),
            headers=_ct("application/json; charset=utf-32be"),
        ),
        id="utf-32be",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            b"\xef\xbb\xbf" + _prompt(CANARY),
            headers=_ct("application/json; charset=utf-8"),
        ),
        id="utf-8 with a byte order mark",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CANARY, "utf-16-le", b"\xff\xfe"),
            headers=_ct("application/json; charset=utf-8; charset=utf-16le"),
        ),
        id="two charsets",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CANARY, "utf-16-le", b"\xff\xfe"),
            headers=(("Content-Type", "application/json; charset=utf-16le"), ("Content-Type", "text/plain")),
        ),
        id="two Content-Type headers",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _prompt(CANARY).replace(b"AKIA", b"AK\xffIA"),
            headers=_ct("application/json"),
            # The backend reads a replacement character there: no key reaches it, so it may pass.
            expect=frozenset(),
        ),
        id="an invalid UTF-8 byte inside the key",
    ),
    # 3. A placeholder beside a real key does not switch the rule off.
    pytest.param(
        Attempt(
            "/conversation/c1/prompt", _prompt(f"deploy with {CANARY} (placeholder AKIAXXXXXXXXXXXXXXXX)")
        ),
        id="a decoy placeholder after the key",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt(f"placeholder AKIAXXXXXXXXXXXXXXXX, real {CANARY}")),
        id="a decoy placeholder before the key",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _json({"prompt": CANARY, "note": "AKIAXXXXXXXXXXXXXXXX"})),
        id="a decoy placeholder in another field",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt(" ".join(["AKIAXXXXXXXXXXXXXXXX"] * 80) + " " + CANARY)),
        id="eighty decoys before the key",
    ),
    # 4. Boundaries and escapes.
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt(f'config = "line1\\n{CANARY}"')),
        id="a literal backslash-n before the key",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt(f"x\\t{CANARY}")),
        id="a literal backslash-t before the key",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt("key=\\u0041KIAIOSFODNN7EXAMPLE")),
        id="a literal unicode escape inside the key",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt(f"aws_key%3D{CANARY}")), id="a percent-encoded equals sign"
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt("aws_key=%41%4BIAIOSFODNN7EXAMPLE")),
        id="percent-encoded letters of the key",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt(f"key_{CANARY}")), id="an underscore before the key"
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt(f"token_{GITHUB}")), id="an underscore before a token"
    ),
    # 5. Every field of the body, at any depth, keys included.
    pytest.param(
        Attempt("/conversation/c1/prompt", _json({"prompt": "hi", "context": CANARY})), id="context"
    ),
    pytest.param(Attempt("/conversation/c1/prompt", _json({"prompt": "hi", "model": CANARY})), id="model"),
    pytest.param(Attempt("/conversation/c1/prompt", _json({"prompt": "hi", "system": GITHUB})), id="system"),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt", _json({"prompt": "hi", "attachments": [{"name": "a", "data": CANARY}]})
        ),
        id="an attachment",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _json(
                {
                    "prompt": "hi",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": CANARY}]}],
                }
            ),
        ),
        id="a message part",
    ),
    pytest.param(Attempt("/conversation/c1/prompt", _json({"prompt": "hi", CANARY: 1})), id="a key"),
    pytest.param(
        Attempt("/conversation/c1/prompt", _json({"prompt": "hi", "env": {"GEMINI_API_KEY": NAMED}})),
        id="a key named by the key of its member",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            b'{"prompt": "hi", "GEMINI_API_KEY": "\\u0041' + NAMED[1:].encode() + b'"}',
        ),
        id="a JSON-escaped key named by the key of its member",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _json({"prompt": "hi", "deep": _nested(30, CANARY)})),
        id="thirty levels deep",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", b'{"prompt":"hi","prompt":"' + CANARY.encode() + b'"}'),
        id="a repeated key, the last one wins",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", b'{"prompt":"hi","x":"\\u0041\\u004bIAIOSFODNN7EXAMPLE"}'),
        id="JSON escapes in another field",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", _json({"prompt": "card", "n": 4111111111111111, "k": CANARY})),
        id="beside a number",
    ),
    # 6. Compressed and chunked bodies.
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            gzip.compress(_prompt(CANARY)),
            headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
        ),
        id="gzip",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            zlib.compress(_json({"prompt": "hi", "context": CANARY})),
            headers=(("Content-Type", "application/json"), ("Content-Encoding", "Deflate")),
        ),
        id="deflate, the encoding in mixed case",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            gzip.compress(b'{"prompt":"hi",') + gzip.compress(b'"x":"' + CANARY.encode() + b'"}'),
            headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
        ),
        id="two gzip members",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            gzip.compress(gzip.compress(_prompt(CANARY))),
            headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip, gzip")),
        ),
        id="gzip twice",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            gzip.compress(_prompt(CANARY)),
            headers=(
                ("Content-Type", "application/json"),
                ("Content-Encoding", "identity"),
                ("Content-Encoding", "gzip"),
            ),
        ),
        id="two Content-Encoding headers",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            gzip.compress(_utf16(CANARY, "utf-16-le", b"\xff\xfe")),
            headers=(("Content-Type", "application/json; charset=utf-16le"), ("Content-Encoding", "gzip")),
        ),
        id="gzip of utf-16",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            gzip.compress(_prompt(CANARY + " " + "x" * 300_000)),
            headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
        ),
        id="gzip that inflates past the limit",
    ),
    pytest.param(Attempt("/conversation/c1/prompt", _prompt(CANARY), chunked=True), id="a chunked body"),
    # Malformed input: a clean refusal, never a 500.
    pytest.param(Attempt("/conversation/c1/prompt", b"[" * 100_000), id="a hundred thousand brackets"),
    pytest.param(
        Attempt("/conversation/c1/prompt", _json({"prompt": "hi", "deep": _nested(100, "x")})),
        id="a hundred levels of objects",
    ),
]


async def send(server: TestServer, attempt: Attempt, *, trickled: bool = False) -> tuple[int, bytes]:
    """``trickled``: the head and the first half of the body, then the rest 20 ms later, so
    that the gateway has the request before its body is all in (and reads it waiting)."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = f"{attempt.method} {attempt.target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in attempt.headers)
    if attempt.chunked:
        middle = len(attempt.body) // 2
        parts = [attempt.body[:middle], attempt.body[middle:]]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n"
    else:
        payload = attempt.body
        head += f"Content-Length: {len(payload)}\r\n\r\n"
    whole = head.encode("latin-1") + payload
    if trickled:
        cut = len(head) + len(payload) // 2
        writer.write(whole[:cut])
        await writer.drain()
        await asyncio.sleep(0.02)
        whole = whole[cut:]
    writer.write(whole)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def prompt_handler_bodies(express: ExpressBackend) -> list[str]:
    """What the backend's prompt handler parsed, as text, for every request it routed there."""
    return [
        json.dumps(record.get("body"), ensure_ascii=False)
        for record in express.received()
        if record["method"] == "POST" and (record.get("params") or {}).get("conversationId")
    ]


@pytest.fixture
async def gateway(aiohttp_server: Any, express: ExpressBackend) -> TestServer:
    public, _, _ = await start_gateway(aiohttp_server, express.url)
    return public


@pytest.mark.parametrize("trickled", [False, True], ids=["body all in", "body still arriving"])
@pytest.mark.parametrize("attempt", ATTACKS)
async def test_no_canary_reaches_the_backends_prompt_handler(
    gateway: TestServer, express: ExpressBackend, attempt: Attempt, trickled: bool
) -> None:
    """The canary never arrives in a body the backend parsed; the gateway refuses cleanly,
    whether the body is all in when the request is handled (read at once) or still arriving
    (read waiting)."""
    status, body = await send(gateway, attempt, trickled=trickled)
    for parsed in prompt_handler_bodies(express):
        assert CANARY not in parsed
        assert GITHUB not in parsed
        assert NAMED not in parsed
    assert status != 500
    if attempt.expect:
        assert status in attempt.expect
    if status >= 400 and not body.startswith(b"{"):
        # aiohttp's own parser refused it before the gateway saw it (a lower-case method, two
        # Content-Type headers): a plain-text 400 that nothing was forwarded after.
        assert status == 400
    elif status >= 400:
        answer = json.loads(body)
        assert answer["success"] is False
        assert answer["error_code"]
        assert CANARY.encode() not in body


CLEAN = "Summarise the été notes in three lines"
BACKSLASHES = "a path C:\\new\\table and 100% sure"
CLEAN_ROWS = [
    pytest.param(Attempt("/conversation/c1/prompt#frag", _prompt(CLEAN)), id="with a fragment"),
    pytest.param(Attempt("http://x/conversation/c1/prompt?q=1", _prompt(CLEAN)), id="in absolute form"),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            gzip.compress(_prompt(CLEAN)),
            headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
        ),
        id="gzip",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            zlib.compress(_prompt(CLEAN)),
            headers=(("Content-Type", "application/json"), ("Content-Encoding", "deflate")),
        ),
        id="deflate",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CLEAN, "utf-16-le", b"\xff\xfe"),
            headers=_ct("application/json; charset=utf-16le"),
        ),
        id="utf-16le",
    ),
    pytest.param(
        Attempt(
            "/conversation/c1/prompt",
            _utf16(CLEAN, "utf-32-be", b"\x00\x00\xfe\xff"),
            headers=_ct("application/json; charset=utf-32"),
        ),
        id="utf-32 big-endian",
    ),
    pytest.param(
        Attempt("/conversation/c1/prompt", b"\xef\xbb\xbf" + _prompt(CLEAN)),
        id="utf-8 with a byte order mark",
    ),
    pytest.param(Attempt("/conversation/c1/prompt", _prompt(CLEAN), chunked=True), id="chunked"),
    pytest.param(
        Attempt("/conversation/c1/prompt", _prompt(BACKSLASHES)),
        id="backslashes and a percent sign",
    ),
]


@pytest.mark.parametrize("attempt", CLEAN_ROWS)
async def test_a_clean_prompt_reaches_the_backend_as_the_client_meant_it(
    gateway: TestServer, express: ExpressBackend, attempt: Attempt
) -> None:
    """However it is spelled or encoded, a clean prompt is parsed by the backend to the same value."""
    status, _ = await send(gateway, attempt)
    assert status == 200
    records = [r for r in express.received() if r["method"] == "POST"]
    assert len(records) == 1
    assert records[0]["path"] == "/conversation/c1/prompt"
    assert records[0]["body"] == {"prompt": BACKSLASHES if b"table" in attempt.body else CLEAN}
    assert "content-encoding" not in {name.lower() for name in records[0]["headers"]}


async def test_the_messages_route_with_a_fragment_is_still_inspected(
    gateway: TestServer, express: ExpressBackend
) -> None:
    """GET /conversation/{id}/messages#x is the messages route: a secret in it is withheld."""
    express.answer(
        "messages",
        headers={"Content-Type": "application/json"},
        body=json.dumps({"success": True, "messages": [{"role": "assistant", "content": f"here: {CANARY}"}]}),
    )
    status, body = await send(gateway, Attempt("/conversation/c1/messages#x", b"", method="GET", headers=()))
    assert status in {200, 403}
    assert CANARY.encode() not in body


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        pytest.param("/other/path?x=1#frag", "/other/path?x=1", id="a fragment is dropped"),
        pytest.param("http://evil.example/other?x=1", "/other?x=1", id="an absolute form is reduced"),
        pytest.param("/conversation#x", "/conversation", id="the conversation list with a fragment"),
    ],
)
async def test_the_upstream_request_line_is_the_canonical_target(
    gateway: TestServer, express: ExpressBackend, target: str, forwarded: str
) -> None:
    """Passed-through requests reach the backend at the target the gateway routed on."""
    status, _ = await send(gateway, Attempt(target, b"", method="GET", headers=()))
    assert status != 500
    assert [record["originalUrl"] for record in express.received()] == [forwarded]


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("*", id="an asterisk"),
        pytest.param("conversation/c1/prompt", id="a relative path"),
        pytest.param("http://x@/conversation/c1/prompt", id="user info without a host"),
        pytest.param("HTTP://EVIL:99", id="an absolute form with no path"),
    ],
)
async def test_odd_request_targets_are_refused_cleanly(
    gateway: TestServer, express: ExpressBackend, target: str
) -> None:
    """A target that is no path is refused with a 400, never a 500, and nothing is forwarded."""
    status, _ = await send(gateway, Attempt(target, _prompt(CANARY)))
    assert status in {400, 403, 404}
    assert prompt_handler_bodies(express) == []
