"""Every metric the gateway exports, defined in one place, on a registry of its own."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from gateway.policy import Action, Rule, RuleSet, Stage

# Reaching LLM latencies: a streamed answer can take minutes.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 120)
# Characters of a stream's text held back: a word or two, a key being held, the cap (256).
HOLDBACK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ROUTES = ("prompt", "messages", "conversations", "passthrough")
OTHER = "other"

# Every (dependency, reason) the gateway can fall back on: each means something was not
# evaluated, not counted or not delivered as designed.
FALLBACKS = (
    ("policy", "evaluation_error"),
    ("answer", "encoded"),
    ("answer", "too_large"),
    ("answer", "event_too_large"),
    ("redis", "buffered"),
    ("redis", "dropped"),
    ("redis", "quota_unchecked"),
    ("workspace", "lookup_failed"),
    ("alerts", "queue_full"),
    ("alerts", "delivery_failed"),
    # A judge check the model gave no verdict on: counted as its rule's on_error says.
    *(
        ("judge", kind)
        for kind in ("timeout", "unreachable", "rate_limited", "http_error", "malformed", "busy")
    ),
    ("judge", "not_configured"),
    ("judge", "history_not_judged"),
    ("judge", "cache_unavailable"),
)
# A judge call's result: a verdict on every check (violates if one violates), or why not.
JUDGE_RESULTS = ("violates", "clean", "error", "timeout")
# unreachable: no answer (502); timeout: too slow (504); interrupted: an answer broken off (502).
UPSTREAM_ERRORS = ("unreachable", "timeout", "interrupted")
# Why the public port closed a client connection of its own accord (gateway.connections).
CONNECTION_REFUSALS = ("header_timeout", "max_connections")
# Upstream statuses of exchanges not counted against a budget (the backend served nothing): the
# refusals anyone can provoke by name, then classes, so the label stays bounded.
UNCOUNTED_STATUSES = ("401", "403", "404", "429", "3xx", "4xx", "5xx")
ALERT_RESULTS = ("delivered", "failed", "dropped", "grouped")
# A pull of the platform's policies by serve: written (and reloaded), the same as the file, or refused.
POLICY_PULL_RESULTS = ("ok", "unchanged", "failed")


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        workspace_label: bool = False,
        workspace_cap: int = 50,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.workspace_label = workspace_label
        self.workspace_cap = workspace_cap
        self._workspaces: set[str] = set()
        extra = ("workspace",) if workspace_label else ()
        r = self.registry
        self.requests = Counter(
            "policy_gateway_requests", "Requests answered, by route and HTTP status.",
            ("route", "status"), registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "policy_gateway_request_duration_seconds", "Time from request to complete answer.",
            ("route",), buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "policy_gateway_upstream_duration_seconds", "Time the upstream took to answer (headers).",
            buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "policy_gateway_overhead_seconds", "The gateway's own time, upstream excluded.",
            ("stage",), buckets=OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.violations = Counter(
            "policy_gateway_violations", "Rule matches, by policy and outcome.",
            ("policy", "action", "mode", "stage", "severity", *extra), registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "policy_gateway_decisions", "Decisions, by stage and effective action.",
            ("stage", "action"), registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "policy_gateway_tokens", "Tokens counted, by direction and source.",
            ("direction", "source", *extra), registry=r,
        )  # fmt: skip
        self.uncounted_exchanges = Counter(
            "policy_gateway_uncounted_exchanges",
            "Forwarded prompts not counted against a budget (nothing served), by upstream status.",
            ("status",), registry=r,
        )  # fmt: skip
        self.stream_holdback = Histogram(
            "policy_gateway_stream_holdback_chars",
            "Characters of streamed text received and not yet released, after each event with text.",
            buckets=HOLDBACK_BUCKETS, registry=r,
        )  # fmt: skip
        self.stream_first_byte_delay = Histogram(
            "policy_gateway_stream_first_byte_delay_seconds",
            "Time from the first upstream event with text to its release to the client.",
            buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.quota_rejections = Counter(
            "policy_gateway_quota_rejections", "Requests refused because a budget was used up.", registry=r
        )
        self.upstream_errors = Counter(
            "policy_gateway_upstream_errors", "Upstream calls that failed, by kind.", ("kind",), registry=r
        )
        self.fallbacks = Counter(
            "policy_gateway_fallbacks",
            "Times something was not evaluated, not counted or not delivered as designed.",
            ("dependency", "reason"), registry=r,
        )  # fmt: skip
        self.alerts = Counter(
            "policy_gateway_alerts", "Alert deliveries, by sink and result.", ("sink", "result"), registry=r
        )
        # With several workers the highest value wins: a revision still served by one shows 1.
        self.ruleset_info = Gauge(
            "policy_gateway_ruleset_info", "The rule set serving (1), by revision.", ("revision",),
            registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.rules = Gauge(
            "policy_gateway_rules", "Rules loaded, by stage and action.", ("stage", "action"),
            registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.reloads = Counter(
            "policy_gateway_reloads", "Policy reloads, by result (ok, failed).", ("result",), registry=r
        )
        self.policy_pulls = Counter(
            "policy_gateway_policy_pulls", "Pulls of the platform's policies by serve, by result (ok: "
            "written and reloaded; unchanged; failed: nothing changed).", ("result",), registry=r,
        )  # fmt: skip
        self.connections_refused = Counter(
            "policy_gateway_connections_refused",
            "Client connections closed with no complete request head in time (header_timeout), "
            "or answered 503 over the cap (max_connections).",
            ("reason",), registry=r,
        )  # fmt: skip
        self.judge_calls = Counter(
            "policy_gateway_judge_calls", "Calls to the judge model, by result (violates, clean, error, "
            "timeout).", ("result",), registry=r,
        )  # fmt: skip
        self.judge_duration = Histogram(
            "policy_gateway_judge_duration_seconds", "Time a judge call took, retries included.",
            buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.judge_cache = Counter(
            "policy_gateway_judge_cache", "Judge checks answered from the verdict cache (memory, redis) "
            "or not (miss).", ("result",), registry=r,
        )  # fmt: skip
        self.judge_tokens = Counter(
            "policy_gateway_judge_tokens", "Tokens the judge model was billed for, by kind (prompt, "
            "completion).", ("kind", *extra), registry=r,
        )  # fmt: skip
        self._revision: str | None = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._routes: dict[str, tuple[Any, Any, Any]] = {}
        self._pending: dict[tuple[Any, tuple[str, ...]], float] = {}
        # Per histogram series: [sum, count in each bucket], added at the next flush.
        self._observed: dict[Any, list[float]] = {}
        for route in ROUTES:
            self.request_duration.labels(route)
        for kind in UPSTREAM_ERRORS:
            self.upstream_errors.labels(kind)
        for reason in CONNECTION_REFUSALS:
            self.connections_refused.labels(reason)
        for status in UNCOUNTED_STATUSES:
            self.uncounted_exchanges.labels(status)
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        for result in JUDGE_RESULTS:
            self.judge_calls.labels(result)
        for result in POLICY_PULL_RESULTS:
            self.policy_pulls.labels(result)
        for result in ("memory", "redis", "miss"):
            self.judge_cache.labels(result)
        for dependency, reason in FALLBACKS:
            self.fallbacks.labels(dependency, reason)
        for stage in Stage:
            self.overhead.labels(stage.value)
            for action in Action:
                self.decisions.labels(stage.value, action.label)
        for direction in ("prompt", "response"):
            for source in ("reported", "estimated"):
                self.tokens.labels(direction, source, *((OTHER,) if workspace_label else ()))

    def load_ruleset(self, ruleset: RuleSet) -> None:
        """Show a (new) rule set: its revision, its rule counts, and its violation series at 0."""
        if self._revision is not None and self._revision != ruleset.revision:
            # Set to 0 rather than removed: other workers' files keep series a clear() would not.
            self.ruleset_info.labels(self._revision).set(0)
        self._revision = ruleset.revision
        self.ruleset_info.labels(ruleset.revision).set(1)
        for stage in Stage:
            for action in (Action.LOG, Action.ALERT, Action.BLOCK):
                count = sum(1 for rule in ruleset.rules if stage in rule.stages and rule.action is action)
                self.rules.labels(stage.value, action.label).set(count)
        for labels in _violation_labels(ruleset.rules):
            self.violations.labels(*labels, *((OTHER,) if self.workspace_label else ()))

    def child(self, metric: Any, *labels: str) -> Any:
        """A labelled series, looked up once: ``labels()`` costs microseconds on every call."""
        key = (id(metric), labels)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*labels)
        return series

    def route_series(self, route: str) -> tuple[Any, Any, Any]:
        """A route's request duration series, and the prompt and response overhead series: the
        three each finished request observes, looked up in one step."""
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = (
                self.child(self.request_duration, route),
                self.child(self.overhead, "prompt"),
                self.child(self.overhead, "response"),
            )
        return series

    def count(self, counter: Any, labels: tuple[str, ...], amount: float = 1) -> None:
        """Add to a counter series at the next ``flush``: the requests finished in one turn of
        the event loop are added up first, one locked update per series instead of one each."""
        key = (counter, labels)
        self._pending[key] = self._pending.get(key, 0) + amount

    def observe(self, series: Any, amount: float) -> None:
        """``series.observe(amount)`` at the next ``flush``, as ``count`` does for counters: the
        bucket is found by bisection, and a batch's observations of a series are added with one
        locked update per bucket they fell in, rather than two each."""
        pending = self._observed.get(series)
        if pending is None:
            if not _batchable(series):
                series.observe(amount)
                return
            pending = self._observed[series] = [0.0] * (len(series._upper_bounds) + 1)
        pending[0] += amount
        # observe() counts an amount in the first bucket whose upper bound is >= it.
        pending[bisect.bisect_left(series._upper_bounds, amount) + 1] += 1

    def flush(self) -> None:
        """Apply what ``count`` and ``observe`` have gathered (after each batch of answers, and
        before a scrape)."""
        pending, self._pending = self._pending, {}
        for (counter, labels), amount in pending.items():
            self.child(counter, *labels).inc(amount)
        observed, self._observed = self._observed, {}
        for series, sums in observed.items():
            series._sum.inc(sums[0])
            buckets = series._buckets
            for index, count in enumerate(sums[1:]):
                if count:
                    buckets[index].inc(count)

    def exposition(self) -> bytes:
        """The text format; with several workers, the sum (or max) over all of them."""
        self.flush()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
            return generate_latest(registry)
        return generate_latest(self.registry)

    def alert_sinks(self, names: Iterable[str]) -> None:
        for name in names:
            for result in ALERT_RESULTS:
                self.alerts.labels(name, result)

    def workspace(self, workspace: str) -> tuple[str, ...]:
        """The workspace label values to add, if any: a bounded set, the rest become ``other``."""
        if not self.workspace_label:
            return ()
        if workspace in self._workspaces:
            return (workspace,)
        if len(self._workspaces) < self.workspace_cap:
            self._workspaces.add(workspace)
            return (workspace,)
        return (OTHER,)


def _batchable(series: Any) -> bool:
    """Whether ``observe`` can add to this histogram series's values itself: the attributes it
    uses are prometheus_client's own (tests/test_metrics_batching.py holds them to what
    ``Histogram.observe`` does); a release without them gets plain ``observe`` calls."""
    bounds = getattr(series, "_upper_bounds", None)
    buckets = getattr(series, "_buckets", None)
    return (
        isinstance(bounds, list)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets)
        and bool(bounds)
        and bounds[-1] == float("inf")
        and hasattr(getattr(series, "_sum", None), "inc")
    )


def _violation_labels(rules: Iterable[Rule]) -> Iterable[tuple[str, str, str, str, str]]:
    for rule in rules:
        for stage in sorted(rule.stages, key=lambda s: s.value):
            yield rule.id, rule.action.label, rule.mode.value, stage.value, rule.severity.value
