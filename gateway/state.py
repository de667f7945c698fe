"""What the handlers share: settings, the rule set, the upstream session and the usage parts."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gateway.alerts import AlertDispatcher
from gateway.config import Settings
from gateway.judge.cache import VerdictCache
from gateway.judge.runner import JudgeRunner
from gateway.metrics import Metrics
from gateway.observe import Observer
from gateway.policy import RuleSet, Stage
from gateway.policy.holdback import Holdback, plan_holdback
from gateway.redaction import REDACTOR
from gateway.usage.accounting import Accountant
from gateway.usage.memory_store import MemoryUsageStore
from gateway.usage.quota import QuotaGate
from gateway.usage.redis_store import RedisUsageStore, connect
from gateway.usage.store import UsageStore
from gateway.usage.tokens import TokenCounter
from gateway.usage.workspaces import WorkspaceDirectory, WorkspaceResolver


def make_store(settings: Settings, observer: Observer) -> UsageStore:
    if settings.redis_url is None:
        return MemoryUsageStore()
    return RedisUsageStore(
        settings.redis_url,
        timeout=settings.redis_timeout,
        buffer_limit=settings.usage_buffer,
        on_fallback=lambda reason: observer.fallback("redis", reason),
    )


def make_verdict_cache(settings: Settings, observer: Observer) -> VerdictCache:
    """In memory, and shared through Redis when usage is counted there (the same server)."""
    redis = None if settings.redis_url is None else connect(settings.redis_url, settings.redis_timeout)
    return VerdictCache(
        observer.key,
        redis=redis,
        timeout=settings.redis_timeout,
        on_error=lambda reason: observer.fallback("judge", "cache_unavailable"),
    )


def make_observer(settings: Settings) -> Observer:
    metrics = Metrics(
        workspace_label=settings.metrics_workspace_label, workspace_cap=settings.metrics_workspace_cap
    )
    observer = Observer(
        metrics,
        key=settings.audit_key.encode() if settings.audit_key else None,
        alert_on_block=settings.alerts.on_block,
    )
    if settings.alerts.sinks:
        metrics.alert_sinks(sink.name for sink in settings.alerts.sinks)
        observer.alerts = AlertDispatcher(
            settings.alerts,
            on_result=lambda sink, result: metrics.alerts.labels(sink, result).inc(),
            on_fallback=lambda reason: observer.fallback("alerts", reason),
        )
    return observer


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    ruleset: RuleSet
    field_paths: tuple[tuple[str, ...], ...] = field(init=False)
    # What streamed answers hold back under the rule set's block rules (``gateway.streaming``).
    stream_holdback: Holdback = field(init=False)
    observer: Observer = field(init=False)
    store: UsageStore = field(init=False)
    accountant: Accountant = field(init=False)
    quota: QuotaGate = field(init=False)
    resolver: WorkspaceResolver = field(init=False)
    # Completes decisions that wait on the judge; its model client exists while the app runs.
    judge: JudgeRunner = field(init=False)
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        settings = self.settings
        self.field_paths = settings.field_paths
        self.stream_holdback = plan_holdback(self.ruleset, Stage.RESPONSE, settings.stream_holdback)
        self.observer = make_observer(settings)
        self.observer.ruleset(self.ruleset)
        REDACTOR.ruleset = self.ruleset
        self.store = make_store(settings, self.observer)
        self.accountant = Accountant(self.store, TokenCounter(settings.model_encodings), self.observer)
        self.quota = QuotaGate(
            self.store,
            settings.quotas,
            fail_closed=settings.quota_fail_closed,
            margin=settings.quota_margin,
            on_unchecked=lambda: self.observer.fallback("redis", "quota_unchecked"),
        )
        self.judge = JudgeRunner(
            None,
            make_verdict_cache(settings, self.observer),
            self.observer.metrics,
            settings.judge_model or "",
        )
        self.resolver = WorkspaceResolver(
            WorkspaceDirectory(cache_ttl=settings.workspace_cache_ttl),
            header=settings.workspace_header,
            lookup_pages=settings.workspace_lookup_pages,
        )

    def swap_ruleset(self, ruleset: RuleSet) -> None:
        """Serve a new rule set from the next evaluation on; requests under way keep theirs."""
        holdback = plan_holdback(ruleset, Stage.RESPONSE, self.settings.stream_holdback)
        self.ruleset, self.stream_holdback = ruleset, holdback
        self.observer.ruleset(ruleset)
        REDACTOR.ruleset = ruleset

    @property
    def holdback(self) -> int:
        """The characters every stream holds whatever its text (rules held by a fixed window)."""
        return self.stream_holdback.fixed

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream session exists only while the app runs")
        return self._session

    @session.setter
    def session(self, session: aiohttp.ClientSession | None) -> None:
        self._session = session


STATE = web.AppKey("state", GatewayState)
