"""``evaluate``: a pure function from (rule set, stage, text, context) to a ``Decision``."""

from __future__ import annotations

from gateway.policy.model import (
    MAX_SPANS_PER_VIOLATION,
    Action,
    Context,
    Decision,
    Stage,
    Violation,
)
from gateway.policy.normalize import NormalizedText, normalize
from gateway.policy.ruleset import (
    AllNode,
    AnyNode,
    MaxTokensNode,
    Node,
    NotNode,
    Probe,
    ProbeNode,
    RuleSet,
)

_NO_CONTEXT = Context()
ByteSpans = list[tuple[int, int]]


def evaluate(ruleset: RuleSet, stage: Stage, text: str, context: Context = _NO_CONTEXT) -> Decision:
    plan = ruleset.plan(stage)
    normalized = normalize(text)
    hits = plan.matcher.Match(normalized.data) if plan.matcher is not None else None
    candidates = set(plan.always)
    if hits:
        candidates.update(plan.owner[index] for index in hits)
    if not candidates:
        return Decision(stage, Action.ALLOW, ruleset.revision)

    hit_set = frozenset(hits or ())
    violations: list[Violation] = []
    for rule_index in sorted(candidates):
        compiled = plan.rules[rule_index]
        rule = compiled.rule
        if not rule.scope.covers(context):
            continue
        spans: ByteSpans = []
        if not _matches(compiled.node, hit_set, normalized, context, spans):
            continue
        violations.append(
            Violation(
                rule_id=rule.id,
                name=rule.name,
                severity=rule.severity,
                action=rule.action,
                mode=rule.mode,
                stage=stage,
                spans=tuple(
                    normalized.span(start, end) for start, end in sorted(set(spans))[:MAX_SPANS_PER_VIOLATION]
                ),
            )
        )
    action = max((v.effective_action for v in violations), default=Action.ALLOW)
    return Decision(stage, action, ruleset.revision, tuple(violations))


def _matches(
    node: Node,
    hits: frozenset[int],
    text: NormalizedText,
    context: Context,
    spans: ByteSpans,
) -> bool:
    match node:
        case ProbeNode(probe):
            return probe.index in hits and _probe_spans(probe, text, spans)
        case AnyNode(parts):
            # Every part is looked at, not only the first that matches, to report all spans.
            found = [_matches(part, hits, text, context, spans) for part in parts]
            return any(found)
        case AllNode(parts):
            collected: ByteSpans = []
            if all(_matches(part, hits, text, context, collected) for part in parts):
                spans.extend(collected)
                return True
            return False
        case NotNode(part):
            return not _matches(part, hits, text, context, [])
        case MaxTokensNode(limit):
            if context.count_tokens(text.original) > limit:
                spans.append((0, len(text.data)))
                return True
            return False


def _probe_spans(probe: Probe, text: NormalizedText, spans: ByteSpans) -> bool:
    data = text.data
    found = 0
    position = 0
    while found < MAX_SPANS_PER_VIOLATION and position <= len(data):
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
        spans.append((start, end))
        found += 1
    return found > 0
