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

from gateway.alerts.config import AlertConfig, AlertConfigError, parse_alert_config
from gateway.alerts.dispatcher import AlertDispatcher
from gateway.alerts.events import AlertEvent, GroupedAlert
from gateway.alerts.sinks import AlertmanagerSink, AlertSink, DeliveryError, SlackSink, WebhookSink

__all__ = [
    "AlertConfig",
    "AlertConfigError",
    "AlertDispatcher",
    "AlertEvent",
    "AlertSink",
    "AlertmanagerSink",
    "DeliveryError",
    "GroupedAlert",
    "SlackSink",
    "WebhookSink",
    "parse_alert_config",
]
