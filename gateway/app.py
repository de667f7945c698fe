"""Wiring: the public app, the admin app, and running both until told to stop."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.admin_auth import AdminToken, admin_auth, warn_if_exposed
from gateway.answers import judged_after
from gateway.audit import AuditFile
from gateway.batches import AfterAnswers
from gateway.config import Settings
from gateway.connections import ConnectionGuard, ConnectionLimits, GuardedAppRunner
from gateway.flashback import INVALID_REQUEST
from gateway.judge.client import JudgeClient, JudgeSettings
from gateway.policy import RuleSet
from gateway.policy_repull import PolicyRepull
from gateway.redaction import REDACTOR
from gateway.reload import Reloader
from gateway.routes import AFTER_ANSWERS, add_routes, completed, public_handler
from gateway.state import STATE, GatewayState
from gateway.usage.journal import UsageJournal
from gateway.usage.redis_store import RedisUsageStore
from gateway.usage.store import Period, StoreUnavailable, Totals

log = structlog.get_logger("gateway")


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    settings = state.settings
    state.session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
        ),
        # Bytes pass through as the upstream sent them; answers to inspect ask for identity.
        auto_decompress=False,
        # SECURITY: one session serves every client; it must never carry one's cookies to another.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Forward only the headers the client sent, not aiohttp's defaults.
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    )
    judge_session = None
    if settings.judge_url is not None:
        # Its own pool: a slow model must not hold the upstream's connections, nor the reverse.
        judge_session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        state.judge.client = JudgeClient(
            JudgeSettings(
                url=settings.judge_url,
                model=settings.judge_model or "",
                api_key=settings.judge_api_key,
                timeout=settings.judge_timeout,
                max_concurrent=settings.judge_max_concurrent,
            ),
            judge_session,
        )
    yield
    await state.session.close()
    state.session = None
    if judge_session is not None:
        state.judge.client = None
        await judge_session.close()


async def _usage(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    settings = state.settings
    if settings.usage_journal is not None and isinstance(state.store, RedisUsageStore):
        # Here, in the serving process: each worker keeps its own file (PATH.<pid>).
        state.store.journal = UsageJournal(settings.usage_journal, limit=settings.usage_buffer)
    await state.store.start()
    yield
    # Every answered request's usage is recorded, then flushed, before the store closes.
    # Requests that finished in this very turn of the loop are handed to accounting first.
    app[AFTER_ANSWERS].flush()
    await state.accountant.drain()
    await state.store.close()


async def _audit_and_alerts(app: web.Application) -> AsyncIterator[None]:
    observer = app[STATE].observer
    settings = app[STATE].settings
    if settings.audit_file is not None:
        observer.audit_file = AuditFile(settings.audit_file)
    if observer.alerts is not None:
        await observer.alerts.start()
    yield
    if observer.alerts is not None:
        await observer.alerts.close()
    if observer.audit_file is not None:
        observer.audit_file.close()


async def _judged_after(app: web.Application) -> AsyncIterator[None]:
    yield
    # Verdicts of log and alert rules still coming in are recorded before the audit file, the
    # alerts and the judge's session close; each call is bounded by judge_timeout.
    settings = app[STATE].settings
    # Requests finished in this very turn hand over their judging first.
    app[AFTER_ANSWERS].flush()
    await judged_after(settings.judge_timeout + settings.redis_timeout + 1.0)


# SECURITY: request bodies reach the handlers as the client sent them. The prompt route decodes
# its body itself, as the backend would, and forwards what it decoded; every other route
# forwards the bytes with their own Content-Encoding. (aiohttp would otherwise inflate every
# body and leave it labelled as compressed.)
PUBLIC_SERVER_OPTIONS: dict[str, Any] = {"auto_decompress": False}


def build_public_app(state: GatewayState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_usage)
    app.cleanup_ctx.append(_audit_and_alerts)
    app.cleanup_ctx.append(_judged_after)  # last in, so first out
    app[AFTER_ANSWERS] = AfterAnswers(completed, state.observer.metrics.flush)
    add_routes(app)
    return app


def build_admin_app(state: GatewayState, reloader: Reloader | None = None) -> web.Application:
    reloader = reloader or Reloader(state)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ruleset = state.ruleset
        body: dict[str, object] = {"ready": True, "revision": ruleset.revision, "rules": len(ruleset.rules)}
        if state.settings.redis_url is not None:
            reachable = await state.store.reachable()
            body["redis"] = "reachable" if reachable else "unreachable"
            if not reachable:
                # Usage is buffered either way; only fail-closed quotas make the instance unfit.
                body["quotas"] = "fail-closed" if state.settings.quota_fail_closed else "fail-open"
                body["ready"] = not state.settings.quota_fail_closed
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def reload(_: web.Request) -> web.Response:
        result = await reloader.reload()
        if not result.ok:
            return web.json_response(
                {"success": False, "message": "policies refused; the previous rule set keeps serving",
                 "error_code": "POLICIES_REFUSED", "revision": result.revision,
                 "errors": [REDACTOR.text(error) for error in result.errors]},
                status=422,
            )  # fmt: skip
        reloader.tell_other_workers()
        return web.json_response(
            {"success": True, "revision": result.revision, "rules": result.rules, "changed": result.changed}
        )

    async def usage(request: web.Request) -> web.Response:
        period_name = request.query.get("period", "day")
        if period_name not in {"day", "month"}:
            return web.json_response(
                {"success": False, "message": "period must be day or month", "error_code": INVALID_REQUEST},
                status=400,
            )
        workspace, period, now = request.match_info["workspace"], Period(period_name), datetime.now(UTC)
        try:
            totals = await state.store.totals(workspace, period, now)
        except StoreUnavailable:
            return web.json_response(
                {"success": False, "message": "usage store unavailable", "error_code": "STORE_UNAVAILABLE"},
                status=503,
            )
        return web.json_response(usage_body(workspace, period, now, totals))

    async def metrics(_: web.Request) -> web.Response:
        body = state.observer.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    settings = state.settings
    warn_if_exposed(settings)
    # Route names are what admin_open lists.
    token = AdminToken(settings.admin_token, settings.admin_token_file)
    app = web.Application(middlewares=[admin_auth(token, settings.admin_open)])
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/usage/{workspace}", usage, name="usage")
    app.router.add_post("/-/reload", reload, name="reload")
    return app


def usage_body(workspace: str, period: Period, now: datetime, totals: Totals) -> dict[str, object]:
    return {
        "success": True,
        "workspace": REDACTOR.identifier(workspace),  # an id a caller typed, as every sink shows it
        "period": period.value,
        "bucket": period.bucket(now),
        "promptTokens": totals.prompt_tokens,
        "responseTokens": totals.response_tokens,
        "totalTokens": totals.tokens,
        "requests": totals.requests,
    }


def public_runner(state: GatewayState, **options: Any) -> GuardedAppRunner:
    """The public port's runner, as ``serve`` runs it (``options``: more server options)."""
    settings, metrics = state.settings, state.observer.metrics
    # SECURITY: a slow or surplus client cannot hold the public port (gateway/connections.py).
    guard = ConnectionGuard(
        ConnectionLimits(settings.header_timeout, settings.max_connections),
        lambda reason: metrics.child(metrics.connections_refused, reason).inc(),
    )
    return GuardedAppRunner(
        build_public_app(state),
        guard=guard,
        request_handler=public_handler,
        # SECURITY: a client that goes away cancels its handler, and with it the upstream call.
        handler_cancellation=True,
        access_log=None,
        **PUBLIC_SERVER_OPTIONS,
        shutdown_timeout=settings.shutdown_timeout,
        **options,
    )


async def run(settings: Settings, ruleset: RuleSet, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then drain: stop accepting, let requests under way finish
    (up to ``shutdown_timeout``), record their usage, flush it and queued alerts, return."""
    state = GatewayState(settings, ruleset)
    reloader = Reloader(state)
    metrics = state.observer.metrics
    public = public_runner(state)
    # The admin port's parser errors quote bytes too (a token, say): it gets the same handler.
    admin_guard = ConnectionGuard(
        ConnectionLimits(settings.header_timeout, settings.max_connections),
        lambda reason: metrics.child(metrics.connections_refused, reason).inc(),
    )
    admin = GuardedAppRunner(
        build_admin_app(state, reloader), guard=admin_guard, access_log=None, shutdown_timeout=2.0
    )
    await public.setup()
    await admin.setup()
    background: set[asyncio.Task[None]] = set()

    def spawn(coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        background.add(task)
        task.add_done_callback(background.discard)

    try:
        await web.TCPSite(public, settings.host, settings.port, reuse_port=reuse_port).start()
        await web.TCPSite(admin, settings.admin_host, settings.admin_port, reuse_port=reuse_port).start()
        log.info(
            "gateway.serving",
            listen=f"{settings.host}:{settings.port}",
            admin=f"{settings.admin_host}:{settings.admin_port}",
            # The origin only: a URL's user, password or path may hold a credential.
            upstream=str(settings.upstream_url.origin()),
            revision=ruleset.revision,
            rules=len(ruleset.rules),
            store="redis" if settings.redis_url else "memory",
            stream_holdback_chars=state.holdback,
            pid=os.getpid(),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: spawn(_reload(reloader)))
        if settings.watch_policies:
            spawn(reloader.watch())
        if settings.policies_pull_interval is not None:
            spawn(PolicyRepull(reloader).run())
        await stop.wait()
        log.info("gateway.stopping", pid=os.getpid(), shutdown_timeout=settings.shutdown_timeout)
    finally:
        for task in list(background):
            task.cancel()
        # Public first: it stops accepting, finishes what is under way, then flushes usage and alerts.
        await public.cleanup()
        await admin.cleanup()
        log.info("gateway.stopped", pid=os.getpid())


async def _reload(reloader: Reloader) -> None:
    await reloader.reload()
