"""A minimal stand-in for the backend: answers every request with a small JSON body.

.venv/bin/python bench/upstream.py PORT
"""

from __future__ import annotations

import sys

from aiohttp import web

ANSWER = b'{"success": true, "message": "Prompt received"}'


async def answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
