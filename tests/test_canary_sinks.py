"""No canary in any sink: secrets sent through every input route never reach what the gateway writes.

A real gateway process, with an audit file, a webhook, a Slack and an Alertmanager sink, a
trusted workspace header and the workspace metric label, sits in front of a real upstream. Each
input route carries canaries of its own, of every outcome the pack knows (block, alert, log):
the prompt, another body field, the conversation id, request and authorization headers, the
workspace header, malformed requests that the HTTP parser refuses, a charset the body reader
refuses, answers and upstream error bodies. Then every sink is read whole: the process's stdout
and stderr, the audit file, every alert delivery (body and headers), the metrics exposition,
the admin endpoints and every answer the client got. No canary, nor a piece of one, may be in
any of them, while the traffic did reach the sinks (alerts delivered, audit records written).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import secrets
import signal
import string
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.policy import Action, Stage, evaluate, load_ruleset
from tests.gateway_process import answers
from tests.redis_fixtures import free_port

RULESET = load_ruleset()


def _aws() -> str:
    return "AKIA" + "".join(random.choices(string.ascii_uppercase + "234567", k=16))


def _github() -> str:
    return "ghp_" + "".join(random.choices(string.ascii_letters + string.digits, k=36))


def _twilio() -> str:
    return "SK" + secrets.token_hex(16)


def _card() -> str:
    digits = [4] + [random.randrange(10) for _ in range(14)]
    total = 0
    for index, digit in enumerate(reversed(digits)):
        doubled = digit * 2 if index % 2 == 0 else digit
        total += doubled - 9 if doubled > 9 else doubled
    digits.append((10 - total % 10) % 10)
    number = "".join(map(str, digits))
    return " ".join(number[i : i + 4] for i in range(0, 16, 4))


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _jwt(payload: dict[str, Any] | None = None) -> str:
    payload = payload or {"sub": secrets.token_hex(6), "iat": 1754524912}
    signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(payload)}.{signature}"


def _email() -> str:
    return f"canary.{secrets.token_hex(4)}@example.co.uk"


@dataclass
class Canaries:
    """Every canary of the run, by where it was sent; each is checked by the pack first."""

    by_route: dict[str, str] = field(default_factory=dict)

    def add(self, route: str, value: str, action: Action) -> str:
        decision = evaluate(RULESET, Stage.PROMPT, value)
        assert decision.violations, f"the pack does not catch the {route} canary"
        assert max(v.action for v in decision.violations) is action, route
        self.by_route[route] = value
        return value

    def found_in(self, text: str) -> list[str]:
        """Routes whose canary, or its middle ten characters, are in ``text``."""
        found = []
        for route, value in self.by_route.items():
            middle = value[len(value) // 2 - 5 : len(value) // 2 + 5]
            if value in text or middle in text:
                found.append(route)
        return found


@dataclass
class Recorder:
    """Every request a sink received: path, headers and body."""

    seen: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.seen.append(f"{request.method} {request.raw_path}\n{dict(request.headers)}\n{body}")
        return web.Response(text="ok")


def _upstream_app(canaries: Canaries) -> web.Application:
    """The backend: answers carry canaries where the prompt asks for them."""

    async def prompt(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = body.get("prompt", "")
        if "ANSWER-BLOCK" in text:
            return web.json_response({"success": True, "message": canaries.by_route["answer.block"]})
        if "ANSWER-ALERT" in text:
            return web.json_response({"success": True, "message": canaries.by_route["answer.alert"]})
        if "UPSTREAM-500" in text:
            return web.json_response(
                {"success": False, "message": canaries.by_route["upstream.error"]}, status=500
            )
        if "ANSWER-SSE" in text:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            value = canaries.by_route["answer.stream"]
            for piece in (value[:7], value[7:]):
                await response.write(f"data: {json.dumps({'delta': {'content': piece}})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.json_response({"success": True, "message": "Prompt received"})

    async def messages(_: web.Request) -> web.Response:
        return web.json_response(
            {"success": True, "messages": [{"role": "assistant", "content": canaries.by_route["messages"]}]}
        )

    async def other(_: web.Request) -> web.Response:
        return web.json_response({"success": True})

    app = web.Application()
    app.router.add_post("/conversation/{id}/prompt", prompt)
    app.router.add_get("/conversation/{id}/messages", messages)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


@dataclass
class Stack:
    port: int
    admin: int
    process: asyncio.subprocess.Process
    audit: Path
    sinks: Recorder
    answers: list[str] = field(default_factory=list)


@pytest.fixture
async def stack(tmp_path: Path, aiohttp_server: Any) -> AsyncIterator[tuple[Stack, Canaries]]:
    canaries = Canaries()
    upstream = await aiohttp_server(_upstream_app(canaries))
    sinks = Recorder()
    receiver = web.Application()
    receiver.router.add_route("*", "/{tail:.*}", sinks.handle)
    sink_server = await aiohttp_server(receiver)
    base = str(sink_server.make_url("")).rstrip("/")
    port, admin = free_port(), free_port()
    audit = tmp_path / "audit.jsonl"
    config = {
        "upstream": str(upstream.make_url("")).rstrip("/"),
        "port": port,
        "admin_port": admin,
        "audit_file": str(audit),
        "workspace_header": "X-Workspace",
        "metrics_workspace_label": True,
        "alerts": {
            "window": 0.05,
            "on_block": True,
            "sinks": [
                {"type": "webhook", "url": f"{base}/webhook"},
                {"type": "slack", "url": f"{base}/slack"},
                {"type": "alertmanager", "url": f"{base}/am"},
            ],
        },
    }
    (tmp_path / "gateway.yaml").write_text(json.dumps(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "gateway.yaml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stack = Stack(port, admin, process, audit, sinks)
    try:
        assert await answers(f"http://127.0.0.1:{admin}/readyz"), "the gateway did not start"
        yield stack, canaries
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _raw(port: int, data: bytes) -> str:
    """Send bytes as they are (what no HTTP client would send), return what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    return answer.decode("latin-1")


async def _send_everything(stack: Stack, canaries: Canaries) -> None:
    base = f"http://127.0.0.1:{stack.port}"
    prompt_url = f"{base}/conversation/c1/prompt"
    add = canaries.add
    block, alert, log = Action.BLOCK, Action.ALERT, Action.LOG
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", prompt_url, {"json": {"prompt": f"deploy with {add('prompt.block', _aws(), block)}"}}),
        ("POST", prompt_url, {"json": {"prompt": f"my card is {add('prompt.alert', _card(), alert)}"}}),
        ("POST", prompt_url, {"json": {"prompt": f"write to {add('prompt.log', _email(), log)}"}}),
        ("POST", prompt_url, {"json": {"prompt": "hi", "context": add("field.alert", _twilio(), alert)}}),
        ("POST", prompt_url, {"json": {"prompt": "hi", "model": add("field.block", _github(), block)}}),
        ("POST", f"{base}/conversation/{add('conversation.block', _github(), block)}/prompt",
         {"json": {"prompt": f"card {_card()}"}}),
        ("POST", f"{base}/conversation/{add('conversation.alert', _jwt(), alert)}/prompt",
         {"json": {"prompt": f"card {_card()}"}}),
        ("POST", prompt_url, {"json": {"prompt": f"card {_card()}"},
                              "headers": {"X-Request-Id": add("request-id.alert", _twilio(), alert)}}),
        ("POST", prompt_url, {"json": {"prompt": f"card {_card()}"},
                              "headers": {"Authorization": "Bearer " + _jwt(
                                  {"userId": add("user-id.log", _email(), log)})}}),
        ("POST", prompt_url, {"json": {"prompt": f"card {_card()}"},
                              "headers": {"X-Workspace": add("workspace.block", _aws(), block)}}),
        ("POST", prompt_url, {"data": b'{"prompt":"x"}', "headers": {
            "Content-Type": f"application/json; charset={add('charset.block', _aws(), block)}"}}),
        ("POST", prompt_url, {"json": {"prompt": "ANSWER-BLOCK"}}),
        ("POST", prompt_url, {"json": {"prompt": "ANSWER-ALERT"}}),
        ("POST", prompt_url, {"json": {"prompt": "ANSWER-SSE"}}),
        ("POST", prompt_url, {"json": {"prompt": "UPSTREAM-500"}}),
        ("GET", f"{base}/conversation/c2/messages", {}),
        ("GET", f"{base}/repo/{add('passthrough.block', _github(), block)}", {}),
        ("GET", f"{base}/policy?token={add('query.block', _github(), block)}", {}),
        ("POST", prompt_url, {"json": {"prompt": "hi"},
                              "headers": {"X-Api-Key": add("header.block", _aws(), block)}}),
        ("GET", f"http://127.0.0.1:{stack.admin}/usage/{add('admin.usage', _aws(), block)}", {}),
    ]  # fmt: skip
    canaries.add("answer.block", _aws(), Action.BLOCK)
    canaries.add("answer.alert", _twilio(), Action.ALERT)
    canaries.add("answer.stream", _aws(), Action.BLOCK)
    canaries.add("upstream.error", _aws(), Action.BLOCK)
    canaries.add("messages", _github(), Action.BLOCK)
    async with aiohttp.ClientSession() as session:
        for method, url, options in requests:
            async with session.request(method, url, **options) as response:
                stack.answers.append(f"{response.status} {dict(response.headers)}\n{await response.text()}")
    # What no HTTP client sends: the parser refuses it, and quotes what it read.
    body = f'{{"prompt":"deploy {add("malformed.body", _aws(), Action.BLOCK)}"}}'.encode()
    stack.answers.append(await _raw(stack.port, (
        b"POST /conversation/c1/prompt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Content-Type: application/json\r\n\r\n" + body
    )))  # fmt: skip
    path = add("malformed.path", _aws(), Action.BLOCK)
    stack.answers.append(await _raw(stack.port, (
        f"POST /conversation/c1/prompt\x7f{path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}"
    ).encode()))  # fmt: skip
    token = add("malformed.header", _github(), Action.BLOCK)
    stack.answers.append(await _raw(stack.port, (
        f"POST /conversation/c1/prompt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token[:4]}\x01"
        f"{token[4:]}\r\nContent-Length: 2\r\n\r\n{{}}"
    ).encode()))  # fmt: skip
    line = add("malformed.line", _aws(), Action.BLOCK)
    stack.answers.append(await _raw(stack.port, f"{line} / HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
    # The rest of the parser's refusals, each with a canary where the parser quotes from.
    long_header = add("malformed.long-header", _aws(), Action.BLOCK)
    chunk = add("malformed.chunk", _aws(), Action.BLOCK)
    version = add("malformed.version", _aws(), Action.BLOCK)
    lengths = add("malformed.lengths", _aws(), Action.BLOCK)
    for raw in (
        f"GET / HTTP/1.1\r\nHost: x\r\nX-Note: {'a' * 9000}{long_header}\r\n\r\n",
        f"POST /conversation/c1/prompt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"{chunk}\r\n{{}}\r\n0\r\n\r\n",
        f"GET / HTTP/{version}\r\nHost: x\r\n\r\n",
        f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: {lengths}\r\n\r\n{{}}",
    ):
        stack.answers.append(await _raw(stack.port, raw.encode()))
    token = add("admin.malformed", _github(), Action.BLOCK)
    stack.answers.append(await _raw(stack.admin, (
        f"GET /usage/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token[:4]}\x01{token[4:]}\r\n\r\n"
    ).encode()))  # fmt: skip


async def test_no_canary_reaches_any_sink(stack: tuple[Stack, Canaries]) -> None:
    """Every sink, read whole after the gateway stopped, holds no canary of any input route."""
    gateway, canaries = stack
    await _send_everything(gateway, canaries)
    async with aiohttp.ClientSession() as session:
        admin = f"http://127.0.0.1:{gateway.admin}"
        sinks: dict[str, str] = {}
        for path in ("/metrics", "/readyz", "/usage/unresolved"):
            async with session.get(admin + path) as response:
                sinks[f"admin {path}"] = await response.text()
    await asyncio.sleep(0.3)  # the alert window
    gateway.process.send_signal(signal.SIGTERM)
    stdout, stderr = await asyncio.wait_for(gateway.process.communicate(), timeout=20)
    assert gateway.process.returncode == 0, stderr.decode()[-2000:]
    sinks["stdout"], sinks["stderr"] = stdout.decode(), stderr.decode()
    sinks["audit file"] = gateway.audit.read_text()
    for index, delivery in enumerate(gateway.sinks.seen):
        sinks[f"alert delivery {index}"] = delivery
    # An answer with an alert-level secret is the client's to read (alerted, not blocked); every
    # other answer is the gateway's own words, or an error body, and holds no canary.
    [alerted] = [answer for answer in gateway.answers if canaries.by_route["answer.alert"] in answer]
    for index, answer in enumerate(gateway.answers):
        if answer is not alerted:
            sinks[f"answer {index}"] = answer

    # The traffic reached the sinks: the check below is not vacuous.
    audit = [json.loads(line) for line in sinks["audit file"].splitlines()]
    assert {"pii.credit-card", "secrets.twilio-api-key", "secrets.aws-access-key-id"} <= {
        record["policyId"] for record in audit
    }
    assert {path.split()[1] for path in gateway.sinks.seen} >= {"/webhook", "/slack", "/am/api/v2/alerts"}
    assert "policy.violation" in sinks["stdout"]
    assert "Error handling request" in sinks["stdout"] or "BadHttpMessage" in sinks["stdout"]
    assert 'route="prompt"' in sinks["admin /metrics"]

    leaks = {name: canaries.found_in(text) for name, text in sinks.items()}
    assert {name: routes for name, routes in leaks.items() if routes} == {}
    assert len(canaries.by_route) >= 29
