"""Per-workspace token budgets, checked before the upstream is called."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.config import Budget
from gateway.usage.store import StoreUnavailable, Totals, UsageStore

log = logging.getLogger("gateway.quota")


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # seconds until the exhausted budget renews
    period: str = ""
    # Not checked: the store was unavailable and quotas fail open.
    unchecked: bool = False


ALLOWED = Verdict(True)


class Ticket:
    """Held from admission until the request's usage is recorded."""

    def __init__(self, lock: asyncio.Lock | None = None) -> None:
        self._lock = lock

    @property
    def held(self) -> bool:
        """Whether another request of the workspace waits for this one's usage to be recorded."""
        return self._lock is not None

    def release(self) -> None:
        if self._lock is not None and self._lock.locked():
            self._lock.release()
        self._lock = None


# What a workspace without a budget is admitted with: one shared ticket that holds no lock (its
# release does nothing), rather than a new one for every request.
_ADMITTED = (ALLOWED, Ticket())


def seconds_until_next(period: str, now: datetime) -> int:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        renews = day + timedelta(days=1)
    else:
        first = day.replace(day=1)
        renews = (first + timedelta(days=32)).replace(day=1)
    return max(1, int((renews - now).total_seconds() + 0.999))


class QuotaGate:
    def __init__(
        self,
        store: UsageStore,
        budgets: Mapping[str, Budget],
        *,
        fail_closed: bool = False,
        margin: int = 16_384,
        on_unchecked: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.on_unchecked = on_unchecked
        self.budgets = budgets
        self.fail_closed = fail_closed
        self.margin = margin
        self._locks: dict[str, asyncio.Lock] = {}

    def admit_now(self, workspace: str) -> tuple[Verdict, Ticket] | None:
        """What ``admit`` answers when it needs no store: a workspace without a budget is
        admitted. None when the store must be asked (``admit``)."""
        if workspace in self.budgets:
            return None
        return _ADMITTED

    async def admit(self, workspace: str, now: datetime | None = None) -> tuple[Verdict, Ticket]:
        budget = self.budgets.get(workspace)
        if budget is None:
            return ALLOWED, Ticket()
        now = now or datetime.now(UTC)
        try:
            day, month = await self.store.current(workspace, now)
        except StoreUnavailable:
            return self._unchecked(workspace, now), Ticket()
        verdict = _judge(budget, day, month, now)
        if not verdict.allowed or _remaining(budget, day, month) > self.margin:
            return verdict, Ticket()
        # Close to the budget: one request of this workspace at a time in this instance, and
        # its usage recorded before the next is judged, so the overrun is one request at most.
        lock = self._locks.setdefault(workspace, asyncio.Lock())
        await lock.acquire()
        try:
            day, month = await self.store.current(workspace, now)
        except StoreUnavailable:
            lock.release()
            return self._unchecked(workspace, now), Ticket()
        verdict = _judge(budget, day, month, now)
        if not verdict.allowed:
            lock.release()
            return verdict, Ticket()
        return verdict, Ticket(lock)

    def _unchecked(self, workspace: str, now: datetime) -> Verdict:
        self.on_unchecked()
        log.warning("quota not checked for a workspace: usage store unavailable")
        if self.fail_closed:
            return Verdict(False, retry_after=30, period="store unavailable")
        return Verdict(True, unchecked=True)


def _remaining(budget: Budget, day: Totals, month: Totals) -> int:
    left = [limit - used.tokens for limit, used in ((budget.daily, day), (budget.monthly, month)) if limit]
    return min(left) if left else 1 << 62


def _judge(budget: Budget, day: Totals, month: Totals, now: datetime) -> Verdict:
    if budget.monthly is not None and month.tokens >= budget.monthly:
        return Verdict(False, seconds_until_next("month", now), "month")
    if budget.daily is not None and day.tokens >= budget.daily:
        return Verdict(False, seconds_until_next("day", now), "day")
    return ALLOWED
