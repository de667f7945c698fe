"""Forwarding to the upstream: headers, URLs, pass-through streaming and upstream failures."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.audit import INFO
from gateway.config import Settings
from gateway.flashback import UPSTREAM_TIMEOUT, UPSTREAM_UNREACHABLE, error_body
from gateway.request_body import InspectedRequest
from gateway.state import STATE, GatewayState
from gateway.target import TARGET

log = logging.getLogger("gateway.proxy")

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
CHUNK = 64 << 10
# What a call to the upstream, or a read of its answer, raises when the upstream fails: refused
# connections, a connection closed before or during the answer (ServerDisconnectedError,
# ClientPayloadError for a body short of its Content-Length or its last chunk), timeouts. A
# failed write to the gateway's own client is an aiohttp.ClientError too
# (ClientConnectionResetError): only code that reads the upstream catches these.
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)
# The error code of an answer the upstream began and broke off.
UPSTREAM_ERROR = "UPSTREAM_ERROR"


# The fixed part of what each direction drops, built once rather than on every request.
_TO_UPSTREAM = HOP_BY_HOP | {"host"}
_TO_UPSTREAM_INSPECTED = _TO_UPSTREAM | {"content-length", "accept-encoding"}
_BACK_WITHOUT_LENGTH = HOP_BY_HOP | {"content-length"}


def _dropped(headers: CIMultiDictProxy[str], fixed: frozenset[str] = HOP_BY_HOP) -> frozenset[str]:
    """``fixed``, and whatever the message's ``Connection`` header names as hop-by-hop."""
    listed = headers.getall("Connection", ())
    if not listed:
        return fixed
    return fixed | {token.strip().lower() for value in listed for token in value.split(",")}


@functools.lru_cache(maxsize=8)
def _upstream(upstream: str) -> tuple[str, str]:
    """The upstream's base URL and its Host header, worked out once, not on every request."""
    target = URL(upstream)
    host = target.raw_host or ""
    return str(target).rstrip("/"), host if target.is_default_port() else f"{host}:{target.port}"


def upstream_url(request: web.Request, upstream: str) -> URL:
    """The upstream base and the request's canonical target (path and query, no fragment).

    Nothing is re-encoded on the way: the backend routes on the same characters the gateway did.
    """
    return _upstream_url(upstream, request[TARGET].forward)  # TARGET: set by dispatch


@functools.lru_cache(maxsize=1024)
def _upstream_url(upstream: str, forward: str) -> URL:
    # The same few targets on every request; a URL is immutable, and costs microseconds to build.
    return URL(_upstream(upstream)[0] + forward, encoded=True)


def upstream_headers(
    request: web.Request,
    upstream: str,
    *,
    inspect: bool = False,
    body: InspectedRequest | None = None,
    settings: Settings | None = None,
) -> CIMultiDict[str]:
    source = request.headers
    if settings is None:
        settings = request.app[STATE].settings
    # What is dropped (hop-by-hop, what the Connection header names, and every header the
    # gateway sets itself, so that no client copy of one passes), then what it sets: the
    # headers are built in one pass and one construction, not copied and edited.
    fixed = _replaced(inspect, body is not None, settings.origin_header)
    dropped = _dropped(source, fixed)
    headers = [(name, value) for name, value in source.items() if name.lower() not in dropped]
    if body is not None:
        # SECURITY: the body goes as it was inspected: decoded, and labelled as it was read.
        content_type = body.content_type or source.get("Content-Type")
        if content_type is not None:
            headers.append(("Content-Type", content_type))
    peer = request.remote or "unknown"
    prior = source.get("X-Forwarded-For")
    headers += (
        ("X-Forwarded-For", f"{prior}, {peer}" if prior else peer),
        ("X-Forwarded-Proto", request.scheme),
        ("X-Forwarded-Host", request.host),
        ("Host", _upstream(upstream)[1]),
    )
    # SECURITY: the origin header tells the backend a request came through the gateway; a
    # client's copy never passes (dropped above), and every forwarded request carries the
    # gateway's own.
    if settings.origin_secret is not None:
        headers.append((settings.origin_header, settings.origin_secret))
    if inspect:
        # The gateway reads this answer; a compressed one could not be inspected.
        headers.append(("Accept-Encoding", "identity"))
    return CIMultiDict(headers)


@functools.lru_cache(maxsize=16)
def _replaced(inspect: bool, body: bool, origin_header: str) -> frozenset[str]:
    """The headers of a request not forwarded as the client sent them (lower case)."""
    fixed = _TO_UPSTREAM_INSPECTED if inspect else _TO_UPSTREAM
    own = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", origin_header.lower()}
    if body:
        own |= {"content-encoding", "content-type"}
    return fixed | own


def response_headers(upstream: aiohttp.ClientResponse, *, keep_length: bool) -> list[tuple[str, str]]:
    """The upstream's headers to send back, in order: pairs, which a response copies into its
    own headers (a multidict built here would be copied again)."""
    source = upstream.headers
    dropped = _dropped(source, HOP_BY_HOP if keep_length else _BACK_WITHOUT_LENGTH)
    return [(name, value) for name, value in source.items() if name.lower() not in dropped]


def upstream_failure(request: web.Request, exc: BaseException, *, answering: bool = False) -> web.Response:
    """504 for an upstream that took too long; 502 for one that could not be reached or, once
    ``answering``, broke its answer off. Counted and logged (by type: no traceback)."""
    return json_response(*_failure(request, exc, answering=answering))


def answer_cut_short(request: web.Request, exc: BaseException) -> bytes:
    """The upstream failed after the client had the status line: counted and logged as
    ``upstream_failure`` does, recorded with its status; the error body, for the stream's end."""
    status, body = _failure(request, exc, answering=True)
    # The status metrics and request.completed record when it is not the status sent: an answer
    # broken off after its status line went out is the upstream's failure, whatever it said.
    info = request.get(INFO)
    if info is not None:
        info.recorded_status = status
    return body


def _failure(request: web.Request, exc: BaseException, *, answering: bool) -> tuple[int, bytes]:
    observer = request.app[STATE].observer
    if isinstance(exc, TimeoutError):
        observer.upstream_error("timeout")
        log.warning("upstream timeout: %s", type(exc).__name__)
        return 504, error_body("Upstream timed out", error_code=UPSTREAM_TIMEOUT)
    if answering:
        observer.upstream_error("interrupted")
        log.warning("upstream broke off its answer: %s", type(exc).__name__)
        return 502, error_body("Upstream broke off its answer", error_code=UPSTREAM_ERROR)
    observer.upstream_error("unreachable")
    log.warning("upstream unreachable: %s", type(exc).__name__)
    return 502, error_body("Upstream unreachable", error_code=UPSTREAM_UNREACHABLE)


def json_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


async def stream_back(
    request: web.Request, upstream: aiohttp.ClientResponse, tap: Callable[[bytes], None] | None = None
) -> web.StreamResponse:
    """Send the upstream's answer as it arrives, in bounded chunks (``tap`` sees each one).

    An answer the upstream breaks off is left unfinished for the client too: the bytes are
    opaque, so no error can be appended, and a proper end would pass for the whole answer.
    """
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(response_headers(upstream, keep_length=True))
    await response.prepare(request)
    content = upstream.content
    while True:
        try:
            chunk = await content.read(CHUNK)
        except UPSTREAM_ERRORS as exc:
            answer_cut_short(request, exc)
            _cut_off(request)
            return response
        if not chunk:
            break
        if tap is not None:
            tap(chunk)
        await response.write(chunk)
    await response.write_eof()
    return response


def _cut_off(request: web.Request) -> None:
    """Close the client's connection after what was sent, without the answer's end: no last
    chunk, no Content-Length reached. (aiohttp then finds the connection closing when it
    would end the answer, and lets it go quietly.)"""
    transport = request.transport
    if transport is not None:
        transport.close()


def call_upstream(
    request: web.Request,
    *,
    data: bytes | aiohttp.StreamReader | None,
    inspect: bool,
    body: InspectedRequest | None = None,
    state: GatewayState | None = None,
) -> Awaitable[aiohttp.ClientResponse]:
    """Send the request on to the same path upstream; awaited, it raises one of
    ``UPSTREAM_ERRORS``. (The session's call itself is returned to be awaited, not awaited in a
    coroutine of its own: a frame fewer for every step of the call to resume through.)"""
    if state is None:
        state = request.app[STATE]
    settings = state.settings
    upstream = settings.upstream
    return state.session.request(
        request.method.upper(),
        upstream_url(request, upstream),
        headers=upstream_headers(request, upstream, inspect=inspect, body=body, settings=settings),
        data=data,
        allow_redirects=False,
    )


async def pass_through(
    request: web.Request,
    *,
    body: bytes | None = None,
    tap: Callable[[bytes], None] | None = None,
) -> web.StreamResponse:
    """Everything the gateway does not inspect: forwarded unchanged, streamed both ways.

    ``body``, when the caller already read it, is sent instead of the request's stream; with a
    ``tap`` the answer is asked for uncompressed, so that what the tap sees can be parsed.
    """
    data: bytes | aiohttp.StreamReader | None = body
    if body is None and request.body_exists:
        data = request.content
    try:
        upstream = await call_upstream(request, data=data, inspect=tap is not None)
    except UPSTREAM_ERRORS as exc:
        return upstream_failure(request, exc)
    try:
        # The status is sent from here on: a failure can only cut the answer short.
        return await stream_back(request, upstream, tap)
    finally:
        upstream.release()
