"""Workspace resolution: trusted header, learned from answers, upstream lookup, unresolved."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.usage.workspaces import Placement, WorkspaceDirectory, WorkspaceResolver
from tests.proxy_fixtures import start_gateway, start_upstream

# One rule per workspace, so a blocked prompt shows which workspace the gateway resolved.
SCOPED = "policies:\n" + "".join(
    f"  - {{id: {rule_id}, name: {rule_id}, severity: low, action: block, scope: {scope}, "
    f"match: {{keywords: [{word}]}}}}\n"
    for rule_id, scope, word in (
        ("ws.a", "{workspaces: [ws-a]}", "marker"),
        ("ws.b", "{workspaces: [ws-b]}", "marker"),
        ("ws.c", "{workspaces: [ws-c]}", "marker"),
        ("repo.x", "{repos: [repo-x]}", "repomark"),
    )
)


# Placements are learned only from answers to a caller with credentials.
USER = {"Authorization": "Bearer user-1"}


def _conversation(cid: str, workspace: str, repo: str = "repo-1") -> dict[str, str]:
    return {"id": cid, "workspaceId": workspace, "repoId": repo, "orgId": "org-1", "tokensIn": "0"}


class Backend:
    """The upstream's conversation list, paged like the real one, plus prompt and create calls."""

    def __init__(self, conversations: list[dict[str, str]]) -> None:
        self.conversations = conversations
        self.list_calls: list[tuple[str, str | None]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/conversation" and request.method == "GET":
            self.list_calls.append((request.query_string, request.headers.get("Authorization")))
            take, skip = int(request.query.get("take", 50)), int(request.query.get("skip", 0))
            page = self.conversations[skip : skip + take]
            return web.json_response(
                {"success": True, "conversations": page, "total": len(self.conversations)}
            )
        if request.path == "/conversation" and request.method == "POST":
            return web.json_response({"success": True, "conversationId": "c-new"})
        return web.json_response({"success": True, "message": "ok"})


@pytest.fixture
async def setup(aiohttp_server: Any, tmp_path: Path) -> Any:
    (tmp_path / "scoped.yaml").write_text(SCOPED)
    recorder, upstream = await start_upstream(aiohttp_server)
    backend = Backend([_conversation(f"c-{i}", "ws-z") for i in range(150)])
    recorder.handler = backend.handle

    async def make(**settings: Any) -> tuple[TestServer, TestServer]:
        public, admin, _ = await start_gateway(
            aiohttp_server, str(upstream.make_url("/")), policies=[tmp_path], **settings
        )
        return public, admin

    async with aiohttp.ClientSession() as client:
        yield make, backend, client


async def _prompt(
    client: aiohttp.ClientSession, gateway: TestServer, cid: str, text: str = "marker", **headers: str
) -> str:
    """The id of the policy that blocked the prompt, or 'allowed'."""
    async with client.post(
        gateway.make_url(f"/conversation/{cid}/prompt"), json={"prompt": text}, headers=headers
    ) as response:
        body = await response.json()
    return body["violations"][0]["policyId"] if response.status == 403 else "allowed"


async def test_a_configured_trusted_header_names_the_workspace(setup: Any) -> None:
    make, backend, client = setup
    gateway, _ = await make(workspace_header="X-Workspace-Id")
    assert await _prompt(client, gateway, "c-0", **{"X-Workspace-Id": "ws-a"}) == "ws.a"
    assert backend.list_calls == []


async def test_an_unconfigured_header_is_ignored(setup: Any) -> None:
    """Without --workspace-header, a client's X-Workspace-Id claims nothing."""
    make, _, client = setup
    gateway, _ = await make()
    assert await _prompt(client, gateway, "c-none", **{"X-Workspace-Id": "ws-a"}) == "allowed"


async def test_a_conversation_listed_through_the_gateway_is_learned(setup: Any) -> None:
    """After a GET /conversation passed through, its conversations resolve with no lookup."""
    make, backend, client = setup
    backend.conversations = [_conversation("c-listed", "ws-b", "repo-x")]
    gateway, _ = await make()
    async with client.get(gateway.make_url("/conversation?take=50"), headers=USER) as response:
        assert (await response.json())["conversations"][0]["id"] == "c-listed"
    calls_after_listing = len(backend.list_calls)
    assert await _prompt(client, gateway, "c-listed") == "ws.b"
    assert await _prompt(client, gateway, "c-listed", text="repomark") == "repo.x"
    assert len(backend.list_calls) == calls_after_listing


async def test_a_created_conversation_takes_its_repos_workspace(setup: Any) -> None:
    """POST /conversation pairs the new id with the requested repo, whose workspace a list showed."""
    make, backend, client = setup
    backend.conversations = [_conversation("c-old", "ws-c", "repo-7")]
    gateway, _ = await make()
    async with client.get(gateway.make_url("/conversation"), headers=USER) as response:
        await response.read()
    async with client.post(
        gateway.make_url("/conversation"), json={"repoId": "repo-7"}, headers=USER
    ) as response:
        assert await response.json() == {"success": True, "conversationId": "c-new"}
    calls = len(backend.list_calls)
    assert await _prompt(client, gateway, "c-new") == "ws.c"
    assert len(backend.list_calls) == calls


async def test_an_unknown_conversation_is_looked_up_with_the_callers_credentials(setup: Any) -> None:
    """The lookup pages through the caller's list with the caller's Authorization, then caches."""
    make, backend, client = setup
    backend.conversations = [_conversation(f"c-{i}", "ws-z") for i in range(130)]
    backend.conversations.append(_conversation("c-deep", "ws-a"))
    gateway, _ = await make()
    assert await _prompt(client, gateway, "c-deep", Authorization="Bearer user-1") == "ws.a"
    assert backend.list_calls == [
        ("take=100&skip=0", "Bearer user-1"),
        ("take=100&skip=100", "Bearer user-1"),
    ]
    assert await _prompt(client, gateway, "c-deep", Authorization="Bearer user-1") == "ws.a"
    assert len(backend.list_calls) == 2


async def test_a_conversation_nobody_can_find_is_unresolved_and_not_looked_up_again(setup: Any) -> None:
    make, backend, client = setup
    gateway, _ = await make(workspace_lookup_pages=2)
    assert await _prompt(client, gateway, "c-ghost", Authorization="Bearer u") == "allowed"
    assert len(backend.list_calls) == 2
    assert await _prompt(client, gateway, "c-ghost", Authorization="Bearer u") == "allowed"
    assert len(backend.list_calls) == 2


async def test_without_credentials_there_is_no_lookup(setup: Any) -> None:
    make, backend, client = setup
    gateway, _ = await make()
    assert await _prompt(client, gateway, "c-0") == "allowed"
    assert backend.list_calls == []


async def test_the_header_wins_over_what_was_learned(setup: Any) -> None:
    make, backend, client = setup
    backend.conversations = [_conversation("c-1", "ws-b")]
    gateway, _ = await make(workspace_header="X-Workspace-Id")
    async with client.get(gateway.make_url("/conversation"), headers=USER) as response:
        await response.read()
    assert await _prompt(client, gateway, "c-1", **{"X-Workspace-Id": "ws-a"}) == "ws.a"
    assert await _prompt(client, gateway, "c-1") == "ws.b"


async def test_concurrent_lookups_of_one_conversation_share_one_fetch() -> None:
    """Ten prompts of an unknown conversation at once cost one page fetch."""
    directory = WorkspaceDirectory()
    resolver = WorkspaceResolver(directory, header=None, lookup_pages=3)
    fetches = 0

    async def fetch(take: int, skip: int) -> tuple[int, Any]:
        nonlocal fetches
        fetches += 1
        await asyncio.sleep(0.05)
        return 200, {"conversations": [_conversation("c-x", "ws-q")]}

    results = await asyncio.gather(*(resolver.resolve({}, "c-x", fetch) for _ in range(10)))
    assert {r.placement for r in results} == {Placement("ws-q", "repo-1", "org-1")}
    assert {r.source for r in results} == {"lookup"}
    assert fetches == 1


def test_the_directory_is_bounded() -> None:
    directory = WorkspaceDirectory(max_entries=10)
    directory.learn_list({"conversations": [_conversation(f"c-{i}", "ws") for i in range(50)]})
    assert directory.known("c-49") == Placement("ws", "repo-1", "org-1")
    assert directory.known("c-0") is None


def test_malformed_lists_teach_nothing() -> None:
    directory = WorkspaceDirectory()
    assert directory.learn_list({"conversations": [{"id": "c"}, "x", {"workspaceId": "w"}]}) == 0
    assert directory.learn_list(json.loads('{"conversations": null}')) == 0
    assert directory.learn_created({"repoId": None}, {"conversationId": "c"}) is False
