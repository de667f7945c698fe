"""The public port: the two intercepted conversation routes, and pass-through for the rest."""

from __future__ import annotations

import json
import posixpath
import re
from urllib.parse import unquote

from aiohttp import web

from gateway.answers import (
    AnswerTooLarge,
    EvaluationFailed,
    decide,
    inspect_answer,
    read_bounded,
    withhold_messages,
)
from gateway.flashback import EVALUATION_FAILED, block_body, error_body
from gateway.policy import Context, Stage
from gateway.proxy import (
    UPSTREAM_ERRORS,
    json_response,
    pass_through,
    upstream_failure,
    upstream_headers,
    upstream_url,
)
from gateway.state import STATE

# Case-insensitive, trailing slash allowed: the routing rules of a typical Node backend, so
# that no spelling the backend accepts as the prompt route slips past uninspected.
_INTERCEPTED = re.compile(r"^/conversation/([^/]+)/(prompt|messages)/?$", re.IGNORECASE)
_INTERCEPTED_METHOD = {"prompt": "POST", "messages": "GET"}


def _bad_request(message: str) -> web.Response:
    return json_response(400, error_body(message))


def intercepted_route(request: web.Request) -> tuple[str, str] | web.Response | None:
    """(route, conversation id) for an intercepted request, a 400 for a disguised one, or None."""
    raw_path = request.raw_path.split("?", 1)[0]
    decoded = unquote(raw_path)
    canonical = posixpath.normpath(re.sub("/+", "/", decoded.replace("\\", "/")))
    # A backend may route on the raw path (and decode the id after) or on a normalised one.
    target = _INTERCEPTED.match(raw_path) or _INTERCEPTED.match(canonical)
    if target is None or request.method != _INTERCEPTED_METHOD[target.group(2).lower()]:
        return None
    # SECURITY: whatever the backend would resolve to this route must be inspected, so any
    # spelling other than the plain one (encoded slashes, dot segments, doubled slashes,
    # control characters) is refused rather than passed through.
    plain = _INTERCEPTED.match(raw_path)
    conversation_id = unquote(plain.group(1)) if plain else ""
    if (
        plain is None
        or conversation_id in {"", ".", ".."}
        or any(char in conversation_id for char in "/\\")
        or any(ord(char) < 32 or ord(char) == 127 for char in conversation_id)
    ):
        return _bad_request("Invalid conversation id")
    return plain.group(2).lower(), conversation_id


async def dispatch(request: web.Request) -> web.StreamResponse:
    route = intercepted_route(request)
    if route is None:
        return await pass_through(request)
    if isinstance(route, web.Response):
        return route
    name, conversation_id = route
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


def request_context(request: web.Request) -> Context:
    # Workspace and repo resolution comes with token accounting; until then rules scoped to
    # them do not apply (see README, Scope).
    return Context()


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
        payload = json.loads(body)
    except ValueError:
        return _bad_request("Request body must be JSON")
    if not isinstance(payload, dict) or "prompt" not in payload:
        return _bad_request("Request body must have a 'prompt' field")
    if not isinstance(payload["prompt"], str):
        return _bad_request("'prompt' must be a string")

    context = request_context(request)
    decision = decide(state, Stage.PROMPT, payload["prompt"], context)
    if decision.blocked:
        return json_response(403, block_body(decision))
    try:
        upstream = await state.session.post(
            upstream_url(request),
            data=body,
            headers=upstream_headers(request, inspect=True),
            allow_redirects=False,
        )
    except UPSTREAM_ERRORS as exc:
        return upstream_failure(exc)
    try:
        return await inspect_answer(request, upstream, context)
    finally:
        upstream.release()


async def messages(request: web.Request, conversation_id: str) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        upstream = await state.session.get(
            upstream_url(request), headers=upstream_headers(request, inspect=True), allow_redirects=False
        )
    except UPSTREAM_ERRORS as exc:
        return upstream_failure(exc)
    try:
        return await withhold_messages(request, upstream, request_context(request))
    finally:
        upstream.release()


def add_routes(app: web.Application) -> None:
    # [\s\S], not ".": a decoded path may hold a newline, and must still reach dispatch.
    app.router.add_route("*", r"/{tail:[\s\S]*}", dispatch)
