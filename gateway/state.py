"""What the handlers share: settings, the current rule set and the upstream session."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gateway.config import Settings
from gateway.policy import RuleSet, Stage
from gateway.streaming import holdback_chars


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    ruleset: RuleSet
    field_paths: tuple[tuple[str, ...], ...] = field(init=False)
    holdback: int = field(init=False)
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self.field_paths = self.settings.field_paths
        self.holdback = holdback_chars(self.ruleset, Stage.RESPONSE, self.settings.stream_holdback)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream session exists only while the app runs")
        return self._session

    @session.setter
    def session(self, session: aiohttp.ClientSession | None) -> None:
        self._session = session


STATE = web.AppKey("state", GatewayState)
