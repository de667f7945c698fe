"""What the dispatcher carries: one violation (``AlertEvent``) and a group of them (``GroupedAlert``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
