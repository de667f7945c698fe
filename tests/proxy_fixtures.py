"""A recording upstream and a gateway in front of it, both real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import PUBLIC_SERVER_OPTIONS, build_admin_app, build_public_app
from gateway.config import Settings
from gateway.policy import load_ruleset
from gateway.state import GatewayState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """Records every request; answers with ``handler`` (by default a JSON success)."""

    received: list[Received] = field(default_factory=list)
    handler: Handler | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.raw_path, dict(request.headers), body))
        if self.handler is None:
            return web.json_response({"success": True, "message": "Prompt received"})
        try:
            return await self.handler(request)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def start_upstream(aiohttp_server: Any) -> tuple[Upstream, TestServer]:
    upstream = Upstream()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    server = await aiohttp_server(app)
    return upstream, server


async def start_gateway(
    aiohttp_server: Any,
    upstream_url: str,
    *,
    policies: list[Path] | None = None,
    **overrides: Any,
) -> tuple[TestServer, TestServer, GatewayState]:
    settings = replace(Settings(), upstream=upstream_url.rstrip("/"), **overrides)
    ruleset = load_ruleset(policies) if policies else load_ruleset()
    state = GatewayState(settings, ruleset)
    public = await aiohttp_server(build_public_app(state), **PUBLIC_SERVER_OPTIONS)
    admin = await aiohttp_server(build_admin_app(state))
    return public, admin, state
