"""The public port's client connections: a deadline for every request head, and a cap.

aiohttp's server waits for a request head as long as the connection stays open (its keep-alive
timer closes an idle connection only after ``keepalive_timeout``, about an hour by default, and
bytes arriving do not move it): a client that sends a head slowly, or half of one, holds a
connection and its memory for that hour, and a thousand such clients hold a thousand.

``header_timeout`` is the time a client has to send a complete request head: from connecting,
and on a kept-alive connection from the first byte after the previous request's body (waiting
idle in between is ``keepalive_timeout``'s business); a head still incomplete then closes the
connection, as nginx's ``client_header_timeout`` and Go's ``ReadHeaderTimeout`` do. A body is
not timed here. A head's start is noted as it begins and cleared as it ends; one timer a
connection checks, when it fires, the head under way then (and is set again for its deadline),
rather than one timer set and cancelled for every request: nothing is done per byte but
comparing a counter.

``max_connections`` caps the connections open at once (per worker process). The one over the
cap is served no request: its first is answered 503 in the backend's error shape, and the
connection closed. It is held no longer than a head takes, so the cap cannot be filled by
refused connections.

Limit: a head begun in the same packet that ended the previous request (pipelining) is not
seen as begun (aiohttp's parser does not tell what it holds); such a connection is bounded by
``keepalive_timeout`` and the cap instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from gateway.flashback import error_body
from gateway.http_errors import QuietRequestHandler

log = logging.getLogger("gateway.connections")

TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float  # seconds a client has to send a complete request head
    max_connections: int  # connections open at once; the next is answered 503


class ConnectionGuard:
    """The connections one server has open, and the limits it keeps them to.

    ``on_refusal`` is told each time a limit closes a connection (``header_timeout``) or
    refuses one (``max_connections``): a metric, typically.
    """

    def __init__(self, limits: ConnectionLimits, on_refusal: Callable[[str], None]) -> None:
        self.limits = limits
        self.open = 0
        self._on_refusal = on_refusal
        self._full = False

    def admit(self) -> bool:
        if self.open < self.limits.max_connections:
            self.open += 1
            return True
        self._on_refusal("max_connections")
        if not self._full:
            # Once each time the cap is reached, not once a refused connection.
            self._full = True
            log.warning("connection cap reached: %d open, new connections answered 503", self.open)
        return False

    def release(self) -> None:
        self.open -= 1
        if self._full and self.open < self.limits.max_connections * 0.9:
            self._full = False

    def timed_out(self) -> None:
        self._on_refusal("header_timeout")


async def _over_capacity(_: web.BaseRequest) -> web.StreamResponse:
    body = error_body("Too many connections: try again shortly", error_code=TOO_MANY_CONNECTIONS)
    response = web.Response(status=503, body=body, content_type="application/json")
    response.headers["Retry-After"] = "1"
    response.force_close()
    return response


class GuardedRequestHandler(QuietRequestHandler):
    """aiohttp's connection handler, with the head deadline and the cap of a ``ConnectionGuard``
    (and the safe error answers and log lines of ``QuietRequestHandler``)."""

    __slots__ = ("_admitted", "_body", "_guard", "_head_started", "_head_timer")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._admitted = False
        self._head_started: float | None = None  # when the head under way began; None: none is
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the body of the last request whose head came

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._admitted = self._guard.admit()
        if not self._admitted:
            # Answered rather than dropped: the client reads why, and tries again later.
            self._request_handler = _over_capacity
        super().connection_made(transport)
        self._start_head_clock()

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        # The last body complete (or none): these bytes begin the next head.
        between = self._head_started is None and (self._body is None or self._body.is_eof())
        super().data_received(data)
        if self._request_count != heads:
            self._stop_head_clock()
            self._body = self._messages[-1][1] if self._messages else None
        elif between:
            self._start_head_clock()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_clock()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._body = None
        if self._admitted:
            self._admitted = False
            self._guard.release()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        """Waiting for the next request: no request is being handled or lingered over."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _start_head_clock(self) -> None:
        self._head_started = started = self._loop.time()
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(
                started + self._guard.limits.header_timeout, self._head_late
            )

    def _stop_head_clock(self) -> None:
        # The timer is left to run out: it finds no head under way, or a later one to time.
        self._head_started = None

    def _head_late(self) -> None:
        self._head_timer = None
        started = self._head_started
        if self.transport is None or started is None:
            return
        due = started + self._guard.limits.header_timeout
        if due > self._loop.time():
            # A head begun after the one this timer was set for: its own deadline.
            self._head_timer = self._loop.call_at(due, self._head_late)
            return
        if not self._idle():
            # The previous request is still being answered (its client pipelines): the next
            # head is owed the time that answer takes, and a full header_timeout after it.
            self._start_head_clock()
            return
        # No head completed since the clock started, and no request is being handled.
        self._guard.timed_out()
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's protocol factory, making ``handler_class`` connection handlers: a
    ``GuardedRequestHandler``, or a class that combines it with another ``RequestHandler``
    subclass (``class Public(GuardedRequestHandler, OtherRequestHandler)``)."""

    def __init__(
        self,
        handler: Any,
        *,
        guard: ConnectionGuard,
        handler_class: type[GuardedRequestHandler] = GuardedRequestHandler,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.guard = guard
        self.handler_class = handler_class

    def __call__(self) -> RequestHandler:
        return self.handler_class(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose server keeps its connections to ``guard``'s limits."""

    __slots__ = ("_guard", "_handler_class", "_request_handler")

    def __init__(
        self,
        app: web.Application,
        *,
        guard: ConnectionGuard,
        handler_class: type[GuardedRequestHandler] = GuardedRequestHandler,
        request_handler: Callable[[web.Application], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard
        self._handler_class = handler_class
        # Makes, from the app once it is set up, the handler of every request in place of the
        # app's own (its router and middleware chain): gateway.routes.public_handler.
        self._request_handler = request_handler

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        handler = made.request_handler
        if self._request_handler is not None:
            handler = self._request_handler(self.app)
        # The server the app made (its handler, request factory and options), making guarded
        # connection handlers instead.
        return GuardedServer(
            handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            guard=self._guard,
            handler_class=self._handler_class,
            **made._kwargs,
        )
