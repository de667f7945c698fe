"""The dispatcher: grouping by (workspace, policy), a bounded queue and worker per sink, retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import aiohttp

from gateway.alerts.config import AlertConfig
from gateway.alerts.events import AlertEvent, GroupedAlert
from gateway.alerts.sinks import AlertSink, DeliveryError

# The logger keeps the name it had before alerts became a package: log config and tests use it.
log = logging.getLogger("gateway.alerts")

BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
# Distinct (workspace, policy) pairs with an open window; past it, events go out ungrouped.
MAX_GROUPS = 10_000
USER_AGENT = "ai-policy-gateway-alerts"


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
