"""The default usage store: counters in this process's memory (one process, no Redis).

Nothing is ever buffered or dropped, so ``pending`` and ``dropped`` stay 0, and there is
nothing to journal at close: the totals end with the process anyway. Memory is bounded
where traffic alone would grow it: record ids are remembered for ``id_retention`` seconds (at
most ``max_ids`` of them), and at most ``max_conversations`` conversations are kept, the one
written longest ago forgotten first. Day and month buckets are kept: at most two a workspace a day.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from gateway.usage.store import Period, Totals, UsageRecord

# As long as the Redis store keeps its record markers, so a late retry is treated alike by both.
ID_RETENTION_SECONDS = 8 * 24 * 3600


@dataclass(slots=True)
class _Counter:
    prompt: int = 0
    response: int = 0
    requests: int = 0

    def add(self, record: UsageRecord) -> None:
        self.prompt += record.prompt_tokens
        self.response += record.response_tokens
        self.requests += 1

    def totals(self) -> Totals:
        return Totals(self.prompt, self.response, self.requests)


class MemoryUsageStore:
    """Usage counters in this process; ``clock`` (monotonic seconds) is there for tests."""

    def __init__(
        self,
        *,
        id_retention: float = ID_RETENTION_SECONDS,
        max_ids: int = 10_000,
        max_conversations: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._id_retention = id_retention
        self._max_ids = max_ids
        self._max_conversations = max_conversations
        self._clock = clock
        # Insertion order is time order, so the oldest ids are always at the front.
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._buckets: dict[tuple[str, Period, str], _Counter] = {}
        self._conversations: OrderedDict[tuple[str, str], _Counter] = OrderedDict()

    async def start(self) -> None:
        return None

    async def reachable(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    @property
    def pending(self) -> int:
        return 0

    @property
    def dropped(self) -> int:
        return 0

    @property
    def healthy(self) -> bool:
        """Always: there is no backend to lose (the same property as the Redis store's)."""
        return True

    async def record_many(self, records: Sequence[UsageRecord], *, urgent: bool = False) -> None:
        await self.submit(records, urgent=urgent)

    def submit(self, records: Sequence[UsageRecord], *, urgent: bool = False) -> asyncio.Future[None]:
        for record in records:
            self._count(record)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def record(self, record: UsageRecord) -> None:
        self._count(record)

    def _count(self, record: UsageRecord) -> None:
        now = self._clock()
        self._forget_ids(now)
        marker = (record.workspace, record.id)
        if marker in self._seen:
            return
        self._seen[marker] = now
        for period in Period:
            key = (record.workspace, period, period.bucket(record.at))
            self._buckets.setdefault(key, _Counter()).add(record)
        if record.conversation_id is not None:
            self._conversation(record.workspace, record.conversation_id).add(record)

    async def totals(self, workspace: str, period: Period, at: datetime) -> Totals:
        counter = self._buckets.get((workspace, period, period.bucket(at)))
        return counter.totals() if counter else Totals()

    async def current(self, workspace: str, at: datetime) -> tuple[Totals, Totals]:
        return await self.totals(workspace, Period.DAY, at), await self.totals(workspace, Period.MONTH, at)

    async def conversation_totals(self, workspace: str, conversation_id: str) -> Totals:
        counter = self._conversations.get((workspace, conversation_id))
        return counter.totals() if counter else Totals()

    def _forget_ids(self, now: float) -> None:
        seen = self._seen
        while seen and (len(seen) >= self._max_ids or next(iter(seen.values())) <= now - self._id_retention):
            seen.popitem(last=False)

    def _conversation(self, workspace: str, conversation_id: str) -> _Counter:
        key = (workspace, conversation_id)
        counter = self._conversations.get(key)
        if counter is None:
            counter = self._conversations[key] = _Counter()
            if len(self._conversations) > self._max_conversations:
                self._conversations.popitem(last=False)
        else:
            self._conversations.move_to_end(key)
        return counter
