"""A stand-in backend that streams its answer: OpenAI-style SSE chunks, one every DELAY_MS.

.venv/bin/python bench/sse_upstream.py PORT DELAY_MS

``POST /conversation/{kind}-{id}/prompt`` answers ``text/event-stream``: a first chunk with the
role and no text, then the text of ``kind`` (``prose``, ``code`` or ``keylike``, see ``TEXTS``)
as ``choices[0].delta.content`` pieces, the first at once and each next one DELAY_MS after the
one before (sent on a fixed schedule from the start, so a late wake-up does not delay the rest),
then a chunk with ``finish_reason`` and ``data: [DONE]``. The monotonic clock time (system-wide
on Linux, so comparable with the client's) at which each event was written is kept under the
request's id, and ``GET /times/{id}`` hands it over once.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

from aiohttp import web

# About 80 words of ordinary prose: no rule of the built-in pack matches any part of it.
PROSE = (
    "The migration of the billing service went well this week. Two consumers still read from "
    "the old topic, so we will change them before the end of the month and remove the topic "
    "after that. The release notes should explain the new retry behaviour in plain words and "
    "leave out the names of internal systems. The riskiest part of the plan is the order of the "
    "database changes, because the cache warm-up has no rollback step yet. I suggest we test "
    "each step on the staging cluster first and review the results together on Thursday."
)
# A Python snippet, a few tokens to an event as a model streams code.
CODE = '''def retry(call, attempts=3, delay=0.5):
    """Call `call` until it succeeds, waiting longer after each failure."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except ConnectionError as error:
            if attempt == attempts:
                raise
            print(f"attempt {attempt} failed: {error}; retrying")
            time.sleep(delay * 2 ** attempt)


const total = items.filter((item) => item.price > 0).reduce((sum, item) => sum + item.price, 0);
'''
# Prefixes of credentials the pack blocks, none completed into one: a precise hold-back holds
# each a while, then has to let it go.
KEYLIKE = (
    "AWS access key ids start with AKIA and are twenty characters long, so AKIA alone is only "
    "the prefix. GitHub tokens begin with ghp_ or github_pat_, Slack bot tokens with xoxb- and "
    "Stripe secret keys with sk_live_ followed by many characters. A file that opens with "
    "-----BEGIN PUBLIC KEY----- holds a public key and is safe to share, unlike a private one. "
    "A connection string such as postgres://user: is incomplete without its password, and so is "
    "mysql://admin@db or redis://:@cache. OpenAI keys start with sk- and Google API keys with "
    "AIza, yet here each is just a prefix."
)
TEXTS = {"prose": PROSE, "code": CODE, "keylike": KEYLIKE}

_WORD = re.compile(r"\s*\S+")
_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")
CODE_TOKENS_PER_EVENT = 3

_CHUNK = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o"}


def pieces(kind: str) -> list[str]:
    """The text of ``kind`` as the content of successive events (they join to the whole text)."""
    text = TEXTS[kind]
    if kind == "code":
        tokens = _TOKEN.findall(text)
        step = CODE_TOKENS_PER_EVENT
        return ["".join(tokens[i : i + step]) for i in range(0, len(tokens), step)]
    return _WORD.findall(text)  # one word (with the space before it) to an event


def _event(delta: dict[str, str], finish: str | None = None) -> bytes:
    chunk = {**_CHUNK, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def events(kind: str) -> list[tuple[bytes, str]]:
    """Every event of the answer of ``kind`` with the text it carries ("" for none)."""
    content = [(_event({"content": piece}), piece) for piece in pieces(kind)]
    return [
        (_event({"role": "assistant", "content": ""}), ""),
        *content,
        (_event({}, "stop"), ""),
        (b"data: [DONE]\n\n", ""),
    ]


def schedule(kind: str, delay: float) -> list[float]:
    """Seconds after the start at which each event of ``events(kind)`` is sent."""
    count = len(pieces(kind))
    return [0.0, *(i * delay for i in range(count)), (count - 1) * delay, (count - 1) * delay]


SENT = web.AppKey("sent", dict[str, list[float]])
DELAY = web.AppKey("delay", float)


async def answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    kind, _, stream_id = request.match_info["conversation"].partition("-")
    if kind not in TEXTS or not stream_id:
        return web.Response(status=404, text=f"no text kind {kind!r}")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    start, sent = loop.time(), []
    for (event, _), offset in zip(events(kind), schedule(kind, request.app[DELAY]), strict=True):
        wait = start + offset - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        await response.write(event)
        sent.append(time.monotonic())
    request.app[SENT][stream_id] = sent
    await response.write_eof()
    return response


async def times(request: web.Request) -> web.Response:
    sent = request.app[SENT].pop(request.match_info["stream_id"], None)
    if sent is None:
        return web.Response(status=404)
    return web.json_response(sent)


def main() -> None:
    app = web.Application()
    app[SENT] = {}
    app[DELAY] = float(sys.argv[2]) / 1000
    app.router.add_post("/conversation/{conversation}/prompt", answer)
    app.router.add_get("/times/{stream_id}", times)
    app.router.add_get("/", lambda _: web.Response(text="ok"))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
