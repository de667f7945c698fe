"""A stand-in of an OpenAI-compatible model server that judges by plain, deterministic logic.

A rule is violated when the text holds one of the rule's upper-case words (four letters or more):
"Do not mention the codename BLUEFALCON" is violated by "ship bluefalcon on Friday". The server
can be made slow, failing, rate-limited (429 with or without ``Retry-After``), malformed, or to
quote the text in its explanation (as real models do); it counts calls and the most in flight.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_UPPER = re.compile(r"\b[A-Z][A-Z0-9]{3,}\b")


@dataclass
class ModelServer:
    mode: str = "ok"  # ok | slow | fail | rate_limited | rate_limited_forever | malformed | partial | quote
    delay: float = 0.0
    calls: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    authorizations: list[str | None] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            body = await request.json()
            self.bodies.append(body)
            self.authorizations.append(request.headers.get("Authorization"))
            if self.delay:
                await asyncio.sleep(self.delay)
            return self._answer(body)
        finally:
            self.in_flight -= 1

    def _answer(self, body: dict[str, Any]) -> web.Response:
        if self.mode == "fail":
            return web.json_response({"error": {"message": "overloaded"}}, status=500)
        if self.mode == "rate_limited_forever" or (self.mode == "rate_limited" and self.calls == 1):
            return web.json_response(
                {"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0.2"}
            )
        if self.mode == "malformed":
            return web.json_response({"choices": [{"message": {"content": "I think it is fine."}}]})
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        rules = json.loads(system.split("Rules:\n", 1)[1])
        text = user.split("<<<TEXT\n", 1)[1].rsplit("\nTEXT>>>", 1)[0]
        verdicts = []
        for rule in rules[: 1 if self.mode == "partial" else None]:
            words = [w for w in _UPPER.findall(rule["forbids"]) if w.lower() in text.lower()]
            explanation = f"mentions {', '.join(words)}" if words else "nothing forbidden"
            if self.mode == "quote":
                explanation = f"the text says: {text}"
            verdicts.append({"rule": rule["id"], "violates": bool(words), "explanation": explanation})
        content = json.dumps({"verdicts": verdicts})
        return web.json_response(
            {
                "model": body.get("model", "stand-in"),
                "choices": [{"message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": len(system + user) // 4, "completion_tokens": len(content) // 4},
            }
        )


def model_app(server: ModelServer) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    return app


if __name__ == "__main__":
    # A stand-in judge for trying judge rules by hand (README) and for bench/judge.py:
    # python tests/judge_fixtures.py PORT [--delay SECONDS]; GET /calls counts calls by model.
    import argparse
    from collections import Counter

    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each answer takes (0)")
    args = parser.parse_args()
    server = ModelServer(delay=args.delay)
    app = model_app(server)

    async def calls(request: web.Request) -> web.Response:
        by_model = Counter(str(body.get("model")) for body in server.bodies)
        return web.json_response({"calls": server.calls, "by_model": by_model})

    app.router.add_get("/calls", calls)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
