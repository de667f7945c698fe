"""Work that follows an answer, done in batches once the answers are out.

Under load many requests finish in one turn of the event loop; their bookkeeping (metrics, the
``request.completed`` line, handing the exchange to accounting) runs in one loop over all of
them on the next turn, instead of one scheduled callback each: one callback instead of many,
and the same code run back to back while it is still in the processor's caches. The client has
its answer before any of it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from gateway.audit import held_events

log = logging.getLogger("gateway.batches")
T = TypeVar("T")


class AfterAnswers(Generic[T]):
    """Calls ``handle`` on every item added, on the event loop's next turn, in arrival order,
    then ``done`` once for the batch."""

    def __init__(self, handle: Callable[[T], None], done: Callable[[], None] = lambda: None) -> None:
        self._handle = handle
        self._done = done
        self._items: list[T] = []

    def add(self, item: T) -> None:
        self._items.append(item)
        if len(self._items) == 1:
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        if self._items:
            self.flush()

    def flush(self) -> None:
        """Handle what is pending now (at shutdown, before usage is drained)."""
        items, self._items = self._items, []
        with held_events():
            for item in items:
                try:
                    self._handle(item)
                except Exception as exc:
                    # One item's bug must not cost the others their metrics and lines.
                    log.error("bookkeeping after an answer failed: %s", type(exc).__name__)
        self._done()
