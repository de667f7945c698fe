"""The request target as the backend routes it: one canonical reading, routed and forwarded.

The gateway routes on the same reading it forwards. A Node/Express backend routes on the path
of ``url.parse(req.url)``: a fragment is dropped and an absolute-form target is reduced to its
path. So the gateway reduces the target the same way once, routes on the result, and builds
the upstream request line from it; nothing else of the raw string is sent on.
"""

from __future__ import annotations

import functools
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from gateway.flashback import INVALID_REQUEST

# Case-insensitive, trailing slash allowed: the routing rules of a typical Node backend, so
# that no spelling the backend accepts as the prompt route slips past uninspected.
_INTERCEPTED = re.compile(r"^/conversation/([^/]+)/(prompt|messages)/?$", re.IGNORECASE)
_INTERCEPTED_METHOD = {"prompt": "POST", "messages": "GET"}
_CONVERSATIONS = re.compile(r"^/conversation/?$", re.IGNORECASE)
_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
# Printable ASCII without space: what RFC 9112 allows in a request target. Anything else
# (controls, whitespace, bytes above 0x7e) a URL parser trims, rewrites or rejects in its own way.
_TARGET_CHARS = re.compile(r"^[\x21-\x7e]+$")
# Conversations see many requests each: the same paths recur. Clients choose them, so only
# short ones are remembered, and only so many: at most about 1 MB.
_MEMO_PATH = 256


@dataclass(frozen=True, slots=True)
class Refusal:
    """An immediate answer instead of forwarding: status, message, error code."""

    status: int
    message: str
    error_code: str = INVALID_REQUEST


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: its route, its conversation id, and the target sent upstream."""

    route: str  # "prompt" | "messages" | "conversations" | "passthrough"
    method: str  # upper case, as the upstream client sends it
    forward: str  # canonical path and query, the only form of the target that leaves
    path: str
    conversation_id: str | None = None


def classify(method: str, raw_target: str) -> Target | Refusal:
    """The route of a request target, read as the backend would, or why it is refused."""
    if not _TARGET_CHARS.match(raw_target):
        return Refusal(400, "Invalid request target")
    forward = raw_target.split("#", 1)[0]
    absolute = _ABSOLUTE.match(forward)
    if absolute is not None:
        forward = forward[absolute.end() :]
        if not forward.startswith(("/", "?")) and forward:
            return Refusal(400, "Invalid request target")
        if not forward.startswith("/"):
            forward = "/" + forward
    elif not forward.startswith("/"):
        return Refusal(400, "Invalid request target")
    path = forward.split("?", 1)[0]
    # The HTTP client sends the method upper-cased; route on what it will send.
    method = method.upper()
    found = _classify(path) if len(path) <= _MEMO_PATH else _classify.__wrapped__(path)
    if found is None or method != _INTERCEPTED_METHOD[found[0]]:
        if method in {"GET", "POST"} and _CONVERSATIONS.match(path):
            return Target("conversations", method, forward, path)
        return Target("passthrough", method, forward, path)
    route, conversation_id = found
    if not conversation_id:
        return Refusal(400, "Invalid conversation id")
    return Target(route, method, forward, path, conversation_id)


_DISGUISED = ""  # the conversation id _classify gives a disguised spelling of a route


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


# The canonical target of a request, set once routed; the upstream URL is built from it alone.
TARGET = web.RequestKey("target", Target)
