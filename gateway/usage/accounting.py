"""Turning a finished exchange into a usage record, off the request path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.ids import new_id
from gateway.observe import Observer
from gateway.usage.quota import Ticket
from gateway.usage.store import Source, UsageRecord, UsageStore
from gateway.usage.tokens import TokenCounter
from gateway.usage.workspaces import Resolution

log = logging.getLogger("gateway.usage")


@dataclass(slots=True)
class Exchange:
    """What one prompt exchange used; the handlers fill it in as the answer goes by."""

    conversation_id: str
    resolution: Resolution
    model: str | None
    prompt: str
    ticket: Ticket = field(default_factory=Ticket)
    response_texts: list[str] = field(default_factory=list)
    reported_prompt: int | None = None
    reported_response: int | None = None
    forwarded: bool = False
    # The status the upstream answered with; None while none came back (or the call failed).
    upstream_status: int | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: str = field(default_factory=new_id)

    def note_reported(self, payload: Any) -> None:
        prompt, response = reported_usage(payload)
        self.reported_prompt = prompt if prompt is not None else self.reported_prompt
        self.reported_response = response if response is not None else self.reported_response


def uncounted_status(status: int | None) -> str | None:
    """The metric label of an exchange that costs its workspace nothing; None if it counts.

    Only an answer the backend gave with a 2xx status counts: a 4xx is a refusal (401, 403 and 404
    can be provoked by anyone who knows a conversation id, and must not spend a workspace's
    budget), a 5xx a failure of the backend, a 3xx a redirection: none served the prompt. An
    exchange with no status (the call failed after the prompt was sent) counts, because the
    backend may have done the work.
    """
    if status is None or 200 <= status < 300:
        return None
    if status in _NAMED_STATUSES:
        return str(status)
    return f"{min(max(status // 100, 3), 5)}xx"


# Statuses with a label of their own: the refusals an anonymous caller meets, and rate limits.
_NAMED_STATUSES = frozenset({401, 403, 404, 429})


def _count(value: object) -> int | None:
    # Token counts come as numbers, or as strings where the backend sends big integers.
    if value is None:  # most answers report none
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def reported_usage(payload: Any) -> tuple[int | None, int | None]:
    """(prompt, response) tokens an answer reports, where it reports them."""
    # A dict first, everywhere: checking against Mapping, an ABC, is a Python call each time.
    if not isinstance(payload, dict | Mapping):
        return None, None
    prompt = response = None
    usage = payload.get("usage")
    if usage is not None and isinstance(usage, dict | Mapping):
        prompt, response = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    prompt = prompt if prompt is not None else _count(payload.get("tokensIn"))
    response = response if response is not None else _count(payload.get("tokensOut"))
    if response is None:
        response = _count(payload.get("tokenCount"))
    message = payload.get("message")
    if response is None and not isinstance(message, str | None) and isinstance(message, dict | Mapping):
        response = _count(message.get("tokenCount"))
    return prompt, response


class Accountant:
    """Counts and records exchanges after their answers are out, so no answer waits for it.

    Each exchange is counted when its request's bookkeeping runs (after the answer), and its
    ``request.completed`` line logged with the counts; the records of one turn of the event loop
    go to the store together, in one write. A request near its workspace's budget holds a ticket
    that is released only once its record is in the store. An exchange the backend did not serve
    (see :func:`uncounted_status`) has no record: it is counted in a metric instead.
    """

    def __init__(self, store: UsageStore, counter: TokenCounter, observer: Observer) -> None:
        self.store = store
        self.counter = counter
        self.observer = observer
        self._records: list[UsageRecord] = []
        self._tickets: list[Ticket] = []
        self._writes: set[asyncio.Future[None]] = set()

    def settle(self, exchange: Exchange, completed: dict[str, Any]) -> None:
        """Count the exchange, log ``request.completed``, and send its record to the store."""
        if not exchange.forwarded:
            exchange.ticket.release()
            self.observer.request_completed(completed)
            return
        uncounted = uncounted_status(exchange.upstream_status)
        if uncounted is not None:
            # SECURITY: a refused exchange must not spend the budget of the workspace it names.
            exchange.ticket.release()
            metrics = self.observer.metrics
            metrics.count(metrics.uncounted_exchanges, (uncounted,))
            self.observer.request_completed(completed)
            return
        try:
            record = self.record_of(exchange)
        except Exception as exc:
            # A bug, logged by type only (the text counted is a prompt): the rest still count.
            log.error("usage record failed: %s", type(exc).__name__)
            exchange.ticket.release()
            self.observer.request_completed(completed)
            return
        self.observer.tokens(record)
        completed["tokens"] = {
            "prompt": record.prompt_tokens,
            "response": record.response_tokens,
            "source": record.source,
        }
        self.observer.request_completed(completed)
        if not self._records:
            asyncio.get_running_loop().call_soon(self.flush)
        self._records.append(record)
        if exchange.ticket.held:
            self._tickets.append(exchange.ticket)

    def record_of(self, exchange: Exchange) -> UsageRecord:
        prompt, response = exchange.reported_prompt, exchange.reported_response
        source: Source = "reported" if prompt is not None and response is not None else "estimated"
        if prompt is None:
            prompt = self.counter.count(exchange.prompt, exchange.model)
        if response is None:
            response = sum(self.counter.count(text, exchange.model) for text in exchange.response_texts)
        return UsageRecord(
            id=exchange.id,
            workspace=exchange.resolution.placement.workspace,
            conversation_id=exchange.conversation_id,
            prompt_tokens=prompt,
            response_tokens=response,
            source=source,
            at=exchange.at,
        )

    def flush(self) -> None:
        """Send what is gathered to the store, as one write (then release its tickets)."""
        records, self._records = self._records, []
        tickets, self._tickets = self._tickets, []
        if not records:
            return
        try:
            # Near its budget a workspace admits one request at a time: do not keep it waiting.
            written = self.store.submit(records, urgent=bool(tickets))
        except Exception as exc:
            # The store buffers its own outages; anything else is a bug, logged by type only.
            log.error("usage record failed: %s", type(exc).__name__)
            _release(tickets)
            return
        self._writes.add(written)
        written.add_done_callback(self._writes.discard)
        written.add_done_callback(lambda _: _release(tickets))

    async def drain(self) -> None:
        """Send what is gathered and wait until the store has taken it (at shutdown)."""
        self.flush()
        while self._writes:
            await asyncio.shield(asyncio.gather(*self._writes, return_exceptions=True))


def _release(tickets: list[Ticket]) -> None:
    for ticket in tickets:
        ticket.release()
