"""``evaluate``: a pure function from (rule set, stage, text, context) to a ``Decision``.

A rule holding a ``judge`` is evaluated with three values (Kleene's logic): a judge is unknown
unless the context carries its verdict; ``all`` is false when a part is false, true when every
part is, unknown otherwise; ``any`` the other way round; ``not`` swaps true and false. A rule
left unknown is returned in ``Decision.pending`` with the checks that can still change it, for
the layer that can ask the model; ``complete`` then decides it.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from collections.abc import Mapping
from enum import IntEnum

from gateway.policy.model import (
    MAX_SPANS_PER_VIOLATION,
    Action,
    Context,
    Decision,
    JudgeCheck,
    OnError,
    PendingRule,
    Rule,
    Span,
    Stage,
    Violation,
)
from gateway.policy.normalize import NormalizedText, normalize
from gateway.policy.ruleset import (
    AllNode,
    AnyNode,
    ExceptNode,
    JudgeNode,
    MaxTokensNode,
    Node,
    NotNode,
    Probe,
    ProbeNode,
    RuleSet,
    StagePlan,
)
from gateway.policy.views import DecodedView, decoded_views

_NO_CONTEXT = Context()
ByteSpans = list[tuple[int, int]]
Found = dict[int, list[Span]]  # rule index in the plan -> spans in the evaluated text
Pending = dict[int, dict[str, JudgeCheck]]  # rule index -> the checks it needs, by key


class Truth(IntEnum):
    """Kleene's three values, ordered so that ``all`` is ``min``, ``any`` is ``max``, ``not`` is 2 - x."""

    FALSE = 0
    UNKNOWN = 1
    TRUE = 2


def evaluate(ruleset: RuleSet, stage: Stage, text: str, context: Context = _NO_CONTEXT) -> Decision:
    """The decision on ``text``: every rule that matches it, or a decoded view of it (``views``).

    A rule holding a judge whose verdict is not in ``context.verdicts`` may be left pending.
    """
    plan = ruleset.plan(stage)
    normalized = normalize(text)
    hits = plan.matcher.Match(normalized.data) if plan.matcher is not None else None
    encoded = "\\" in text or "%" in text
    if not hits and not plan.always and not encoded:
        return Decision(stage, Action.ALLOW, ruleset.revision)  # most texts: nothing more to do
    # Only a plan with judge rules evaluates three-valued: the others take the path they always took.
    pending: Pending | None = {} if plan.judged else None
    found = _evaluate(plan, normalized, hits, context, pending)
    merged: set[int] = set()  # rules that a view added spans to
    if encoded:
        chain: list[DecodedView] = []
        for view in decoded_views(text):
            chain.append(view)
            decoded = normalize(view.text)
            view_hits = plan.matcher.Match(decoded.data) if plan.matcher is not None else None
            for rule_index, spans in _evaluate(plan, decoded, view_hits, context, pending).items():
                # Back through each view to the text: the second view is decoded from the first.
                mapped = spans
                for earlier in reversed(chain):
                    mapped = [earlier.span(span) for span in mapped]
                found.setdefault(rule_index, []).extend(mapped)
                merged.add(rule_index)
    if not found and not pending:
        return Decision(stage, Action.ALLOW, ruleset.revision)
    violations: list[Violation] = []
    for rule_index in sorted(found):
        rule = plan.rules[rule_index].rule
        spans = found[rule_index]
        if rule_index in merged:
            # A match seen in the text and in a view is one match: reported once.
            spans = sorted(set(spans), key=_span_order)[:MAX_SPANS_PER_VIOLATION]
        elif not spans and pending is not None and rule_index in plan.judged:
            # No pattern of the rule located anything: the judge decided on the whole text.
            spans = [Span(0, len(text))]
        violations.append(
            Violation(
                rule_id=rule.id,
                name=rule.name,
                severity=rule.severity,
                action=rule.action,
                mode=rule.mode,
                stage=stage,
                spans=tuple(spans),
                reference=rule.reference,
            )
        )
    action = max((v.effective_action for v in violations), default=Action.ALLOW)
    if not pending:
        return Decision(stage, action, ruleset.revision, tuple(violations))
    # True in the text or in one of its views is true: only what no view decided stays pending.
    waiting = tuple(
        _pending_rule(plan.rules[rule_index].rule, stage, tuple(checks.values()))
        for rule_index, checks in sorted(pending.items())
        if rule_index not in found
    )
    return Decision(stage, action, ruleset.revision, tuple(violations), waiting)


def complete(
    ruleset: RuleSet,
    decision: Decision,
    text: str,
    verdicts: Mapping[str, bool],
    context: Context = _NO_CONTEXT,
) -> Decision:
    """``decision``, from ``evaluate(ruleset, decision.stage, text, context)``, with the model's verdicts.

    ``verdicts`` (True: violates) are keyed like the checks of ``decision.pending``; a check
    without one counts as its ``on_error`` says, so nothing is left pending. This evaluates
    again with the verdicts in the context: one more normalisation and RE2 pass over the text,
    microseconds beside the model's call, for one definition of what a rule means (completing
    the decision in place would need each pending rule's half-evaluated tree and the spans of
    each of its branches carried in the decision).
    """
    if not decision.pending:
        return decision
    given = {**context.verdicts, **verdicts}
    for waiting in decision.pending:
        for check in waiting.checks:
            given.setdefault(check.key, check.on_error is OnError.BLOCK)
    return evaluate(ruleset, decision.stage, text, dataclasses.replace(context, verdicts=given))


def _pending_rule(rule: Rule, stage: Stage, checks: tuple[JudgeCheck, ...]) -> PendingRule:
    return PendingRule(
        rule.id, rule.name, rule.severity, rule.action, rule.mode, stage, checks, reference=rule.reference
    )


def _span_order(span: Span) -> tuple[int, int]:
    return span.start, span.end


def _evaluate(
    plan: StagePlan,
    normalized: NormalizedText,
    hits: list[int] | None,
    context: Context,
    pending: Pending | None,
) -> Found:
    """The rules of the plan that match one text, with their spans in that text.

    With ``pending`` (a plan with judge rules), the rules left unknown are added to it.
    """
    candidates = set(plan.always)
    if hits:
        candidates.update(plan.owner[index] for index in hits)
    if not candidates:
        return {}
    hit_set = frozenset(hits or ())
    if pending is not None:
        return _evaluate_judged(plan, sorted(candidates), hit_set, normalized, context, pending)
    found: Found = {}
    for rule_index in sorted(candidates):
        compiled = plan.rules[rule_index]
        if not compiled.rule.scope.covers(context):
            continue
        spans: ByteSpans = []
        if not _matches(compiled.node, hit_set, normalized, context, spans, None):
            continue
        found[rule_index] = _located(normalized, spans)
    return found


def _located(normalized: NormalizedText, spans: ByteSpans) -> list[Span]:
    """A rule's spans in the evaluated text: in order, each once, at most MAX_SPANS_PER_VIOLATION."""
    return [normalized.span(start, end) for start, end in sorted(set(spans))[:MAX_SPANS_PER_VIOLATION]]


def _evaluate_judged(
    plan: StagePlan,
    candidates: list[int],
    hits: frozenset[int],
    normalized: NormalizedText,
    context: Context,
    pending: Pending,
) -> Found:
    found: Found = {}
    for rule_index in candidates:
        compiled = plan.rules[rule_index]
        if not compiled.rule.scope.covers(context):
            continue
        spans: ByteSpans = []
        if rule_index in plan.judged:
            needed: list[JudgeCheck] = []
            truth = _truth(compiled.node, hits, normalized, context, spans, None, needed)
            if truth is Truth.UNKNOWN:
                checks = pending.setdefault(rule_index, {})
                for check in needed:
                    checks.setdefault(check.key, check)
            if truth is not Truth.TRUE:
                continue
        elif not _matches(compiled.node, hits, normalized, context, spans, None):
            continue
        found[rule_index] = _located(normalized, spans)
    return found


def _truth(
    node: Node,
    hits: frozenset[int],
    text: NormalizedText,
    context: Context,
    spans: ByteSpans,
    excluded: _Exclusions | None,
    needed: list[JudgeCheck],
) -> Truth:
    """The node's value; spans are added for what is true, checks to ``needed`` for what is unknown.

    Only the checks of unknown parts of an unknown node are needed: a verdict on any other
    could not change the rule's value.
    """
    match node:
        case JudgeNode(check):
            # A verdict on the whole text: exclusions take matches away, and the judge has none.
            verdict = context.verdicts.get(check.key)
            if verdict is None:
                needed.append(check)
                return Truth.UNKNOWN
            return Truth.TRUE if verdict else Truth.FALSE
        case AnyNode(parts):
            # Every part is looked at, as in ``_matches``, to report all spans.
            asked: list[JudgeCheck] = []
            value = max(_truth(part, hits, text, context, spans, excluded, asked) for part in parts)
            if value is Truth.UNKNOWN:
                needed.extend(asked)
            return value
        case AllNode(parts, exceptions):
            if exceptions:
                excluded = _Exclusions(exceptions, hits, text, excluded)
            collected: ByteSpans = []
            asked = []
            value = Truth.TRUE
            for part in parts:
                value = min(value, _truth(part, hits, text, context, collected, excluded, asked))
                if value is Truth.FALSE:
                    return value
            if value is Truth.TRUE:
                spans.extend(collected)
            else:
                needed.extend(asked)
            return value
        case NotNode(part):
            return Truth(Truth.TRUE - _truth(part, hits, text, context, [], None, needed))
        case _:
            return Truth.TRUE if _matches(node, hits, text, context, spans, excluded) else Truth.FALSE


class _Exclusions:
    """Where the ``except`` parts of an ``all`` match: no span of its other parts may overlap them.

    Searched over the whole text, once, only when a match is there to be judged, and only for
    the patterns the set saw somewhere in the text.
    """

    __slots__ = ("_ends", "_exceptions", "_hits", "_outer", "_starts", "_text")

    def __init__(
        self,
        exceptions: tuple[ExceptNode, ...],
        hits: frozenset[int],
        text: NormalizedText,
        outer: _Exclusions | None,
    ) -> None:
        self._exceptions, self._hits, self._text, self._outer = exceptions, hits, text, outer
        self._starts: list[int] | None = None
        self._ends: list[int] = []

    def overlap(self, start: int, end: int) -> bool:
        if self._outer is not None and self._outer.overlap(start, end):
            return True
        if self._starts is None:
            self._search()
        assert self._starts is not None
        # The first range ending after ``start``: ranges are disjoint, so ends are sorted too.
        index = bisect_right(self._ends, start)
        return index < len(self._starts) and self._starts[index] < max(end, start + 1)

    def _search(self) -> None:
        found: ByteSpans = []
        for exception in self._exceptions:
            _exception_spans(exception.part, self._hits, self._text, found)
        starts: list[int] = []
        ends: list[int] = []
        for start, end in sorted(found):
            if starts and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        self._starts, self._ends = starts, ends


def _exception_spans(node: Node, hits: frozenset[int], text: NormalizedText, spans: ByteSpans) -> None:
    match node:
        case ProbeNode(probe):
            if probe.index in hits:
                _probe_spans(probe, text, spans, None, limit=None)
        case AnyNode(parts):
            for part in parts:
                _exception_spans(part, hits, text, spans)
        case _:
            raise AssertionError(f"an exception holds regex, keywords, detectors or any: {node}")


def _matches(
    node: Node,
    hits: frozenset[int],
    text: NormalizedText,
    context: Context,
    spans: ByteSpans,
    excluded: _Exclusions | None,
) -> bool:
    match node:
        case ProbeNode(probe):
            return probe.index in hits and _probe_spans(probe, text, spans, excluded)
        case AnyNode(parts):
            # Every part is looked at, not only the first that matches, to report all spans.
            found = [_matches(part, hits, text, context, spans, excluded) for part in parts]
            return any(found)
        case AllNode(parts, exceptions):
            if exceptions:
                excluded = _Exclusions(exceptions, hits, text, excluded)
            collected: ByteSpans = []
            if all(_matches(part, hits, text, context, collected, excluded) for part in parts):
                spans.extend(collected)
                return True
            return False
        case NotNode(part):
            # Judged on the whole text: exclusions take matches away, never add any.
            return not _matches(part, hits, text, context, [], None)
        case MaxTokensNode(limit):
            if context.count_tokens(text.original) > limit and (
                excluded is None or not excluded.overlap(0, len(text.data))
            ):
                spans.append((0, len(text.data)))
                return True
            return False
        case ExceptNode():
            raise AssertionError("exceptions are kept apart from the parts of an all")
        case JudgeNode():
            raise AssertionError("a rule holding a judge is evaluated by _truth")


def _probe_spans(
    probe: Probe,
    text: NormalizedText,
    spans: ByteSpans,
    excluded: _Exclusions | None,
    limit: int | None = MAX_SPANS_PER_VIOLATION,
) -> bool:
    """Add the probe's matches in ``text`` to ``spans``, at most ``limit`` of them not excluded."""
    data = text.data
    found = 0
    position = 0
    while (limit is None or found < limit) and position <= len(data):
        match = probe.regex.search(data, position)
        if match is None:
            break
        start, end = match.span(probe.group)
        # Resume after the reported part, not after a consumed boundary character.
        position = end if end > start else max(match.end(), start + 1)
        if probe.validate is not None:
            candidate = data[start:end].decode("utf-8", errors="replace")
            if not probe.validate(candidate, probe.params):
                continue
        # An excluded match does not count towards the limit: decoys cannot crowd a key out.
        if excluded is not None and excluded.overlap(start, end):
            continue
        spans.append((start, end))
        found += 1
    return found > 0
