"""The rule set that redaction uses: every rule that finds spans, of any stage, action or scope.

What the gateway writes down (log lines, audit records, alerts, error bodies) must not carry a
text that any rule would catch, whatever the rule's outcome, stage, mode or scope: a card number
that an alert rule reports is as much out of place in a log line as a key that a block rule
stops. Rules that judge a whole text (``max_tokens``, a bare ``not``) find no span to redact and
are left out, or every value would match them; so are rules holding a ``judge``, whose spans
exist only once a model has given its verdict on that very text.
"""

from __future__ import annotations

import dataclasses

from gateway.policy.model import Mode, Scope, Span, Stage
from gateway.policy.ruleset import RuleSet, compile_ruleset, holds_judge, may_match_without_probes

# Every redacted rule is compiled into the plan of this stage (the stage itself means nothing).
REDACTION_STAGE = Stage.PROMPT


def redaction_ruleset(ruleset: RuleSet) -> RuleSet:
    """``ruleset``'s span-finding rules, each enforced in one stage, everywhere."""
    rules = []
    for rule in ruleset.rules:
        plans = [ruleset.plan(stage) for stage in rule.stages]
        compiled = next((c for plan in plans for c in plan.rules if c.rule is rule), None)
        if compiled is None or may_match_without_probes(compiled.node) or holds_judge(compiled.node):
            continue
        rules.append(
            dataclasses.replace(rule, stages=frozenset({REDACTION_STAGE}), scope=Scope(), mode=Mode.ENFORCE)
        )
    return compile_ruleset(tuple(rules), ruleset.revision)


def merged(spans: list[Span]) -> list[tuple[int, int]]:
    """Overlapping or touching spans as one, in order."""
    out: list[tuple[int, int]] = []
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        if out and span.start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], span.end))
        else:
            out.append((span.start, span.end))
    return out
