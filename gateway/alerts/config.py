"""The ``alerts:`` section of the config file: ``AlertConfig`` and its validating parser."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.alerts.sinks import AlertmanagerSink, AlertSink, SlackSink, WebhookSink
from gateway.alerts.validation import _is_http_url, _positive, _url_problem


@dataclass(frozen=True, slots=True)
class AlertConfig:
    sinks: tuple[AlertSink, ...] = ()
    window: float = 60.0  # seconds: repeats of the same (workspace, policy) within it are grouped
    queue_size: int = 1000  # alerts waiting, per sink
    on_block: bool = False  # also alert on block outcomes
    retries: int = 3  # attempts per delivery
    timeout: float = 5.0  # seconds, per attempt

    def __post_init__(self) -> None:
        # queue_size 0 would make an unbounded asyncio.Queue.
        for key, integer in NUMBERS.items():
            try:
                _positive(getattr(self, key), integer=integer)
            except ValueError as exc:
                raise ValueError(f"AlertConfig.{key} {exc}") from None
        names = [sink.name for sink in self.sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be distinct: {names}")


class AlertConfigError(ValueError):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


SINK_TYPES: Mapping[str, type[WebhookSink | SlackSink | AlertmanagerSink]] = {
    "webhook": WebhookSink,
    "slack": SlackSink,
    "alertmanager": AlertmanagerSink,
}
SINK_KEYS = frozenset({"type", "name", "url", "headers"})
SINK_OPTIONS = {"alertmanager": frozenset({"resolve_after", "generator_url"})}
NUMBERS = {"window": False, "queue_size": True, "retries": True, "timeout": False}  # name: whole number
CONFIG_KEYS = frozenset({"sinks", "on_block", *NUMBERS})


@dataclass(slots=True)
class _SinkSpec:
    index: int
    type: str
    name: str | None
    url: str
    headers: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)


def parse_alert_config(value: object) -> AlertConfig:
    """The ``alerts:`` mapping of the config file, validated; every problem is reported at once.

    ``{sinks: [{type: webhook|slack|alertmanager, name?, url, headers?: {..}}], window?,
    queue_size?, on_block?, retries?, timeout?}``; an alertmanager sink also takes
    ``resolve_after`` (seconds) and ``generator_url``. Sink names default to the type, then
    type-2, type-3, ... when the type repeats.
    """
    if value is None:
        return AlertConfig()
    if not isinstance(value, Mapping):
        raise AlertConfigError(["alerts: must be a mapping with sinks: [...] and options"])
    errors: list[str] = []
    errors.extend(
        f"alerts: unknown key {key!r} (known: {', '.join(sorted(CONFIG_KEYS))})"
        for key in value
        if key not in CONFIG_KEYS
    )
    options: dict[str, Any] = {}
    for key, integer in NUMBERS.items():
        if key in value:
            try:
                options[key] = _positive(value[key], integer=integer)
            except ValueError as exc:
                errors.append(f"alerts.{key}: {value[key]!r} {exc}")
    if "on_block" in value:
        if isinstance(value["on_block"], bool):
            options["on_block"] = value["on_block"]
        else:
            errors.append(f"alerts.on_block: {value['on_block']!r} must be true or false")
    raw_sinks = value.get("sinks", [])
    specs: list[_SinkSpec] = []
    if not isinstance(raw_sinks, list):
        errors.append("alerts.sinks: must be a list of {type, url, ...}")
    else:
        for index, raw in enumerate(raw_sinks):
            spec = _sink_spec(index, raw, errors)
            if spec is not None:
                specs.append(spec)
    # Names are checked even for sinks with other problems, so that every problem is listed.
    names = _sink_names(specs, errors)
    if errors:
        raise AlertConfigError(errors)
    sinks = tuple(
        SINK_TYPES[spec.type](spec.url, name=name, headers=spec.headers, **spec.options)
        for spec, name in zip(specs, names, strict=True)
    )
    return AlertConfig(sinks=sinks, **options)


def _sink_spec(index: int, raw: object, errors: list[str]) -> _SinkSpec | None:
    """The sink described by ``raw``, its problems added to ``errors`` (then it is not to be built)."""
    where = f"alerts.sinks[{index}]"
    if not isinstance(raw, Mapping):
        errors.append(f"{where}: must be a mapping {{type, url, ...}}")
        return None
    kind = raw.get("type")
    if kind is None:
        errors.append(f"{where}: missing type (one of {', '.join(SINK_TYPES)})")
    elif kind not in SINK_TYPES:
        errors.append(f"{where}.type: unknown type {kind!r} (known: {', '.join(SINK_TYPES)})")
    allowed = SINK_KEYS | SINK_OPTIONS.get(str(kind), frozenset())
    errors.extend(f"{where}: unknown key {key!r}" for key in raw if key not in allowed)
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        errors.append(f"{where}.name: must be non-empty text")
    url = raw.get("url")
    if url is None:
        errors.append(f"{where}: missing url")
    elif not _is_http_url(url):
        errors.append(f"{where}.url: {_url_problem(url)}")
    headers = _headers(raw.get("headers", {}), f"{where}.headers", errors)
    options: dict[str, Any] = {}
    if "resolve_after" in raw:
        try:
            options["resolve_after"] = _positive(raw["resolve_after"], integer=False)
        except ValueError as exc:
            errors.append(f"{where}.resolve_after: {raw['resolve_after']!r} {exc}")
    if "generator_url" in raw:
        if _is_http_url(raw["generator_url"]):
            options["generator_url"] = raw["generator_url"]
        else:
            errors.append(f"{where}.generator_url: {_url_problem(raw['generator_url'])}")
    return _SinkSpec(index, str(kind), name if isinstance(name, str) else None, str(url), headers, options)


def _headers(value: object, where: str, errors: list[str]) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        errors.append(f"{where}: must map header names to text values")
        return {}
    for key, text in value.items():
        # SECURITY: values may be credentials; name the header, never print its value.
        if not key or any(c in key for c in "\r\n:") or any(c in text for c in "\r\n"):
            errors.append(f"{where}: header {key!r} has an empty name or a line break")
    return dict(value)


def _sink_names(specs: list[_SinkSpec], errors: list[str]) -> list[str]:
    taken: dict[str, int] = {}
    for spec in specs:
        if spec.name is None:
            continue
        if spec.name in taken:
            errors.append(
                f"alerts.sinks[{spec.index}].name: duplicate sink name {spec.name!r} "
                f"(also sinks[{taken[spec.name]}])"
            )
        else:
            taken[spec.name] = spec.index
    names: list[str] = []
    for spec in specs:
        name = spec.name
        if name is None:
            name, number = spec.type, 1
            while name in taken:
                number += 1
                name = f"{spec.type}-{number}"
            taken[name] = spec.index
        names.append(name)
    return names
