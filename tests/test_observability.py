"""Every outcome is made visible, and the matched text appears in no sink at all (canary test)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import select
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.alerts import AlertConfig, WebhookSink
from gateway.audit import configure_logging, events, fingerprint, held_events, user_id
from gateway.metrics import Metrics
from gateway.policy import BUILTIN_POLICY_DIR
from tests.proxy_fixtures import start_gateway, start_upstream

CANARY_BLOCK = "AKIACANARYCANARY2345"  # the shipped AWS key rule blocks it
CANARY_CARD = "4000 0566 5566 5556"  # Luhn-valid: the shipped card rule alerts on it
CANARY_EMAIL = "canary.log@example.org"  # the shipped email rule logs it
CANARY_ALERT = "CANARY-ALERT-271828"
CANARY_SHADOW = "CANARY-SHADOW-314159"
CANARIES = (CANARY_BLOCK, CANARY_CARD, CANARY_EMAIL, CANARY_ALERT, CANARY_SHADOW, "AKIACANARY", "5566 5556")
KEY = "test-fingerprint-key"

EXTRA_RULES = """\
policies:
  - id: canary.alert
    name: Canary alert
    severity: medium
    action: alert
    match: {regex: 'CANARY-ALERT-\\d{6}'}
  - id: canary.shadow
    name: Canary shadow
    severity: high
    action: block
    mode: shadow
    match: {regex: 'CANARY-SHADOW-\\d{6}'}
"""


def _sse(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n".encode()


class Backend:
    """Answers by prompt: what each outcome needs, never echoing the prompt."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/messages"):
            messages = [
                {"id": "1", "role": "assistant", "content": f"key {CANARY_BLOCK}"},
                {"id": "2", "role": "assistant", "content": "nothing here"},
            ]
            return web.json_response({"success": True, "messages": messages})
        prompt = (await request.json())["prompt"]
        if prompt == "leak in response":
            return web.json_response({"success": True, "message": f"here: {CANARY_BLOCK}"})
        if prompt in {"stream a split key", "stream an alert"}:
            parts = (
                ["the key ", CANARY_BLOCK[:7], CANARY_BLOCK[7:], " end"]
                if prompt == "stream a split key"
                else ["number ", CANARY_ALERT, " done"]
            )
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for part in parts:
                await response.write(_sse(part))
                await asyncio.sleep(0.005)
            await response.write_eof()
            return response
        return web.json_response({"success": True, "message": "Prompt received"})


@pytest.fixture
async def stack(aiohttp_server: Any, tmp_path: Path) -> Any:
    log_stream = io.StringIO()
    configure_logging("json", log_stream)
    received: list[bytes] = []

    async def receiver(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=204)

    sink_app = web.Application()
    sink_app.router.add_post("/hook", receiver)
    sink = await aiohttp_server(sink_app)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "extra.yaml").write_text(EXTRA_RULES)
    recorder, upstream = await start_upstream(aiohttp_server)
    recorder.handler = Backend().handle
    gateway, admin, state = await start_gateway(
        aiohttp_server,
        str(upstream.make_url("/")),
        policies=[BUILTIN_POLICY_DIR, tmp_path / "rules"],
        audit_file=tmp_path / "audit.jsonl",
        audit_key=KEY,
        alerts=AlertConfig(sinks=(WebhookSink(str(sink.make_url("/hook")), name="hook"),), window=0.2),
        workspace_header="X-Workspace-Id",
    )
    yield gateway, admin, state, log_stream, received, tmp_path / "audit.jsonl", recorder
    logging.getLogger().handlers.clear()


async def _exchange(client: aiohttp.ClientSession, gateway: TestServer, prompt: str) -> tuple[int, bytes]:
    async with client.post(
        gateway.make_url("/conversation/c-canary/prompt"),
        json={"prompt": prompt, "model": "gpt-4o"},
        headers={"X-Workspace-Id": "ws-canary", "Authorization": _bearer("user-42")},
    ) as response:
        return response.status, await response.read()


def _bearer(user: str) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"Bearer {part({'alg': 'HS256'})}.{part({'userId': user})}.c2ln"


async def test_canaries_reach_no_log_audit_record_metric_alert_or_error_body(stack: Any) -> None:
    """Log, alert, block, shadow, streaming and withholding all run; no canary leaves."""
    gateway, admin, state, log_stream, received, audit_path, _ = stack
    error_bodies: list[bytes] = []
    async with aiohttp.ClientSession() as client:
        outcomes = {
            "log": await _exchange(client, gateway, f"mail {CANARY_EMAIL} please"),
            "alert": await _exchange(client, gateway, f"card {CANARY_CARD} and {CANARY_ALERT}"),
            "shadow": await _exchange(client, gateway, f"shadow {CANARY_SHADOW}"),
            "block": await _exchange(client, gateway, f"key {CANARY_BLOCK}"),
            "response block": await _exchange(client, gateway, "leak in response"),
            "stream block": await _exchange(client, gateway, "stream a split key"),
            "stream alert": await _exchange(client, gateway, "stream an alert"),
        }
        async with client.get(gateway.make_url("/conversation/c-canary/messages")) as response:
            withheld = await response.json()
        await asyncio.sleep(0.6)  # the alert window closes; background records settle
        async with client.get(admin.make_url("/metrics")) as response:
            metrics = await response.text()
    await state.accountant.drain()

    assert outcomes["log"][0] == outcomes["alert"][0] == outcomes["shadow"][0] == 200
    assert outcomes["block"][0] == outcomes["response block"][0] == 403
    assert b"event: error" in outcomes["stream block"][1]
    assert withheld["messages"][0]["policyWithheld"] is True
    error_bodies += [outcomes["block"][1], outcomes["response block"][1]]
    error_bodies.append(outcomes["stream block"][1].split(b"event: error")[1])
    error_bodies.append(json.dumps(withheld).encode())

    logs = log_stream.getvalue()
    audit = audit_path.read_text()
    for canary in CANARIES:
        for name, sink in (("log", logs), ("audit", audit), ("metrics", metrics)):
            assert canary not in sink, f"{canary!r} in {name}"
        for body in error_bodies + received:
            assert canary.encode() not in body
    assert b"AKIA" not in outcomes["stream block"][1]

    events = [json.loads(line) for line in logs.splitlines()]
    violations = [e for e in events if e["event"] == "policy.violation"]
    seen = {(e["policyId"], e["stage"]) for e in violations}
    assert {
        ("pii.email", "prompt"),
        ("pii.credit-card", "prompt"),
        ("canary.alert", "prompt"),
        ("canary.shadow", "prompt"),
        ("secrets.aws-access-key-id", "prompt"),
        ("secrets.aws-access-key-id", "response"),
        ("canary.alert", "response"),
    } <= seen
    shadow = next(e for e in violations if e["policyId"] == "canary.shadow")
    assert (shadow["mode"], shadow["block"], shadow["wouldBlock"]) == ("shadow", False, True)
    card = next(e for e in violations if e["policyId"] == "pii.credit-card")
    assert card["fingerprints"] == [fingerprint(KEY.encode(), CANARY_CARD)[:32]]
    assert card["length"] == len(CANARY_CARD)
    assert card["userId"] == "user-42"
    assert card["workspace"] == "ws-canary"
    assert card["conversationId"] == "c-canary"
    streamed = next(e for e in violations if e["policyId"] == "canary.alert" and e["stage"] == "response")
    assert streamed["fingerprints"] == [fingerprint(KEY.encode(), CANARY_ALERT)[:32]]
    completed = [e for e in events if e["event"] == "request.completed"]
    assert len(completed) == 8
    assert {e["decision"] for e in completed} >= {"log", "alert", "block"}
    assert any(e["tokens"] and e["tokens"]["source"] == "estimated" for e in completed)

    audit_events = [json.loads(line) for line in audit.splitlines()]
    assert {e["policyId"] for e in audit_events} == {p for p, _ in seen}
    alerts = [json.loads(body) for body in received]
    assert {a["policyId"] for a in alerts} >= {"pii.credit-card", "canary.alert"}
    assert 'policy_gateway_violations_total{action="block",mode="shadow",policy="canary.shadow"' in metrics


def test_user_id_is_read_from_the_bearer_payload_without_verification() -> None:
    assert user_id(_bearer("u-1")) == "u-1"
    assert user_id("Bearer not-a-jwt") is None
    assert user_id("Basic abc") is None
    assert user_id(None) is None


def test_a_secret_in_a_careless_log_call_is_redacted(stack: Any) -> None:
    """The redaction processor catches a secret that a log call should never have carried."""
    _, _, _, log_stream, *_ = stack
    logging.getLogger("careless").warning("oops %s", CANARY_BLOCK)
    structlog.get_logger("careless").info("oops", detail=f"x {CANARY_BLOCK}", prompt="anything")
    logs = log_stream.getvalue()
    assert CANARY_BLOCK not in logs
    assert logs.count("[redacted]") == 3


def test_event_lines_are_stamped_redacted_and_filtered_by_level() -> None:
    """The request path's event log: structlog's ISO UTC stamp, the redactor, one line each."""
    stream = io.StringIO()
    configure_logging("json", stream)
    before = datetime.now(UTC)
    events().info("request.completed", route="prompt", prompt="a secret prompt")
    events().info("request.completed", route="messages")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["route"] for line in lines] == ["prompt", "messages"]
    assert lines[0]["prompt"] == "[redacted]"
    assert lines[0]["level"] == "info"
    stamp = lines[0]["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    written = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= written <= datetime.now(UTC)
    reference = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})["timestamp"]
    assert len(reference) == len(stamp)
    assert reference[-1] == stamp[-1] == "Z"
    quiet = io.StringIO()
    configure_logging("json", quiet, level=logging.WARNING)
    events().info("request.completed", route="prompt")
    assert quiet.getvalue() == ""
    configure_logging("json", io.StringIO())


async def test_a_client_request_id_is_kept_unless_a_block_rule_catches_it(aiohttp_server: Any) -> None:
    """X-Request-Id is checked once on arrival: a clean one is used, one holding a secret is
    replaced by the gateway's own id and appears nowhere in the log."""
    stream = io.StringIO()
    configure_logging("json", stream)
    _, upstream = await start_upstream(aiohttp_server)
    public, _, _ = await start_gateway(aiohttp_server, str(upstream.make_url("")))
    async with aiohttp.ClientSession() as client:
        for request_id in ("trace-123", CANARY_BLOCK):
            async with client.get(public.make_url("/health"), headers={"X-Request-Id": request_id}) as answer:
                await answer.read()
    await asyncio.sleep(0.05)
    logged = stream.getvalue()
    ids = [json.loads(line)["requestId"] for line in logged.splitlines() if "request.completed" in line]
    assert ids[0] == "trace-123"
    assert len(ids) == 2
    assert len(ids[1]) == 32
    assert CANARY_BLOCK not in logged
    configure_logging("json", io.StringIO())


def test_counts_gathered_in_a_batch_add_up_in_the_exposition() -> None:
    """Counts gathered with ``count`` are applied once, summed, and a scrape never misses them."""
    metrics = Metrics()
    metrics.count(metrics.requests, ("prompt", "200"))
    metrics.count(metrics.requests, ("prompt", "200"), 2)
    metrics.count(metrics.requests, ("messages", "502"))
    text = metrics.exposition().decode()
    assert 'policy_gateway_requests_total{route="prompt",status="200"} 3.0' in text
    assert 'policy_gateway_requests_total{route="messages",status="502"} 1.0' in text
    metrics.count(metrics.requests, ("prompt", "200"))
    metrics.flush()
    metrics.flush()
    assert 'policy_gateway_requests_total{route="prompt",status="200"} 4.0' in metrics.exposition().decode()


class _Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_held_lines_go_out_together_in_whole_lines_of_at_most_pipe_buf() -> None:
    """A batch's lines wait for the end of the batch, then go out in few writes, none of which
    splits a line or exceeds PIPE_BUF (what a pipe writes atomically)."""
    stream = _Writes()
    configure_logging("json", stream)
    with held_events():
        for number in range(40):
            events().info("request.completed", route="prompt", number=number)
        with held_events():
            events().info("request.completed", route="inner")
        assert stream.writes == []
    assert 1 < len(stream.writes) < 41
    assert all(len(text.encode()) <= select.PIPE_BUF and text.endswith("\n") for text in stream.writes)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("number") for line in lines] == [*range(40), None]
    events().info("request.completed", route="alone")
    assert stream.writes[-1].count("\n") == 1
    configure_logging("json", io.StringIO())
