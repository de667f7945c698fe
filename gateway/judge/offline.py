"""Verdicts for `gateway test` and `gateway eval`: replayed from a recorded file, or asked of a model.

A recorded verdict file is JSON lines ``{"key", "text_sha256", "violates", "explanation"}``: a
check's key (the rule id, or ``rule-id#n``), the plain SHA-256 of the text as judged, and the
verdict. Plain, not keyed like the gateway's fingerprints: the file is written by a policy
author from their own test texts, to sit beside the policy in its repository, and CI replays it
with no model and no key. A check with no recorded verdict is never passed: the text is
``Unjudged``. The live source asks an OpenAI-compatible endpoint (one call a text, for every
pending check of it) and, with ``record``, merges what it got into such a file, sorted, so that a
second recording of the same verdicts writes the same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from gateway.judge.client import JudgeClient, JudgeError, JudgeSettings
from gateway.policy import Context, Decision, JudgeCheck, RuleSet, Stage, complete, evaluate
from gateway.policy.selftest import Unjudged

API_KEY_VARIABLE = "GATEWAY_JUDGE_API_KEY"
RECORD_HINT = "run with --judge-url URL --judge-model NAME --record FILE"
_FIELDS = ("key", "text_sha256", "violates", "explanation")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NO_CONTEXT = Context()


class VerdictSourceError(ValueError):
    """Recorded verdicts or judge options that cannot be used; each problem names its file and line."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class RecordedVerdict:
    key: str
    text_sha256: str
    violates: bool
    explanation: str = ""

    def to_line(self) -> str:
        row = {"key": self.key, "text_sha256": self.text_sha256, "violates": self.violates}
        return json.dumps({**row, "explanation": self.explanation}, ensure_ascii=False) + "\n"


Recorded = dict[tuple[str, str], RecordedVerdict]  # (check key, text sha256) -> verdict


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_verdicts(path: Path) -> Recorded:
    """The verdicts of a recorded file, or ``VerdictSourceError`` listing every bad line."""
    problems: list[str] = []
    recorded: Recorded = {}
    seen_at: dict[tuple[str, str], int] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                verdict = _parse_line(line)
            except ValueError as exc:
                problems.append(f"{path}:{number}: {exc}")
                continue
            index = (verdict.key, verdict.text_sha256)
            earlier = recorded.get(index)
            if earlier is not None and earlier.violates != verdict.violates:
                problems.append(
                    f"{path}:{number}: {verdict.key}: another verdict on the text of line {seen_at[index]}"
                )
                continue
            recorded[index] = verdict
            seen_at.setdefault(index, number)
    if problems:
        raise VerdictSourceError(problems)
    return recorded


def _parse_line(line: str) -> RecordedVerdict:
    # Messages name fields, never values: a line may hold anything, a text pasted by mistake too.
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with {', '.join(_FIELDS)}")
    unknown = sorted(set(row) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(repr(name) for name in unknown)}")
    key, digest, violates, explanation = (row.get(name) for name in _FIELDS)
    if not isinstance(key, str) or not key:
        raise ValueError("key must be a check key (a rule id, or rule-id#n)")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ValueError("text_sha256 must be 64 lower-case hex digits (the SHA-256 of the text)")
    if not isinstance(violates, bool):
        raise ValueError("violates must be true or false")
    if explanation is not None and not isinstance(explanation, str):
        raise ValueError("explanation must be text")
    return RecordedVerdict(key, digest, violates, explanation or "")


def write_verdicts(path: Path, verdicts: Iterable[RecordedVerdict]) -> None:
    """Merge ``verdicts`` into the file at ``path`` (a new verdict replaces a recorded one), sorted."""
    merged = load_verdicts(path) if path.exists() else {}
    merged.update({(v.key, v.text_sha256): v for v in verdicts})
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text("".join(merged[index].to_line() for index in sorted(merged)), encoding="utf-8")
    os.replace(scratch, path)  # a reader never sees half a file


class VerdictSource(ABC):
    """Where the verdicts on pending judge checks come from."""

    @abstractmethod
    def verdicts(self, text: str, checks: Sequence[JudgeCheck]) -> Mapping[str, bool]:
        """A verdict for every check on ``text`` (True: violates), or ``Unjudged``."""

    def complete(
        self, ruleset: RuleSet, decision: Decision, text: str, context: Context = _NO_CONTEXT
    ) -> Decision:
        """``decision`` (from ``evaluate`` on ``text``) decided with this source's verdicts."""
        if not decision.pending:
            return decision
        checks = {check.key: check for rule in decision.pending for check in rule.checks}
        given = self.verdicts(text, list(checks.values()))
        return complete(ruleset, decision, text, given, context)


def decide(
    ruleset: RuleSet, stage: Stage, text: str, source: VerdictSource, context: Context = _NO_CONTEXT
) -> Decision:
    """The decision on ``text``, nothing left pending: what judge rules need is asked of ``source``."""
    return source.complete(ruleset, evaluate(ruleset, stage, text, context), text, context)


class RecordedVerdicts(VerdictSource):
    def __init__(self, recorded: Recorded) -> None:
        self._recorded = recorded

    @classmethod
    def load(cls, path: Path) -> RecordedVerdicts:
        return cls(load_verdicts(path))

    def verdicts(self, text: str, checks: Sequence[JudgeCheck]) -> dict[str, bool]:
        digest = text_sha256(text)
        found = {check.key: self._recorded.get((check.key, digest)) for check in checks}
        missing = [key for key, verdict in found.items() if verdict is None]
        if missing:
            raise Unjudged("missing", f"no recorded verdict for {', '.join(missing)} ({RECORD_HINT})")
        return {key: verdict.violates for key, verdict in found.items() if verdict is not None}


class LiveVerdicts(VerdictSource):
    """Verdicts asked of a model, one call a text; with ``record``, merged into that file on close.

    For the command line, which is synchronous: each call runs to its end on the source's own
    event loop. A verdict is asked once a run, however many stages or cases share its text.
    """

    def __init__(self, settings: JudgeSettings, record: Path | None = None) -> None:
        self.settings = settings
        self._record = record
        if record is not None and record.exists():
            load_verdicts(record)  # a bad file is refused before the model is paid for anything
        self._got: Recorded = {}
        self._runner: asyncio.Runner | None = None
        self._client: JudgeClient | None = None
        self._session: aiohttp.ClientSession | None = None

    def __enter__(self) -> Self:
        self._runner = asyncio.Runner()
        self._session = self._runner.run(_open_session())
        self._client = JudgeClient(self.settings, self._session)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        assert self._runner is not None
        assert self._session is not None
        try:
            self._runner.run(self._session.close())
        finally:
            self._runner.close()
        # What was asked is recorded even when the run stops early: each verdict is a real answer.
        if self._record is not None and self._got:
            write_verdicts(self._record, self._got.values())

    def verdicts(self, text: str, checks: Sequence[JudgeCheck]) -> dict[str, bool]:
        assert self._runner is not None, "use LiveVerdicts as a context manager"
        assert self._client is not None
        digest = text_sha256(text)
        ask = [check for check in checks if (check.key, digest) not in self._got]
        if ask:
            try:
                judgement = self._runner.run(self._client.judge(text, ask))
            except JudgeError as exc:
                raise Unjudged(exc.kind, f"judge error: {exc}") from None
            for key, verdict in judgement.verdicts.items():
                self._got[(key, digest)] = RecordedVerdict(key, digest, verdict.violates, verdict.explanation)
        return {check.key: self._got[(check.key, digest)].violates for check in checks}


async def _open_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()  # made inside the loop it is used on


def read_api_key(path: Path | None, environ: Mapping[str, str]) -> str | None:
    """The judge's API key, from ``path`` or the environment; problems never quote the key."""
    from_env = environ.get(API_KEY_VARIABLE) or None
    if path is None:
        return from_env.strip() if from_env else None
    if from_env:
        raise VerdictSourceError([f"{API_KEY_VARIABLE} and --judge-api-key-file are both given: give one"])
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise VerdictSourceError([f"--judge-api-key-file: cannot read ({reason})"]) from None
    if not key or not all("!" <= char <= "~" for char in key):
        raise VerdictSourceError(["--judge-api-key-file: must hold one word of visible ASCII characters"])
    return key
