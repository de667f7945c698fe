"""A stand-in of the backend for ``gateway demo``: the conversation routes, in memory, deterministic.

It answers as the Flashback platform API documents its conversation routes (``{success, ...}``
bodies, errors as ``{success: false, message}``), with answers chosen so that a newcomer sees
each side of the gateway at work:

- ``POST /conversation`` ``{repoId}`` → ``{success, conversationId}``: ``c2``, ``c3``, ... in order;
  ``c1`` exists from the start. Every repo belongs to the workspace ``demo``.
- ``GET /conversation`` → ``{success, conversations[], total}`` (``take``, ``skip`` honoured).
- ``POST /conversation/{id}/prompt`` ``{prompt}`` → ``{success, message}`` with a fixed answer.
  A prompt that mentions the deploy key gets an answer carrying an AWS secret access key (AWS's
  documented example value; the built-in pack blocks it at stage ``response``).
  A streamed answer (``text/event-stream``, a few words per event, then a ``done`` event) is
  sent when the body has ``"stream": true`` or the request accepts ``text/event-stream``.
- ``GET /conversation/{id}/messages`` → ``{success, messages[], title}``: ``c1`` holds a fixed
  history whose last assistant message carries the secret; a created conversation holds none.

Prompts are not recorded, so every answer and every list is the same whatever ran before: the
README shows them verbatim. No credential is checked: ``Authorization`` is accepted as sent
(the gateway needs one to look up which workspace a conversation belongs to).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

WORKSPACE = "demo"
ORG = "demo-org"
REPO = "demo-repo"
CONVERSATION = "c1"
# AWS's documented example secret access key: a real shape, never a real credential.
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
CREATED_AT = "2025-01-06T09:00:00.000Z"

ANSWER = (
    "This is the stand-in backend's answer: the gateway read your prompt, found nothing to block, "
    "and read this answer before passing it on."
)
SECRET_ANSWER = (
    f"The deploy key is in the release vault: AWS_SECRET_ACCESS_KEY={SECRET} (rotate it after use)."
)
STREAMED_ANSWER = (
    "This answer arrives a few words per event. The gateway reads every event before it lets it "
    "go, and holds back only the end of the text that could still become a secret (a word cut in "
    "two, or the start of a key), so that a secret split across two events is still caught whole. "
    "Everything else leaves at once: these words reach you as the backend sends them."
)
WORDS_PER_EVENT = 4
# A pause between events, so that a terminal shows the answer arriving; the answer is the same.
EVENT_PAUSE = 0.1

HISTORY: tuple[tuple[str, str], ...] = (
    ("user", "Summarise our release notes"),
    ("assistant", "Release 1.4 adds streamed answers and fixes two bugs in the exporter."),
    ("user", "What is the deploy key?"),
    ("assistant", SECRET_ANSWER),
)


def answer_to(prompt: str, *, streamed: bool) -> str:
    """The stand-in's answer to a prompt: the secret when asked for the deploy key."""
    if "deploy key" in prompt.lower():
        return SECRET_ANSWER
    return STREAMED_ANSWER if streamed else ANSWER


def events(text: str) -> Iterator[bytes]:
    """``text`` as server-sent events of a few words each, then a ``done`` event."""
    words = text.split(" ")
    for start in range(0, len(words), WORDS_PER_EVENT):
        piece = " ".join(words[start : start + WORDS_PER_EVENT])
        if start + WORDS_PER_EVENT < len(words):
            piece += " "
        yield b"data: " + json.dumps({"content": piece}).encode() + b"\n\n"
    yield b"event: done\ndata: " + json.dumps({"success": True}).encode() + b"\n\n"


def _failure(status: int, message: str) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=status)


@dataclass
class DemoBackend:
    """The conversations, in memory; ``c1`` and its history exist from the start."""

    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._add(CONVERSATION, REPO, title="Release planning")

    def _add(self, conversation_id: str, repo: str, *, title: str | None = None) -> None:
        self.conversations[conversation_id] = {
            "id": conversation_id,
            "orgId": ORG,
            "workspaceId": WORKSPACE,
            "repoId": repo,
            "createdBy": "demo-user",
            "createdAt": CREATED_AT,
            "lastUpdatedAt": CREATED_AT,
            "tokensIn": "0",
            "tokensOut": "0",
            **({"title": title} if title else {}),
        }

    async def create(self, request: web.Request) -> web.Response:
        payload = await _json(request)
        repo = payload.get("repoId") if isinstance(payload, dict) else None
        if not isinstance(repo, str) or not repo:
            return _failure(400, "repoId is required")
        conversation_id = f"c{len(self.conversations) + 1}"
        self._add(conversation_id, repo)
        return web.json_response({"success": True, "conversationId": conversation_id})

    async def list(self, request: web.Request) -> web.Response:
        try:
            take = min(int(request.query.get("take", "50")), 100)
            skip = int(request.query.get("skip", "0"))
        except ValueError:
            return _failure(400, "take and skip must be numbers")
        everything = list(self.conversations.values())
        page = everything[skip : skip + take] if take > 0 and skip >= 0 else []
        return web.json_response({"success": True, "conversations": page, "total": len(everything)})

    async def prompt(self, request: web.Request) -> web.StreamResponse:
        conversation_id = request.match_info["id"]
        if conversation_id not in self.conversations:
            return _failure(404, "Conversation not found")
        payload = await _json(request)
        prompt = payload.get("prompt") if isinstance(payload, dict) else None
        if not isinstance(prompt, str):
            return _failure(400, "prompt is required")
        streamed = payload.get("stream") is True or "text/event-stream" in request.headers.get("Accept", "")
        answer = answer_to(prompt, streamed=streamed)
        if not streamed:
            return web.json_response({"success": True, "message": answer})
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            for event in events(answer):
                await response.write(event)
                await asyncio.sleep(EVENT_PAUSE)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the gateway ended the stream (a block) or its client left: nobody is reading
        return response

    async def messages(self, request: web.Request) -> web.Response:
        conversation_id = request.match_info["id"]
        conversation = self.conversations.get(conversation_id)
        if conversation is None:
            return _failure(404, "Conversation not found")
        history = HISTORY if conversation_id == CONVERSATION else ()
        messages = [
            {
                "id": f"m{number}",
                "conversationId": conversation_id,
                "role": role,
                "content": content,
                "createdAt": f"2025-01-06T09:0{number}:00.000Z",
            }
            for number, (role, content) in enumerate(history, start=1)
        ]
        body: dict[str, Any] = {"success": True, "messages": messages}
        if "title" in conversation:
            body["title"] = conversation["title"]
        return web.json_response(body)


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


async def _not_found(_: web.Request) -> web.Response:
    return _failure(404, "Not found")


def build_backend_app(backend: DemoBackend | None = None) -> web.Application:
    backend = backend or DemoBackend()
    app = web.Application()
    app.router.add_post("/conversation", backend.create)
    app.router.add_get("/conversation", backend.list)
    app.router.add_post("/conversation/{id}/prompt", backend.prompt)
    app.router.add_get("/conversation/{id}/messages", backend.messages)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app
