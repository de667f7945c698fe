"""Token accounting end to end, over the memory store and a real Redis: totals and quotas."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.cli import main
from gateway.config import Budget
from gateway.json_texts import collect
from gateway.metrics import Metrics
from gateway.observe import Observer
from gateway.state import GatewayState
from gateway.usage.accounting import Accountant, Exchange
from gateway.usage.quota import Ticket
from gateway.usage.redis_store import RedisUsageStore
from gateway.usage.store import Period, Totals, UsageRecord
from gateway.usage.tokens import TokenCounter
from gateway.usage.workspaces import Placement, Resolution
from tests.proxy_fixtures import start_gateway, start_upstream

WS = {"X-Workspace-Id": "ws-a"}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(params=["memory", "redis"])
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    server = request.getfixturevalue("clean_redis")
    return {"redis_url": server.url}


class Answers:
    """Upstream answers by prompt: usage reported for some, plain text for the others."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        prompt = (await request.json())["prompt"]
        if prompt.startswith("reported"):
            return web.json_response(
                {"success": True, "message": "ok", "usage": {"prompt_tokens": 30, "completion_tokens": 12}}
            )
        if prompt.startswith("backend"):
            return web.json_response({"success": True, "message": "fine", "tokensIn": "7", "tokensOut": "5"})
        if prompt.startswith("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for word in ("alpha ", "beta ", "gamma"):
                delta = {"choices": [{"delta": {"content": word}}]}
                await response.write(f"data: {json.dumps(delta)}\n\n".encode())
            usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}
            await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            await response.write_eof()
            return response
        return web.json_response({"success": True, "message": "An answer of several words."})


async def _settled(state: GatewayState, workspace: str, requests: int) -> tuple[Totals, Totals]:
    """Wait for the background records, then read the day's and month's totals."""
    for _ in range(200):
        day, month = await state.store.current(workspace, _now())
        if day.requests >= requests:
            return day, month
        await asyncio.sleep(0.02)
    raise AssertionError(f"{workspace}: usage never reached {requests} requests")


def _now() -> datetime:
    return datetime.now(UTC)


async def _post(
    client: aiohttp.ClientSession,
    gateway: TestServer,
    cid: str,
    prompt: str,
    headers: dict[str, str] = WS,
    model: str | None = None,
) -> int:
    body: dict[str, str] = {"prompt": prompt}
    if model:
        body["model"] = model
    async with client.post(gateway.make_url(f"/conversation/{cid}/prompt"), json=body, headers=headers) as r:
        await r.read()
        return r.status


async def test_exact_totals_after_a_known_sequence(
    aiohttp_server: Any, store_settings: dict[str, Any]
) -> None:
    """Reported usage is used as reported, the rest is counted; blocked prompts cost nothing."""
    recorder, upstream = await start_upstream(aiohttp_server)
    recorder.handler = Answers().handle
    gateway, admin, state = await start_gateway(
        aiohttp_server, str(upstream.make_url("/")), workspace_header="X-Workspace-Id", **store_settings
    )
    counter = TokenCounter()
    plain = "Please summarise the meeting notes 会议 🚀"
    async with aiohttp.ClientSession() as client:
        assert await _post(client, gateway, "c-1", "reported one") == 200
        assert await _post(client, gateway, "c-1", "backend two") == 200
        assert await _post(client, gateway, "c-2", plain, model="gpt-4-0613") == 200
        assert await _post(client, gateway, "c-2", "stream three") == 200
        assert await _post(client, gateway, "c-2", "AKIAIOSFODNN7EXAMPLE") == 403
        assert await _post(client, gateway, "c-9", "reported elsewhere", {"X-Workspace-Id": "ws-b"}) == 200
        day, month = await _settled(state, "ws-a", 4)
        other, _ = await _settled(state, "ws-b", 1)
        async with client.get(admin.make_url("/usage/ws-a?period=month")) as response:
            listed = await response.json()
    estimated_prompt = counter.count(plain, "gpt-4-0613")
    estimated_answer = counter.count("An answer of several words.", "gpt-4-0613")
    assert counter.encoding_for("gpt-4-0613") == "cl100k_base"
    expected = Totals(30 + 7 + estimated_prompt + 11, 12 + 5 + estimated_answer + 3, 4)
    assert day == expected
    assert month == expected
    assert other == Totals(30, 12, 1)
    assert listed["promptTokens"] == expected.prompt_tokens
    assert listed["responseTokens"] == expected.response_tokens
    assert listed["requests"] == 4
    assert await state.store.conversation_totals("ws-a", "c-1") == Totals(37, 17, 2)
    assert len(recorder.received) == 5


async def test_an_unresolved_workspace_is_counted_as_such(aiohttp_server: Any) -> None:
    _, upstream = await start_upstream(aiohttp_server)
    gateway, _, state = await start_gateway(aiohttp_server, str(upstream.make_url("/")))
    async with aiohttp.ClientSession() as client:
        assert await _post(client, gateway, "c-1", "hello", headers={}) == 200
    day, _ = await _settled(state, "unresolved", 1)
    assert day.requests == 1
    assert day.prompt_tokens == TokenCounter().count("hello")


async def test_a_workspace_over_its_budget_gets_429_before_the_upstream(
    aiohttp_server: Any, store_settings: dict[str, Any]
) -> None:
    """Budget 80, 42 tokens a request: two pass, the third is refused with Retry-After."""
    recorder, upstream = await start_upstream(aiohttp_server)
    recorder.handler = Answers().handle
    gateway, _, state = await start_gateway(
        aiohttp_server,
        str(upstream.make_url("/")),
        workspace_header="X-Workspace-Id",
        quotas={"ws-q": Budget(daily=80)},
        **store_settings,
    )
    headers = {"X-Workspace-Id": "ws-q"}
    async with aiohttp.ClientSession() as client:
        assert await _post(client, gateway, "c", "reported a", headers) == 200
        assert await _post(client, gateway, "c", "reported b", headers) == 200
        await _settled(state, "ws-q", 2)
        async with client.post(
            gateway.make_url("/conversation/c/prompt"), json={"prompt": "reported c"}, headers=headers
        ) as response:
            body = await response.json()
            assert response.status == 429
            assert 0 < int(response.headers["Retry-After"]) <= 86400
        assert body["error_code"] == "QUOTA_EXCEEDED"
        assert body["success"] is False
        assert await _post(client, gateway, "c", "reported d", {"X-Workspace-Id": "ws-other"}) == 200
    assert len(recorder.received) == 3


@pytest.mark.parametrize(("fail_closed", "status"), [(False, 200), (True, 429)])
async def test_quotas_fail_open_by_default_when_redis_is_down(
    aiohttp_server: Any, fail_closed: bool, status: int
) -> None:
    """With no Redis to read, a budgeted workspace is served, unless quotas fail closed."""
    _, upstream = await start_upstream(aiohttp_server)
    gateway, _, _ = await start_gateway(
        aiohttp_server,
        str(upstream.make_url("/")),
        workspace_header="X-Workspace-Id",
        redis_url=f"redis://127.0.0.1:{_closed_port()}/0",
        quotas={"ws-q": Budget(daily=10)},
        quota_fail_closed=fail_closed,
    )
    async with aiohttp.ClientSession() as client:
        assert await _post(client, gateway, "c", "hello", {"X-Workspace-Id": "ws-q"}) == status


async def test_the_usage_endpoint_refuses_a_bad_period_and_reports_an_unavailable_store(
    aiohttp_server: Any,
) -> None:
    _, upstream = await start_upstream(aiohttp_server)
    _, admin, _ = await start_gateway(
        aiohttp_server, str(upstream.make_url("/")), redis_url=f"redis://127.0.0.1:{_closed_port()}/0"
    )
    async with aiohttp.ClientSession() as client:
        async with client.get(admin.make_url("/usage/ws?period=week")) as response:
            assert response.status == 400
        async with client.get(admin.make_url("/usage/ws")) as response:
            assert response.status == 503
            assert (await response.json())["success"] is False


async def test_gateway_usage_reads_a_workspace_from_redis(
    clean_redis: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gateway usage` prints the totals the Redis store holds, and explains a missing URL."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    store = RedisUsageStore(clean_redis.url)
    await store.record(UsageRecord("r1", "ws-cli", "c", 5, 7, "reported", _now()))
    await store.close()
    code = await asyncio.to_thread(
        main, ["usage", "ws-cli", "--redis-url", clean_redis.url, "--period", "month"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["promptTokens"], printed["responseTokens"], printed["requests"]) == (5, 7, 1)
    assert printed["period"] == "month"
    code = await asyncio.to_thread(main, ["usage", "ws-cli"])
    assert code == 2
    assert "GET /usage/WORKSPACE" in capsys.readouterr().err


async def test_max_tokens_rules_count_with_the_requests_tokenizer(aiohttp_server: Any, tmp_path: Any) -> None:
    """A max_tokens rule counts the body's tokens (every field, as it evaluates every field) as
    the request's model does, not characters."""
    counter = TokenCounter()
    short = " ".join(["word"] * 8)  # 8 tokens, 39 characters: over 8 by a 4-characters estimate
    long = " ".join(["word"] * 9)
    assert (counter.count(short, "gpt-4o"), counter.count(long, "gpt-4o")) == (8, 9)
    limit = counter.count(collect({"prompt": short, "model": "gpt-4o"}).text, "gpt-4o")
    assert counter.count(collect({"prompt": long, "model": "gpt-4o"}).text, "gpt-4o") == limit + 1
    (tmp_path / "p.yaml").write_text(
        "policies:\n  - {id: size.cap, name: Too long, severity: low, action: block, "
        f"stages: [prompt], match: {{max_tokens: {limit}}}}}\n"
    )
    _, upstream = await start_upstream(aiohttp_server)
    gateway, _, _ = await start_gateway(aiohttp_server, str(upstream.make_url("/")), policies=[tmp_path])
    async with aiohttp.ClientSession() as client:
        assert await _post(client, gateway, "c", short, {}, model="gpt-4o") == 200
        assert await _post(client, gateway, "c", long, {}, model="gpt-4o") == 403


async def test_usage_a_quota_waits_for_is_written_without_lingering(clean_redis: Any) -> None:
    """Near its budget a workspace admits one request at a time, holding a ticket until the
    usage is recorded: such a record skips the store's linger, the others wait for it."""
    store = RedisUsageStore(clean_redis.url, linger=2.0)
    await store.start()
    accountant = Accountant(store, TokenCounter(), Observer(Metrics()))
    lock = asyncio.Lock()
    await lock.acquire()
    resolution = Resolution(Placement("ws-near"), "header")
    started = asyncio.get_running_loop().time()
    for ticket in (Ticket(), Ticket(lock)):
        exchange = Exchange("c", resolution, None, "some prompt", ticket)
        exchange.forwarded = True
        accountant.settle(exchange, {"event": "request.completed", "requestId": "r"})
    while lock.locked():
        assert asyncio.get_running_loop().time() - started < 1.0, "the held ticket waited for the linger"
        await asyncio.sleep(0.01)
    assert (await store.totals("ws-near", Period.DAY, datetime.now(UTC))).requests == 2
    await accountant.drain()
    await store.close()
