"""Alerts: payloads at real receivers, grouping, retries, the bounded queue, close, a real Alertmanager."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.alerts import (
    AlertConfig,
    AlertConfigError,
    AlertDispatcher,
    AlertEvent,
    AlertmanagerSink,
    AlertSink,
    GroupedAlert,
    SlackSink,
    WebhookSink,
    parse_alert_config,
)
from tests.alertmanager_fixtures import AlertmanagerProcess

# The "matched text": only its keyed fingerprint may leave the gateway.
CANARY = "AKIAQCANARY7EXAMPLE1"
FINGERPRINT_KEY = b"alerts-test-fingerprint-key"
AT = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)


def fingerprint(text: str) -> str:
    return hmac.new(FINGERPRINT_KEY, text.encode(), hashlib.sha256).hexdigest()


def make_event(**changes: Any) -> AlertEvent:
    event = AlertEvent(
        policy_id="secrets.aws-access-key-id",
        policy_name="AWS access key id",
        severity="high",
        action="alert",
        stage="prompt",
        workspace="ws-1",
        conversation_id="c-1",
        repo="repo-1",
        revision="rev-1",
        decision_id="d-1",
        request_id="r-1",
        fingerprints=(fingerprint(CANARY),),
        at=AT,
    )
    return replace(event, **changes)


# -- receivers and dispatchers ------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server recording every request: the first ``failures`` get 503, then 200."""

    failures: int = 0
    hang: bool = False
    url: str = ""
    received: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        if self.hang:
            await asyncio.wait_for(self.release.wait(), 10)
        if len(self.received) <= self.failures:
            return web.Response(status=503)
        return web.Response(status=200, text="ok")

    def bodies(self) -> list[Any]:
        return [item.json() for item in self.received]

    async def wait_for(self, count: int, within: float = 2.0) -> None:
        async with asyncio.timeout(within):
            while len(self.received) < count:
                await asyncio.sleep(0.005)


@dataclass
class Outcomes:
    """What the dispatcher told its callbacks."""

    results: list[tuple[str, str]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def on_result(self, sink: str, result: str) -> None:
        self.results.append((sink, result))

    def count(self, result: str, sink: str | None = None) -> int:
        return sum(1 for s, r in self.results if r == result and sink in (None, s))

    async def wait_for(self, result: str, count: int, within: float = 3.0) -> None:
        async with asyncio.timeout(within):
            while self.count(result) < count:
                await asyncio.sleep(0.005)


StartReceiver = Callable[..., Awaitable[Receiver]]
StartDispatcher = Callable[[AlertConfig], Awaitable[tuple[AlertDispatcher, Outcomes]]]


@pytest.fixture
async def receivers(aiohttp_server: Any) -> AsyncIterator[StartReceiver]:
    """Start receivers; hung handlers are released before the servers close."""
    started: list[Receiver] = []

    async def start(*, failures: int = 0, hang: bool = False) -> Receiver:
        receiver = Receiver(failures=failures, hang=hang)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver.handle)
        server = await aiohttp_server(app)
        receiver.url = str(server.make_url("/hooks/T000/B000/s3cr3t-token"))
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.release.set()


@pytest.fixture
async def dispatchers(receivers: StartReceiver) -> AsyncIterator[StartDispatcher]:
    """Start dispatchers recording their outcomes; each is closed (quickly) at the end."""
    started: list[AlertDispatcher] = []

    async def start(config: AlertConfig) -> tuple[AlertDispatcher, Outcomes]:
        outcomes = Outcomes()
        dispatcher = AlertDispatcher(
            config, on_result=outcomes.on_result, on_fallback=outcomes.fallbacks.append
        )
        await dispatcher.start()
        started.append(dispatcher)
        return dispatcher, outcomes

    yield start
    for dispatcher in started:
        await dispatcher.close(timeout=0.2)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "gateway.alerts" and r.levelno >= logging.WARNING
    ]


# -- parse_alert_config -------------------------------------------------------------------------

URL = "https://alerts.example/hook"


@pytest.mark.parametrize(
    ("value", "sinks", "options"),
    [
        pytest.param(
            {
                "sinks": [
                    {"type": "webhook", "name": "siem", "url": URL, "headers": {"Authorization": "Bearer x"}},
                    {"type": "slack", "url": "https://hooks.slack.com/services/T/B/x"},
                    {"type": "alertmanager", "url": "http://am:9093", "resolve_after": 600},
                ],
                "window": 30,
                "queue_size": 50,
                "on_block": True,
                "retries": 5,
                "timeout": 2.5,
            },
            [("siem", WebhookSink), ("slack", SlackSink), ("alertmanager", AlertmanagerSink)],
            {"window": 30, "queue_size": 50, "on_block": True, "retries": 5, "timeout": 2.5},
            id="a full config yields every sink with its name and every option",
        ),
        pytest.param(
            {
                "sinks": [
                    {"type": "webhook", "url": URL},
                    {"type": "webhook", "url": URL},
                    {"type": "slack", "url": URL},
                ]
            },
            [("webhook", WebhookSink), ("webhook-2", WebhookSink), ("slack", SlackSink)],
            {},
            id="unnamed sinks are named after their type and numbered when the type repeats",
        ),
        pytest.param(
            {
                "sinks": [
                    {"type": "webhook", "url": URL},
                    {"type": "webhook", "name": "webhook-2", "url": URL},
                ]
            },
            [("webhook", WebhookSink), ("webhook-2", WebhookSink)],
            {},
            id="an explicit name is kept",
        ),
        pytest.param(
            {"sinks": [{"type": "webhook", "name": "webhook", "url": URL}, {"type": "webhook", "url": URL}]},
            [("webhook", WebhookSink), ("webhook-2", WebhookSink)],
            {},
            id="a default name steps past a name given explicitly",
        ),
        pytest.param(None, [], {}, id="no alerts mapping means no sinks and the defaults"),
        pytest.param({}, [], {}, id="an empty alerts mapping means no sinks and the defaults"),
    ],
)
def test_parse_alert_config_accepts(
    value: object, sinks: list[tuple[str, type]], options: dict[str, Any]
) -> None:
    """A valid alerts mapping becomes a config with the sinks, names and options it describes."""
    config = parse_alert_config(value)
    assert [(sink.name, type(sink)) for sink in config.sinks] == sinks
    expected = replace(AlertConfig(), **options)
    assert (config.window, config.queue_size, config.on_block, config.retries, config.timeout) == (
        expected.window,
        expected.queue_size,
        expected.on_block,
        expected.retries,
        expected.timeout,
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param({"sink": []}, "alerts: unknown key 'sink'", id="an unknown key is refused"),
        pytest.param(
            {"sinks": [{"type": "webhook"}]},
            "alerts.sinks[0]: missing url",
            id="a sink without url is refused",
        ),
        pytest.param(
            {"sinks": [{"type": "webhook", "url": "ftp://files.example/x"}]},
            "alerts.sinks[0].url: must be an http:// or https:// URL with a host (scheme 'ftp')",
            id="a URL of another scheme is refused",
        ),
        pytest.param(
            {"sinks": [{"type": "pagerduty", "url": URL}]},
            "alerts.sinks[0].type: unknown type 'pagerduty'",
            id="an unknown sink type is refused",
        ),
        pytest.param(
            {"sinks": [{"url": URL}]}, "alerts.sinks[0]: missing type", id="a sink without type is refused"
        ),
        pytest.param(
            {
                "sinks": [
                    {"type": "webhook", "name": "a", "url": URL},
                    {"type": "slack", "name": "a", "url": URL},
                ]
            },
            "alerts.sinks[1].name: duplicate sink name 'a' (also sinks[0])",
            id="two sinks of one name are refused",
        ),
        pytest.param(
            {"sinks": [{"type": "webhook", "url": URL, "resolve_after": 60}]},
            "alerts.sinks[0]: unknown key 'resolve_after'",
            id="an option of another sink type is refused",
        ),
        pytest.param(
            {"sinks": [{"type": "webhook", "url": URL, "headers": {"X-Token": "a\r\nInjected: 1"}}]},
            "header 'X-Token' has an empty name or a line break",
            id="a header value with a line break is refused",
        ),
        pytest.param(
            {"window": 0}, "alerts.window: 0 must be a positive number", id="a zero window is refused"
        ),
        pytest.param(
            {"queue_size": -1},
            "alerts.queue_size: -1 must be a positive number",
            id="a negative queue is refused",
        ),
        pytest.param(
            {"retries": 1.5},
            "alerts.retries: 1.5 must be a positive whole number",
            id="fractional retries are refused",
        ),
        pytest.param(
            {"timeout": True},
            "alerts.timeout: True must be a positive number",
            id="a boolean timeout is refused",
        ),
        pytest.param(
            {"on_block": "yes"},
            "alerts.on_block: 'yes' must be true or false",
            id="a non-boolean on_block is refused",
        ),
        pytest.param(
            {"sinks": {"type": "webhook"}},
            "alerts.sinks: must be a list",
            id="sinks that are not a list are refused",
        ),
        pytest.param([], "alerts: must be a mapping", id="an alerts value that is not a mapping is refused"),
    ],
)
def test_parse_alert_config_refuses(value: object, problem: str) -> None:
    """An invalid alerts mapping is refused with a message naming the problem and where it is."""
    with pytest.raises(AlertConfigError) as caught:
        parse_alert_config(value)
    assert any(problem in error for error in caught.value.errors), caught.value.errors


def test_parse_alert_config_reports_every_problem_and_no_secret() -> None:
    """A config with many problems lists each of them, without echoing URLs or header values."""
    value = {
        "sinks": [
            {"type": "webhook"},
            {"type": "webhook", "url": "ftp://hooks.example/T000/SECRET-URL-TOKEN"},
            {"type": "carrier-pigeon", "url": URL},
            {"type": "slack", "name": "ops", "url": URL, "colour": "red"},
            {
                "type": "alertmanager",
                "name": "ops",
                "url": URL,
                "headers": {"Authorization": "SECRET\nVALUE"},
            },
        ],
        "window": -5,
        "queue_size": 0,
        "retries": 0,
        "timeout": "soon",
        "bogus": 1,
    }
    with pytest.raises(AlertConfigError) as caught:
        parse_alert_config(value)
    errors = caught.value.errors
    expected = [
        "alerts: unknown key 'bogus'",
        "alerts.window: -5",
        "alerts.queue_size: 0",
        "alerts.retries: 0",
        "alerts.timeout: 'soon'",
        "alerts.sinks[0]: missing url",
        "alerts.sinks[1].url:",
        "alerts.sinks[2].type: unknown type 'carrier-pigeon'",
        "alerts.sinks[3]: unknown key 'colour'",
        "alerts.sinks[4].headers: header 'Authorization'",
        "alerts.sinks[4].name: duplicate sink name 'ops' (also sinks[3])",
    ]
    for fragment in expected:
        assert any(fragment in error for error in errors), (fragment, errors)
    assert len(errors) == len(expected)
    assert "SECRET" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


# -- payloads at real receivers -----------------------------------------------------------------

GROUP = GroupedAlert(make_event(), count=3, first_at=AT, last_at=AT + timedelta(seconds=42))


async def deliver(sink: AlertSink, alert: GroupedAlert = GROUP) -> None:
    async with aiohttp.ClientSession() as session:
        await sink.deliver(alert, session)


async def test_webhook_posts_every_field_of_the_alert(receivers: StartReceiver) -> None:
    """The webhook receives one JSON object of the event's fields, count and span, with its headers."""
    receiver = await receivers()
    await deliver(WebhookSink(receiver.url, headers={"Authorization": "Bearer hook-token"}))
    [request] = receiver.received
    assert request.headers["Authorization"] == "Bearer hook-token"
    assert request.headers["Content-Type"].startswith("application/json")
    assert request.json() == {
        "policyId": "secrets.aws-access-key-id",
        "policyName": "AWS access key id",
        "severity": "high",
        "action": "alert",
        "stage": "prompt",
        "workspace": "ws-1",
        "conversationId": "c-1",
        "repo": "repo-1",
        "revision": "rev-1",
        "decisionId": "d-1",
        "requestId": "r-1",
        "fingerprints": [fingerprint(CANARY)],
        "count": 3,
        "firstAt": "2026-11-26T10:00:00.000Z",
        "lastAt": "2026-11-26T10:00:42.000Z",
    }


async def test_slack_posts_one_readable_line(receivers: StartReceiver) -> None:
    """Slack receives {"text"}: one line naming policy, severity, action, stage, workspace and count."""
    receiver = await receivers()
    await deliver(SlackSink(receiver.url))
    [body] = receiver.bodies()
    assert set(body) == {"text"}
    text = body["text"]
    assert "\n" not in text
    for fragment in (
        "AWS access key id",
        "high",
        "action alert",
        "stage prompt",
        "workspace ws-1",
        "3 events",
    ):
        assert fragment in text


async def test_slack_escapes_what_would_become_a_mention_or_link(receivers: StartReceiver) -> None:
    """A workspace id written as a Slack mention reaches Slack escaped, as inert text."""
    receiver = await receivers()
    await deliver(
        SlackSink(receiver.url), replace(GROUP, event=make_event(workspace="<!channel> & <http://x|y>"))
    )
    [body] = receiver.bodies()
    assert "&lt;!channel&gt; &amp; &lt;http://x|y&gt;" in body["text"]
    assert "<" not in body["text"]


async def test_alertmanager_posts_a_list_of_one_alert_to_its_v2_api(receivers: StartReceiver) -> None:
    """Alertmanager receives [alert] at /api/v2/alerts with labels, annotations and a resolve time."""
    receiver = await receivers()
    base = receiver.url.split("/hooks/")[0] + "/prefix/"
    await deliver(AlertmanagerSink(base, generator_url="https://gateway.example/decisions"))
    [request] = receiver.received
    assert request.path == "/prefix/api/v2/alerts"
    [alert] = request.json()
    assert alert["labels"] == {
        "alertname": "PolicyViolation",
        "policy": "secrets.aws-access-key-id",
        "severity": "high",
        "action": "alert",
        "stage": "prompt",
        "workspace": "ws-1",
    }
    annotations = alert["annotations"]
    assert set(annotations) == {
        "summary", "description", "count", "policy_name", "conversation_id", "decision_id", "revision"
    }  # fmt: skip
    assert (annotations["count"], annotations["decision_id"], annotations["revision"]) == (
        "3",
        "d-1",
        "rev-1",
    )
    assert alert["startsAt"] == "2026-11-26T10:00:00.000Z"
    assert alert["endsAt"] == "2026-11-26T10:05:42.000Z"  # the last event + 5 minutes
    assert alert["generatorURL"] == "https://gateway.example/decisions"


async def test_no_sink_receives_the_matched_text(
    receivers: StartReceiver, dispatchers: StartDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """Every sink receives the fingerprint at most, never the matched text, and no log holds it either."""
    caplog.set_level(logging.DEBUG)
    hook, slack, am = await receivers(), await receivers(), await receivers(failures=1)
    config = AlertConfig(
        sinks=(WebhookSink(hook.url), SlackSink(slack.url), AlertmanagerSink(am.url.split("/hooks/")[0])),
        window=0.1,
    )
    dispatcher, _ = await dispatchers(config)
    for index in range(3):
        dispatcher.submit(make_event(at=AT + timedelta(seconds=index), request_id=f"r-{index}"))
    await dispatcher.close()
    for receiver in (hook, slack, am):
        assert receiver.received
        for request in receiver.received:
            assert CANARY.encode() not in request.body
            assert CANARY not in json.dumps(request.headers)
    assert fingerprint(CANARY) in hook.received[0].body.decode()
    assert CANARY not in caplog.text


# -- grouping -----------------------------------------------------------------------------------


async def test_repeats_within_the_window_arrive_as_one_counted_alert(
    receivers: StartReceiver, dispatchers: StartDispatcher
) -> None:
    """The first event goes out at once; repeats within the window follow as one alert with their count."""
    receiver = await receivers()
    dispatcher, outcomes = await dispatchers(AlertConfig(sinks=(WebhookSink(receiver.url),), window=0.3))
    started = time.monotonic()
    assert dispatcher.submit(make_event(decision_id="d-0"))
    await receiver.wait_for(1, within=0.25)
    for index in range(1, 5):
        assert dispatcher.submit(make_event(decision_id=f"d-{index}", at=AT + timedelta(seconds=index)))
    assert outcomes.count("grouped") == 4
    assert len(receiver.received) == 1
    await receiver.wait_for(2, within=1.0)
    assert time.monotonic() - started >= 0.3
    first, second = receiver.bodies()
    assert (first["count"], first["decisionId"]) == (1, "d-0")
    assert (second["count"], second["decisionId"]) == (4, "d-1")
    assert (second["firstAt"], second["lastAt"]) == ("2026-11-26T10:00:01.000Z", "2026-11-26T10:00:04.000Z")
    await outcomes.wait_for("delivered", 2)
    assert outcomes.fallbacks == []


@pytest.mark.parametrize(
    ("events", "counts"),
    [
        pytest.param(
            [make_event(), make_event(workspace="ws-2"), make_event(policy_id="pii.email")],
            [1, 1, 1],
            id="events of other workspaces or policies open groups of their own",
        ),
        pytest.param(
            [make_event(), make_event(stage="response"), make_event(action="block")],
            [1, 2],
            id="events of one workspace and policy group across stages and actions",
        ),
        pytest.param([make_event()], [1], id="a lone event is delivered once and no empty group follows"),
    ],
)
async def test_groups_are_per_workspace_and_policy(
    receivers: StartReceiver, dispatchers: StartDispatcher, events: list[AlertEvent], counts: list[int]
) -> None:
    """Grouping keys on (workspace, policy) alone."""
    receiver = await receivers()
    dispatcher, _ = await dispatchers(
        AlertConfig(sinks=(WebhookSink(receiver.url),), window=0.1, on_block=True)
    )
    for event in events:
        dispatcher.submit(event)
    await asyncio.sleep(0.2)
    await dispatcher.close()
    assert [body["count"] for body in receiver.bodies()] == counts


async def test_an_event_after_the_window_opens_a_new_group(
    receivers: StartReceiver, dispatchers: StartDispatcher
) -> None:
    """Once the window has passed, the next event of the key is delivered at once again."""
    receiver = await receivers()
    dispatcher, outcomes = await dispatchers(AlertConfig(sinks=(WebhookSink(receiver.url),), window=0.1))
    dispatcher.submit(make_event())
    await asyncio.sleep(0.15)
    dispatcher.submit(make_event(decision_id="d-2"))
    await receiver.wait_for(2)
    assert [(b["count"], b["decisionId"]) for b in receiver.bodies()] == [(1, "d-1"), (1, "d-2")]
    assert outcomes.count("grouped") == 0


@pytest.mark.parametrize(
    ("action", "on_block", "delivered"),
    [
        pytest.param("alert", False, True, id="an alert outcome is alerted"),
        pytest.param("block", False, False, id="a block outcome is not alerted by default"),
        pytest.param("block", True, True, id="a block outcome is alerted with on_block"),
        pytest.param("log", True, False, id="a log outcome is never alerted"),
    ],
)
async def test_which_outcomes_are_alerted(
    receivers: StartReceiver, dispatchers: StartDispatcher, action: str, on_block: bool, delivered: bool
) -> None:
    """Alert outcomes are delivered; block outcomes only with on_block."""
    receiver = await receivers()
    dispatcher, _ = await dispatchers(AlertConfig(sinks=(WebhookSink(receiver.url),), on_block=on_block))
    assert dispatcher.submit(make_event(action=action))
    await dispatcher.close()
    assert len(receiver.received) == int(delivered)


# -- retries and failures -----------------------------------------------------------------------


async def test_a_delivery_that_fails_twice_is_retried_and_delivered_once(
    receivers: StartReceiver, dispatchers: StartDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """Two 503 answers are retried with backoff; the third attempt delivers and nothing counts as failed."""
    receiver = await receivers(failures=2)
    dispatcher, outcomes = await dispatchers(
        AlertConfig(sinks=(WebhookSink(receiver.url, name="hook"),), retries=3)
    )
    dispatcher.submit(make_event())
    await outcomes.wait_for("delivered", 1)
    assert len(receiver.received) == 3
    assert outcomes.results == [("hook", "delivered")]
    assert outcomes.fallbacks == []
    assert warnings(caplog) == []


async def test_a_sink_that_keeps_failing_counts_every_alert_and_warns_once(
    receivers: StartReceiver, dispatchers: StartDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """Each alert fails after `retries` attempts and is counted; the burst is logged once, without the URL."""
    receiver = await receivers(failures=1000)
    config = AlertConfig(sinks=(WebhookSink(receiver.url, name="hook"),), retries=2)
    dispatcher, outcomes = await dispatchers(config)
    for index in range(3):
        dispatcher.submit(make_event(policy_id=f"policy-{index}"))
    await outcomes.wait_for("failed", 3)
    assert len(receiver.received) == 6
    assert outcomes.results == [("hook", "failed")] * 3
    assert outcomes.fallbacks == ["delivery_failed"] * 3
    [warning] = warnings(caplog)
    assert "hook" in warning
    assert "HTTP 503" in warning
    # The receiver's own access log (a test server's) names its URL; the gateway's lines must not.
    gateway_lines = [r.getMessage() for r in caplog.records if not r.name.startswith("aiohttp.access")]
    assert not any("s3cr3t-token" in line for line in gateway_lines)


async def test_a_hanging_sink_does_not_delay_a_healthy_one(
    receivers: StartReceiver, dispatchers: StartDispatcher
) -> None:
    """While one sink hangs on its delivery, another receives the same alert at once."""
    stuck, healthy = await receivers(hang=True), await receivers()
    config = AlertConfig(
        sinks=(WebhookSink(stuck.url, name="stuck"), WebhookSink(healthy.url, name="healthy"))
    )
    dispatcher, outcomes = await dispatchers(config)
    dispatcher.submit(make_event())
    dispatcher.submit(make_event(policy_id="pii.email"))
    await healthy.wait_for(2, within=0.3)
    await outcomes.wait_for("delivered", 2, within=0.3)
    assert outcomes.count("delivered", "stuck") == 0
    assert len(stuck.received) == 1  # still on the first alert


# -- the bounded queue and close ----------------------------------------------------------------


async def test_a_full_queue_drops_without_blocking(
    receivers: StartReceiver, dispatchers: StartDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """Past queue_size, submit returns False at once; every drop is counted and the burst logged once."""
    receiver = await receivers(hang=True)
    dispatcher, outcomes = await dispatchers(
        AlertConfig(sinks=(WebhookSink(receiver.url, name="hook"),), queue_size=2)
    )
    started = time.perf_counter()
    taken = [dispatcher.submit(make_event(policy_id=f"policy-{index}")) for index in range(10)]
    assert time.perf_counter() - started < 0.05
    assert taken == [True, True] + [False] * 8
    assert outcomes.count("dropped", "hook") == 8
    assert outcomes.fallbacks == ["queue_full"] * 8
    assert dispatcher.pending == 2
    assert len(warnings(caplog)) == 1


async def test_close_delivers_what_is_queued_and_grouped(
    receivers: StartReceiver, dispatchers: StartDispatcher
) -> None:
    """close() sends the queued alerts and the open groups' counts at once, then refuses new events."""
    receiver = await receivers()
    dispatcher, outcomes = await dispatchers(AlertConfig(sinks=(WebhookSink(receiver.url),), window=60))
    for index in range(3):
        dispatcher.submit(make_event(policy_id=f"policy-{index}"))
    dispatcher.submit(make_event(policy_id="policy-0", decision_id="d-9"))
    dispatcher.submit(make_event(policy_id="policy-0", decision_id="d-10"))
    assert dispatcher.pending == 4
    started = time.monotonic()
    await dispatcher.close(timeout=2)
    assert time.monotonic() - started < 1
    bodies = receiver.bodies()
    assert sorted((b["policyId"], b["count"]) for b in bodies) == [
        ("policy-0", 1), ("policy-0", 2), ("policy-1", 1), ("policy-2", 1)
    ]  # fmt: skip
    assert dispatcher.pending == 0
    assert outcomes.count("delivered") == 4
    assert dispatcher.submit(make_event()) is False


async def test_close_gives_up_at_its_bound(receivers: StartReceiver, dispatchers: StartDispatcher) -> None:
    """close() waits no longer than its timeout for a hanging sink, and counts what it leaves as dropped."""
    receiver = await receivers(hang=True)
    dispatcher, outcomes = await dispatchers(AlertConfig(sinks=(WebhookSink(receiver.url),), timeout=10))
    dispatcher.submit(make_event())
    dispatcher.submit(make_event(policy_id="pii.email"))
    await receiver.wait_for(1)
    started = time.monotonic()
    await dispatcher.close(timeout=0.2)
    assert time.monotonic() - started < 0.6
    assert outcomes.count("dropped") == 2  # the one in flight and the one queued
    assert dispatcher.pending == 0


# -- a real Alertmanager ------------------------------------------------------------------------


async def alertmanager_alert(server: AlertmanagerProcess, workspace: str, count: str) -> dict[str, Any]:
    """Poll Alertmanager until it holds the workspace's alert with ``count``."""
    async with asyncio.timeout(5):
        while True:
            for alert in await asyncio.to_thread(server.alerts):
                if alert["labels"].get("workspace") == workspace and alert["annotations"]["count"] == count:
                    return alert
            await asyncio.sleep(0.05)


async def test_alertmanager_holds_the_delivered_alert(
    alertmanager: AlertmanagerProcess,
    dispatchers: StartDispatcher,
) -> None:
    """A real Alertmanager accepts the alert, then the group's count, under the policy's labels."""
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    config = AlertConfig(sinks=(AlertmanagerSink(alertmanager.url),), window=0.2)
    dispatcher, outcomes = await dispatchers(config)
    for index in range(3):
        dispatcher.submit(make_event(workspace=workspace, at=now + timedelta(milliseconds=index)))
    first = await alertmanager_alert(alertmanager, workspace, "1")
    assert first["labels"] == {
        "alertname": "PolicyViolation",
        "policy": "secrets.aws-access-key-id",
        "severity": "high",
        "action": "alert",
        "stage": "prompt",
        "workspace": workspace,
    }
    assert first["status"]["state"] in {"active", "unprocessed"}
    assert first["annotations"]["policy_name"] == "AWS access key id"
    # The grouped repeats update the same alert (same labels) with their count.
    grouped = await alertmanager_alert(alertmanager, workspace, "2")
    assert grouped["fingerprint"] == first["fingerprint"]
    await outcomes.wait_for("delivered", 2)
    assert outcomes.fallbacks == []
