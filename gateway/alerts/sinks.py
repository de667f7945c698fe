"""Where alerts go: the sink protocol and the webhook, Slack and Alertmanager sinks."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
from yarl import URL

from gateway.alerts.events import GroupedAlert
from gateway.alerts.validation import _http_url, _positive


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
