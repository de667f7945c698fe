"""The policy engine: pure, no I/O beyond reading policy files.

``load_ruleset`` turns YAML policy files into an immutable ``RuleSet``; ``evaluate`` turns a
rule set, a stage and a text into a ``Decision``, whose ``pending`` rules (judge rules only a
model can decide) the caller completes with ``complete`` once it has the model's verdicts.
The HTTP layer acts on decisions; this package never knows about requests, stores, metrics or
logs.
"""

from gateway.policy.engine import complete, evaluate
from gateway.policy.errors import PolicyError, Problem
from gateway.policy.loader import BUILTIN_POLICY_DIR, load_rules, load_ruleset
from gateway.policy.model import (
    Action,
    Context,
    Decision,
    JudgeCheck,
    JudgeSpec,
    Mode,
    OnError,
    PendingRule,
    Rule,
    Severity,
    Span,
    Stage,
    Violation,
)
from gateway.policy.ruleset import RuleSet, compile_ruleset

__all__ = [
    "BUILTIN_POLICY_DIR",
    "Action",
    "Context",
    "Decision",
    "JudgeCheck",
    "JudgeSpec",
    "Mode",
    "OnError",
    "PendingRule",
    "PolicyError",
    "Problem",
    "Rule",
    "RuleSet",
    "Severity",
    "Span",
    "Stage",
    "Violation",
    "compile_ruleset",
    "complete",
    "evaluate",
    "load_rules",
    "load_ruleset",
]
