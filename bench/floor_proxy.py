"""The least a gateway must do on this stack: the inspecting proxy plus the issue's required work.

.venv/bin/python bench/floor_proxy.py PORT UPSTREAM_URL REDIS_URL

As bench/inspecting_proxy.py, plus, for every prompt, only what the gateway may not skip, each
done the cheapest way the libraries allow and with none of the gateway's checks, routing,
failure handling, workspaces, quotas, streaming or alerts: both texts evaluated against the
built-in pack (``evaluate``), both counted in tokens, and, once the answers of a loop turn are
out, per request three histogram observations and one counter, one JSON log line (written with
the turn's other lines) and one usage record (the turn's records go to Redis together through
the gateway's ``RedisUsageStore``). Next to the bare proxy it shows the floor of the gateway's
design on aiohttp; next to the gateway, how much of the gateway's cost is above that floor.

``FLOOR_SKIP`` (comma-separated: eval, tokens, metrics, log, redis) leaves parts out, to see
what each costs.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from bare_proxy import HOP_BY_HOP, SESSION, UPSTREAM, serve
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.ids import new_id
from gateway.policy import Context, Stage, evaluate
from gateway.policy.loader import load_ruleset
from gateway.usage.redis_store import RedisUsageStore
from gateway.usage.store import UsageRecord
from gateway.usage.tokens import TokenCounter

SKIP = set(os.environ.get("FLOOR_SKIP", "").split(","))
RULESET = load_ruleset() if "eval" not in SKIP else load_ruleset([])
TOKENS = TokenCounter()
CONTEXT = Context()
REGISTRY = CollectorRegistry()
DURATION = Histogram("duration", "", ("route",), registry=REGISTRY).labels("prompt")
UPSTREAM_TIME = Histogram("upstream", "", registry=REGISTRY)
OVERHEAD = Histogram("overhead", "", ("stage",), registry=REGISTRY).labels("prompt")
REQUESTS = Counter("requests", "", ("route", "status"), registry=REGISTRY).labels("prompt", "200")
STORE = web.AppKey("store", RedisUsageStore)
Finished = tuple[str, str, str, float, float, float]
PENDING: list[Finished] = []


async def floor(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    body = await request.read()
    prompt = orjson.loads(body)["prompt"]
    if evaluate(RULESET, Stage.PROMPT, prompt, CONTEXT).blocked:
        return web.Response(status=403)
    called = time.perf_counter()
    upstream_url = request.app[UPSTREAM] + request.raw_path
    async with request.app[SESSION].request(
        request.method, upstream_url, headers=headers, data=body, allow_redirects=False
    ) as upstream:
        answer_body = await upstream.read()
        upstream_seconds = time.perf_counter() - called
        answer = orjson.loads(answer_body).get("message", "")
        if evaluate(RULESET, Stage.RESPONSE, answer, CONTEXT).blocked:
            return web.Response(status=403)
        back = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}}
        status, reason = upstream.status, upstream.reason
        response = web.Response(status=status, reason=reason, body=answer_body, headers=back)
    workspace = request.headers.get("X-Workspace-Id", "")
    PENDING.append((prompt, answer, workspace, started, called, upstream_seconds))
    if len(PENDING) == 1:
        asyncio.get_running_loop().call_soon(bookkeeping, request.app[STORE])
    return response


def bookkeeping(store: RedisUsageStore) -> None:
    finished, PENDING[:] = PENDING[:], []
    now = datetime.now(UTC)
    lines: list[bytes] = []
    records: list[UsageRecord] = []
    for prompt, answer, workspace, started, called, upstream_seconds in finished:
        counted = "tokens" not in SKIP
        prompt_tokens, answer_tokens = (TOKENS.count(prompt), TOKENS.count(answer)) if counted else (1, 1)
        if "metrics" not in SKIP:
            DURATION.observe(time.perf_counter() - started)
            UPSTREAM_TIME.observe(upstream_seconds)
            OVERHEAD.observe(called - started)
        record = UsageRecord(new_id(), workspace, "c1", prompt_tokens, answer_tokens, "estimated", now)
        records.append(record)
        fields: dict[str, Any] = {
            "event": "request.completed",
            "requestId": record.id,
            "route": "prompt",
            "status": 200,
            "workspace": workspace,
            "durationMs": round((time.perf_counter() - started) * 1000, 3),
            "tokens": {"prompt": prompt_tokens, "response": answer_tokens},
        }
        if "log" not in SKIP:
            lines.append(orjson.dumps(fields))
    REQUESTS.inc(len(finished))
    sys.stdout.buffer.write(b"\n".join(lines) + b"\n")
    sys.stdout.flush()
    if "redis" not in SKIP:
        store.submit(records)


async def usage_store(app: web.Application) -> Any:
    app[STORE] = RedisUsageStore(sys.argv[3])
    await app[STORE].start()
    yield
    await app[STORE].close()


if __name__ == "__main__":
    serve(floor, contexts=(usage_store,))
