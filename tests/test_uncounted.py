"""Only what the backend served costs a workspace: refused exchanges are counted in a metric."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import Budget
from gateway.metrics import Metrics
from gateway.observe import Observer
from gateway.state import GatewayState
from gateway.usage.accounting import Accountant, Exchange
from gateway.usage.memory_store import MemoryUsageStore
from gateway.usage.quota import Ticket
from gateway.usage.store import Period, Totals
from gateway.usage.tokens import TokenCounter
from gateway.usage.workspaces import Placement, Resolution
from tests.proxy_fixtures import start_gateway, start_upstream

USER = "Bearer the-workspace-user"
STRANGER = "Bearer someone-else"
# About a dozen tokens: four of them, counted, would use up the budget of 40.
LONG_PROMPT = "please summarise the quarterly report of the northern region for the board in detail"
LISTED = {
    "conversations": [
        {"id": "c-1", "workspaceId": "ws-a"},
        {"id": "c-gone", "workspaceId": "ws-a"},
        {"id": "c-broken", "workspaceId": "ws-a"},
    ]
}


class Backend:
    """Checks credentials as the real backend does: 401 without any, 403 for a caller it does not
    know, 404 for a deleted conversation, 503 while a conversation's model is down, and 200
    with 10 + 10 reported tokens for its user. ``lenient`` lists conversations to anyone."""

    def __init__(self, *, lenient: bool = False) -> None:
        self.lenient = lenient

    async def handle(self, request: web.Request) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        if request.path == "/conversation":
            if authorization != USER and not self.lenient:
                return _error(401, "Unauthorized")
            if request.method == "POST":
                return web.json_response({"success": True, "conversationId": "c-new"})
            return web.json_response(LISTED)
        if not authorization:
            return _error(401, "Unauthorized")
        if authorization != USER:
            return _error(403, "Forbidden")
        if "/c-gone/" in request.path:
            return _error(404, "Conversation not found")
        if "/c-broken/" in request.path:
            return _error(503, "Model unavailable")
        return web.json_response(
            {"success": True, "message": "ok", "usage": {"prompt_tokens": 10, "completion_tokens": 10}}
        )


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=status)


@pytest.fixture(params=["memory", "redis"])
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("clean_redis").url}


async def _prompt(
    client: aiohttp.ClientSession, gateway: TestServer, conversation: str, authorization: str | None
) -> int:
    headers = {"Authorization": authorization} if authorization else {}
    async with client.post(
        gateway.make_url(f"/conversation/{conversation}/prompt"),
        json={"prompt": LONG_PROMPT},
        headers=headers,
    ) as response:
        await response.read()
        return response.status


async def _list(client: aiohttp.ClientSession, gateway: TestServer, authorization: str | None) -> int:
    headers = {"Authorization": authorization} if authorization else {}
    async with client.get(gateway.make_url("/conversation"), headers=headers) as response:
        await response.read()
        return response.status


def _uncounted(state: GatewayState) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in state.observer.metrics.exposition().decode().splitlines():
        if line.startswith("policy_gateway_uncounted_exchanges_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('status="', 1)[1].split('"', 1)[0]] = float(value)
    return counts


async def test_refused_prompts_cost_a_learned_workspace_nothing(
    aiohttp_server: Any, store_settings: dict[str, Any]
) -> None:
    """Anonymous (401), stranger (403), deleted (404) and failed (503) prompts to a workspace's
    conversations leave its budget of 40 whole: its user is served twice (2 x 20 tokens)."""
    recorder, upstream = await start_upstream(aiohttp_server)
    recorder.handler = Backend().handle
    gateway, admin, state = await start_gateway(
        aiohttp_server, str(upstream.make_url("/")), quotas={"ws-a": Budget(daily=40)}, **store_settings
    )
    async with aiohttp.ClientSession() as client:
        assert await _list(client, gateway, USER) == 200
        assert state.resolver.directory.known("c-1") == Placement("ws-a")
        refused = [
            *[await _prompt(client, gateway, "c-1", None) for _ in range(4)],
            *[await _prompt(client, gateway, "c-1", STRANGER) for _ in range(2)],
            *[await _prompt(client, gateway, "c-gone", USER) for _ in range(2)],
            await _prompt(client, gateway, "c-broken", USER),
        ]
        served = [await _prompt(client, gateway, "c-1", USER) for _ in range(3)]
        async with client.get(admin.make_url("/usage/ws-a")) as response:
            usage = await response.json()
    print(f"refused: {refused}, the user's three prompts: {served}, ws-a: {usage['totalTokens']} tokens")
    assert refused == [401] * 4 + [403] * 2 + [404] * 2 + [503]
    assert served == [200, 200, 429]
    assert await state.store.totals("ws-a", Period.DAY, datetime.now(UTC)) == Totals(20, 20, 2)
    assert _uncounted(state) == {"3xx": 0, "401": 4, "403": 2, "404": 2, "429": 0, "4xx": 0, "5xx": 1}
    assert len(recorder.received) == 1 + 9 + 2


@pytest.mark.parametrize(
    ("method", "authorization", "learned"),
    [
        ("GET", USER, True),
        ("GET", None, False),
        ("GET", "", False),
        ("POST", USER, True),
        ("POST", None, False),
    ],
    ids=[
        "a list the user was answered teaches where its conversations live",
        "a list answered to an anonymous caller teaches nothing",
        "an empty Authorization header is anonymous",
        "a conversation the user created is paired with its repo",
        "a conversation created anonymously teaches nothing",
    ],
)
async def test_the_resolver_learns_only_from_authenticated_answers(
    aiohttp_server: Any, method: str, authorization: str | None, learned: bool
) -> None:
    recorder, upstream = await start_upstream(aiohttp_server)
    recorder.handler = Backend(lenient=True).handle
    gateway, _, state = await start_gateway(aiohttp_server, str(upstream.make_url("/")))
    headers = {"Authorization": authorization} if authorization is not None else {}
    directory = state.resolver.directory
    async with aiohttp.ClientSession() as client:
        if method == "POST":
            # The repo's workspace is known (from a list); a new conversation pairs with it.
            directory.learn_list({"conversations": [{"id": "c-x", "workspaceId": "ws-a", "repoId": "r-1"}]})
            async with client.post(
                gateway.make_url("/conversation"), json={"repoId": "r-1"}, headers=headers
            ) as response:
                assert response.status == 200
            assert (directory.known("c-new") is not None) is learned
        else:
            async with client.get(gateway.make_url("/conversation"), headers=headers) as response:
                assert response.status == 200
            assert (directory.known("c-1") is not None) is learned


@pytest.mark.parametrize(
    ("status", "counted", "label"),
    [
        (200, True, None),
        (201, True, None),
        (None, True, None),
        (302, False, "3xx"),
        (400, False, "4xx"),
        (401, False, "401"),
        (403, False, "403"),
        (404, False, "404"),
        (429, False, "429"),
        (500, False, "5xx"),
        (503, False, "5xx"),
    ],
    ids=str,
)
async def test_only_a_2xx_answer_or_an_unknown_outcome_is_counted(
    status: int | None, counted: bool, label: str | None
) -> None:
    """A record for what the backend served (or may have: no status came back); the other
    exchanges release their quota ticket at once and are counted by upstream status class."""
    store = MemoryUsageStore()
    metrics = Metrics()
    accountant = Accountant(store, TokenCounter(), Observer(metrics))
    lock = asyncio.Lock()
    await lock.acquire()
    exchange = Exchange("c", Resolution(Placement("ws"), "header"), None, "a prompt", Ticket(lock))
    exchange.forwarded = True
    exchange.upstream_status = status
    accountant.settle(exchange, {"event": "request.completed", "requestId": "r"})
    await accountant.drain()
    assert not lock.locked()
    totals = await store.totals("ws", Period.DAY, datetime.now(UTC))
    assert totals.requests == (1 if counted else 0)
    exposition = metrics.exposition().decode()
    for value in ("3xx", "401", "403", "404", "429", "4xx", "5xx"):
        expected = 1.0 if value == label else 0.0
        assert f'policy_gateway_uncounted_exchanges_total{{status="{value}"}} {expected}' in exposition
