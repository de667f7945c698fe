"""Values of the policy domain: rules as loaded, and decisions as evaluated."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from types import MappingProxyType


class Severity(Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Action(IntEnum):
    """Outcome of a rule; the order is the strength (allow < log < alert < block).

    The values 0..2 of log/alert/block are the backend's actionType.
    """

    ALLOW = -1
    LOG = 0
    ALERT = 1
    BLOCK = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Mode(Enum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


class Stage(Enum):
    PROMPT = "prompt"
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a rule applies; an empty tuple means everywhere, ``*`` matches any known id."""

    orgs: tuple[str, ...] = ()
    workspaces: tuple[str, ...] = ()
    repos: tuple[str, ...] = ()

    def covers(self, context: Context) -> bool:
        return (
            _within(self.orgs, context.org)
            and _within(self.workspaces, context.workspace)
            and _within(self.repos, context.repo)
        )


def _within(allowed: tuple[str, ...], value: str | None) -> bool:
    if not allowed:
        return True
    # A rule scoped to some ids cannot apply when the request's id is unknown.
    if value is None:
        return False
    return "*" in allowed or value in allowed


# Match specifications, as written in the policy file.


@dataclass(frozen=True, slots=True)
class RegexSpec:
    pattern: str


@dataclass(frozen=True, slots=True)
class KeywordsSpec:
    words: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    name: str
    params: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class MaxTokensSpec:
    limit: int


@dataclass(frozen=True, slots=True)
class AnySpec:
    parts: tuple[MatchSpec, ...]


@dataclass(frozen=True, slots=True)
class AllSpec:
    parts: tuple[MatchSpec, ...]


@dataclass(frozen=True, slots=True)
class NotSpec:
    """Matches when its part matches nowhere in the text (judged on the whole text)."""

    part: MatchSpec
    line: int = field(default=0, compare=False)  # where it was written, for `gateway check`


@dataclass(frozen=True, slots=True)
class ExceptSpec:
    """Inside ``all``: a match of the other parts that one of these matches overlaps is dropped."""

    part: MatchSpec


class OnError(Enum):
    """What a judge check counts as when the model gives no verdict on it."""

    ALLOW = "allow"  # as not violated: the text passes this check
    BLOCK = "block"  # as violated: the rule acts with its own action


@dataclass(frozen=True, slots=True)
class JudgeSpec:
    """Matches when a model judges that the whole text does what ``instruction`` forbids.

    The engine never asks the model: until a verdict is supplied, the judge is unknown.
    """

    instruction: str
    violating: tuple[str, ...] = ()
    compliant: tuple[str, ...] = ()
    # Allow by default: a model that is down or slow would otherwise block every text in the
    # judge's scope. The I/O layer counts every failure as a fallback, never as a pass.
    on_error: OnError = OnError.ALLOW


MatchSpec = (
    RegexSpec
    | KeywordsSpec
    | DetectorSpec
    | MaxTokensSpec
    | AnySpec
    | AllSpec
    | NotSpec
    | ExceptSpec
    | JudgeSpec
)


def walk_specs(spec: MatchSpec) -> Iterator[MatchSpec]:
    """The spec and every spec inside it, in the order they are written."""
    yield spec
    match spec:
        case AnySpec(parts) | AllSpec(parts):
            for part in parts:
                yield from walk_specs(part)
        case NotSpec(part) | ExceptSpec(part):
            yield from walk_specs(part)
        case _:
            return


@dataclass(frozen=True, slots=True)
class RuleTests:
    match: tuple[str, ...] = ()
    no_match: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    name: str
    severity: Severity
    action: Action
    match: MatchSpec
    description: str = ""
    mode: Mode = Mode.ENFORCE
    stages: frozenset[Stage] = frozenset(Stage)
    scope: Scope = Scope()
    tests: RuleTests = RuleTests()
    # Where the rule comes from outside this gateway (the platform's policy id, say): records name it.
    reference: str = ""
    source: str = ""
    line: int = 0

    @property
    def effective_action(self) -> Action:
        return Action.LOG if self.mode is Mode.SHADOW else self.action


# Evaluation.


def estimate_tokens(text: str) -> int:
    """Upper-leaning estimate (about 4 characters a token) until a real tokenizer is passed."""
    return (len(text) + 3) // 4


NO_VERDICTS: Mapping[str, bool] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Context:
    """Who a request belongs to; ids the gateway could not resolve stay ``None``."""

    org: str | None = None
    workspace: str | None = None
    repo: str | None = None
    count_tokens: Callable[[str], int] = estimate_tokens
    # The model's verdicts (True: violates) by judge check key; a check without one is unknown.
    verdicts: Mapping[str, bool] = field(default_factory=lambda: NO_VERDICTS)


@dataclass(frozen=True, slots=True)
class Span:
    """Half-open character range ``[start, end)`` in the text as the caller passed it."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """What a decision says of one rule: which rule, and how it acts."""

    rule_id: str
    name: str
    severity: Severity
    action: Action
    mode: Mode
    stage: Stage
    # The rule's reference (``Rule.reference``); keyword-only so subclasses add fields after it.
    reference: str = field(default="", kw_only=True)

    @property
    def effective_action(self) -> Action:
        return Action.LOG if self.mode is Mode.SHADOW else self.action


@dataclass(frozen=True, slots=True)
class Violation(RuleOutcome):
    # At most MAX_SPANS_PER_VIOLATION, in text order.
    spans: tuple[Span, ...]


@dataclass(frozen=True, slots=True)
class JudgeCheck:
    """One question for the model: the judge of a rule, under the key its verdict is given by.

    The key is the rule id; a rule holding several judges keys them ``rule-id#1``,
    ``rule-id#2``, ... in the order they are written.
    """

    key: str
    instruction: str
    violating: tuple[str, ...] = ()
    compliant: tuple[str, ...] = ()
    on_error: OnError = OnError.ALLOW


@dataclass(frozen=True, slots=True)
class PendingRule(RuleOutcome):
    """A rule that only the model can decide on this text, and the checks it still needs."""

    checks: tuple[JudgeCheck, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """``action`` counts the decided ``violations`` only; ``pending`` rules await the model."""

    stage: Stage
    action: Action
    revision: str
    violations: tuple[Violation, ...] = field(default=())
    pending: tuple[PendingRule, ...] = field(default=())

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK


MAX_SPANS_PER_VIOLATION = 64

EMPTY_PARAMS: Mapping[str, object] = {}
