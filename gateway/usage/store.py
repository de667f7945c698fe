"""The usage store's contract: what a request's usage record is, and what a store must do."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import Enum
from typing import Literal, Protocol


class Period(Enum):
    DAY = "day"
    MONTH = "month"

    def bucket(self, at: datetime) -> str:
        """The UTC bucket a moment falls in: ``2026-11-26`` for a day, ``2026-11`` for a month."""
        return _bucket(self, at.year, at.month, at.day)


@functools.lru_cache(maxsize=64)
def _bucket(period: Period, year: int, month: int, day: int) -> str:
    # Every record asks for today's buckets; strftime costs microseconds each time.
    return date(year, month, day).strftime("%Y-%m-%d" if period is Period.DAY else "%Y-%m")


Source = Literal["reported", "estimated"]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One request's usage. ``id`` is unique per request: writing it twice counts it once."""

    id: str
    workspace: str
    conversation_id: str | None
    prompt_tokens: int
    response_tokens: int
    source: Source
    at: datetime  # timezone-aware UTC; decides the day and month buckets


@dataclass(frozen=True, slots=True)
class Totals:
    prompt_tokens: int = 0
    response_tokens: int = 0
    requests: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens


class StoreUnavailable(Exception):
    """The store could not answer a read in time; writes never raise this, they are buffered."""


class UsageStore(Protocol):
    async def start(self) -> None:
        """Connect and start background work (the flush of buffered records)."""

    async def record(self, record: UsageRecord) -> None:
        """Count a record once, atomically; while the backend is down, buffer it (bounded)."""

    async def record_many(self, records: Sequence[UsageRecord], *, urgent: bool = False) -> None:
        """Count each record as :meth:`record` does, in one round trip where the backend allows;
        ``urgent``: someone waits for these (a quota close to its end), write without delay."""

    def submit(self, records: Sequence[UsageRecord], *, urgent: bool = False) -> asyncio.Future[None]:
        """Start :meth:`record_many` without waiting: the future is done once the records are
        counted, buffered or dropped; it never fails."""

    async def totals(self, workspace: str, period: Period, at: datetime) -> Totals:
        """The workspace's totals for the bucket of ``period`` that ``at`` falls in."""

    async def current(self, workspace: str, at: datetime) -> tuple[Totals, Totals]:
        """The day's and the month's totals in one round trip (for quota checks)."""

    async def conversation_totals(self, workspace: str, conversation_id: str) -> Totals:
        """All-time totals of one conversation."""

    async def reachable(self) -> bool:
        """Whether the backend answers now (bounded in time), for readiness."""

    async def close(self) -> None:
        """Flush what is buffered (bounded in time), keep what is left in the usage journal where
        there is one (else log how many records are lost), then release connections."""

    @property
    def pending(self) -> int:
        """Records buffered and not yet written."""

    @property
    def dropped(self) -> int:
        """Records dropped because the buffer was full (counted, and logged once per burst)."""
