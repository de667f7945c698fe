"""The public port: the two intercepted conversation routes, and pass-through for the rest."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from gateway import jsonlib
from gateway.answers import (
    AnswerTooLarge,
    EvaluationFailed,
    decide_first,
    decide_judged,
    inspect_answer,
    must_wait,
    read_bounded,
    read_buffered,
    start_after_answer,
    withhold_messages,
)
from gateway.audit import INFO, RequestInfo, user_id
from gateway.batches import AfterAnswers
from gateway.flashback import BODY_TOO_LARGE, EVALUATION_FAILED, QUOTA_EXCEEDED, block_body, error_body
from gateway.policy import Context, Stage
from gateway.proxy import (
    UPSTREAM_ERRORS,
    call_upstream,
    json_response,
    pass_through,
    upstream_failure,
)
from gateway.redaction import REDACTOR
from gateway.request_body import InspectedRequest, read_body
from gateway.state import STATE, GatewayState
from gateway.target import TARGET, Refusal, Target, classify
from gateway.usage.accounting import Exchange
from gateway.usage.quota import Verdict
from gateway.usage.workspaces import UNRESOLVED, PageFetcher, Placement, Resolution

log = logging.getLogger("gateway.routes")


def refused(refusal: Refusal) -> web.Response:
    return json_response(refusal.status, error_body(refusal.message, error_code=refusal.error_code))


# Conversation lists are small (100 at most a page); a larger answer is passed on unlearned.
_LEARN_LIMIT = 1 << 20


AFTER_ANSWERS = web.AppKey("after_answers", AfterAnswers[Any])
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# nginx's status for a client that closed its connection before it had its answer: a 4xx of
# its own, so that a 5xx always means the gateway or the backend failed.
CLIENT_CLOSED_REQUEST = 499


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def public_handler(app: web.Application) -> Handler:
    """The public port's request handler, in place of the app's router.

    Every request on the public port goes to ``serve_request`` (the app's one route catches
    every path, and ``gateway.target.classify`` reads the target), so the router's matching is
    work done per request for nothing. The handler does what the app's own would: the request is
    given the catch-all route's match (so that ``request.app`` and the response-prepare hooks
    work as they do through the router), and an ``Expect`` header gets the route's answer
    (``100 Continue``). The app keeps its router, for any runner that serves it without this.
    """
    (resource,) = app.router.resources()
    (route,) = resource
    match = web.UrlMappingMatchInfo({"tail": ""}, route)
    match.add_app(app)
    match.freeze()
    # Looked up once here rather than from the request (a property and a key lookup) each time.
    state, after = app[STATE], app[AFTER_ANSWERS]

    async def expected(request: web.Request) -> web.StreamResponse:
        answered = await match.expect_handler(request)
        await request.writer.drain()
        if answered is not None:
            return answered
        return await serve_request(request, state, after)

    # Not a coroutine of its own: the request's task runs serve_request's directly.
    def handle(request: web.Request) -> Awaitable[web.StreamResponse]:
        request._match_info = match
        if request.headers.get("Expect"):
            return expected(request)
        return serve_request(request, state, after)

    return handle


def _request_info(request: web.Request) -> RequestInfo:
    headers = request.headers
    authorization = headers.get("Authorization")
    info = RequestInfo(user_id=user_id(authorization) if authorization else None, after_answer=[])
    incoming = headers.get("X-Request-Id")
    # SECURITY: a client's id is taken only if no block rule catches it; the redactor then
    # leaves requestId alone, instead of scanning a new value on every event of every request.
    if incoming and len(incoming) <= 128 and incoming.isprintable() and not REDACTOR.sensitive(incoming):
        info.request_id = incoming
    request[INFO] = info
    return info


async def serve_request(
    request: web.Request,
    state: GatewayState | None = None,
    after: AfterAnswers[Finished] | None = None,
) -> web.StreamResponse:
    """Every request of the public port: routed by the gateway's own reading of its target, timed,
    counted, and logged as one ``request.completed`` event.

    (One coroutine for both: each frame between the task and the upstream call is resumed at
    every step of a request.)"""
    info = _request_info(request)
    if state is None or after is None:  # served through the app's router
        state, after = request.app[STATE], request.app[AFTER_ANSWERS]
    status = 500
    try:
        response = await _routed(request, info, state)
        status = response.status
        return response
    except EvaluationFailed:
        # Fail closed: what the engine could not evaluate is not forwarded, nor returned.
        status = 403
        return json_response(
            403,
            error_body(
                "Refused: the policy engine could not evaluate this text", error_code=EVALUATION_FAILED
            ),
        )
    except asyncio.CancelledError:
        # aiohttp cancels the handler of a client that disconnects (handler_cancellation).
        if client_gone(request):
            status = CLIENT_CLOSED_REQUEST
        raise
    except ConnectionResetError:
        # A read from or a write to a client that went away ("Cannot write to closing transport").
        if not client_gone(request):
            raise
        status = CLIENT_CLOSED_REQUEST
        # Never sent: aiohttp finds the connection closing, and lets it go without a log line.
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    finally:
        if info.recorded_status is not None:
            status = info.recorded_status
        elapsed = time.perf_counter() - info.started
        # Once this task has handed the answer to the socket: the client does not wait for it.
        after.add((request, info, status, elapsed, state))


Finished = tuple[web.Request, RequestInfo, int, float, GatewayState]


class _Pid:
    """This process's id, read once (a system call each time otherwise), again in a fork."""

    value = os.getpid()

    @classmethod
    def reread(cls) -> None:
        cls.value = os.getpid()


os.register_at_fork(after_in_child=_Pid.reread)


def completed(finished: Finished) -> None:
    """A finished request's metrics and ``request.completed`` line (after usage, if any)."""
    request, info, status, elapsed, state = finished
    if info.after_answer:
        start_after_answer(info)
    metrics = state.observer.metrics
    route = info.route
    duration, prompt_overhead, response_overhead = metrics.route_series(route)
    metrics.count(metrics.requests, (route, str(status)))
    metrics.observe(duration, elapsed)
    if info.upstream_seconds is not None:
        metrics.observe(metrics.upstream_duration, info.upstream_seconds)
    if info.prompt_own is not None:
        metrics.observe(prompt_overhead, info.prompt_own)
    if route in {"prompt", "messages"} and status != 400:
        metrics.observe(response_overhead, info.response_own)
    completed = {
        "event": "request.completed",
        "requestId": info.request_id,
        "pid": _Pid.value,
        "method": request.method,
        "route": route,
        "status": status,
        "decision": info.decision,
        "conversationId": info.conversation_id,
        "workspace": info.workspace,
        "userId": info.user_id,
        "durationMs": round(elapsed * 1000, 3),
        "upstreamMs": None if info.upstream_seconds is None else round(info.upstream_seconds * 1000, 3),
        "tokens": None,
    }
    exchange = info.exchange
    if exchange is not None:
        state.accountant.settle(exchange, completed)
    else:
        state.observer.request_completed(completed)


# Targets as classify reads them, by method and target: the same few recur on every request.
# Bounded (clients choose them), and emptied when full; long targets are not kept.
_TARGETS: dict[tuple[str, str], Target | Refusal] = {}
_TARGETS_LIMIT = 4096
_TARGET_LENGTH = 256


def _classify(method: str, raw_target: str) -> Target | Refusal:
    key = (method, raw_target)
    target = _TARGETS.get(key)
    if target is None:
        target = classify(method, raw_target)
        if len(raw_target) <= _TARGET_LENGTH:
            if len(_TARGETS) >= _TARGETS_LIMIT:
                _TARGETS.clear()
            _TARGETS[key] = target
    return target


def _routed(request: web.Request, info: RequestInfo, state: GatewayState) -> Awaitable[web.StreamResponse]:
    """The request's route, by the gateway's reading of its target (a coroutine to await)."""
    target = _classify(request.method, request.raw_path)
    if isinstance(target, Refusal):
        return _answered(refused(target))
    # SECURITY: from here on the upstream request line is built from this reading only.
    request[TARGET] = target
    if target.route == "passthrough":
        return pass_through(request)
    if target.route == "conversations":
        info.route = "conversations"
        return learn_conversations(request)
    conversation_id = target.conversation_id or ""
    info.route, info.conversation_id = target.route, conversation_id
    if target.route == "prompt":
        return prompt(request, conversation_id, state, info)
    return messages(request, conversation_id, state, info)


async def _answered(response: web.StreamResponse) -> web.StreamResponse:
    return response


async def learn_conversations(request: web.Request) -> web.StreamResponse:
    """Pass ``GET``/``POST /conversation`` through, learning where conversations live."""
    state = request.app[STATE]
    directory = state.resolver.directory
    body: bytes | None = None
    length = request.content_length
    if request.method == "POST" and length is not None and length <= state.settings.body_limit:
        body = await request.read()
    seen: list[bytes] = []
    size = 0

    def tap(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)
        if size <= _LEARN_LIMIT:
            seen.append(chunk)

    response = await pass_through(request, body=body, tap=tap)
    # SECURITY: placements are learned only from answers to a caller with credentials (as lookups
    # are asked): an anonymous caller must not teach which workspace a conversation costs.
    if response.status == 200 and size <= _LEARN_LIMIT and request.headers.get("Authorization"):
        try:
            answer = jsonlib.loads(b"".join(seen))
            if request.method == "GET":
                directory.learn_list(answer)
            elif body is not None:
                directory.learn_created(jsonlib.loads(body), answer)
        except ValueError:
            pass
    return response


def _page_fetcher(request: web.Request) -> PageFetcher | None:
    """Pages of the caller's own conversation list, asked with the caller's own credentials."""
    authorization = request.headers.get("Authorization")
    if not authorization:
        return None
    state = request.app[STATE]
    settings = state.settings
    base = str(settings.upstream_url).rstrip("/")
    headers = {"Authorization": authorization, "Accept": "application/json", "Accept-Encoding": "identity"}
    if settings.origin_secret is not None:
        # The backend refuses what lacks it: this call goes upstream like any forwarded request.
        headers[settings.origin_header] = settings.origin_secret

    async def fetch(take: int, skip: int) -> tuple[int, Any]:
        async with state.session.get(
            f"{base}/conversation",
            params={"take": str(take), "skip": str(skip)},
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=state.settings.connect_timeout + 5),
        ) as answer:
            if answer.status != 200:
                return answer.status, None
            return 200, jsonlib.loads(await read_bounded(answer.content, _LEARN_LIMIT))

    return fetch


async def resolve(
    request: web.Request, conversation_id: str, info: RequestInfo, state: GatewayState | None = None
) -> Resolution:
    if state is None:
        state = request.app[STATE]
    resolver = state.resolver
    headers = request.headers
    # Without a lookup to make (most requests), no coroutine to run.
    resolution = resolver.settled(headers, conversation_id, can_look_up=bool(headers.get("Authorization")))
    if resolution is None:
        try:
            resolution = await resolver.resolve(headers, conversation_id, _page_fetcher(request))
        except (*UPSTREAM_ERRORS, ValueError, AnswerTooLarge) as exc:
            state.observer.fallback("workspace", "lookup_failed")
            log.warning("workspace lookup failed: %s", type(exc).__name__)
            resolution = Resolution(Placement(UNRESOLVED), "unresolved")
    info.workspace, info.repo = resolution.placement.workspace, resolution.placement.repo
    return resolution


# Contexts by how they count tokens and where they place a request: the same few on every
# request, and immutable. Bounded, and emptied when full.
_CONTEXTS: dict[tuple[Any, str | None, str | None, str | None], Context] = {}
_CONTEXTS_LIMIT = 4096


def policy_context(state: GatewayState, resolution: Resolution, model: str | None = None) -> Context:
    """Where the request belongs, for scoped rules, and how to count tokens, for max_tokens rules."""
    count_tokens = state.accountant.counter.counting(model)
    placement = resolution.placement
    if resolution.source == "unresolved":
        key: tuple[Any, str | None, str | None, str | None] = (count_tokens, None, None, None)
    else:
        key = (count_tokens, placement.org, placement.workspace, placement.repo)
    context = _CONTEXTS.get(key)
    if context is None:
        if len(_CONTEXTS) >= _CONTEXTS_LIMIT:
            _CONTEXTS.clear()
        context = _CONTEXTS[key] = Context(key[1], key[2], key[3], count_tokens)
    return context


def quota_exceeded(request: web.Request, verdict: Verdict) -> web.Response:
    request.app[STATE].observer.metrics.quota_rejections.inc()
    message = (
        "Token budget unavailable: usage store down and quotas fail closed"
        if verdict.period == "store unavailable"
        else f"Token budget of this workspace is used up for this {verdict.period}"
    )
    response = json_response(429, error_body(message, error_code=QUOTA_EXCEEDED))
    response.headers["Retry-After"] = str(verdict.retry_after)
    return response


def _too_large(limit: int) -> Refusal:
    return Refusal(413, f"Request body over {limit} bytes", BODY_TOO_LARGE)


def prompt_now(request: web.Request, limit: int) -> InspectedRequest | Refusal | None:
    """The prompt body, decoded as the backend decodes it, or why it is refused, without
    waiting: when the whole body is in already (a prompt usually comes with its head), or its
    Content-Length refuses it. None while some of it is still to come (``read_prompt``)."""
    length = request.content_length
    if length is not None and length > limit:
        return _too_large(limit)
    try:
        raw = read_buffered(request.content, limit)
    except AnswerTooLarge:
        return _too_large(limit)
    return None if raw is None else _inspect_prompt(request, raw, limit)


async def read_prompt(request: web.Request, limit: int) -> InspectedRequest | Refusal:
    """What ``prompt_now`` leaves: a body still arriving, read as it comes, decoded as the
    backend decodes it, or why it is refused."""
    try:
        raw = await read_bounded(request.content, limit)
    except AnswerTooLarge:
        return _too_large(limit)
    return _inspect_prompt(request, raw, limit)


def _inspect_prompt(request: web.Request, raw: bytes, limit: int) -> InspectedRequest | Refusal:
    headers = request.headers
    encodings = headers.getall("Content-Encoding", ())
    inspected = read_body(
        raw,
        content_type=headers.get("Content-Type"),
        content_encoding=", ".join(encodings) if encodings else None,
        limit=limit,
    )
    if isinstance(inspected, Refusal):
        return inspected
    payload = inspected.payload
    if not isinstance(payload, dict) or "prompt" not in payload:
        return Refusal(400, "Request body must have a 'prompt' field")
    if not isinstance(payload["prompt"], str):
        return Refusal(400, "'prompt' must be a string")
    return inspected


async def prompt(
    request: web.Request, conversation_id: str, state: GatewayState, info: RequestInfo
) -> web.StreamResponse:
    limit = state.settings.body_limit
    inspected = prompt_now(request, limit) or await read_prompt(request, limit)
    if isinstance(inspected, Refusal):
        return refused(inspected)
    payload = inspected.payload

    resolution = await resolve(request, conversation_id, info, state)
    model = payload.get("model")
    if not isinstance(model, str):
        model = None
    context = policy_context(state, resolution, model)
    workspace = resolution.placement.workspace
    quota = state.quota
    # A workspace without a budget is admitted without a coroutine to run.
    verdict, ticket = quota.admit_now(workspace) or await quota.admit(workspace)
    if not verdict.allowed:
        return quota_exceeded(request, verdict)
    exchange = Exchange(conversation_id, resolution, model, payload["prompt"], ticket)
    # Settled once the answer is out (serve_request's bookkeeping): recorded, or its ticket released.
    info.exchange = exchange
    # Every string of the body, keys included: the backend acts on all of them.
    texts = inspected.texts
    # A block judge rule is waited for here, before forwarding, unless a cheap rule blocked.
    decision = decide_first(state, info, Stage.PROMPT, texts.text, context, texts.path_at)
    if must_wait(decision):
        decision = await decide_judged(state, info, decision, texts.text, context, texts.path_at)
    if decision.blocked:
        return json_response(403, block_body(decision))
    exchange.forwarded = True
    called = time.perf_counter()
    info.prompt_own = called - info.started
    try:
        upstream = await call_upstream(
            request, data=inspected.forward, inspect=True, body=inspected, state=state
        )
    except UPSTREAM_ERRORS as exc:
        # Refused before the upstream had it: nothing was used.
        exchange.forwarded = not isinstance(exc, aiohttp.ClientConnectorError)
        return upstream_failure(request, exc)
    info.upstream_seconds = time.perf_counter() - called
    try:
        return await inspect_answer(request, upstream, context, exchange, state=state, info=info)
    finally:
        upstream.release()


async def messages(
    request: web.Request, conversation_id: str, state: GatewayState, info: RequestInfo
) -> web.StreamResponse:
    context = policy_context(state, await resolve(request, conversation_id, info, state))
    try:
        upstream = await call_upstream(request, data=None, inspect=True, state=state)
    except UPSTREAM_ERRORS as exc:
        return upstream_failure(request, exc)
    try:
        return await withhold_messages(request, upstream, context)
    finally:
        upstream.release()


def add_routes(app: web.Application) -> None:
    # [\s\S], not ".": a decoded path may hold a newline, and must still be served.
    app.router.add_route("*", r"/{tail:[\s\S]*}", serve_request)
