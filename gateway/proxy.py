"""Forwarding to the upstream: headers, URLs, pass-through streaming and upstream failures."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.flashback import UPSTREAM_TIMEOUT, UPSTREAM_UNREACHABLE, error_body
from gateway.request_body import InspectedRequest
from gateway.state import STATE
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
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)


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
    target = request[TARGET]  # set by dispatch before anything is forwarded
    return URL(_upstream(upstream)[0] + target.forward, encoded=True)


def upstream_headers(
    request: web.Request,
    upstream: str,
    *,
    inspect: bool = False,
    body: InspectedRequest | None = None,
) -> CIMultiDict[str]:
    source = request.headers
    dropped = _dropped(source, _TO_UPSTREAM_INSPECTED if inspect else _TO_UPSTREAM)
    headers = CIMultiDict(source)
    for name in dropped.intersection(map(str.lower, source.keys())):
        del headers[name]
    if body is not None:
        # SECURITY: the body goes as it was inspected: decoded, and labelled as it was read.
        headers.popall("Content-Encoding", None)
        content_type = body.content_type or source.get("Content-Type")
        headers.popall("Content-Type", None)
        if content_type is not None:
            headers["Content-Type"] = content_type
    peer = request.remote or "unknown"
    prior = source.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    headers["Host"] = _upstream(upstream)[1]
    if inspect:
        # The gateway reads this answer; a compressed one could not be inspected.
        headers["Accept-Encoding"] = "identity"
    return headers


def response_headers(upstream: aiohttp.ClientResponse, *, keep_length: bool) -> CIMultiDict[str]:
    source = upstream.headers
    dropped = _dropped(source, HOP_BY_HOP if keep_length else _BACK_WITHOUT_LENGTH)
    headers = CIMultiDict(source)
    for name in dropped.intersection(map(str.lower, source.keys())):
        del headers[name]
    return headers


def upstream_failure(request: web.Request, exc: BaseException) -> web.Response:
    """502 for an upstream that cannot be reached or broke off, 504 for one that took too long."""
    observer = request.app[STATE].observer
    if isinstance(exc, TimeoutError):
        observer.upstream_error("timeout")
        log.warning("upstream timeout: %s", type(exc).__name__)
        return json_response(504, error_body("Upstream timed out", error_code=UPSTREAM_TIMEOUT))
    observer.upstream_error("unreachable")
    log.warning("upstream unreachable: %s", type(exc).__name__)
    return json_response(502, error_body("Upstream unreachable", error_code=UPSTREAM_UNREACHABLE))


def json_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


async def stream_back(
    request: web.Request, upstream: aiohttp.ClientResponse, tap: Callable[[bytes], None] | None = None
) -> web.StreamResponse:
    """Send the upstream's answer as it arrives, in bounded chunks (``tap`` sees each one)."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(response_headers(upstream, keep_length=True))
    await response.prepare(request)
    async for chunk in upstream.content.iter_chunked(CHUNK):
        if tap is not None:
            tap(chunk)
        await response.write(chunk)
    await response.write_eof()
    return response


async def call_upstream(
    request: web.Request,
    *,
    data: bytes | aiohttp.StreamReader | None,
    inspect: bool,
    body: InspectedRequest | None = None,
) -> aiohttp.ClientResponse:
    """Send the request on to the same path upstream; raises one of ``UPSTREAM_ERRORS``."""
    state = request.app[STATE]
    upstream = state.settings.upstream
    return await state.session.request(
        request.method.upper(),
        upstream_url(request, upstream),
        headers=upstream_headers(request, upstream, inspect=inspect, body=body),
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
