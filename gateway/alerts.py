"""Alerts: violations delivered to webhooks, Slack and Alertmanager, off the request path.

The proxy calls ``AlertDispatcher.submit`` for each violation of a rule whose outcome is ``alert``
(or ``block``, with ``on_block``); ``submit`` never waits. Events of one (workspace, policy) are
grouped: the first is delivered at once, the repeats within ``window`` seconds of it are counted
and delivered as one alert when the window ends. Each sink has its own bounded queue and its own
worker, so a slow or dead sink fills and drops only its own queue. A delivery is retried with
exponential backoff; one that still fails is counted, and logged once per burst of failures.

Matched text never reaches this module: an event carries keyed HMAC fingerprints of it, and
logs carry sink names and counts only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
from yarl import URL

log = logging.getLogger("gateway.alerts")

BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
# Distinct (workspace, policy) pairs with an open window; past it, events go out ungrouped.
MAX_GROUPS = 10_000
USER_AGENT = "ai-policy-gateway-alerts"


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One violation of a rule whose outcome is alert (or block, when configured)."""

    policy_id: str
    policy_name: str
    severity: str  # low | medium | high
    action: str  # alert | block
    stage: str  # prompt | response
    workspace: str
    conversation_id: str | None
    repo: str | None
    revision: str  # of the rule set
    decision_id: str
    request_id: str
    fingerprints: tuple[str, ...]  # keyed HMAC hex of the matched text, never the text
    at: datetime  # tz-aware UTC

    def __post_init__(self) -> None:
        if self.at.utcoffset() is None:
            raise ValueError("AlertEvent.at must be timezone-aware")


@dataclass(frozen=True, slots=True)
class GroupedAlert:
    event: AlertEvent  # the first event of the group
    count: int  # events of the same (workspace, policy_id) in this group
    first_at: datetime
    last_at: datetime


class AlertSink(Protocol):
    name: str

    async def deliver(self, alert: GroupedAlert, session: aiohttp.ClientSession) -> None:
        """Deliver one alert; raise on failure (non-2xx, network, timeout)."""


class DeliveryError(Exception):
    """A sink answered with a status other than 2xx."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"HTTP {status}")


# -- sinks --------------------------------------------------------------------------------------


class _HttpSink:
    """POSTs ``body(alert)`` as JSON to ``url``, with ``headers`` (e.g. Authorization) added."""

    __slots__ = ("_headers", "_url", "name")

    def __init__(self, url: str | URL, *, name: str, headers: Mapping[str, str] | None = None) -> None:
        self.name = name
        self._url = _http_url(url)
        self._headers = dict(headers or {})

    def __repr__(self) -> str:
        # SECURITY: the URL (a Slack webhook's path is its credential) and headers stay out of reprs.
        return f"{type(self).__name__}(name={self.name!r})"

    def body(self, alert: GroupedAlert) -> Any:
        raise NotImplementedError

    def _target(self) -> URL:
        return self._url

    async def deliver(self, alert: GroupedAlert, session: aiohttp.ClientSession) -> None:
        # A redirect is a failure, not a cue to re-send the alert to wherever it points.
        async with session.post(
            self._target(), json=self.body(alert), headers=self._headers, allow_redirects=False
        ) as response:
            if not 200 <= response.status < 300:
                raise DeliveryError(response.status)


class WebhookSink(_HttpSink):
    """A generic JSON webhook: one object per alert, every field of the event and the group."""

    __slots__ = ()

    def __init__(
        self, url: str | URL, *, name: str = "webhook", headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(url, name=name, headers=headers)

    def body(self, alert: GroupedAlert) -> dict[str, Any]:
        event = alert.event
        return {
            "policyId": event.policy_id,
            "policyName": event.policy_name,
            "severity": event.severity,
            "action": event.action,
            "stage": event.stage,
            "workspace": event.workspace,
            "conversationId": event.conversation_id,
            "repo": event.repo,
            "revision": event.revision,
            "decisionId": event.decision_id,
            "requestId": event.request_id,
            "fingerprints": list(event.fingerprints),
            "count": alert.count,
            "firstAt": _timestamp(alert.first_at),
            "lastAt": _timestamp(alert.last_at),
        }


class SlackSink(_HttpSink):
    """A Slack-compatible incoming webhook: ``{"text": one readable line}``."""

    __slots__ = ()

    def __init__(
        self, url: str | URL, *, name: str = "slack", headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(url, name=name, headers=headers)

    def body(self, alert: GroupedAlert) -> dict[str, Any]:
        event = alert.event
        events = "1 event" if alert.count == 1 else f"{alert.count} events"
        line = (
            f"Policy violation: {event.policy_name} ({event.policy_id}), severity {event.severity}, "
            f"action {event.action}, stage {event.stage}, workspace {event.workspace}, {events} "
            f"since {_timestamp(alert.first_at)}, decision {event.decision_id}"
        )
        return {"text": _slack_escape(line)}


class AlertmanagerSink(_HttpSink):
    """Alertmanager's v2 API: ``POST {url}/api/v2/alerts`` with a list of one alert.

    The alert resolves ``resolve_after`` seconds after the group's last event, unless a later
    alert with the same labels (the same workspace, policy, stage and action) extends it.
    """

    __slots__ = ("_generator_url", "_resolve_after")

    def __init__(
        self,
        url: str | URL,
        *,
        name: str = "alertmanager",
        headers: Mapping[str, str] | None = None,
        resolve_after: float = 300.0,
        generator_url: str | None = None,
    ) -> None:
        super().__init__(url, name=name, headers=headers)
        self._resolve_after = timedelta(seconds=_positive(resolve_after, integer=False))
        self._generator_url = None if generator_url is None else str(_http_url(generator_url))

    def _target(self) -> URL:
        return URL(str(self._url).rstrip("/") + "/api/v2/alerts")

    def body(self, alert: GroupedAlert) -> list[dict[str, Any]]:
        event = alert.event
        labels = {
            "alertname": "PolicyViolation",
            "policy": event.policy_id,
            "severity": event.severity,
            "action": event.action,
            "stage": event.stage,
            "workspace": event.workspace,
        }
        annotations = {
            "summary": f"{event.policy_name} ({event.severity}) at stage {event.stage} "
            f"in workspace {event.workspace}",
            "description": _description(alert),
            "count": str(alert.count),
            "policy_name": event.policy_name,
            "conversation_id": event.conversation_id or "",
            "decision_id": event.decision_id,
            "revision": event.revision,
        }
        item: dict[str, Any] = {
            # Alertmanager treats an empty value as an absent label, and an empty annotation as noise.
            "labels": {key: value for key, value in labels.items() if value},
            "annotations": {key: value for key, value in annotations.items() if value},
            "startsAt": _timestamp(alert.first_at),
            "endsAt": _timestamp(alert.last_at + self._resolve_after),
        }
        if self._generator_url is not None:
            item["generatorURL"] = self._generator_url
        return [item]


def _timestamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _slack_escape(text: str) -> str:
    # SECURITY: a workspace id or policy name must not become a link or an @channel mention.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _description(alert: GroupedAlert) -> str:
    event = alert.event
    where = f"workspace {event.workspace}"
    if event.repo:
        where += f", repo {event.repo}"
    if event.conversation_id:
        where += f", conversation {event.conversation_id}"
    events = "1 violation" if alert.count == 1 else f"{alert.count} violations"
    return (
        f"{events} of policy {event.policy_name} ({event.policy_id}, severity {event.severity}, "
        f"action {event.action}) at stage {event.stage} in {where}, from {_timestamp(alert.first_at)} "
        f"to {_timestamp(alert.last_at)}; decision {event.decision_id}, rule-set revision {event.revision}"
    )


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlertConfig:
    sinks: tuple[AlertSink, ...] = ()
    window: float = 60.0  # seconds: repeats of the same (workspace, policy) within it are grouped
    queue_size: int = 1000  # alerts waiting, per sink
    on_block: bool = False  # also alert on block outcomes
    retries: int = 3  # attempts per delivery
    timeout: float = 5.0  # seconds, per attempt

    def __post_init__(self) -> None:
        # queue_size 0 would make an unbounded asyncio.Queue.
        for key, integer in NUMBERS.items():
            try:
                _positive(getattr(self, key), integer=integer)
            except ValueError as exc:
                raise ValueError(f"AlertConfig.{key} {exc}") from None
        names = [sink.name for sink in self.sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be distinct: {names}")


class AlertConfigError(ValueError):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


SINK_TYPES: Mapping[str, type[WebhookSink | SlackSink | AlertmanagerSink]] = {
    "webhook": WebhookSink,
    "slack": SlackSink,
    "alertmanager": AlertmanagerSink,
}
SINK_KEYS = frozenset({"type", "name", "url", "headers"})
SINK_OPTIONS = {"alertmanager": frozenset({"resolve_after", "generator_url"})}
NUMBERS = {"window": False, "queue_size": True, "retries": True, "timeout": False}  # name: whole number
CONFIG_KEYS = frozenset({"sinks", "on_block", *NUMBERS})


@dataclass(slots=True)
class _SinkSpec:
    index: int
    type: str
    name: str | None
    url: str
    headers: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)


def parse_alert_config(value: object) -> AlertConfig:
    """The ``alerts:`` mapping of the config file, validated; every problem is reported at once.

    ``{sinks: [{type: webhook|slack|alertmanager, name?, url, headers?: {..}}], window?,
    queue_size?, on_block?, retries?, timeout?}``; an alertmanager sink also takes
    ``resolve_after`` (seconds) and ``generator_url``. Sink names default to the type, then
    type-2, type-3, ... when the type repeats.
    """
    if value is None:
        return AlertConfig()
    if not isinstance(value, Mapping):
        raise AlertConfigError(["alerts: must be a mapping with sinks: [...] and options"])
    errors: list[str] = []
    errors.extend(
        f"alerts: unknown key {key!r} (known: {', '.join(sorted(CONFIG_KEYS))})"
        for key in value
        if key not in CONFIG_KEYS
    )
    options: dict[str, Any] = {}
    for key, integer in NUMBERS.items():
        if key in value:
            try:
                options[key] = _positive(value[key], integer=integer)
            except ValueError as exc:
                errors.append(f"alerts.{key}: {value[key]!r} {exc}")
    if "on_block" in value:
        if isinstance(value["on_block"], bool):
            options["on_block"] = value["on_block"]
        else:
            errors.append(f"alerts.on_block: {value['on_block']!r} must be true or false")
    raw_sinks = value.get("sinks", [])
    specs: list[_SinkSpec] = []
    if not isinstance(raw_sinks, list):
        errors.append("alerts.sinks: must be a list of {type, url, ...}")
    else:
        for index, raw in enumerate(raw_sinks):
            spec = _sink_spec(index, raw, errors)
            if spec is not None:
                specs.append(spec)
    # Names are checked even for sinks with other problems, so that every problem is listed.
    names = _sink_names(specs, errors)
    if errors:
        raise AlertConfigError(errors)
    sinks = tuple(
        SINK_TYPES[spec.type](spec.url, name=name, headers=spec.headers, **spec.options)
        for spec, name in zip(specs, names, strict=True)
    )
    return AlertConfig(sinks=sinks, **options)


def _sink_spec(index: int, raw: object, errors: list[str]) -> _SinkSpec | None:
    """The sink described by ``raw``, its problems added to ``errors`` (then it is not to be built)."""
    where = f"alerts.sinks[{index}]"
    if not isinstance(raw, Mapping):
        errors.append(f"{where}: must be a mapping {{type, url, ...}}")
        return None
    kind = raw.get("type")
    if kind is None:
        errors.append(f"{where}: missing type (one of {', '.join(SINK_TYPES)})")
    elif kind not in SINK_TYPES:
        errors.append(f"{where}.type: unknown type {kind!r} (known: {', '.join(SINK_TYPES)})")
    allowed = SINK_KEYS | SINK_OPTIONS.get(str(kind), frozenset())
    errors.extend(f"{where}: unknown key {key!r}" for key in raw if key not in allowed)
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        errors.append(f"{where}.name: must be non-empty text")
    url = raw.get("url")
    if url is None:
        errors.append(f"{where}: missing url")
    elif not _is_http_url(url):
        errors.append(f"{where}.url: {_url_problem(url)}")
    headers = _headers(raw.get("headers", {}), f"{where}.headers", errors)
    options: dict[str, Any] = {}
    if "resolve_after" in raw:
        try:
            options["resolve_after"] = _positive(raw["resolve_after"], integer=False)
        except ValueError as exc:
            errors.append(f"{where}.resolve_after: {raw['resolve_after']!r} {exc}")
    if "generator_url" in raw:
        if _is_http_url(raw["generator_url"]):
            options["generator_url"] = raw["generator_url"]
        else:
            errors.append(f"{where}.generator_url: {_url_problem(raw['generator_url'])}")
    return _SinkSpec(index, str(kind), name if isinstance(name, str) else None, str(url), headers, options)


def _headers(value: object, where: str, errors: list[str]) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        errors.append(f"{where}: must map header names to text values")
        return {}
    for key, text in value.items():
        # SECURITY: values may be credentials; name the header, never print its value.
        if not key or any(c in key for c in "\r\n:") or any(c in text for c in "\r\n"):
            errors.append(f"{where}: header {key!r} has an empty name or a line break")
    return dict(value)


def _sink_names(specs: list[_SinkSpec], errors: list[str]) -> list[str]:
    taken: dict[str, int] = {}
    for spec in specs:
        if spec.name is None:
            continue
        if spec.name in taken:
            errors.append(
                f"alerts.sinks[{spec.index}].name: duplicate sink name {spec.name!r} "
                f"(also sinks[{taken[spec.name]}])"
            )
        else:
            taken[spec.name] = spec.index
    names: list[str] = []
    for spec in specs:
        name = spec.name
        if name is None:
            name, number = spec.type, 1
            while name in taken:
                number += 1
                name = f"{spec.type}-{number}"
            taken[name] = spec.index
        names.append(name)
    return names


def _positive(value: object, *, integer: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("must be a positive number")
    if integer and not isinstance(value, int):
        raise ValueError("must be a positive whole number")
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def _is_http_url(value: object) -> bool:
    try:
        _http_url(value)
    except ValueError:
        return False
    return True


def _http_url(value: object) -> URL:
    if not isinstance(value, str | URL):
        raise ValueError("must be an http:// or https:// URL")
    url = URL(value) if isinstance(value, str) else value
    if url.scheme not in {"http", "https"} or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return url


def _url_problem(value: object) -> str:
    # SECURITY: a webhook URL may carry its token: say what is wrong without echoing it.
    if not isinstance(value, str):
        return f"must be an http:// or https:// URL, not {type(value).__name__}"
    try:
        scheme = URL(value).scheme
    except ValueError:
        return "is not a URL"
    return f"must be an http:// or https:// URL with a host (scheme {scheme!r})"


# -- the dispatcher -----------------------------------------------------------------------------


def _ignore_result(sink: str, result: str) -> None:
    pass


def _ignore_fallback(reason: str) -> None:
    pass


@dataclass(slots=True)
class _Group:
    """An open window of one (workspace, policy): the events counted since its first."""

    deadline: float  # loop time
    timer: asyncio.TimerHandle | None = None
    first: AlertEvent | None = None
    count: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None

    def add(self, event: AlertEvent) -> None:
        self.count += 1
        if self.first is None:
            self.first = event
        self.first_at = event.at if self.first_at is None else min(self.first_at, event.at)
        self.last_at = event.at if self.last_at is None else max(self.last_at, event.at)


@dataclass(slots=True, eq=False)
class _Lane:
    """One sink's bounded queue, its worker, and the bursts it is in (drops, failures)."""

    sink: AlertSink
    queue: asyncio.Queue[GroupedAlert]
    worker: asyncio.Task[None] | None = None
    busy: bool = False
    dropped: int = 0  # since the sink last caught up
    failed: int = 0  # since the sink last delivered


class AlertDispatcher:
    """Groups alert events and delivers them to every sink of ``config`` in the background.

    ``on_result(sink, result)`` is told each outcome per sink: ``delivered``, ``failed``,
    ``dropped`` (queue full, or undelivered at close) or ``grouped`` (counted into a later
    alert); ``on_fallback(reason)`` each ``queue_full`` and ``delivery_failed``.
    """

    def __init__(
        self,
        config: AlertConfig,
        *,
        on_result: Callable[[str, str], None] = _ignore_result,
        on_fallback: Callable[[str], None] = _ignore_fallback,
    ) -> None:
        self._config = config
        self._on_result = on_result
        self._on_fallback = on_fallback
        self._lanes = [_Lane(sink, asyncio.Queue(config.queue_size)) for sink in config.sinks]
        self._groups: dict[tuple[str, str], _Group] = {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._abandoned = 0  # deliveries cut short by close

    @property
    def pending(self) -> int:
        """Deliveries queued or under way, summed over sinks, plus windows holding counted events."""
        queued = sum(lane.queue.qsize() + lane.busy for lane in self._lanes)
        return queued + sum(1 for group in self._groups.values() if group.count)

    def submit(self, event: AlertEvent) -> bool:
        """Take ``event`` without waiting; False if a full queue (or a closed dispatcher) dropped it.

        Must be called on the event loop's thread.
        """
        wanted = event.action == "alert" or (event.action == "block" and self._config.on_block)
        if not wanted or not self._lanes:
            return True
        if self._closed:
            for lane in self._lanes:
                self._on_result(lane.sink.name, "dropped")
            return False
        loop = asyncio.get_running_loop()
        now = loop.time()
        key = (event.workspace, event.policy_id)
        group = self._groups.get(key)
        if group is not None and now < group.deadline:
            group.add(event)
            for lane in self._lanes:
                self._on_result(lane.sink.name, "grouped")
            return True
        if group is not None:  # its timer is due but has not run yet
            self._end_window(key, group)
        if len(self._groups) < MAX_GROUPS:
            group = _Group(deadline=now + self._config.window)
            group.timer = loop.call_at(group.deadline, self._end_window, key, group)
            self._groups[key] = group
        return self._enqueue(GroupedAlert(event, 1, event.at, event.at))

    async def start(self) -> None:
        if self._session is not None:
            return
        if self._closed:
            raise RuntimeError("the alert dispatcher is closed")
        self._session = aiohttp.ClientSession(
            # SECURITY: a sink must never be handed cookies another sink set.
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,
        )
        loop = asyncio.get_running_loop()
        for lane in self._lanes:
            lane.worker = loop.create_task(self._work(lane), name=f"alerts-{lane.sink.name}")

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking events, deliver what is queued or grouped within ``timeout``, then stop."""
        if self._closed:
            return
        self._closed = True
        for key, group in list(self._groups.items()):
            self._end_window(key, group)
        workers = [lane.worker for lane in self._lanes if lane.worker is not None]
        if workers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(lane.queue.join() for lane in self._lanes))
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        left = self._abandoned
        for lane in self._lanes:
            while not lane.queue.empty():
                lane.queue.get_nowait()
                self._on_result(lane.sink.name, "dropped")
                left += 1
        if left:
            log.warning("alert dispatcher closed with %d alert deliveries not made", left)
        if self._session is not None:
            await self._session.close()

    # -- inside -----------------------------------------------------------------------------------

    def _end_window(self, key: tuple[str, str], group: _Group) -> None:
        if self._groups.get(key) is not group:
            return
        del self._groups[key]
        if group.timer is not None:
            group.timer.cancel()
        if group.first is not None and group.first_at is not None and group.last_at is not None:
            self._enqueue(GroupedAlert(group.first, group.count, group.first_at, group.last_at))

    def _enqueue(self, alert: GroupedAlert) -> bool:
        taken = True
        for lane in self._lanes:
            try:
                lane.queue.put_nowait(alert)
            except asyncio.QueueFull:
                taken = False
                self._on_result(lane.sink.name, "dropped")
                lane.dropped += 1
                if lane.dropped == 1:
                    log.warning(
                        "alert queue of sink %s is full (%d alerts): dropping alerts until it has room",
                        lane.sink.name,
                        self._config.queue_size,
                    )
        if not taken:
            self._on_fallback("queue_full")
        return taken

    async def _work(self, lane: _Lane) -> None:
        while True:
            alert = await lane.queue.get()
            lane.busy = True
            try:
                await self._deliver(lane, alert)
            except asyncio.CancelledError:
                self._abandoned += 1
                self._on_result(lane.sink.name, "dropped")
                raise
            except Exception:
                # A bug in a sink or a callback must not stop this sink's deliveries for good.
                log.exception("alert worker of sink %s failed on an alert", lane.sink.name)
            finally:
                lane.busy = False
                lane.queue.task_done()
            # A burst of drops ends once the sink has caught up, not at each free slot: one
            # warning per overload rather than one per alert taken.
            if lane.dropped and lane.queue.empty():
                log.info("alert sink %s caught up; %d alerts were dropped", lane.sink.name, lane.dropped)
                lane.dropped = 0

    async def _deliver(self, lane: _Lane, alert: GroupedAlert) -> None:
        assert self._session is not None
        name = lane.sink.name
        attempts = self._config.retries
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(self._config.timeout):
                    await lane.sink.deliver(alert, self._session)
            except Exception as exc:  # CancelledError is not one: close() cut it short, it did not fail
                if attempt < attempts:
                    await asyncio.sleep(min(BACKOFF_MIN * 2 ** (attempt - 1), BACKOFF_MAX))
                    continue
                lane.failed += 1
                self._on_result(name, "failed")
                self._on_fallback("delivery_failed")
                if lane.failed == 1:
                    log.warning(
                        "alert sink %s failed to deliver after %d attempts (%s); "
                        "further failures are counted, not logged, until it delivers again",
                        name,
                        attempts,
                        _reason(exc),
                    )
                return
            else:
                self._on_result(name, "delivered")
                if lane.failed:
                    log.info("alert sink %s delivers again; %d alerts failed meanwhile", name, lane.failed)
                    lane.failed = 0
                return


def _reason(exc: BaseException) -> str:
    # SECURITY: aiohttp's messages quote the URL, which may hold a token: name the kind only.
    if isinstance(exc, DeliveryError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__
