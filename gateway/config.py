"""Settings: read once from defaults, a YAML file, the environment and flags, then frozen.

Precedence, strongest first: command-line flags, environment variables, the config file,
defaults. Every invalid setting is reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from gateway.flashback import DEFAULT_RESPONSE_FIELDS, parse_field_path


class ConfigError(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


@dataclass(frozen=True, slots=True)
class Settings:
    upstream: str = "https://backend.flashback.tech"
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    policies: tuple[Path, ...] = ()  # empty: the built-in pack
    body_limit: int = 1 << 20  # bytes of a prompt request body
    response_limit: int = 8 << 20  # bytes of a JSON answer held for inspection
    connect_timeout: float = 5.0
    # Long: a model may think for minutes before its first byte.
    read_timeout: float = 300.0
    response_fields: tuple[str, ...] = DEFAULT_RESPONSE_FIELDS
    stream_holdback: int = 256  # most characters a stream is held back

    @property
    def upstream_url(self) -> URL:
        return URL(self.upstream)

    @property
    def field_paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple(parse_field_path(path) for path in self.response_fields)


ENV_PREFIX = "GATEWAY_"


def _positive_int(value: object) -> int:
    number = int(str(value))
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _non_negative_int(value: object) -> int:
    number = int(str(value))
    if number < 0:
        raise ValueError("must be zero or more")
    return number


def _port(value: object) -> int:
    number = int(str(value))
    if not 0 <= number <= 65535:
        raise ValueError("must be a port number 0-65535")
    return number


def _positive_float(value: object) -> float:
    number = float(str(value))
    if number <= 0:
        raise ValueError("must be a positive number of seconds")
    return number


def _upstream(value: object) -> str:
    url = URL(str(value))
    if url.scheme not in {"http", "https"} or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return str(url).rstrip("/")


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be non-empty text")
    return value


def _paths(value: object) -> tuple[Path, ...]:
    items = value.split(os.pathsep) if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str | Path) for i in items):
        raise ValueError("must be a list of directories")
    return tuple(Path(item) for item in items if str(item))


def _fields(value: object) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError("must be a non-empty list of field paths")
    for item in items:
        parse_field_path(str(item))
    return tuple(str(item).strip() for item in items)


PARSERS: Mapping[str, Callable[[object], Any]] = {
    "upstream": _upstream,
    "host": _text,
    "port": _port,
    "admin_host": _text,
    "admin_port": _port,
    "policies": _paths,
    "body_limit": _positive_int,
    "response_limit": _positive_int,
    "connect_timeout": _positive_float,
    "read_timeout": _positive_float,
    "response_fields": _fields,
    "stream_holdback": _non_negative_int,
}
assert set(PARSERS) == {f.name for f in fields(Settings)}


def load_settings(
    flags: Mapping[str, object],
    environ: Mapping[str, str] = os.environ,
    config_file: Path | None = None,
) -> Settings:
    """Merge the sources; ``flags`` holds only what was given on the command line."""
    errors: list[str] = []
    raw: dict[str, tuple[str, object]] = {}
    if config_file is not None:
        for key, value in _read_file(config_file, errors).items():
            raw[key] = (f"{config_file}: {key}", value)
    for name in PARSERS:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            raw[name] = (env_name, environ[env_name])
    for name, value in flags.items():
        if value is not None:
            raw[name] = ("--" + name.replace("_", "-"), value)

    values: dict[str, Any] = {}
    for name, (origin, value) in raw.items():
        try:
            values[name] = PARSERS[name](value)
        except (ValueError, TypeError) as exc:
            errors.append(f"{origin}: {value!r} {exc}")
    settings = Settings(**values) if not errors else Settings()
    if not errors and settings.port == settings.admin_port and settings.port != 0:
        errors.append(f"port and admin_port are both {settings.port}: the admin port must be its own")
    if errors:
        raise ConfigError(errors)
    return settings


def _read_file(path: Path, errors: list[str]) -> dict[str, object]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        errors.append(f"{path}: cannot read config: {exc}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{path}: the config file must be a mapping of settings")
        return {}
    unknown = sorted(str(key) for key in data if key not in PARSERS)
    errors.extend(f"{path}: unknown setting '{key}' (known: {', '.join(PARSERS)})" for key in unknown)
    return {key: value for key, value in data.items() if key in PARSERS}
