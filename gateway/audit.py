"""Logs and the audit trail: structured events that carry ids, offsets and fingerprints, no text.

Every log line, the gateway's own and the libraries', goes through one structlog chain whose
last processor before rendering is the redactor (``gateway.redaction``), exceptions rendered to
text first: the last line of defence if a value that looks like a secret ever reaches a log call.
The audit file and the alerts get the same redaction, applied once per violation (``observe``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import select
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import orjson
import structlog
from aiohttp import web

from gateway.ids import new_id
from gateway.policy import Action, Decision, Mode, Violation
from gateway.redaction import REDACTOR, render_exceptions

if TYPE_CHECKING:
    from gateway.usage.accounting import Exchange

log = structlog.get_logger("gateway.audit")


def _json(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


class UtcStamp:
    """``timestamp`` as structlog's ISO UTC stamper writes it (``2026-01-31T23:59:59.123456Z``),
    at a fraction of its cost: the date and time of day are formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = time.time_ns()  # integers: the microseconds without float arithmetic
        second = now // 1_000_000_000
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{now // 1000 % 1_000_000:06d}Z"
        return event


class EventLog:
    """The gateway's own events through the configured chain, each line whole in one ``write()``.

    What structlog's bound logger does for an event, without its per-call wrapping: the
    ``request.completed`` line is written for every request. Within ``held()`` the lines wait
    and go out together at its end, in writes of at most ``PIPE_BUF`` bytes of whole lines
    (atomic on a pipe, so workers sharing stdout never split one another's lines).
    """

    def __init__(
        self,
        processors: list[Any],
        out: TextIO,
        level: int,
        render: Callable[[dict[str, Any]], str] | None = None,
    ) -> None:
        self._processors = processors
        self._out = out
        self._level = level
        self._held: list[str] | None = None
        # The chain in one function, where configure_logging provides it (the JSON format):
        # the same line as the processors' without a call for each of them.
        self._render = render

    def info(self, name: str, **fields: Any) -> None:
        self.event(name, fields)

    def event(self, name: str, fields: dict[str, Any]) -> None:
        """As ``info(name, **fields)``; ``fields`` becomes the event (the caller gives it up)."""
        if self._level > logging.INFO:
            return
        event: Any = {"event": name}
        event.update(fields)
        self.line(event)

    def line(self, event: Any) -> None:
        """As ``event``, of an event that holds its name under ``"event"`` (given up)."""
        if self._level > logging.INFO:
            return
        if self._render is not None:
            line = self._render(event) + "\n"
        else:
            for processor in self._processors:
                event = processor(None, "info", event)
            line = event + "\n"
        if self._held is not None:
            self._held.append(line)
            return
        self._write(line)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Lines logged inside go out together at the end (the batches after answers)."""
        if self._held is not None:
            yield
            return
        self._held = []
        try:
            yield
        finally:
            lines, self._held = self._held, None
            self._write_together(lines)

    def _write_together(self, lines: list[str]) -> None:
        chunk: list[str] = []
        size = 0
        for line in lines:
            length = len(line) if line.isascii() else 4 * len(line)  # bytes, at most
            if chunk and size + length > select.PIPE_BUF:
                self._write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += length
        if chunk:
            self._write("".join(chunk))

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def configure_logging(fmt: str = "json", stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """The gateway's events, and the libraries' stdlib records, through one redacting chain.

    The gateway's own events are rendered straight to the stream (no stdlib logging on the
    request path: it costs several times more per line); library records take the stdlib route.
    """
    out = stream or sys.stdout
    stamp = UtcStamp()
    stamped: list[Any] = [
        structlog.processors.add_log_level,
        stamp,
        render_exceptions,
        REDACTOR,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_json)
    )
    structlog.configure(
        processors=[*stamped, renderer],
        # One write() a line: several workers share stdout, and a line written in two parts
        # could be interleaved with another worker's.
        logger_factory=structlog.WriteLoggerFactory(file=out),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamped],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    render = _json_line(stamp) if fmt != "console" else None
    _Current.events = EventLog([*stamped, renderer], out, level, render)


def _json_line(stamp: UtcStamp) -> Callable[[dict[str, Any]], str]:
    """The JSON chain of ``configure_logging`` for an ``info`` event, as one function: the
    level, the stamp, exceptions rendered, the redactor, then JSON (``request.completed`` is
    written for every request, and a call per processor cost a quarter of it)."""

    def render(event: dict[str, Any]) -> str:
        event["level"] = "info"
        stamp(None, "info", event)
        if "exc_info" in event:
            render_exceptions(None, "info", event)
        REDACTOR(None, "info", event)
        return orjson.dumps(event, default=str).decode()

    return render


class _Current:
    events: EventLog | Any = structlog.get_logger("gateway")


def events() -> EventLog | Any:
    """The gateway's event logger, as the last ``configure_logging`` set it up."""
    return _Current.events


def held_events() -> contextlib.AbstractContextManager[None]:
    """``events().held()`` once logging is configured; before that, nothing is held."""
    current = _Current.events
    return current.held() if isinstance(current, EventLog) else contextlib.nullcontext()


def user_id(authorization: str | None) -> str | None:
    """The ``userId`` (or ``sub``) of a bearer JWT's payload, unverified: for attribution only.

    The gateway does not check the signature; the upstream does. A forged token gives a forged
    attribution in the audit trail, never access.
    """
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    parts = authorization[7:].strip().split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(payload, dict):
        return None
    value = payload.get("userId", payload.get("sub"))
    return str(value)[:128] if isinstance(value, str | int) else None


@dataclass(slots=True)
class RequestInfo:
    """Who and what a request is about, for its audit events."""

    request_id: str = field(default_factory=new_id)
    route: str = "passthrough"
    conversation_id: str | None = None
    workspace: str | None = None
    repo: str | None = None
    user_id: str | None = None
    # Timings, for the overhead metric and the request.completed event.
    started: float = field(default_factory=time.perf_counter)
    upstream_seconds: float | None = None
    prompt_own: float | None = None  # from arrival until the upstream was called
    response_own: float = 0.0  # spent inspecting the answer
    decision: str = "allow"  # the strongest action taken on this request
    # For the bookkeeping after the answer (gateway.routes.completed), kept here rather than
    # under keys of their own on the request: each such key costs two calls to read.
    recorded_status: int | None = None  # the status recorded, when it is not the one sent
    exchange: Exchange | None = None  # the prompt exchange to count, once the answer is out
    # Judging of log and alert rules, started by that bookkeeping (None: at once, no answer
    # to wait for: a caller without the routes' middleware).
    after_answer: list[Any] | None = None


# The request's audit context (set by the routes' middleware).
INFO = web.RequestKey("info", RequestInfo)


def fingerprint(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8", errors="replace"), hashlib.sha256).hexdigest()


def violation_event(
    violation: Violation,
    decision: Decision,
    decision_id: str,
    info: RequestInfo,
    matched: Callable[[int, int], str | None],
    key: bytes,
    where: Callable[[int], str] | None = None,
) -> dict[str, Any]:
    """The audit record of one violation; field names follow the backend's where they overlap."""
    spans = [(s.start, s.end) for s in violation.spans]
    texts = [matched(start, end) for start, end in spans]
    event = {
        "decisionId": decision_id,
        "requestId": info.request_id,
        "revision": decision.revision,
        "policyId": violation.rule_id,
        "policyName": violation.name,
        "severity": violation.severity.value,
        "action": violation.action.label,
        "mode": violation.mode.value,
        "stage": violation.stage.value,
        "block": violation.effective_action is Action.BLOCK,
        "wouldBlock": violation.mode is Mode.SHADOW and violation.action is Action.BLOCK,
        "conversationId": info.conversation_id,
        "workspace": info.workspace,
        "repoId": info.repo,
        "userId": info.user_id,
        "offsets": spans,
        "length": sum(end - start for start, end in spans),
        "fingerprints": [fingerprint(key, text)[:32] for text in texts if text is not None],
    }
    if violation.reference:
        event["reference"] = violation.reference  # the platform's policy id, for an imported rule
    if where is not None:
        # Where in the message each match fell (JSON paths that name plain-word keys only).
        event["paths"] = list(dict.fromkeys(where(start) for start, _ in spans))
    return event


class AuditFile:
    """Violations as JSON lines in a file of their own, for the security team's pipeline."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8", buffering=1)

    def write(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()
