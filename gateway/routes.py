"""The public port: the two intercepted conversation routes, and pass-through for the rest."""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from gateway import jsonlib
from gateway.answers import (
    INFO,
    AnswerTooLarge,
    EvaluationFailed,
    decide,
    inspect_answer,
    read_bounded,
    withhold_messages,
)
from gateway.audit import REDACTOR, RequestInfo, user_id
from gateway.batches import AfterAnswers
from gateway.flashback import EVALUATION_FAILED, QUOTA_EXCEEDED, block_body, error_body
from gateway.policy import Context, Stage
from gateway.proxy import (
    UPSTREAM_ERRORS,
    call_upstream,
    json_response,
    pass_through,
    upstream_failure,
)
from gateway.state import STATE
from gateway.usage.accounting import Exchange
from gateway.usage.quota import Verdict
from gateway.usage.workspaces import UNRESOLVED, PageFetcher, Placement, Resolution

log = logging.getLogger("gateway.routes")

# Case-insensitive, trailing slash allowed: the routing rules of a typical Node backend, so
# that no spelling the backend accepts as the prompt route slips past uninspected.
_INTERCEPTED = re.compile(r"^/conversation/([^/]+)/(prompt|messages)/?$", re.IGNORECASE)
_INTERCEPTED_METHOD = {"prompt": "POST", "messages": "GET"}


def _bad_request(message: str) -> web.Response:
    return json_response(400, error_body(message))


def intercepted_route(request: web.Request) -> tuple[str, str] | web.Response | None:
    """(route, conversation id) for an intercepted request, a 400 for a disguised one, or None."""
    raw_path = request.raw_path.split("?", 1)[0]
    found = _classify(raw_path) if len(raw_path) <= _MEMO_PATH else _classify.__wrapped__(raw_path)
    if found is None or request.method != _INTERCEPTED_METHOD[found[0]]:
        return None
    if not found[1]:
        return _bad_request("Invalid conversation id")
    return found


_DISGUISED = ""  # the conversation id _classify gives a disguised spelling of a route


# Conversations see many requests each: the same paths recur. Clients choose them, so only
# short ones are remembered, and only so many: at most about 1 MB.
_MEMO_PATH = 256


@functools.lru_cache(maxsize=4096)
def _classify(raw_path: str) -> tuple[str, str] | None:
    """(route, conversation id) for a path that reaches an intercepted route, with the id
    ``_DISGUISED`` for any spelling other than the plain one; None for any other path."""
    # A backend may route on the raw path (and decode the id after) or on a normalised one.
    plain = _INTERCEPTED.match(raw_path)
    target = plain or _INTERCEPTED.match(_canonical(raw_path))
    if target is None:
        return None
    route = target.group(2).lower()
    # SECURITY: whatever the backend would resolve to this route must be inspected, so any
    # spelling other than the plain one (encoded slashes, dot segments, doubled slashes,
    # control characters) is refused rather than passed through.
    conversation_id = unquote(plain.group(1)) if plain else ""
    if (
        plain is None
        or conversation_id in {"", ".", ".."}
        or any(char in conversation_id for char in "/\\")
        or any(ord(char) < 32 or ord(char) == 127 for char in conversation_id)
    ):
        return route, _DISGUISED
    return route, conversation_id


def _canonical(raw_path: str) -> str:
    """The path decoded and normalised, as a backend that routes on a normalised path sees it."""
    decoded = unquote(raw_path)
    return posixpath.normpath(re.sub("/+", "/", decoded.replace("\\", "/")))


_CONVERSATIONS = re.compile(r"^/conversation/?$", re.IGNORECASE)
# Conversation lists are small (100 at most a page); a larger answer is passed on unlearned.
_LEARN_LIMIT = 1 << 20


EXCHANGE = web.RequestKey("exchange", Exchange)
AFTER_ANSWERS = web.AppKey("after_answers", AfterAnswers[Any])
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def info_of(request: web.Request) -> RequestInfo:
    return request.get(INFO) or RequestInfo()


@web.middleware
async def observe_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Times every request, counts it, and logs one ``request.completed`` event for it."""
    info = RequestInfo(user_id=user_id(request.headers.get("Authorization")))
    incoming = request.headers.get("X-Request-Id", "")
    # SECURITY: a client's id is taken only if no block rule catches it; the redactor then
    # leaves requestId alone, instead of scanning a new value on every event of every request.
    if 0 < len(incoming) <= 128 and incoming.isprintable() and not REDACTOR.sensitive(incoming):
        info.request_id = incoming
    request[INFO] = info
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        elapsed = time.perf_counter() - info.started
        # Once this task has handed the answer to the socket: the client does not wait for it.
        request.app[AFTER_ANSWERS].add((request, info, status, elapsed))


Finished = tuple[web.Request, RequestInfo, int, float]


def completed(finished: Finished) -> None:
    """A finished request's metrics and ``request.completed`` line (after usage, if any)."""
    request, info, status, elapsed = finished
    state = request.app[STATE]
    metrics = state.observer.metrics
    metrics.count(metrics.requests, (info.route, str(status)))
    metrics.child(metrics.request_duration, info.route).observe(elapsed)
    if info.prompt_own is not None:
        metrics.child(metrics.overhead, "prompt").observe(info.prompt_own)
    if info.route in {"prompt", "messages"} and status != 400:
        metrics.child(metrics.overhead, "response").observe(info.response_own)
    completed = {
        "requestId": info.request_id,
        "pid": os.getpid(),
        "method": request.method,
        "route": info.route,
        "status": status,
        "decision": info.decision,
        "conversationId": info.conversation_id,
        "workspace": info.workspace,
        "userId": info.user_id,
        "durationMs": round(elapsed * 1000, 3),
        "upstreamMs": None if info.upstream_seconds is None else round(info.upstream_seconds * 1000, 3),
        "tokens": None,
    }
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        state.accountant.settle(exchange, completed)
    else:
        state.observer.request_completed(completed)


async def dispatch(request: web.Request) -> web.StreamResponse:
    info = info_of(request)
    route = intercepted_route(request)
    if route is None:
        if request.method in {"GET", "POST"} and _CONVERSATIONS.match(request.path):
            info.route = "conversations"
            return await learn_conversations(request)
        return await pass_through(request)
    if isinstance(route, web.Response):
        return route
    name, conversation_id = route
    info.route, info.conversation_id = name, conversation_id
    try:
        if name == "prompt":
            return await prompt(request, conversation_id)
        return await messages(request, conversation_id)
    except EvaluationFailed:
        return json_response(
            403,
            error_body(
                "Refused: the policy engine could not evaluate this text", error_code=EVALUATION_FAILED
            ),
        )


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
    if response.status == 200 and size <= _LEARN_LIMIT:
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
    base = str(state.settings.upstream_url).rstrip("/")

    async def fetch(take: int, skip: int) -> tuple[int, Any]:
        async with state.session.get(
            f"{base}/conversation",
            params={"take": str(take), "skip": str(skip)},
            headers={
                "Authorization": authorization,
                "Accept": "application/json",
                "Accept-Encoding": "identity",
            },
            timeout=aiohttp.ClientTimeout(total=state.settings.connect_timeout + 5),
        ) as answer:
            if answer.status != 200:
                return answer.status, None
            return 200, jsonlib.loads(await read_bounded(answer.content, _LEARN_LIMIT))

    return fetch


async def resolve(request: web.Request, conversation_id: str) -> Resolution:
    state = request.app[STATE]
    try:
        resolution = await state.resolver.resolve(request.headers, conversation_id, _page_fetcher(request))
    except (*UPSTREAM_ERRORS, ValueError, AnswerTooLarge) as exc:
        state.observer.fallback("workspace", "lookup_failed")
        log.warning("workspace lookup failed: %s", type(exc).__name__)
        resolution = Resolution(Placement(UNRESOLVED), "unresolved")
    info = info_of(request)
    info.workspace, info.repo = resolution.placement.workspace, resolution.placement.repo
    return resolution


def policy_context(request: web.Request, resolution: Resolution, model: str | None = None) -> Context:
    """Where the request belongs, for scoped rules, and how to count tokens, for max_tokens rules."""
    count_tokens = functools.partial(request.app[STATE].accountant.counter.count, model=model)
    placement = resolution.placement
    if resolution.source == "unresolved":
        return Context(count_tokens=count_tokens)
    return Context(placement.org, placement.workspace, placement.repo, count_tokens)


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


async def prompt(request: web.Request, conversation_id: str) -> web.StreamResponse:
    state = request.app[STATE]
    limit = state.settings.body_limit
    if request.content_length is not None and request.content_length > limit:
        return json_response(413, error_body(f"Request body over {limit} bytes"))
    try:
        body = await read_bounded(request, limit)
    except AnswerTooLarge:
        return json_response(413, error_body(f"Request body over {limit} bytes"))
    try:
        payload = jsonlib.loads(body)
    except ValueError:
        return _bad_request("Request body must be JSON")
    if not isinstance(payload, dict) or "prompt" not in payload:
        return _bad_request("Request body must have a 'prompt' field")
    if not isinstance(payload["prompt"], str):
        return _bad_request("'prompt' must be a string")

    resolution = await resolve(request, conversation_id)
    model = payload.get("model") if isinstance(payload.get("model"), str) else None
    context = policy_context(request, resolution, model)
    verdict, ticket = await state.quota.admit(resolution.placement.workspace)
    if not verdict.allowed:
        return quota_exceeded(request, verdict)
    exchange = Exchange(conversation_id, resolution, model, payload["prompt"], ticket)
    # Settled by the middleware once the answer is out: recorded, or its ticket released.
    request[EXCHANGE] = exchange
    decision = decide(request, Stage.PROMPT, payload["prompt"], context)
    if decision.blocked:
        return json_response(403, block_body(decision))
    info = info_of(request)
    exchange.forwarded = True
    called = time.perf_counter()
    info.prompt_own = called - info.started
    try:
        upstream = await call_upstream(request, data=body, inspect=True)
    except UPSTREAM_ERRORS as exc:
        # Refused before the upstream had it: nothing was used.
        exchange.forwarded = not isinstance(exc, aiohttp.ClientConnectorError)
        return upstream_failure(request, exc)
    info.upstream_seconds = time.perf_counter() - called
    state.observer.metrics.upstream_duration.observe(info.upstream_seconds)
    try:
        return await inspect_answer(request, upstream, context, exchange)
    finally:
        upstream.release()


async def messages(request: web.Request, conversation_id: str) -> web.StreamResponse:
    context = policy_context(request, await resolve(request, conversation_id))
    try:
        upstream = await call_upstream(request, data=None, inspect=True)
    except UPSTREAM_ERRORS as exc:
        return upstream_failure(request, exc)
    try:
        return await withhold_messages(request, upstream, context)
    finally:
        upstream.release()


def add_routes(app: web.Application) -> None:
    # [\s\S], not ".": a decoded path may hold a newline, and must still reach dispatch.
    app.router.add_route("*", r"/{tail:[\s\S]*}", dispatch)
