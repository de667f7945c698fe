"""Making every decision visible: metrics, audit events, the audit file and alerts, in one place.

Handlers report what happened here; nothing else writes a violation anywhere, so no path can
forget the rule that matched text never leaves the gateway.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from gateway.alerts import AlertDispatcher, AlertEvent
from gateway.audit import AuditFile, EventLog, RequestInfo, events, violation_event
from gateway.ids import new_id
from gateway.metrics import Metrics
from gateway.policy import Action, Decision, Mode, RuleSet, Stage, Violation
from gateway.redaction import REDACTOR
from gateway.usage.store import UsageRecord

log = structlog.get_logger("gateway")

Matched = Callable[[int, int], str | None]
Where = Callable[[int], str]


class Observer:
    def __init__(
        self,
        metrics: Metrics,
        *,
        key: bytes | None = None,
        audit_file: AuditFile | None = None,
        alerts: AlertDispatcher | None = None,
        alert_on_block: bool = False,
    ) -> None:
        self.metrics = metrics
        # Without a configured key, fingerprints still correlate events within one process.
        self.key = key or secrets.token_bytes(32)
        self.audit_file = audit_file
        self.alerts = alerts
        self.alert_on_block = alert_on_block

    def ruleset(self, ruleset: RuleSet) -> None:
        self.metrics.load_ruleset(ruleset)

    def decision(
        self,
        decision: Decision,
        info: RequestInfo,
        matched: Matched,
        where: Where | None = None,
        *,
        notes: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        metrics = self.metrics
        metrics.count(metrics.decisions, _DECISION_LABELS[decision.stage._value_, decision.action])
        if decision.violations:
            self.violations(decision, decision.violations, info, matched, where, notes=notes)

    def stream_decision(self, stage: Stage, action: Action) -> None:
        """A streamed answer counts as one decision, its strongest action, when it ends."""
        self.metrics.count(self.metrics.decisions, (stage.value, action.label))

    def violations(
        self,
        decision: Decision,
        violations: Iterable[Violation],
        info: RequestInfo,
        matched: Matched,
        where: Where | None = None,
        *,
        notes: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        """Each violation counted and recorded; ``notes`` adds fields to a rule's record (a
        judge's explanation: redacted with the rest, since a model may quote the text)."""
        decision_id = new_id()
        workspace = self._workspace_label(info.workspace or "unresolved")
        for violation in violations:
            self.metrics.violations.labels(
                violation.rule_id, violation.action.label, violation.mode.value,
                violation.stage.value, violation.severity.value, *workspace,
            ).inc()  # fmt: skip
            # One redaction for the log line, the audit file and the alert: the ids a client
            # chose (conversation, user, workspace, repo) read the same in each.
            record = violation_event(violation, decision, decision_id, info, matched, self.key, where)
            if notes and violation.rule_id in notes:
                record.update(notes[violation.rule_id])
            event = REDACTOR.event(record)
            log.info("policy.violation", **event)
            if self.audit_file is not None:
                self.audit_file.write({"event": "policy.violation", "timestamp": _now(), **event})
            if self._alerting(violation) and self.alerts is not None:
                self.alerts.submit(_alert(violation, event))

    def workspace_label(self, workspace: str) -> tuple[str, ...]:
        """The workspace label values of a metric (none unless the workspace label is on)."""
        return self._workspace_label(workspace)

    def _workspace_label(self, workspace: str) -> tuple[str, ...]:
        if not self.metrics.workspace_label:
            return ()
        # A workspace id may come from a header: a label value is a sink like any other.
        return self.metrics.workspace(REDACTOR.identifier(workspace) or workspace)

    def _alerting(self, violation: Violation) -> bool:
        if violation.mode is Mode.SHADOW:
            return False
        return violation.action is Action.ALERT or (self.alert_on_block and violation.action is Action.BLOCK)

    def fallback(self, dependency: str, reason: str) -> None:
        self.metrics.fallbacks.labels(dependency, reason).inc()

    def upstream_error(self, kind: str) -> None:
        self.metrics.upstream_errors.labels(kind).inc()

    def tokens(self, record: UsageRecord) -> None:
        metrics, workspace = self.metrics, self._workspace_label(record.workspace)
        metrics.count(metrics.tokens, ("prompt", record.source, *workspace), record.prompt_tokens)
        metrics.count(metrics.tokens, ("response", record.source, *workspace), record.response_tokens)

    def request_completed(self, fields: dict[str, Any]) -> None:
        """The ``request.completed`` line; ``fields`` is the event (``"event"`` first), given up."""
        log = events()
        if isinstance(log, EventLog):
            log.line(fields)  # no copy of the fields, into keywords and back or into another dict
        else:
            log.info(fields.pop("event", "request.completed"), **fields)


# The decisions counter's labels, by the stage's value and the action: Stage hashes (and
# .value reads) in Python, and each request is decided twice.
_DECISION_LABELS = {
    (stage._value_, action): (stage.value, action.label) for stage in Stage for action in Action
}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _alert(violation: Violation, event: dict[str, Any]) -> AlertEvent:
    """The alert of a violation, from its redacted audit record."""
    return AlertEvent(
        policy_id=violation.rule_id,
        policy_name=violation.name,
        severity=violation.severity.value,
        action=violation.action.label,
        stage=violation.stage.value,
        workspace=event["workspace"] or "unresolved",
        conversation_id=event["conversationId"],
        repo=event["repoId"],
        revision=event["revision"],
        decision_id=event["decisionId"],
        request_id=event["requestId"],
        fingerprints=tuple(event["fingerprints"]),
        at=datetime.now(UTC),
    )
