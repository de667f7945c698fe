"""Gateway processes sharing one real Redis: exact totals, shared budgets, outages."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.usage.redis_store import RedisUsageStore
from gateway.usage.store import Period, Totals
from tests.gateway_process import answers
from tests.proxy_fixtures import start_upstream
from tests.redis_fixtures import RedisProcess, free_ports

TOKENS_IN, TOKENS_OUT = 12, 8


async def _reporting(_: web.Request) -> web.StreamResponse:
    return web.json_response(
        {
            "success": True,
            "message": "ok",
            "usage": {"prompt_tokens": TOKENS_IN, "completion_tokens": TOKENS_OUT},
        }
    )


class Gateway:
    def __init__(self, process: asyncio.subprocess.Process, port: int, admin: int) -> None:
        self.process, self.port, self.admin = process, port, admin

    def prompt_url(self, conversation: str) -> str:
        return f"http://127.0.0.1:{self.port}/conversation/{conversation}/prompt"


@pytest.fixture
async def gateways(
    aiohttp_server: Any, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[list[Gateway]]]]:
    started: list[Gateway] = []
    recorder, upstream = await start_upstream(aiohttp_server)
    recorder.handler = _reporting

    async def start(redis_url: str, count: int, config: str = "") -> list[Gateway]:
        (tmp_path / "gateway.yaml").write_text(config or "{}\n")
        for _ in range(count):
            port, admin = free_ports(2)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--upstream", str(upstream.make_url("/")),
                "--port", str(port), "--admin-port", str(admin), "--redis-url", redis_url,
                "--workspace-header", "X-Workspace-Id", "--config", str(tmp_path / "gateway.yaml"),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            started.append(Gateway(process, port, admin))
        async with aiohttp.ClientSession() as session:
            for gateway in started[-count:]:
                await _wait_ready(session, gateway)
        return started[-count:]

    yield start
    for gateway in started:
        if gateway.process.returncode is None:
            gateway.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(gateway.process.wait(), timeout=15)


async def _wait_ready(session: aiohttp.ClientSession, gateway: Gateway) -> None:
    assert await answers(f"http://127.0.0.1:{gateway.admin}/healthz"), "gateway did not start"


async def _send(session: aiohttp.ClientSession, url: str, workspace: str) -> int:
    async with session.post(url, json={"prompt": "hello"}, headers={"X-Workspace-Id": workspace}) as response:
        await response.read()
        return response.status


async def _totals(url: str, workspace: str, *, requests: int | None = None) -> Totals:
    """The day's totals once they reach ``requests`` (records are written in the background)."""
    store = RedisUsageStore(url, timeout=1.0)
    try:
        for _ in range(300):
            totals = await store.totals(workspace, Period.DAY, datetime.now(UTC))
            if requests is None or totals.requests >= requests:
                await asyncio.sleep(0.3)  # anything still in flight would show now
                return await store.totals(workspace, Period.DAY, datetime.now(UTC))
            await asyncio.sleep(0.05)
        return totals
    finally:
        await store.close()


async def test_two_gateways_sharing_redis_count_exactly_under_concurrent_load(
    gateways: Any, clean_redis: RedisProcess
) -> None:
    """400 prompts from 32 concurrent clients over two processes: every token counted once."""
    pair = await gateways(clean_redis.url, 2)
    semaphore = asyncio.Semaphore(32)

    async def one(index: int) -> int:
        async with semaphore:
            return await _send(session, pair[index % 2].prompt_url(f"c-{index % 7}"), "ws-shared")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        statuses = await asyncio.gather(*(one(i) for i in range(400)))
    assert statuses == [200] * 400
    assert await _totals(clean_redis.url, "ws-shared", requests=400) == Totals(
        400 * TOKENS_IN, 400 * TOKENS_OUT, 400
    )


async def test_a_shared_budget_is_overrun_by_at_most_one_request_per_instance(
    gateways: Any, clean_redis: RedisProcess
) -> None:
    """Budget 1000 tokens, 20 a request, two instances hammered: at most 1000 + 2 x 20 used."""
    pair = await gateways(clean_redis.url, 2, "quotas:\n  ws-budget: {daily: 1000}\n")
    semaphore = asyncio.Semaphore(24)

    async def one(index: int) -> int:
        async with semaphore:
            return await _send(session, pair[index % 2].prompt_url("c-1"), "ws-budget")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        statuses = await asyncio.gather(*(one(i) for i in range(160)))
    allowed = statuses.count(200)
    assert set(statuses) == {200, 429}
    totals = await _totals(clean_redis.url, "ws-budget", requests=allowed)
    per_request = TOKENS_IN + TOKENS_OUT
    print(f"budget 1000 tokens: {allowed} of 160 admitted, {totals.tokens} tokens used")
    assert totals.requests == allowed
    assert 1000 <= totals.tokens <= 1000 + 2 * per_request


async def test_redis_paused_then_killed_and_restarted_loses_no_count(
    gateways: Any, persistent_redis: RedisProcess
) -> None:
    """Every request is answered through a pause and a crash of Redis; totals end exact."""
    (gateway,) = await gateways(persistent_redis.url, 1)
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:

        async def burst(count: int) -> None:
            results = await asyncio.gather(
                *(_send(session, gateway.prompt_url("c-1"), "ws-outage") for _ in range(count))
            )
            statuses.extend(results)

        await burst(40)
        persistent_redis.pause()
        for _ in range(5):
            await burst(20)
        persistent_redis.resume()
        await burst(40)
        persistent_redis.kill()
        for _ in range(5):
            await burst(20)
        persistent_redis.start()
        await burst(40)
    sent = len(statuses)
    assert statuses == [200] * sent
    assert await _totals(persistent_redis.url, "ws-outage", requests=sent) == Totals(
        sent * TOKENS_IN, sent * TOKENS_OUT, sent
    )
