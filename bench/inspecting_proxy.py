"""The bare proxy plus what any inspecting gateway must do with a prompt and its answer.

.venv/bin/python bench/inspecting_proxy.py PORT UPSTREAM_URL

As bench/bare_proxy.py, but it reads the whole request body and the whole answer, parses both
as JSON, and sends the answer back as one buffered response, as the gateway does: no policies,
no usage, no logging, no metrics. Next to the bare proxy it shows what reading and parsing both
bodies costs on our stack; next to the gateway, what the gateway's own work costs.
"""

from __future__ import annotations

import orjson
from aiohttp import web
from bare_proxy import HOP_BY_HOP, SESSION, UPSTREAM, serve


async def inspect(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    body = await request.read()
    orjson.loads(body)
    upstream_url = request.app[UPSTREAM] + request.raw_path
    async with request.app[SESSION].request(
        request.method, upstream_url, headers=headers, data=body or None, allow_redirects=False
    ) as upstream:
        answer = await upstream.read()
        orjson.loads(answer)
        back = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}}
        return web.Response(status=upstream.status, reason=upstream.reason, body=answer, headers=back)


if __name__ == "__main__":
    serve(inspect)
