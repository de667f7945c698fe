"""Settings: read once from defaults, a YAML file, the environment and flags, then frozen.

Precedence, strongest first: command-line flags, environment variables, the config file,
defaults. Every invalid setting is reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml
from yarl import URL

from gateway.admin_auth import OPENABLE, parse_admin_open
from gateway.alerts import AlertConfig, parse_alert_config
from gateway.credentials import SECRET_FILES, parse_origin_header, parse_secret, read_secret_files
from gateway.flashback import DEFAULT_RESPONSE_FIELDS, parse_field_path


class ConfigError(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


@dataclass(frozen=True, slots=True)
class Budget:
    """Token budgets of one workspace, per UTC day and per UTC month (``None``: no limit)."""

    daily: int | None = None
    monthly: int | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    upstream: str = "https://backend.flashback.tech"
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    # The admin port's bearer token (GATEWAY_ADMIN_TOKEN, or the content of admin_token_file,
    # read again when the file changes); None: the admin port answers anyone who reaches it.
    admin_token: str | None = field(default=None, repr=False)
    admin_token_file: Path | None = None
    admin_open: tuple[str, ...] = OPENABLE  # admin endpoints served without the token
    # Added to every request sent upstream, so the backend can refuse what went around the
    # gateway; a client's copy is always dropped. The secret: GATEWAY_ORIGIN_SECRET or a file.
    origin_header: str = "X-Gateway-Origin"
    origin_secret: str | None = field(default=None, repr=False)
    origin_secret_file: Path | None = None
    policies: tuple[Path, ...] = ()  # empty: the built-in pack
    body_limit: int = 1 << 20  # bytes of a prompt request body
    response_limit: int = 8 << 20  # bytes of a JSON answer held for inspection
    connect_timeout: float = 5.0
    # Long: a model may think for minutes before its first byte.
    read_timeout: float = 300.0
    # Public port: seconds a client has to send a complete request head, and connections open
    # at once per worker (the next is answered 503). See gateway/connections.py.
    header_timeout: float = 10.0
    max_connections: int = 10_000
    response_fields: tuple[str, ...] = DEFAULT_RESPONSE_FIELDS
    stream_holdback: int = 256  # most characters a stream is held back
    redis_url: str | None = None  # None: usage is kept in process memory
    redis_timeout: float = 0.25
    usage_buffer: int = 100_000  # records held while Redis is down
    # Records still unwritten at stop are kept here (PATH.<pid>) and replayed at the next start.
    usage_journal: Path | None = None
    # Workspace resolution: a header only when an operator names it (it must be set by a
    # component the gateway trusts), then what answers taught, then a lookup at the upstream.
    workspace_header: str | None = None
    workspace_lookup_pages: int = 5
    workspace_cache_ttl: float = 300.0
    quotas: Mapping[str, Budget] = field(default_factory=dict)
    quota_fail_closed: bool = False
    # Within this many tokens of a budget, an instance admits one request of the workspace at a
    # time, so a shared budget is overrun by at most one request per instance.
    quota_margin: int = 16_384
    model_encodings: Mapping[str, str] = field(default_factory=dict)
    log_format: str = "json"  # or "console"
    audit_file: Path | None = None  # violations as JSON lines, besides the log
    # Key of the violation fingerprints (HMAC-SHA256); random per process when not given, so
    # fingerprints then correlate events of one process only.
    audit_key: str | None = None
    alerts: AlertConfig = field(default_factory=AlertConfig)
    metrics_workspace_label: bool = False
    metrics_workspace_cap: int = 50
    # The model that judges ``judge`` rules (OpenAI-compatible chat completions); None: judge
    # checks get no verdict, and count as their on_error says (fallbacks_total{dependency="judge"}).
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = field(default=None, repr=False)  # GATEWAY_JUDGE_API_KEY or a file
    judge_api_key_file: Path | None = None
    judge_timeout: float = 10.0
    judge_max_concurrent: int = 8
    # A stream in scope of a block judge rule: sent as it comes and judged at its end (False), or
    # held whole until the verdict (True: the first word waits for the whole answer and the model).
    judge_stream_hold: bool = False
    watch_policies: bool = False  # reload when a policy file changes (polled every 2 s)
    # The platform's policies (``gateway policies pull``), pulled again every interval into
    # policies_pull_out and reloaded when they changed (gateway/policy_repull.py); None: never.
    platform_url: str | None = None
    platform_org: str | None = None
    platform_workspaces: tuple[str, ...] = ()
    platform_repos: tuple[str, ...] = ()
    platform_token: str | None = field(default=None, repr=False)  # GATEWAY_PLATFORM_TOKEN or a file
    platform_token_file: Path | None = None
    policies_pull_interval: float | None = None
    policies_pull_out: Path | None = None
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    workers: int = 1  # processes serving the same ports (SO_REUSEPORT)

    @property
    def upstream_url(self) -> URL:
        return URL(self.upstream)

    @property
    def field_paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple(parse_field_path(path) for path in self.response_fields)


ENV_PREFIX = "GATEWAY_"
T = TypeVar("T", int, float)


def _number(cast: Callable[[str], T], accept: Callable[[T], bool], rule: str) -> Callable[[object], T]:
    def parse(value: object) -> T:
        number = cast(str(value))
        if not accept(number):
            raise ValueError(rule)
        return number

    return parse


_positive_int = _number(int, lambda n: n > 0, "must be a positive integer")
_non_negative_int = _number(int, lambda n: n >= 0, "must be zero or more")
_port = _number(int, lambda n: 0 <= n <= 65535, "must be a port number 0-65535")
_positive_float = _number(float, lambda n: n > 0, "must be a positive number of seconds")


def _upstream(value: object) -> str:
    url = URL(str(value))
    if url.scheme not in {"http", "https"} or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return str(url).rstrip("/")


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be non-empty text")
    return value


def _platform_url(value: object) -> str | None:
    if value in (None, ""):
        return None
    url = _upstream(value)
    parsed = URL(url)
    # SECURITY: the URL is logged and written into the pulled file; the token travels apart.
    if parsed.user is not None or parsed.password is not None or parsed.query_string or parsed.fragment:
        raise ValueError("must hold no user, password, query or fragment (the token is given apart)")
    return url


def _ids(value: object) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError("must be a list of ids")
    return tuple(item.strip() for item in items if item.strip())


def _interval(value: object) -> float | None:
    """Seconds between pulls; none or 0: no pull."""
    if value in (None, ""):
        return None
    seconds = float(str(value))
    if not 0 <= seconds < float("inf"):
        raise ValueError("must be a number of seconds (0: never)")
    return seconds or None


def _paths(value: object) -> tuple[Path, ...]:
    items = value.split(os.pathsep) if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str | Path) for i in items):
        raise ValueError("must be a list of directories")
    return tuple(Path(item) for item in items if str(item))


def _optional_text(value: object) -> str | None:
    return None if value in (None, "") else _text(value)


def _optional_path(value: object) -> Path | None:
    return None if value in (None, "") else Path(str(value))


def _redis_url(value: object) -> str | None:
    if value in (None, ""):
        return None
    url = URL(str(value))
    schemes = {"redis", "rediss", "unix", "redis+cluster", "rediss+cluster"}
    if url.scheme not in schemes:
        raise ValueError(f"must be a Redis URL ({', '.join(sorted(schemes))})")
    return str(value)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _quotas(value: object) -> Mapping[str, Budget]:
    if not isinstance(value, dict):
        raise ValueError("must map workspace ids to {daily: N, monthly: N}")
    budgets: dict[str, Budget] = {}
    for workspace, limits in value.items():
        if not isinstance(limits, dict) or not limits or set(limits) - {"daily", "monthly"}:
            raise ValueError(f"workspace {workspace!r}: expected {{daily: N, monthly: N}}")
        budgets[str(workspace)] = Budget(**{period: _positive_int(limit) for period, limit in limits.items()})
    return MappingProxyType(budgets)


def _model_encodings(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ValueError("must map model name prefixes to o200k_base or cl100k_base")
    known = {"o200k_base", "cl100k_base"}
    bad = {str(k): v for k, v in value.items() if v not in known}
    if bad:
        raise ValueError(f"unknown encodings {bad} (known: {', '.join(sorted(known))})")
    return MappingProxyType({str(k): str(v) for k, v in value.items()})


def _log_format(value: object) -> str:
    if value not in {"json", "console"}:
        raise ValueError("must be json or console")
    return str(value)


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
    "admin_token": parse_secret,
    "admin_token_file": _optional_path,
    "admin_open": parse_admin_open,
    "origin_header": parse_origin_header,
    "origin_secret": parse_secret,
    "origin_secret_file": _optional_path,
    "policies": _paths,
    "body_limit": _positive_int,
    "response_limit": _positive_int,
    "connect_timeout": _positive_float,
    "read_timeout": _positive_float,
    "header_timeout": _positive_float,
    "max_connections": _positive_int,
    "response_fields": _fields,
    "stream_holdback": _non_negative_int,
    "redis_url": _redis_url,
    "redis_timeout": _positive_float,
    "usage_buffer": _positive_int,
    "usage_journal": lambda value: None if value in (None, "") else Path(str(value)),
    "workspace_header": _optional_text,
    "workspace_lookup_pages": _non_negative_int,
    "workspace_cache_ttl": _positive_float,
    "quotas": _quotas,
    "quota_fail_closed": _bool,
    "quota_margin": _non_negative_int,
    "model_encodings": _model_encodings,
    "log_format": _log_format,
    "audit_file": lambda value: None if value in (None, "") else Path(str(value)),
    "audit_key": _optional_text,
    "alerts": parse_alert_config,
    "metrics_workspace_label": _bool,
    "metrics_workspace_cap": _positive_int,
    "judge_url": lambda value: None if value in (None, "") else _upstream(value),
    "judge_model": _optional_text,
    "judge_api_key": parse_secret,
    "judge_api_key_file": _optional_path,
    "judge_timeout": _positive_float,
    "judge_max_concurrent": _positive_int,
    "judge_stream_hold": _bool,
    "watch_policies": _bool,
    "platform_url": _platform_url,
    "platform_org": _optional_text,
    "platform_workspaces": _ids,
    "platform_repos": _ids,
    "platform_token": parse_secret,
    "platform_token_file": _optional_path,
    "policies_pull_interval": _interval,
    "policies_pull_out": _optional_path,
    "shutdown_timeout": _positive_float,
    "workers": _positive_int,
}
# Settings whose values may hold a password, a token or a key.
CREDENTIAL_SETTINGS = frozenset(
    {
        "upstream",
        "redis_url",
        "audit_key",
        "alerts",
        "judge_url",
        "platform_url",
        *SECRET_FILES.keys(),
        *SECRET_FILES.values(),
    }
)
# Read from these variables too, as the ecosystem names them.
ENV_ALIASES = {"redis_url": "REDIS_URL"}
assert set(PARSERS) == {f.name for f in fields(Settings)}


def env_variables(name: str) -> tuple[str, ...]:
    """The variables a setting is read from, weakest first (``serve --help`` names them too)."""
    alias = ENV_ALIASES.get(name)
    return (*((alias,) if alias else ()), ENV_PREFIX + name.upper())


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
        for env_name in env_variables(name):
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
            # SECURITY: a URL or a header may carry a credential; such values are not echoed.
            shown = "" if name in CREDENTIAL_SETTINGS else f"{value!r} "
            errors.append(f"{origin}: {shown}{exc}")
    read_secret_files(values, {name: origin for name, (origin, _) in raw.items()}, errors)
    settings = Settings(**values) if not errors else Settings()
    if not errors and settings.port == settings.admin_port and settings.port != 0:
        errors.append(f"port and admin_port are both {settings.port}: the admin port must be its own")
    if not errors and settings.usage_journal is not None and settings.redis_url is None:
        errors.append("usage_journal needs redis_url: the in-memory store has nothing to journal")
    if not errors and settings.policies_pull_interval is not None:
        errors.extend(_pull_errors(settings, {name: origin for name, (origin, _) in raw.items()}))
    if errors:
        raise ConfigError(errors)
    return settings


def _pull_errors(settings: Settings, origins: Mapping[str, str]) -> list[str]:
    """A pull needs where to pull from and to, and a file the reload reads."""
    interval = origins["policies_pull_interval"]
    needed = {
        "platform_url": "--platform-url",
        "platform_org": "--platform-org",
        "platform_token": "GATEWAY_PLATFORM_TOKEN or --platform-token-file",
        "policies_pull_out": "--policies-pull-out",
    }
    errors = [
        f"{interval}: needs {name} ({given})"
        for name, given in needed.items()
        if getattr(settings, name) is None
    ]
    out = settings.policies_pull_out
    if out is not None and not _read_by(out, settings.policies):
        errors.append(
            f"{origins['policies_pull_out']}: {out} is not read by the policies "
            f"({', '.join(str(path) for path in settings.policies) or 'builtin'}): give a file listed "
            "in them, or a *.yaml file directly in a directory listed, so that the reload reads it"
        )
    return errors


def _read_by(out: Path, policies: tuple[Path, ...]) -> bool:
    """Whether loading ``policies`` reads ``out``, as the loader lists files (never the shipped pack)."""
    target = out.resolve()
    for given in policies:
        if str(given) == "builtin":
            continue
        path = given.resolve()
        if (target == path and not path.is_dir()) or (
            target.parent == path and target.suffix in {".yaml", ".yml"}
        ):
            return True
    return False


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
