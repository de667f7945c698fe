"""One redaction for every sink: log lines, the audit file, alert payloads and error bodies.

A value is redacted when any rule of the current rule set finds something in it (block, alert
or log; any stage, mode or scope), or when its key names content. Values of one word (ids,
tokens) are replaced whole; texts (messages, exception texts) keep their words around the
matches, which are replaced. Exceptions are rendered to text before redaction, so a message that quotes input
is scanned like any other value, and a request the HTTP parser refused is never quoted at all.
"""

from __future__ import annotations

import re
import sys
import traceback
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from types import TracebackType
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from gateway.policy import RuleSet, evaluate
from gateway.policy.redaction import REDACTION_STAGE, merged, redaction_ruleset

REDACTED = "[redacted]"

# Keys whose values are content, whatever they hold.
CONTENT_KEYS = frozenset({"prompt", "text", "content", "body", "matched", "authorization", "password"})
# Values of these keys are the gateway's own vocabulary, numbers and ids: never scanned. A
# client's X-Request-Id is checked once, when the request arrives, and replaced if anything
# catches it.
OWN_KEYS = frozenset({
    "event", "level", "timestamp", "logger", "policyId", "policyName", "severity", "action", "mode",
    "stage", "decision", "route", "method", "revision", "decisionId", "fingerprints", "requestId",
    "status", "pid", "durationMs", "upstreamMs", "tokens", "offsets", "length", "block", "wouldBlock",
    "paths", "listen", "admin", "upstream", "store", "rules", "stream_holdback_chars",
})  # fmt: skip
# Client-chosen identifiers: checked in every sink the same way (whole value, memory of clean ones).
IDENTIFIER_KEYS = ("conversationId", "workspace", "repoId", "userId")

# Values found clean, remembered per rule set: the same ids (conversation, workspace, user) and
# messages recur on every request's events. Bounded in count and length; a value that a rule
# catches is never remembered, so no secret is held here, and it is evaluated every time.
_CLEAN_ENTRIES = 4096
_CLEAN_LENGTH = 256
_WORDS = re.compile(r"\s")


class Redactor:
    """Redacts values that any rule of the current rule set catches, and content keys."""

    def __init__(self) -> None:
        # The rule sets and the clean values, replaced together in one assignment: a verdict
        # taken under one rule set can never land in the memory of the next.
        self._current: tuple[RuleSet | None, RuleSet | None, OrderedDict[str, None]] = (
            None,
            None,
            OrderedDict(),
        )

    @property
    def ruleset(self) -> RuleSet | None:
        return self._current[0]

    @ruleset.setter
    def ruleset(self, ruleset: RuleSet | None) -> None:
        spans = None if ruleset is None else redaction_ruleset(ruleset)
        self._current = (ruleset, spans, OrderedDict())

    def _spans(self, value: str) -> list[tuple[int, int]]:
        _, ruleset, clean = self._current
        if ruleset is None:
            return []
        # A plain str only: a subclass could compare equal to a remembered value it is not.
        memorable = type(value) is str and len(value) <= _CLEAN_LENGTH
        if memorable and value in clean:
            return []
        decision = evaluate(ruleset, REDACTION_STAGE, value)
        spans = merged([span for v in decision.violations for span in v.spans])
        if spans:
            return spans
        if memorable:
            clean[value] = None
            if len(clean) > _CLEAN_ENTRIES:
                clean.popitem(last=False)  # the oldest: an id that recurs is soon back
        return []

    def sensitive(self, value: str) -> bool:
        """Whether any rule finds something in ``value``."""
        return bool(self._spans(value))

    def identifier(self, value: str | None) -> str | None:
        """A client-chosen id as every sink may show it: itself, or ``[redacted]`` whole."""
        if value is None or not self._spans(value):
            return value
        return REDACTED

    def text(self, value: str) -> str:
        """``value`` with what the rules find replaced; a value of one word is replaced whole."""
        spans = self._spans(value)
        if not spans:
            return value
        if not _WORDS.search(value):
            return REDACTED  # an id, a token: a part of it left would still say too much
        parts, at = [], 0
        for start, end in spans:
            parts += [value[at:start], REDACTED]
            at = end
        parts.append(value[at:])
        return "".join(parts)

    def value(self, key: str, value: Any) -> Any:
        """One field of an event, as a sink may write it (nested mappings and lists included)."""
        if key in OWN_KEYS:
            return value
        if key.lower() in CONTENT_KEYS:
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(key, item) for item in value]
        return value

    def event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``event`` fit for any sink."""
        return {key: self.value(key, value) for key, value in event.items()}

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """structlog processor: the last step before a line is rendered."""
        clean = self._current[2]
        # The keys that are not the gateway's own, found by one set difference rather than a
        # test per key in Python: most of an event's keys are its own (values replaced in
        # place: the keys do not change).
        for key in event.keys() - OWN_KEYS:
            value = event[key]
            if value is None:
                continue
            # Most values are ids seen on the last requests: found clean already (hot path).
            if type(value) is str and value in clean and key.lower() not in CONTENT_KEYS:
                continue
            event[key] = self.value(key, value)
        # The message of a stdlib log call is scanned too: it is where a careless %s would land.
        message = event.get("event")
        if isinstance(message, str) and message not in clean:
            event["event"] = self.text(message)
        return event


REDACTOR = Redactor()

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and isinstance(exc_info[1], BaseException):
        return exc_info[1]
    return None


def describe_exception(exc: BaseException) -> str:
    """An exception as a log line may carry it: no bytes the HTTP parser was given."""
    if isinstance(exc, HttpProcessingError):
        # SECURITY: the parser quotes the bytes it refused (a header, a request line, a body
        # read as the next request); they are the client's input, so only the kind is kept.
        return f"{type(exc).__name__}: status {exc.code}, the request's bytes are not logged"
    return "".join(traceback.format_exception(exc)).rstrip()


def render_exceptions(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor, before the redactor: ``exc_info`` becomes an ``exception`` text."""
    exc_info = event.pop("exc_info", None)
    if exc_info:
        exc = _exception_of(exc_info)
        if exc is not None:
            event["exception"] = describe_exception(exc)
    return event
