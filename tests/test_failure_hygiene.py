"""Clean failures: an upstream that breaks off, a slow or surplus client, a client that leaves.

A 5xx in the metrics means the gateway or the backend failed, and nothing else does; none of
these failures leaves an error-level line or a traceback in the log.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.audit import configure_logging
from gateway.state import GatewayState
from gateway.usage.store import Period
from tests.gateway_process import ServedProcess, served_processes
from tests.proxy_fixtures import Upstream, start_gateway, start_upstream

BROKE_OFF = {"success": False, "message": "Upstream broke off its answer", "error_code": "UPSTREAM_ERROR"}


# What the tests read: the log, the request counts, the upstream error counts.


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Every line the gateway and its libraries log, as the process would write it."""
    stream = io.StringIO()
    configure_logging("json", stream)
    yield stream
    logging.getLogger().handlers.clear()


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


def assert_no_error_lines(stream: io.StringIO) -> None:
    text = stream.getvalue()
    assert "Traceback" not in text
    errors = [line for line in log_lines(stream) if line.get("level") in {"error", "critical", "exception"}]
    assert errors == []


def requests_counted(state: GatewayState) -> dict[tuple[str, str], float]:
    """``requests_total`` by (route, status), the series that were counted."""
    metrics = state.observer.metrics
    metrics.flush()
    return {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in metrics.registry.collect()
        if family.name == "policy_gateway_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.value
    }


def upstream_errors(state: GatewayState) -> dict[str, float]:
    metrics = state.observer.metrics
    return {
        sample.labels["kind"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "policy_gateway_upstream_errors"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.value
    }


async def settled(state: GatewayState, count: int = 1) -> dict[tuple[str, str], float]:
    """The request counts once ``count`` requests are recorded (bookkeeping follows the answer)."""
    for _ in range(500):
        counted = requests_counted(state)
        if sum(counted.values()) >= count:
            return counted
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} requests recorded: {requests_counted(state)}")


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[Upstream, TestServer]:
    return await start_upstream(aiohttp_server)


async def gateway_for(
    aiohttp_server: Any, upstream: TestServer, **overrides: Any
) -> tuple[TestServer, GatewayState]:
    public, _, state = await start_gateway(aiohttp_server, str(upstream.make_url("/")), **overrides)
    return public, state


def breaking_off(
    content_type: str, head: bytes, length: int | None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream that sends its status, headers and ``head``, then closes the connection:
    a ``Content-Length`` it does not reach, or (``None``) a chunked body with no last chunk."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        await response.write(head)
        assert request.transport is not None
        request.transport.close()
        return response

    return handler


def _sse(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n".encode()


# An upstream that breaks off.


@dataclass(frozen=True)
class Whole:
    """A route whose answer the gateway reads whole before the client has a byte of it."""

    route: str
    method: str
    path: str
    head: bytes
    length: int | None


WHOLE_ANSWERS = [
    pytest.param(
        Whole("prompt", "POST", "/conversation/c1/prompt", b'{"success": true, "message": "half an an', 400),
        id="a prompt's JSON answer shorter than its Content-Length gives 502",
    ),
    pytest.param(
        Whole("prompt", "POST", "/conversation/c1/prompt", b'{"success": true, "message": "half an an', None),
        id="a prompt's chunked JSON answer without its last chunk gives 502",
    ),
    pytest.param(
        Whole("messages", "GET", "/conversation/c1/messages", b'{"success": true, "messages": [{"id"', 400),
        id="a messages list shorter than its Content-Length gives 502",
    ),
    pytest.param(
        Whole("messages", "GET", "/conversation/c1/messages", b'{"success": true, "messages": [{"id"', None),
        id="a chunked messages list without its last chunk gives 502",
    ),
]


@pytest.mark.parametrize("case", WHOLE_ANSWERS)
async def test_an_answer_broken_off_before_the_client_had_any_of_it_is_a_502(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], log_stream: io.StringIO, case: Whole
) -> None:
    """The client gets the backend's error shape with UPSTREAM_ERROR; metrics say 502, not 500."""
    upstream[0].handler = breaking_off("application/json", case.head, case.length)
    gateway, state = await gateway_for(aiohttp_server, upstream[1])
    async with aiohttp.ClientSession() as client:
        body = {"json": {"prompt": "hello"}} if case.method == "POST" else {}
        async with client.request(case.method, gateway.make_url(case.path), **body) as response:
            assert response.status == 502
            assert await response.json() == BROKE_OFF
    assert await settled(state) == {(case.route, "502"): 1}
    assert upstream_errors(state) == {"interrupted": 1}
    (completed,) = [line for line in log_lines(log_stream) if line["event"] == "request.completed"]
    assert completed["status"] == 502
    assert_no_error_lines(log_stream)


async def test_an_answer_that_stalls_midway_is_a_504(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], log_stream: io.StringIO
) -> None:
    """Past read_timeout with the answer half sent: 504 UPSTREAM_TIMEOUT, as before any byte."""

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 400
        await response.prepare(request)
        await response.write(b'{"success": true, "mess')
        await asyncio.sleep(30)
        return response

    upstream[0].handler = stalls
    gateway, state = await gateway_for(aiohttp_server, upstream[1], read_timeout=0.2)
    async with (
        aiohttp.ClientSession() as client,
        client.post(gateway.make_url("/conversation/c1/prompt"), json={"prompt": "hi"}) as response,
    ):
        assert response.status == 504
        assert (await response.json())["error_code"] == "UPSTREAM_TIMEOUT"
    assert await settled(state) == {("prompt", "504"): 1}
    assert upstream_errors(state) == {"timeout": 1}
    assert_no_error_lines(log_stream)


STREAMS = [
    pytest.param(
        "text/event-stream",
        _sse("The first half ") + _sse("of the answer"),
        b"event: error\ndata: " + json.dumps(BROKE_OFF, separators=(",", ":")).encode() + b"\n\n",
        id="an event stream ends with an error event",
    ),
    pytest.param(
        "text/plain",
        b"The first half of the answer",
        b"\n" + json.dumps(BROKE_OFF, separators=(",", ":")).encode(),
        id="a text stream ends with the error body",
    ),
]


@pytest.mark.parametrize(("content_type", "sent", "ending"), STREAMS)
async def test_a_stream_broken_off_after_its_headers_ends_cleanly_and_counts_as_a_502(
    aiohttp_server: Any,
    upstream: tuple[Upstream, TestServer],
    log_stream: io.StringIO,
    content_type: str,
    sent: bytes,
    ending: bytes,
) -> None:
    """What was inspected reaches the client, then an error it can read, then a proper end."""
    upstream[0].handler = breaking_off(content_type, sent, None)
    gateway, state = await gateway_for(aiohttp_server, upstream[1])
    async with (
        aiohttp.ClientSession() as client,
        client.post(gateway.make_url("/conversation/c1/prompt"), json={"prompt": "hi"}) as response,
    ):
        assert response.status == 200
        body = await response.read()  # no ClientPayloadError: the stream was ended, not cut
    assert body == sent + ending
    assert await settled(state) == {("prompt", "502"): 1}
    assert upstream_errors(state) == {"interrupted": 1}
    assert_no_error_lines(log_stream)


@pytest.mark.parametrize(
    "length",
    [pytest.param(1000, id="with a Content-Length"), pytest.param(None, id="chunked")],
)
async def test_a_passed_through_answer_broken_off_stays_unfinished_and_counts_as_a_502(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], log_stream: io.StringIO, length: int | None
) -> None:
    """Opaque bytes cannot carry an error: the client sees the answer end unfinished, as the
    upstream left it (never a clean end that would pass for the whole), and metrics say 502."""
    upstream[0].handler = breaking_off("application/octet-stream", b"x" * 100, length)
    gateway, state = await gateway_for(aiohttp_server, upstream[1])
    async with (
        aiohttp.ClientSession() as client,
        client.get(gateway.make_url("/files/report.bin")) as response,
    ):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert await settled(state) == {("passthrough", "502"): 1}
    assert upstream_errors(state) == {"interrupted": 1}
    assert_no_error_lines(log_stream)


# A client that goes away.


async def _send_and_leave(gateway: TestServer, request: bytes, until: Callable[[], Awaitable[None]]) -> None:
    """Send ``request`` on a socket of its own, wait for ``until``, then drop the connection."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(request)
    await writer.drain()
    await until()
    writer.transport.abort()
    del reader


def _prompt_request(text: str, workspace: str = "ws-gone") -> bytes:
    body = json.dumps({"prompt": text}).encode()
    head = (
        "POST /conversation/c1/prompt HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"X-Workspace-Id: {workspace}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def test_a_client_that_leaves_while_the_upstream_thinks_is_a_499(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], log_stream: io.StringIO
) -> None:
    """Recorded with status 499 in request.completed (info) and requests_total; no 500, no error."""
    recorder = upstream[0]

    async def thinks(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.json_response({"success": True, "message": "too late"})

    recorder.handler = thinks

    async def upstream_has_it() -> None:
        while not recorder.received:
            await asyncio.sleep(0.01)

    gateway, state = await gateway_for(aiohttp_server, upstream[1], workspace_header="X-Workspace-Id")
    await _send_and_leave(gateway, _prompt_request("hello"), upstream_has_it)
    await asyncio.wait_for(recorder.cancelled.wait(), timeout=10)
    assert await settled(state) == {("prompt", "499"): 1}
    (completed,) = [line for line in log_lines(log_stream) if line["event"] == "request.completed"]
    assert (completed["status"], completed["level"]) == (499, "info")
    assert upstream_errors(state) == {}
    assert_no_error_lines(log_stream)


async def test_a_client_that_leaves_mid_stream_is_a_499_and_its_usage_still_counts(
    aiohttp_server: Any, upstream: tuple[Upstream, TestServer], log_stream: io.StringIO
) -> None:
    """The backend served part of the answer: the exchange is counted although no one read it all."""
    recorder = upstream[0]
    words = "word " * 100  # longer than the hold-back: the first event is released at once

    async def streams(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse(words) + _sse(words))
        await asyncio.sleep(30)
        return response

    recorder.handler = streams
    gateway, state = await gateway_for(aiohttp_server, upstream[1], workspace_header="X-Workspace-Id")
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(_prompt_request("tell me"))
    await writer.drain()
    seen = b""
    while b"word" not in seen:
        chunk = await reader.read(65536)
        assert chunk, "the gateway closed the stream"
        seen += chunk
    writer.transport.abort()
    await asyncio.wait_for(recorder.cancelled.wait(), timeout=10)
    assert await settled(state) == {("prompt", "499"): 1}
    await state.accountant.drain()
    totals = await state.store.totals("ws-gone", Period.DAY, datetime.now(UTC))
    assert totals.requests == 1
    assert totals.response_tokens > 0
    assert_no_error_lines(log_stream)


async def test_a_write_to_a_client_gone_is_a_499_without_a_traceback(
    aiohttp_server: Any,
    upstream: tuple[Upstream, TestServer],
    log_stream: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ "Cannot write to closing transport" is the client leaving, not the gateway failing."""

    async def writes_too_late(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        assert request.transport is not None
        request.transport.close()  # as when the client's socket fails under a write
        await response.write(b"too late")
        return response

    monkeypatch.setattr("gateway.routes._routed", lambda request, *_: writes_too_late(request))
    gateway, state = await gateway_for(aiohttp_server, upstream[1])
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientError):
            async with client.get(gateway.make_url("/anything")) as response:
                await response.read()
    assert await settled(state) == {("passthrough", "499"): 1}
    assert_no_error_lines(log_stream)


# Slow and surplus clients, against `gateway serve` as a process.


class Served(ServedProcess):
    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def metric(self, line_start: str) -> float:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.admin}/metrics") as response,
        ):
            text = await response.text()
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
        return sum(values)


@pytest.fixture
async def serve(
    upstream: tuple[Upstream, TestServer], tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    upstream_url = str(upstream[1].make_url("/"))
    async with served_processes(Served, upstream_url, tmp_path, gently=True) as start:
        yield start


GET = b"GET /files/a HTTP/1.1\r\nHost: gw\r\n\r\n"


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP answer with a Content-Length: its status and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def closed_without_answer(reader: asyncio.StreamReader) -> bool:
    # Bounded only so that a failure ends: the gateway is meant to close well before.
    return await asyncio.wait_for(reader.read(), timeout=20) == b""


async def test_a_request_head_not_complete_within_header_timeout_is_dropped(serve: Any) -> None:
    """Nothing, half a head, or half the next head on a kept-alive connection (after a request
    with or without a body): each is closed after header_timeout and counted; a slow body after
    a complete head is not cut."""
    gateway = await serve("--header-timeout", "0.5")
    silent = await gateway.connect()
    half = await gateway.connect()
    half[1].write(b"POST /conversation/c1/prompt HTTP/1.1\r\nHost: gw\r\nContent-Ty")
    kept = await gateway.connect()
    kept[1].write(GET)
    assert (await read_answer(kept[0]))[0] == 200
    kept[1].write(b"GET /files/b HTTP/1.1\r\nHo")
    slow_body = await gateway.connect()
    body = json.dumps({"prompt": "hello"}).encode()
    slow_body[1].write(
        b"POST /conversation/c1/prompt HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:5]
    )
    for reader, _ in (silent, half, kept):
        assert await closed_without_answer(reader)
    slow_body[1].write(body[5:])
    assert (await read_answer(slow_body[0]))[0] == 200
    slow_body[1].write(b"POST /conversation/c1/prompt HTTP/1.1\r\n")  # after a body, half a head
    assert await closed_without_answer(slow_body[0])
    assert await gateway.metric('policy_gateway_connections_refused_total{reason="header_timeout"}') == 4
    for _, writer in (silent, half, kept, slow_body):
        writer.close()


async def test_the_connection_over_max_connections_is_refused_with_503(serve: Any) -> None:
    """The (cap+1)th open connection gets 503 in the backend's error shape and is closed; once
    one closes, a new connection is served again."""
    gateway = await serve("--max-connections", "2")
    held = [await gateway.connect(), await gateway.connect()]
    for reader, writer in held:
        writer.write(GET)
        assert (await read_answer(reader))[0] == 200
    surplus = await gateway.connect()
    surplus[1].write(GET)
    status, body = await read_answer(surplus[0])
    assert status == 503
    assert json.loads(body)["error_code"] == "TOO_MANY_CONNECTIONS"
    assert await closed_without_answer(surplus[0])
    assert await gateway.metric('policy_gateway_connections_refused_total{reason="max_connections"}') == 1
    held[0][1].close()
    for _ in range(100):
        reader, writer = await gateway.connect()
        writer.write(GET)
        status, _ = await read_answer(reader)
        writer.close()
        if status == 200:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no connection was served after one of the two closed")
    held[1][1].close()
