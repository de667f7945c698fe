"""End to end: a client, the gateway and a recording upstream, all real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import target
from tests.proxy_fixtures import Upstream, start_gateway, start_upstream

KEY = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[Upstream, TestServer]:
    return await start_upstream(aiohttp_server)


@pytest.fixture
async def gateway(aiohttp_server: Any, upstream: tuple[Upstream, TestServer]) -> TestServer:
    public, _, _ = await start_gateway(aiohttp_server, str(upstream[1].make_url("/")))
    return public


@pytest.fixture
async def client() -> Any:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def _url(server: TestServer, path: str) -> str:
    return str(server.make_url(path))


async def raw_request(server: TestServer, request_line: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request line exactly as written (no client normalises it) and read the answer."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = f"{request_line}\r\nHost: gw\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


# The prompt route.


async def test_an_allowed_prompt_is_forwarded_byte_for_byte(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """The upstream receives the client's exact bytes, model and other fields included."""
    recorder, _ = upstream
    body = b'{ "prompt" : "Summarise \\u00e9t\\u00e9 notes",\n "model":"gpt-4o", "extra": [1,2] }'
    async with client.post(
        _url(gateway, "/conversation/c-1/prompt?trace=1"),
        data=body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer t0k"},
    ) as response:
        assert response.status == 200
        assert await response.json() == {"success": True, "message": "Prompt received"}
    # The caller's Authorization also let the gateway look up the conversation's workspace.
    assert [r.raw_path for r in recorder.received if r.method == "GET"] == ["/conversation?take=100&skip=0"]
    (seen,) = [r for r in recorder.received if r.method == "POST"]
    assert seen.raw_path == "/conversation/c-1/prompt?trace=1"
    assert seen.body == body
    assert seen.headers["Authorization"] == "Bearer t0k"


async def test_a_blocked_prompt_never_reaches_the_upstream(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """A block rule answers 403 POLICY_BLOCKED with the policies, and no matched text."""
    async with client.post(
        _url(gateway, "/conversation/c-1/prompt"), json={"prompt": f"my key {KEY} ok", "model": "m"}
    ) as response:
        raw = await response.read()
    assert response.status == 403
    assert upstream[0].received == []
    body = json.loads(raw)
    assert body == {
        "success": False,
        "message": "Prompt blocked by policy: AWS access key id",
        "error_code": "POLICY_BLOCKED",
        "violations": [
            {
                "policyId": "secrets.aws-access-key-id",
                "policyName": "AWS access key id",
                "severity": "high",
                "stage": "prompt",
            }
        ],
    }
    assert KEY.encode() not in raw
    assert b"AKIA" not in raw


async def test_an_alert_rule_lets_the_prompt_through(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """A prompt that only hits alert and log rules is forwarded."""
    async with client.post(
        _url(gateway, "/conversation/c-1/prompt"),
        json={"prompt": "card 4111 1111 1111 1111, mail a@b.io"},
    ) as response:
        assert response.status == 200
    assert len(upstream[0].received) == 1


@pytest.mark.parametrize(
    ("body", "status", "message", "code"),
    [
        pytest.param(
            b"not json", 400, "Request body must be JSON", "INVALID_REQUEST", id="a body that is not JSON"
        ),
        pytest.param(
            b'{"model": "m"}',
            400,
            "Request body must have a 'prompt' field",
            "INVALID_REQUEST",
            id="no prompt",
        ),
        pytest.param(
            b'{"prompt": 42}',
            400,
            "'prompt' must be a string",
            "INVALID_REQUEST",
            id="a prompt that is not text",
        ),
        pytest.param(
            b'["prompt"]', 400, "Request body must have a 'prompt' field", "INVALID_REQUEST", id="a JSON list"
        ),
        pytest.param(
            b'{"prompt": "' + b"x" * 2000 + b'"}',
            413,
            "Request body over 1024 bytes",
            "BODY_TOO_LARGE",
            id="too big",
        ),
    ],
)
async def test_malformed_prompts_get_the_backend_error_shape(
    aiohttp_server: Any,
    upstream: tuple[Upstream, TestServer],
    client: aiohttp.ClientSession,
    body: bytes,
    status: int,
    message: str,
    code: str,
) -> None:
    """Each malformed request gets {success: false, message, error_code}; the upstream is not called."""
    gateway, _, _ = await start_gateway(aiohttp_server, str(upstream[1].make_url("/")), body_limit=1024)
    async with client.post(_url(gateway, "/conversation/c/prompt"), data=body) as response:
        assert response.status == status
        assert await response.json() == {"success": False, "message": message, "error_code": code}
    assert upstream[0].received == []


async def test_an_oversized_chunked_prompt_is_refused_while_streaming(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """Without a Content-Length, the body is refused once it grows past the limit."""
    gateway, _, _ = await start_gateway(aiohttp_server, str(upstream[1].make_url("/")), body_limit=1024)

    async def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 512

    async with client.post(_url(gateway, "/conversation/c/prompt"), data=chunks()) as response:
        assert response.status == 413
        assert (await response.json())["success"] is False
    assert upstream[0].received == []


@pytest.mark.parametrize("size", [1024, 1025, 4096])
async def test_a_chunked_prompt_that_arrives_whole_is_held_to_the_limit(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], size: int
) -> None:
    """A body without a Content-Length that is all in when its request is handled (read without
    waiting) is held to the same limit as one that streams in: at the limit it is read, past
    it refused with 413, and the upstream never sees it."""
    gateway, _, _ = await start_gateway(aiohttp_server, str(upstream[1].make_url("/")), body_limit=1024)
    prefix = b'{"prompt": "'
    body = prefix + b"x" * (size - len(prefix) - 2) + b'"}'
    assert len(body) == size
    head = b"POST /conversation/c/prompt HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:700], body[700:]))
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(head + chunked + b"0\r\n\r\n")  # one write: the whole body comes with its head
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    if size <= 1024:
        assert status == 200
        assert upstream[0].received[-1].body == body
    else:
        assert status == 413
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["success"] is False
        assert upstream[0].received == []


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/conversation/a%2Fb/prompt", id="an encoded slash in the id"),
        pytest.param("/conversation/a%5cb/prompt", id="an encoded backslash in the id"),
        pytest.param("/conversation/x/../c-1/prompt", id="a dot-dot segment"),
        pytest.param("/conversation/%2e%2e/prompt", id="an encoded dot-dot id"),
        pytest.param("/conversation//c-1/prompt", id="a doubled slash"),
        pytest.param("/conversation/a%0ab/prompt", id="a control character in the id"),
        pytest.param("/conversation/./c-1/prompt", id="a dot segment"),
    ],
)
async def test_disguised_prompt_paths_are_refused(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], path: str
) -> None:
    """A path the backend might resolve to the prompt route, spelled oddly, gets a 400."""
    status, body = await raw_request(gateway, f"POST {path} HTTP/1.1", b'{"prompt": "hi"}')
    assert status == 400
    assert json.loads(body) == {
        "success": False,
        "message": "Invalid conversation id",
        "error_code": "INVALID_REQUEST",
    }
    assert upstream[0].received == []


async def test_case_and_trailing_slash_variants_are_still_inspected(
    gateway: TestServer, upstream: tuple[Upstream, TestServer]
) -> None:
    """/Conversation/x/PROMPT/ is the prompt route to a case-insensitive backend: inspected."""
    body = json.dumps({"prompt": f"key {KEY}"}).encode()
    status, answer = await raw_request(gateway, "POST /Conversation/c-1/PROMPT/ HTTP/1.1", body)
    assert status == 403
    assert json.loads(answer)["error_code"] == "POLICY_BLOCKED"
    assert upstream[0].received == []


# The answer to a prompt.


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"success": True, "message": f"here: {KEY}"}, id="in message"),
        pytest.param({"choices": [{"message": {"content": f"x {KEY}"}}]}, id="in choices content"),
        pytest.param({"success": True, "content": f"{KEY}"}, id="in content"),
    ],
)
async def test_a_response_that_hits_a_block_rule_is_replaced(
    gateway: TestServer,
    upstream: tuple[Upstream, TestServer],
    client: aiohttp.ClientSession,
    answer: dict[str, Any],
) -> None:
    """The client gets 403 RESPONSE_BLOCKED instead of the upstream's body."""

    async def leak(_: web.Request) -> web.StreamResponse:
        return web.json_response(answer)

    upstream[0].handler = leak
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"}) as response:
        raw = await response.read()
    assert response.status == 403
    body = json.loads(raw)
    assert body["error_code"] == "RESPONSE_BLOCKED"
    assert body["violations"][0]["stage"] == "response"
    assert b"AKIA" not in raw


async def test_a_clean_response_is_returned_unchanged(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """The upstream's status, headers and bytes reach the client as they were."""
    payload = b'{"success":true,  "message":"fine", "tokensIn":"12"}'

    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(
            status=201, body=payload, content_type="application/json", headers={"X-Trace": "t1"}
        )

    upstream[0].handler = answer
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"}) as response:
        assert response.status == 201
        assert response.headers["X-Trace"] == "t1"
        assert await response.read() == payload


@pytest.mark.parametrize("status", [400, 404, 500, 503])
async def test_upstream_errors_pass_through_unchanged(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession, status: int
) -> None:
    """An upstream 4xx or 5xx answer reaches the client as it was."""

    async def fail(_: web.Request) -> web.StreamResponse:
        return web.json_response({"success": False, "message": f"upstream says {status}"}, status=status)

    upstream[0].handler = fail
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"}) as response:
        assert response.status == status
        assert await response.json() == {"success": False, "message": f"upstream says {status}"}


# Streaming answers.


def _sse(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n".encode()


async def _stream_answer(upstream: Upstream, events: list[bytes], *, pause: float = 0.0) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            await asyncio.sleep(pause)
        await response.write_eof()
        return response

    upstream.handler = stream


async def test_a_secret_split_across_two_events_never_reaches_the_client(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """The stream ends with an error event and no part of the key is ever sent."""
    events = [_sse("Here is the key: "), _sse(KEY[:9]), _sse(KEY[9:]), _sse(" done"), b"data: [DONE]\n\n"]
    await _stream_answer(upstream[0], events, pause=0.01)
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"}) as response:
        assert response.status == 200
        received = await response.read()
    assert b"AKIA" not in received
    assert KEY[9:].encode() not in received
    last = received.strip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    error = json.loads(last.split(b"data: ", 1)[1])
    assert error["error_code"] == "RESPONSE_BLOCKED"
    assert error["violations"][0]["policyId"] == "secrets.aws-access-key-id"


async def test_a_clean_stream_is_forwarded_event_for_event(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """Every event of a clean stream reaches the client, in order, byte for byte."""
    events = [_sse(f"word{i} ") for i in range(200)] + [b": keep-alive\n\n", b"data: [DONE]\n\n"]
    await _stream_answer(upstream[0], events)
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"}) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert await response.read() == b"".join(events)


async def test_stream_events_are_released_before_the_stream_ends(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """Once enough text follows an event, the client has it while the upstream still streams."""
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse("first "))
        await response.write(_sse("y" * 600))
        await release.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    upstream[0].handler = stream
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"}) as response:
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=5)
        assert first == _sse("first ")
        release.set()
        await response.read()


# The messages route.


async def test_assistant_messages_that_hit_a_block_rule_are_withheld(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """The hit message is replaced by a notice; the other messages are untouched."""
    messages = [
        {"id": "1", "role": "user", "content": "what is the key?", "createdAt": "t1"},
        {"id": "2", "role": "assistant", "content": f"It is {KEY}", "model": "m", "createdAt": "t2"},
        {"id": "3", "role": "assistant", "content": "Anything else?", "createdAt": "t3"},
    ]

    async def listing(_: web.Request) -> web.StreamResponse:
        return web.json_response({"success": True, "messages": messages, "title": "T"})

    upstream[0].handler = listing
    async with client.get(_url(gateway, "/conversation/c-9/messages")) as response:
        raw = await response.read()
    assert response.status == 200
    assert b"AKIA" not in raw
    body = json.loads(raw)
    assert body["title"] == "T"
    assert body["messages"][0] == messages[0]
    assert body["messages"][2] == messages[2]
    withheld = body["messages"][1]
    assert withheld["policyWithheld"] is True
    assert withheld["content"] == "[This message was withheld by policy: AWS access key id]"
    # A withheld message keeps only its id, role and time, where no block matched them.
    assert {k: v for k, v in withheld.items() if k not in {"content", "policyWithheld"}} == {
        "id": "2",
        "role": "assistant",
        "createdAt": "t2",
    }
    assert upstream[0].received[0].raw_path == "/conversation/c-9/messages"


async def test_a_clean_messages_list_is_returned_byte_for_byte(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    payload = b'{"success": true, "messages": [{"role": "assistant", "content": "hello"}]}'

    async def listing(_: web.Request) -> web.StreamResponse:
        return web.Response(body=payload, content_type="application/json")

    upstream[0].handler = listing
    async with client.get(_url(gateway, "/conversation/c/messages")) as response:
        assert await response.read() == payload


# Pass-through.


async def test_other_routes_pass_through_with_query_and_headers(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """Method, raw path and query, body and end-to-end headers arrive; hop-by-hop ones do not."""

    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(
            status=202, body=b"listing", headers={"X-Upstream": "yes", "Keep-Alive": "timeout=5"}
        )

    upstream[0].handler = answer
    async with client.put(
        _url(gateway, "/conversation?take=10&skip=0&q=a%20b"),
        data=b"payload-bytes",
        headers={
            "Authorization": "Bearer abc",
            "X-Custom": "1",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "must not pass",
            "X-Forwarded-For": "10.0.0.1",
        },
    ) as response:
        assert response.status == 202
        assert response.headers["X-Upstream"] == "yes"
        assert "Keep-Alive" not in response.headers
        assert await response.read() == b"listing"
    (seen,) = upstream[0].received
    assert (seen.method, seen.raw_path, seen.body) == (
        "PUT",
        "/conversation?take=10&skip=0&q=a%20b",
        b"payload-bytes",
    )
    assert seen.headers["Authorization"] == "Bearer abc"
    assert seen.headers["X-Custom"] == "1"
    assert "X-Hop" not in seen.headers
    assert seen.headers["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["X-Forwarded-Host"] == f"{gateway.host}:{gateway.port}"
    upstream_server = upstream[1]
    assert seen.headers["Host"] == f"{upstream_server.host}:{upstream_server.port}"


async def test_a_large_upload_passes_through_intact(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """A body far over the prompt limit streams through a pass-through route unchanged."""
    body = bytes(range(256)) * (20 * 4096)
    async with client.post(_url(gateway, "/repo/r1/files"), data=body) as response:
        assert response.status == 200
    assert upstream[0].received[0].body == body


async def test_the_public_port_does_not_serve_admin_endpoints(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """/healthz and /readyz on the public port go to the upstream; the admin port serves them."""
    public, admin, state = await start_gateway(aiohttp_server, str(upstream[1].make_url("/")))
    for path in ("/healthz", "/readyz"):
        async with client.get(_url(public, path)) as response:
            assert await response.json() == {"success": True, "message": "Prompt received"}
    assert [r.raw_path for r in upstream[0].received] == ["/healthz", "/readyz"]
    async with client.get(_url(admin, "/readyz")) as response:
        assert await response.json() == {
            "ready": True,
            "revision": state.ruleset.revision,
            "rules": len(state.ruleset.rules),
        }
    async with client.get(_url(admin, "/healthz")) as response:
        assert response.status == 200


# Upstream failures.


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("path", ["/conversation/c/prompt", "/conversation"])
async def test_an_unreachable_upstream_gives_502(
    aiohttp_server: Any, client: aiohttp.ClientSession, path: str
) -> None:
    gateway, _, _ = await start_gateway(aiohttp_server, f"http://127.0.0.1:{_closed_port()}")
    async with client.post(_url(gateway, path), json={"prompt": "hi"}) as response:
        assert response.status == 502
        assert await response.json() == {
            "success": False,
            "message": "Upstream unreachable",
            "error_code": "UPSTREAM_UNREACHABLE",
        }


@pytest.mark.parametrize("path", ["/conversation/c/prompt", "/conversation"])
async def test_a_slow_upstream_gives_504(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession, path: str
) -> None:
    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response({})

    upstream[0].handler = slow
    gateway, _, _ = await start_gateway(aiohttp_server, str(upstream[1].make_url("/")), read_timeout=0.2)
    async with client.post(_url(gateway, path), json={"prompt": "hi"}) as response:
        assert response.status == 504
        assert await response.json() == {
            "success": False,
            "message": "Upstream timed out",
            "error_code": "UPSTREAM_TIMEOUT",
        }


async def test_a_client_that_disconnects_cancels_the_upstream_call(
    gateway: TestServer, upstream: tuple[Upstream, TestServer]
) -> None:
    """When the client goes away mid-request, the upstream's handler is cancelled too."""

    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.json_response({})

    upstream[0].handler = slow
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as impatient:
        with pytest.raises(TimeoutError):
            await impatient.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"})
    await asyncio.wait_for(upstream[0].cancelled.wait(), timeout=5)


async def test_an_engine_failure_refuses_the_prompt(
    gateway: TestServer,
    upstream: tuple[Upstream, TestServer],
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not evaluated is not passed: an engine error fails closed, and its text is not logged."""

    def broken(*_: object) -> None:
        raise RuntimeError(f"boom near {KEY}")

    monkeypatch.setattr("gateway.answers.evaluate", broken)
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": KEY}) as response:
        assert response.status == 403
        body = await response.json()
    assert body["error_code"] == "POLICY_EVALUATION_FAILED"
    assert upstream[0].received == []
    assert "policy evaluation failed at stage prompt: RuntimeError" in caplog.text
    assert KEY not in caplog.text


async def test_a_stream_event_too_large_to_inspect_ends_the_stream(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """An event over the response limit is not forwarded: the stream ends with an error event."""
    gateway, _, _ = await start_gateway(aiohttp_server, str(upstream[1].make_url("/")), response_limit=4096)
    await _stream_answer(upstream[0], [_sse("small "), b"data: " + b"z" * 10_000 + b"\n\n"])
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"}) as response:
        received = await response.read()
    assert b"z" * 100 not in received
    assert received.endswith(b"\n\n")
    error = json.loads(received.split(b"event: error\ndata: ")[-1])
    assert error["error_code"] == "ANSWER_NOT_INSPECTABLE"


async def test_a_chunked_text_answer_is_guarded_like_a_stream(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """A chunked text/plain answer with a key split across chunks never shows the key."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in ("The key is ", KEY[:6], KEY[6:], " and more."):
            await response.write(part.encode())
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    upstream[0].handler = stream
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"}) as response:
        received = await response.read()
    assert b"AKIA" not in received
    # The words before the key may leave before it does (the hold-back holds only what may be a key).
    text, _, error = received.rpartition(b"\n")
    assert b"The key is ".startswith(text)
    assert json.loads(error)["error_code"] == "RESPONSE_BLOCKED"


async def test_an_engine_failure_mid_stream_ends_the_stream(
    gateway: TestServer,
    upstream: tuple[Upstream, TestServer],
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream the engine cannot evaluate stops at once with an error event, failing closed."""

    def broken(*_: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("gateway.answers.StreamGuard.feed", broken)
    await _stream_answer(upstream[0], [_sse("first words "), _sse("more words")])
    async with client.post(_url(gateway, "/conversation/c/prompt"), json={"prompt": "hi"}) as response:
        received = await response.read()
    assert received.startswith(b"event: error\ndata: ")
    assert b"words" not in received
    assert json.loads(received.split(b"data: ", 1)[1])["error_code"] == "POLICY_EVALUATION_FAILED"


def test_route_memo_keeps_only_short_paths() -> None:
    """Paths are classified the same whether remembered or not; long ones are not remembered."""
    long_id = "c" * (target._MEMO_PATH + 10)
    before = target._classify.cache_info().currsize
    found = target.classify("POST", f"/conversation/{long_id}/prompt")
    assert isinstance(found, target.Target)
    assert (found.route, found.conversation_id) == ("prompt", long_id)
    assert target._classify.cache_info().currsize == before
    disguised = target.classify("POST", f"/conversation/{long_id}%2F..%2Fx/prompt")
    assert isinstance(disguised, target.Refusal)
    assert disguised.status == 400
    short = target.classify("POST", "/conversation/short-1/prompt")
    assert isinstance(short, target.Target)
    assert (short.route, short.conversation_id) == ("prompt", "short-1")
    assert target._classify.cache_info().currsize == before + 1
    other = target.classify("GET", "/conversation/short-1/prompt")
    assert isinstance(other, target.Target)
    assert other.route == "passthrough"


# The public port's own request handler (gateway.routes.public_handler), in place of the router.


async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    gateway: TestServer, upstream: tuple[Upstream, TestServer]
) -> None:
    """A client that waits for ``100 Continue`` (curl does, over 1 KB) gets it, then its prompt
    is inspected like any other: a clean one is forwarded, a key in one is blocked."""
    for prompt, status in (("a clean prompt " * 100, 200), (f"my key {KEY} " * 100, 403)):
        body = json.dumps({"prompt": prompt}).encode()
        reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
        head = (
            "POST /conversation/c-1/prompt HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert int(answer.split(b" ", 2)[1]) == status
        assert KEY.encode() not in answer
    assert [json.loads(r.body)["prompt"] for r in upstream[0].received] == ["a clean prompt " * 100]


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        ("OPTIONS * HTTP/1.1", 400),
        ("POST conversation/c-1/prompt HTTP/1.1", 400),
        (f"GET /{'a' * 300} HTTP/1.1", 200),
    ],
)
async def test_every_request_target_reaches_the_gateways_own_reading(
    gateway: TestServer, upstream: tuple[Upstream, TestServer], request_line: str, status: int
) -> None:
    """No target is left to a router: each is read by ``target.classify`` (refused in the
    backend's error shape, or forwarded as read)."""
    got, body = await raw_request(gateway, request_line, b"")
    assert got == status
    if status == 400:
        assert json.loads(body)["success"] is False
        assert upstream[0].received == []
