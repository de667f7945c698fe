"""The limit of our stack: an aiohttp pass-through proxy that does nothing but forward.

.venv/bin/python bench/bare_proxy.py PORT UPSTREAM_URL

One pooled ClientSession (the gateway's defaults: 100 connections, no decompression, no
cookies); the method, raw path, headers and body go to the upstream and the answer streams
back. No policies, no usage, no logging, no metrics: what is left is aiohttp's own cost. It
runs on the gateway's event loop (uvloop when installed) with the gateway's garbage collector
settings, both from gateway/runtime.py. ``BENCH_WORKERS=N`` in the environment runs N processes
on the port (SO_REUSEPORT), as ``gateway serve --workers N`` does.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import aiohttp
from aiohttp import web

from gateway.runtime import settle_heap

try:
    import uvloop
except ImportError:  # the gateway falls back to asyncio's loop too
    uvloop = None

HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"})
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
PR_SET_PDEATHSIG = 1


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    body = await request.read()
    upstream_url = request.app[UPSTREAM] + request.raw_path
    async with request.app[SESSION].request(
        request.method, upstream_url, headers=headers, data=body or None, allow_redirects=False
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend((k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP)
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(64 << 10):
            await response.write(chunk)
        await response.write_eof()
        return response


async def session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    )
    yield
    await app[SESSION].close()


def serve(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    contexts: Iterable[Callable[[web.Application], AsyncIterator[None]]] = (),
) -> None:
    """Serve ``handler`` for every path on ``sys.argv[1]``, forwarding to ``sys.argv[2]``
    (``contexts``: more of the app's cleanup contexts)."""
    app = web.Application()
    app[UPSTREAM] = sys.argv[2].rstrip("/")
    app.cleanup_ctx.append(session)
    app.cleanup_ctx.extend(contexts)
    app.router.add_route("*", "/{tail:.*}", handler)
    workers, first = int(os.environ.get("BENCH_WORKERS", "1")), os.getpid()
    for _ in range(workers - 1):
        if os.fork() == 0:
            # The benchmark stops the first process; the others go with it (or now, if it has
            # already gone).
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != first:
                sys.exit(0)
            break
    settle_heap()  # the gateway's garbage collector settings, so that only the work differs
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
        loop=loop,
        reuse_port=workers > 1,
    )


if __name__ == "__main__":
    serve(forward)
