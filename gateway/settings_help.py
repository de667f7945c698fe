"""What ``gateway serve --help`` says of every setting: its words, its variable and its default.

Only the words are written here. The variables and the defaults come from gateway.config (the
names ``load_settings`` reads, the defaults of ``Settings``), so help cannot drift from what is
read; a setting without words fails tests/test_config.py.
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Mapping
from dataclasses import fields

from yarl import URL

from gateway.alerts import AlertConfig
from gateway.config import CREDENTIAL_SETTINGS, Settings, env_variables

# Mappings: only the config file can write them (a variable is one line of text).
FILE_ONLY = frozenset({"quotas", "model_encodings", "alerts"})

WORDS: Mapping[str, str] = {
    "upstream": "backend base URL",
    "host": "public address",
    "port": "public port",
    "admin_host": "admin address",
    "admin_port": "admin port: /healthz, /readyz, /metrics, /usage, /-/reload",
    "admin_token": "the admin port's bearer token; none: the admin port answers anyone who reaches it",
    "admin_token_file": "file holding the admin port's bearer token, read again when it changes",
    "admin_open": "admin endpoints served without the token, comma-separated",
    "origin_header": "header carrying the origin secret upstream",
    "origin_secret": "secret added to every upstream request, so the backend can refuse what went around",
    "origin_secret_file": "file holding the origin secret",
    "policies": "policy directory or file, repeatable; 'builtin' names the shipped pack",
    "body_limit": "bytes of a prompt request",
    "response_limit": "bytes of an answer held to inspect",
    "connect_timeout": "seconds to connect upstream",
    "read_timeout": "seconds between upstream bytes",
    "header_timeout": "seconds a client has to send a request head",
    "max_connections": "open client connections per worker; more get 503",
    "response_fields": "JSON field of an answer to evaluate, repeatable, e.g. choices[].message.content",
    "stream_holdback": "most characters a stream is held back",
    "judge_url": "OpenAI-compatible endpoint judging judge rules (its /chat/completions); none: no judge",
    "judge_model": "model the judge endpoint runs",
    "judge_api_key": "API key of the judge endpoint",
    "judge_api_key_file": "file holding the judge endpoint's API key",
    "judge_timeout": "seconds a judge call may take, retries included",
    "judge_max_concurrent": "judge calls at once per worker; more wait",
    "judge_stream_hold": "hold a stream a block judge rule covers until the verdict on all of it",
    "redis_url": "count usage in Redis; none: in process memory",
    "redis_timeout": "seconds a Redis call may take",
    "usage_buffer": "usage records held while Redis is down",
    "usage_journal": "keep usage not yet written to Redis at stop in PATH.<pid>, replayed at start",
    "workspace_header": "trusted header naming the workspace; none: no header is trusted",
    "workspace_lookup_pages": "pages of GET /conversation a workspace lookup reads",
    "workspace_cache_ttl": "seconds a workspace lookup that found nothing is remembered",
    "quotas": "token budgets per workspace: {WORKSPACE: {daily: N, monthly: N}}",
    "quota_fail_closed": "refuse budgeted workspaces while Redis is down",
    "quota_margin": "within this many tokens of a budget, one request of the workspace at a time",
    "model_encodings": "tokenizer by model name prefix: {PREFIX: o200k_base | cl100k_base}",
    "log_format": "log lines: json or console",
    "audit_file": "also append violations to this JSON-lines file",
    "audit_key": "key of violation fingerprints (HMAC-SHA256); none: random per process",
    "alerts": "alert sinks: {sinks: [{type, url, ...}], window, on_block, retries, timeout}",
    "metrics_workspace_label": "label metrics by workspace",
    "metrics_workspace_cap": "workspaces labelled by name; the rest are 'other'",
    "watch_policies": "reload when a policy file changes",
    "platform_url": "the platform API's base URL, whose GET /policy the pull reads",
    "platform_org": "the org whose policies to pull",
    "platform_workspaces": "also pull a workspace's policies, repeatable",
    "platform_repos": "also pull a repo's policies, repeatable",
    "platform_token": "the platform's bearer token for the pull",
    "platform_token_file": "file holding the platform's bearer token",
    "policies_pull_interval": "seconds between pulls of the platform's policies; none or 0: no pull",
    "policies_pull_out": "policy file the pull writes; must be read by --policies",
    "shutdown_timeout": "seconds to finish requests on SIGTERM",
    "workers": "processes serving the same ports",
}
# A setting whose empty value means something other than "none".
_EMPTY_MEANS = {"policies": "builtin"}
_DEFAULTS = Settings()


def shown_default(name: str, value: object) -> str:
    """The default as its variable would take it; a value that may hold a secret is "hidden"."""
    if value in (None, (), "") or value == AlertConfig() or (isinstance(value, Mapping) and not value):
        return _EMPTY_MEANS.get(name, "none")
    # SECURITY: only a URL with no user, password or query can be a credential's shown default.
    if name in CREDENTIAL_SETTINGS and not (isinstance(value, str) and _plain_url(value)):
        return "hidden"
    match value:
        case bool():
            return str(value).lower()
        case float():
            return f"{value:g}"
        case tuple():
            # Spaced so a long list wraps between items; the variables strip them.
            return ", ".join(str(item) for item in value)
        case _:
            return str(value)


def _plain_url(text: str) -> bool:
    url = URL(text)
    return bool(url.scheme and url.host) and not (url.user or url.password or url.query_string)


def flag_help(name: str) -> str:
    """A setting's words, with its variables (strongest first) and its default."""
    variables = " or ".join(reversed(env_variables(name)))
    return f"{WORDS[name]} (env {variables}, default {_default(name)})"


def _default(name: str) -> str:
    return shown_default(name, getattr(_DEFAULTS, name))


def settings_epilog(flagged: Collection[str], width: int) -> str:
    """The settings that have no flag, by variable, then the config file's mappings."""
    unflagged = [f.name for f in fields(Settings) if f.name not in flagged]
    lines = textwrap.wrap(
        "Every setting is also read from its variable, and from the --config YAML file under "
        "its own name (e.g. admin_port: 9091); flags win over variables, variables over the file.",
        width,
    )
    lines += ["", "settings without a flag:"]
    for name in unflagged:
        if name not in FILE_ONLY:
            variables = " or ".join(reversed(env_variables(name)))
            lines += _entry(variables, f"{WORDS[name]} (default {_default(name)})", width)
    lines += ["", "settings of the --config file only:"]
    for name in unflagged:
        if name in FILE_ONLY:
            lines += _entry(name, f"{WORDS[name]} (default {_default(name)})", width)
    return "\n".join(lines)


# Where argparse starts an option's help, so both lists read as one.
_HELP_COLUMN = 24


def _entry(head: str, text: str, width: int) -> list[str]:
    lines = textwrap.wrap(text, max(width - _HELP_COLUMN, 20))
    if len(head) + 4 <= _HELP_COLUMN:
        first, rest = [f"  {head:<{_HELP_COLUMN - 2}}{lines[0]}"], lines[1:]
    else:
        first, rest = [f"  {head}"], lines
    return first + [" " * _HELP_COLUMN + line for line in rest]


assert set(WORDS) == {f.name for f in fields(Settings)}, "every setting needs its words in WORDS"
