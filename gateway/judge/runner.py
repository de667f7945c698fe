"""Completing decisions that wait on the judge: the cache, the model call, the fallbacks.

The engine leaves a rule that only the model can decide in ``Decision.pending``; this asks the
verdict cache, then the model (one call for every check of the text), stores what the model
said, and completes the decision. A check the model gave no verdict on counts as its rule's
``on_error`` says, and is counted in ``fallbacks_total{dependency="judge"}`` either way: a text
the judge could not see is never counted as passed. Errors of the cache never fail a request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.judge.cache import CachedVerdict, VerdictCache
from gateway.judge.client import JudgeClient, JudgeError
from gateway.metrics import Metrics
from gateway.policy import Action, Context, Decision, RuleSet, complete
from gateway.policy.model import JudgeCheck
from gateway.redaction import REDACTOR


@dataclass(frozen=True, slots=True)
class Judged:
    """A decision completed by the judge, and what the records of its judge violations carry."""

    decision: Decision
    # By rule id: the model's explanation of a violation (redacted with the record), the model.
    notes: Mapping[str, dict[str, object]] = field(default_factory=dict)


# A run of this many characters of the judged text inside an explanation is a quote of it.
QUOTE = 12
_QUOTED = "[quoted text]"


def unquoted(explanation: str, text: str) -> str:
    """``explanation`` without what it quotes of ``text``: a model asked not to quote may still,
    and a sink must not hold the prompt. Every run of ``QUOTE`` or more characters found in the
    text is replaced (ends included); the redactor then also takes out what rules find."""
    if len(explanation) < QUOTE or not text:
        return explanation
    covered = bytearray(len(explanation))
    for start in range(len(explanation) - QUOTE + 1):
        if explanation[start : start + QUOTE] in text:
            covered[start : start + QUOTE] = b"\x01" * QUOTE
    if not any(covered):
        return explanation
    out: list[str] = []
    index = 0
    while index < len(explanation):
        if covered[index]:
            while index < len(explanation) and covered[index]:
                index += 1
            out.append(_QUOTED)
        else:
            out.append(explanation[index])
            index += 1
    return "".join(out)


def waits(decision: Decision) -> bool:
    """Whether the request must wait for the judge: a pending rule would block."""
    return any(rule.effective_action is Action.BLOCK for rule in decision.pending)


class JudgeRunner:
    def __init__(
        self, client: JudgeClient | None, cache: VerdictCache | None, metrics: Metrics, model: str = ""
    ) -> None:
        self.client = client
        self.cache = cache
        self.metrics = metrics
        # Verdicts are cached per rule set and judge model: another model may judge otherwise.
        self.model = model

    async def complete(
        self,
        ruleset: RuleSet,
        decision: Decision,
        text: str,
        context: Context,
        workspace: tuple[str, ...] = (),
    ) -> Judged:
        """``decision`` with every pending rule decided; ``workspace`` labels the token spend."""
        checks: dict[str, JudgeCheck] = {}
        for rule in decision.pending:
            for check in rule.checks:
                checks.setdefault(check.key, check)
        if not checks:
            return Judged(decision)
        metrics = self.metrics
        known: dict[str, CachedVerdict] = {}
        if self.cache is not None:
            stats = self.cache.stats
            memory, redis = stats.memory_hits, stats.redis_hits
            known = await self.cache.lookup(f"{decision.revision}/{self.model}", text, list(checks))
            metrics.judge_cache.labels("memory").inc(stats.memory_hits - memory)
            metrics.judge_cache.labels("redis").inc(stats.redis_hits - redis)
        asked = [check for key, check in checks.items() if key not in known]
        asked_keys = {check.key for check in asked}
        metrics.judge_cache.labels("miss").inc(len(asked))
        model = ""
        started = time.perf_counter()
        if asked:
            fresh, model = await self._ask(text, asked, workspace)
            known.update(fresh)
            if fresh and self.cache is not None:
                await self.cache.store(f"{decision.revision}/{self.model}", text, fresh)
        waited = round((time.perf_counter() - started) * 1000, 3)
        verdicts = {key: verdict.violates for key, verdict in known.items()}
        completed = complete(ruleset, decision, text, verdicts, context)
        notes: dict[str, dict[str, object]] = {}
        for rule in decision.pending:
            said = [known[check.key] for check in rule.checks if check.key in known]
            if said:
                explanation = " ".join(v.explanation for v in said if v.violates) or said[0].explanation
                notes[rule.rule_id] = {
                    "explanation": unquoted(explanation, text),
                    "judgeModel": said[0].model or model,
                    # The model's call, or the cache's answer when every verdict was in it.
                    "judgeMs": waited,
                    "judgeCached": all(check.key not in asked_keys for check in rule.checks),
                }
            else:
                notes[rule.rule_id] = {"judgeError": True, "judgeMs": waited}
        return Judged(completed, notes)

    async def _ask(
        self, text: str, asked: list[JudgeCheck], workspace: tuple[str, ...]
    ) -> tuple[dict[str, CachedVerdict], str]:
        metrics = self.metrics
        if self.client is None:
            metrics.fallbacks.labels("judge", "not_configured").inc(len(asked))
            return {}, ""
        started = time.perf_counter()
        try:
            judgement = await self.client.judge(text, asked)
        except JudgeError as exc:
            metrics.judge_duration.observe(time.perf_counter() - started)
            metrics.judge_calls.labels("timeout" if exc.kind == "timeout" else "error").inc()
            metrics.fallbacks.labels("judge", exc.kind).inc(len(asked))
            return {}, ""
        metrics.judge_duration.observe(judgement.seconds)
        violates = any(verdict.violates for verdict in judgement.verdicts.values())
        metrics.judge_calls.labels("violates" if violates else "clean").inc()
        metrics.judge_tokens.labels("prompt", *workspace).inc(judgement.prompt_tokens)
        metrics.judge_tokens.labels("completion", *workspace).inc(judgement.completion_tokens)
        return {
            # Cached (and shared through Redis) without what it quotes or what a rule finds in it.
            key: CachedVerdict(
                verdict.violates, REDACTOR.text(unquoted(verdict.explanation, text)), judgement.model
            )
            for key, verdict in judgement.verdicts.items()
        }, judgement.model
