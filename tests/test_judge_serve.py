"""Judge rules through `gateway serve`: real gateway processes, a real model server, a real backend.

The stand-in model (tests/judge_fixtures.py) says a rule is violated when the text holds one of
the rule's UPPERCASE words; the backend answers from the prompt (a whole answer, or an event
stream); two gateways share one redis-server and one fingerprint key. Each rule is gated by a
keyword, so that a prompt reaches the judge for the rules it is meant to test, and no other.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.gateway_process import ServedProcess, serve_process
from tests.judge_fixtures import ModelServer, model_app
from tests.redis_fixtures import RedisProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

POLICIES = """\
policies:
  - id: house.codename
    name: Release codename
    severity: high
    action: block
    stages: [prompt]
    match:
      all:
        - keywords: [codename]
        - judge: Do not mention the codename BLUEFALCON
  - id: house.project
    name: Project name
    severity: high
    action: block
    stages: [prompt]
    match:
      all:
        - keywords: [project]
        - judge:
            instruction: Do not discuss the project REDHERON
            on_error: block
  - id: house.mascot
    name: Mascot
    severity: medium
    action: alert
    stages: [prompt]
    match:
      all:
        - keywords: [mascot]
        - judge: Do not mention the mascot GREENOWL
  - id: house.answer
    name: Codename in an answer
    severity: high
    action: block
    stages: [response]
    match:
      all:
        - keywords: [codename]
        - judge: Do not reveal the codename BLUEFALCON
"""
AUDIT_KEY = "5f0c1d2e3a4b59687786950a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e"

# What the backend answers to a prompt that is exactly one of these words.
ANSWERS = {
    "answer-leak": "The release codename is BLUEFALCON, ship it on Friday.",
    "answer-clean": "The release codename is not decided yet.",
}
STREAMS = {
    "stream-leak": ["The release ", "codename is ", "blue", "falcon, ", "ship it."],
    "stream-clean": ["The release ", "codename is ", "not decided ", "yet."],
}


@dataclass
class Backend:
    """The backend: records each prompt it received, answers as ``ANSWERS`` and ``STREAMS`` say."""

    prompts: list[str] = field(default_factory=list)
    sent: dict[str, bytes] = field(default_factory=dict)

    async def prompt(self, request: web.Request) -> web.StreamResponse:
        text = (await request.json())["prompt"]
        self.prompts.append(text)
        if text.removesuffix("-cut") in STREAMS:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            pieces = STREAMS[text.removesuffix("-cut")]
            # Broken off before its last piece: a text of its own, no verdict on it cached yet.
            for piece in pieces[:-1] if text.endswith("-cut") else pieces:
                event = {"choices": [{"delta": {"content": piece}}]}
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
                await asyncio.sleep(0.01)
            if text.endswith("-cut"):
                assert request.transport is not None
                request.transport.close()  # broken off: no end marker, no last chunk
                return response
            await response.write(b"data: [DONE]\n\n")
            return response
        body = json.dumps({"success": True, "message": ANSWERS.get(text, "Prompt received")}).encode()
        self.sent[text] = body
        return web.Response(body=body, content_type="application/json")


Gateway = ServedProcess


@dataclass
class Stack:
    backend: Backend
    model: ModelServer  # the model of gateways a and b
    slow_model: ModelServer  # the model of gateway c, which waits at most 0.3 s
    slow_server: TestServer
    a: Gateway
    b: Gateway  # as a, on the same Redis and fingerprint key
    c: Gateway
    d: Gateway  # as b, holding a stream a block judge rule covers until the verdict
    audit: Path
    session: aiohttp.ClientSession

    async def post(self, gateway: Gateway, prompt: str) -> tuple[int, bytes, float]:
        started = time.perf_counter()
        async with self.session.post(
            gateway.url(f"/conversation/c-{uuid.uuid4().hex[:8]}/prompt"), json={"prompt": prompt}
        ) as response:
            body = await response.read()
        return response.status, body, time.perf_counter() - started

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]

    async def audited(self, rule_id: str, count: int = 1, within: float = 5.0) -> list[dict[str, Any]]:
        """The audit records of ``rule_id``, once there are ``count`` (the judge may come later)."""
        deadline = time.monotonic() + within
        while True:
            found = [r for r in self.audit_records() if r.get("policyId") == rule_id]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.05)


HISTORY = {
    "success": True,
    "messages": [
        {"id": "m1", "conversationId": "c1", "role": "assistant", "content": "The codename is BLUEFALCON"}
    ],
}


async def _history(_: web.Request) -> web.Response:
    return web.json_response(HISTORY)


async def _server(app: web.Application) -> TestServer:
    server = TestServer(app)
    await server.start_server()
    return server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess) -> AsyncIterator[Stack]:
    with redis_server.client() as client:
        client.flushall()
    root = tmp_path_factory.mktemp("judge-serve")
    policies = root / "policies"
    policies.mkdir()
    (policies / "house.yaml").write_text(POLICIES)
    config = root / "gateway.yaml"
    config.write_text(json.dumps({"audit_key": AUDIT_KEY}))
    audit = root / "audit.jsonl"

    backend, model, slow_model = Backend(), ModelServer(), ModelServer(mode="slow", delay=1.0)
    backend_app = web.Application()
    backend_app.router.add_post("/conversation/{id}/prompt", backend.prompt)
    backend_app.router.add_get("/conversation/{id}/messages", _history)
    servers = [
        await _server(backend_app),
        await _server(model_app(model)),
        await _server(model_app(slow_model)),
    ]
    upstream = str(servers[0].make_url("")).rstrip("/")
    common = ("--config", str(config), "--policies", "builtin", "--policies", str(policies))
    shared = (*common, "--judge-url", str(servers[1].make_url("/v1")), "--judge-model", "stand-in-1")
    shared += ("--judge-timeout", "5", "--redis-url", redis_server.url)
    slow = (*common, "--judge-url", str(servers[2].make_url("/v1")), "--judge-model", "stand-in-1")
    slow += ("--judge-timeout", "0.3")
    gateways = await asyncio.gather(
        serve_process(Gateway, upstream, root, *shared, "--audit-file", str(audit)),
        serve_process(Gateway, upstream, root, *shared),
        serve_process(Gateway, upstream, root, *slow),
        serve_process(Gateway, upstream, root, *shared, "--judge-stream-hold"),
        return_exceptions=True,
    )
    started = [g for g in gateways if isinstance(g, Gateway)]
    session = aiohttp.ClientSession()
    try:
        for failed in gateways:
            if isinstance(failed, BaseException):
                raise failed
        a, b, c, d = started
        yield Stack(backend, model, slow_model, servers[2], a, b, c, d, audit, session)
    finally:
        await session.close()
        for gateway in started:
            if gateway.process.returncode is None:
                gateway.process.kill()
                await gateway.process.wait()
        for server in servers:
            await server.close()


@pytest.fixture(autouse=True)
def _model_ok(stack: Stack) -> None:
    stack.model.mode, stack.model.delay = "ok", 0.0


def _unique(text: str) -> str:
    """``text`` with a tag of its own: no verdict on it is cached yet."""
    return f"{text} (ref {uuid.uuid4().hex[:10]})"


def _codes(body: bytes) -> tuple[str, list[str]]:
    answer = json.loads(body)
    return answer["error_code"], [v["policyId"] for v in answer["violations"]]


# -- prompt stage ---------------------------------------------------------------------------------


async def test_a_block_judge_rule_refuses_a_prompt_before_the_backend_has_it(stack: Stack) -> None:
    leak, clean = _unique("the codename is bluefalcon"), _unique("which codename do we ship?")
    calls = stack.model.calls
    decisions = {
        action: await stack.a.metric("policy_gateway_decisions_total", stage="prompt", action=action)
        for action in ("allow", "block")
    }
    for _ in range(2):
        status, body, _ = await stack.post(stack.a, leak)
        assert status == 403, body
        assert _codes(body) == ("POLICY_BLOCKED", ["house.codename"])
        status, body, _ = await stack.post(stack.a, clean)
        assert status == 200, body
    assert leak not in stack.backend.prompts
    assert stack.backend.prompts.count(clean) == 2
    # One call per distinct prompt: the second time, the verdict is in the cache.
    assert stack.model.calls - calls == 2
    # A prompt the judge blocked counts as a block, once, and not as allowed too.
    for action, count in decisions.items():
        now = await stack.a.metric("policy_gateway_decisions_total", stage="prompt", action=action)
        assert now - count == 2, action
    assert await stack.a.metric("policy_gateway_judge_calls_total", result="violates") >= 1
    assert await stack.a.metric("policy_gateway_judge_calls_total", result="clean") >= 1
    assert await stack.a.metric("policy_gateway_judge_cache_total", result="memory") >= 2
    assert await stack.a.metric("policy_gateway_judge_duration_seconds_count") >= 2
    assert await stack.a.metric("policy_gateway_judge_tokens_total", kind="prompt") > 0


async def test_a_prompt_the_judge_rules_do_not_gate_is_not_sent_to_the_model(stack: Stack) -> None:
    calls = stack.model.calls
    status, _, _ = await stack.post(stack.a, _unique("hello there, bluefalcon"))
    assert status == 200
    assert stack.model.calls == calls


# -- response stage -------------------------------------------------------------------------------


async def test_a_block_judge_rule_refuses_a_whole_answer_and_releases_a_clean_one_as_sent(
    stack: Stack,
) -> None:
    blocks = await stack.a.metric("policy_gateway_decisions_total", stage="response", action="block")
    async with stack.session.post(
        stack.a.url("/conversation/c-1/prompt"), json={"prompt": "answer-leak"}
    ) as got:
        assert got.status == 403
        assert _codes(await got.read()) == ("RESPONSE_BLOCKED", ["house.answer"])
    now = await stack.a.metric("policy_gateway_decisions_total", stage="response", action="block")
    assert now - blocks == 1
    async with stack.session.post(
        stack.a.url("/conversation/c-1/prompt"), json={"prompt": "answer-clean"}
    ) as got:
        assert got.status == 200
        assert await got.read() == stack.backend.sent["answer-clean"]


async def _stream(stack: Stack, prompt: str, gateway: Gateway | None = None) -> bytes:
    gateway = gateway or stack.a
    async with stack.session.post(gateway.url("/conversation/c-2/prompt"), json={"prompt": prompt}) as got:
        assert got.status == 200
        assert got.headers["Content-Type"].startswith("text/event-stream")
        return await got.read()


async def test_a_block_judge_rule_ends_a_stream_with_an_error_event_instead_of_its_end(
    stack: Stack,
) -> None:
    clean = await _stream(stack, "stream-clean")
    assert clean.endswith(b"data: [DONE]\n\n"), clean
    assert b"event: error" not in clean
    leak = await _stream(stack, "stream-leak")
    events = [event for event in leak.split(b"\n\n") if event]
    assert events[-1].startswith(b"event: error\ndata: "), leak
    assert _codes(events[-1].split(b"data: ", 1)[1]) == ("RESPONSE_BLOCKED", ["house.answer"])
    assert b"[DONE]" not in leak


async def test_with_judge_stream_hold_a_blocked_stream_sends_nothing_of_the_answer(stack: Stack) -> None:
    """--judge-stream-hold: the client gets no word of a stream the judge blocks, and all of a
    clean one once judged."""
    leak = await _stream(stack, "stream-leak", stack.d)
    events = [event for event in leak.split(b"\n\n") if event]
    assert len(events) == 1, leak
    assert events[0].startswith(b"event: error\ndata: "), leak
    assert _codes(events[0].split(b"data: ", 1)[1]) == ("RESPONSE_BLOCKED", ["house.answer"])
    clean = await _stream(stack, "stream-clean", stack.d)
    assert clean.endswith(b"data: [DONE]\n\n"), clean
    assert b"not decided" in clean


async def test_a_stream_the_backend_breaks_off_is_judged_before_what_is_held_is_released(
    stack: Stack,
) -> None:
    """On gateway b: a broken-off answer is logged as a warning, and a's log must have none."""
    calls = stack.model.calls
    leak = await _stream(stack, "stream-leak-cut", stack.b)
    events = [event for event in leak.split(b"\n\n") if event]
    assert events[-1].startswith(b"event: error\ndata: "), leak
    assert _codes(events[-1].split(b"data: ", 1)[1]) == ("RESPONSE_BLOCKED", ["house.answer"])
    assert b"falcon" not in leak, "the last event was released before the judge's verdict"
    assert stack.model.calls - calls == 1
    clean = await _stream(stack, "stream-clean-cut", stack.b)
    events = [event for event in clean.split(b"\n\n") if event]
    # Judged clean: everything the backend sent is released, then the broken-off error.
    assert b"not decided" in events[-2], clean
    assert json.loads(events[-1].split(b"data: ", 1)[1])["error_code"] == "UPSTREAM_ERROR"


# -- log and alert rules --------------------------------------------------------------------------


async def test_an_alert_judge_rule_does_not_delay_the_answer_and_is_audited_later(stack: Stack) -> None:
    stack.model.delay = 1.5
    prompt = _unique("our mascot is greenowl")
    before = len(await stack.audited("house.mascot", within=0))
    status, _, seconds = await stack.post(stack.a, prompt)
    assert status == 200
    assert seconds < 1.0, f"the answer waited {seconds:.2f} s for an alert rule's judge"
    assert prompt in stack.backend.prompts
    records = await stack.audited("house.mascot", before + 1)
    assert len(records) == before + 1, "no audit record of the alert judge rule"
    record = records[-1]
    assert record["event"] == "policy.violation"
    assert record["action"] == "alert"
    assert record["explanation"] == "mentions GREENOWL"
    assert record["judgeModel"] == "stand-in-1"
    # The record says how long the verdict took (the model was slowed), and that it was asked.
    assert record["judgeMs"] >= 1000
    assert record["judgeCached"] is False


async def test_an_explanation_quoting_the_text_is_redacted(stack: Stack, redis_server: RedisProcess) -> None:
    stack.model.mode = "quote"
    email = f"jane.roe.{uuid.uuid4().hex[:6]}@corp-mail.net"
    before = len(await stack.audited("house.mascot", within=0))
    status, _, _ = await stack.post(stack.a, f"our mascot greenowl, mail {email} today")
    assert status == 200
    records = await stack.audited("house.mascot", before + 1)
    assert len(records) == before + 1
    explanation = records[-1]["explanation"]
    assert explanation.startswith("the text says: "), explanation
    # What it quotes of the prompt is taken out whole (the runner), what rules find too (redactor).
    assert "[quoted text]" in explanation
    assert "greenowl" not in explanation
    assert email not in json.dumps(records[-1])
    assert email not in stack.audit.read_text()
    assert email not in stack.a.log.read_text()
    # Nor in the verdict shared through Redis: it is cached as recorded.
    with redis_server.client() as client:
        cached = [client.get(key) or "" for key in client.scan_iter("*judge*")]
    assert cached
    assert not any(email in value or "greenowl" in value for value in cached)


# -- fail modes -----------------------------------------------------------------------------------


async def test_a_failing_model_falls_back_as_each_rule_says_and_is_counted(stack: Stack) -> None:
    stack.model.mode = "fail"
    allow = ("policy_gateway_fallbacks_total", {"dependency": "judge", "reason": "http_error"})
    before = await stack.a.metric(allow[0], **allow[1])
    errors = await stack.a.metric("policy_gateway_judge_calls_total", result="error")
    # house.codename falls back to allow; house.project to block (the model would say clean).
    status, body, _ = await stack.post(stack.a, _unique("which codename do we ship?"))
    assert status == 200, body
    status, body, _ = await stack.post(stack.a, _unique("how is the project going?"))
    assert status == 403, body
    assert _codes(body) == ("POLICY_BLOCKED", ["house.project"])
    assert await stack.a.metric(allow[0], **allow[1]) - before == 2
    assert await stack.a.metric("policy_gateway_judge_calls_total", result="error") - errors == 2
    # A failed call is not cached: once the model is back, the same kind of prompt passes.
    stack.model.mode = "ok"
    status, _, _ = await stack.post(stack.a, _unique("how is the project going?"))
    assert status == 200


async def test_a_model_too_slow_or_gone_falls_back_as_each_rule_says(stack: Stack) -> None:
    c = stack.c
    labels = {"dependency": "judge", "reason": "timeout"}
    before = await c.metric("policy_gateway_fallbacks_total", **labels)
    status, _, seconds = await stack.post(c, _unique("which codename do we ship?"))
    assert status == 200
    assert seconds < 0.9, f"the judge timeout is 0.3 s, the prompt waited {seconds:.2f} s"
    status, body, _ = await stack.post(c, _unique("how is the project going?"))
    assert status == 403
    assert _codes(body) == ("POLICY_BLOCKED", ["house.project"])
    assert await c.metric("policy_gateway_fallbacks_total", **labels) - before == 2
    assert await c.metric("policy_gateway_judge_calls_total", result="timeout") >= 2

    await stack.slow_server.close()  # nothing listens on the model's port any more
    labels["reason"] = "unreachable"
    before = await c.metric("policy_gateway_fallbacks_total", **labels)
    status, _, _ = await stack.post(c, _unique("which codename do we ship?"))
    assert status == 200
    status, body, _ = await stack.post(c, _unique("how is the project going?"))
    assert status == 403
    assert await c.metric("policy_gateway_fallbacks_total", **labels) - before == 2


# -- the verdict cache ----------------------------------------------------------------------------


async def test_a_prompt_judged_by_one_instance_is_not_judged_again_by_another(stack: Stack) -> None:
    prompt = _unique("the codename is bluefalcon")
    calls = stack.model.calls
    redis_hits = await stack.b.metric("policy_gateway_judge_cache_total", result="redis")
    status, _, _ = await stack.post(stack.a, prompt)
    assert status == 403
    status, body, _ = await stack.post(stack.b, prompt)
    assert status == 403, body
    assert _codes(body) == ("POLICY_BLOCKED", ["house.codename"])
    assert stack.model.calls - calls == 1
    assert await stack.b.metric("policy_gateway_judge_cache_total", result="redis") - redis_hits == 1


# -- shutdown (last: it stops gateway a) ---------------------------------------------------------


# -- what is not sent to the judge ----------------------------------------------------------------


async def test_a_history_is_not_judged_and_that_is_counted_never_passed(stack: Stack) -> None:
    """GET messages: each text was judged as it passed; the history is not sent again, and a
    judge rule left pending on it is counted as a fallback."""
    fallback = {"dependency": "judge", "reason": "history_not_judged"}
    before = await stack.a.metric("policy_gateway_fallbacks_total", **fallback)
    calls = stack.model.calls
    async with stack.session.get(stack.a.url("/conversation/c1/messages")) as response:
        assert response.status == 200
        assert await response.json() == HISTORY
    assert await stack.a.metric("policy_gateway_fallbacks_total", **fallback) - before == 1
    assert stack.model.calls == calls


async def test_a_verdict_still_coming_at_shutdown_is_awaited_and_recorded(stack: Stack) -> None:
    """SIGTERM while an alert rule's judge is still out: its violation is recorded, cleanly."""
    stack.model.delay = 1.0
    before = len(await stack.audited("house.mascot", within=0))
    status, _, _ = await stack.post(stack.a, _unique("our mascot is greenowl"))
    assert status == 200
    assert await stack.a.stop() == 0
    records = await stack.audited("house.mascot", before + 1, within=0)
    assert len(records) == before + 1, "the verdict that came during shutdown was lost"
    assert records[-1]["explanation"] == "mentions GREENOWL"
    troubles = [e for e in stack.a.log_events() if e.get("level") in ("warning", "error", "critical")]
    assert troubles == []
