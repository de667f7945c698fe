"""A recording upstream and a gateway in front of it, both real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import build_admin_app, public_runner
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
    public = PublicServer(state)
    await public.start_server()
    admin_app = build_admin_app(state)

    async def close_public(_: web.Application) -> None:
        await public.close()

    # The fixture closes the servers it made; the public one closes with the admin one.
    admin_app.on_cleanup.append(close_public)
    admin = await aiohttp_server(admin_app)
    return public, admin, state


class PublicServer(TestServer):
    """The public port on loopback as ``serve`` runs it: its own runner (``public_runner``) and
    request handler, not the app's router and middleware chain (which plain ``TestServer``s use)."""

    def __init__(self, state: GatewayState) -> None:
        self._public = public_runner(state)
        super().__init__(self._public.app, host="127.0.0.1")

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return self._public
