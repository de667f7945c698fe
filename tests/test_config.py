"""Settings: precedence of flags, environment and file, and every error reported at once."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, Settings, env_variables, load_settings
from gateway.settings_help import FILE_ONLY, shown_default


def test_defaults() -> None:
    settings = load_settings({}, {}, None)
    assert settings == Settings()
    assert (settings.host, settings.port, settings.admin_port) == ("127.0.0.1", 8080, 9090)
    assert settings.upstream == "https://backend.flashback.tech"


def test_flags_beat_environment_which_beats_the_file(tmp_path: Path) -> None:
    """The same setting from three sources: the flag wins, then the variable, then the file."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "upstream: http://from-file:1\nport: 7001\nadmin_port: 7002\nread_timeout: 9\n"
        "response_fields: [message, data.text]\npolicies: [a, b]\n"
    )
    settings = load_settings(
        {"port": 7101, "upstream": None},
        {"GATEWAY_PORT": "7201", "GATEWAY_UPSTREAM": "http://from-env:2/"},
        config,
    )
    assert settings.port == 7101
    assert settings.upstream == "http://from-env:2"
    assert settings.admin_port == 7002
    assert settings.read_timeout == 9.0
    assert settings.response_fields == ("message", "data.text")
    assert settings.field_paths == (("message",), ("data", "text"))
    assert settings.policies == (Path("a"), Path("b"))


def test_every_invalid_setting_is_reported(tmp_path: Path) -> None:
    """Bad values from every source, and unknown file keys, are all listed in one error."""
    config = tmp_path / "gateway.yaml"
    config.write_text("colour: red\nbody_limit: -1\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(
            {"port": 70000, "upstream": "ftp://x"},
            {"GATEWAY_READ_TIMEOUT": "soon", "GATEWAY_RESPONSE_FIELDS": "a..b"},
            config,
        )
    errors = "\n".join(raised.value.errors)
    assert len(raised.value.errors) == 6
    for fragment in (
        "unknown setting 'colour'",
        "body_limit: -1 must be a positive integer",
        "--port: 70000 must be a port number",
        "--upstream: must be an http:// or https:// URL",
        "GATEWAY_READ_TIMEOUT: 'soon'",
        "GATEWAY_RESPONSE_FIELDS: 'a..b' bad response field path",
    ):
        assert fragment in errors


def test_the_admin_port_must_differ_from_the_public_port() -> None:
    with pytest.raises(ConfigError, match="admin port must be its own"):
        load_settings({"port": 8000, "admin_port": 8000}, {}, None)


def test_an_unreadable_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings({}, {}, tmp_path / "absent.yaml")


def test_settings_that_may_hold_credentials_are_not_echoed_in_errors(tmp_path: Path) -> None:
    """A bad Redis URL or alerts block is reported without repeating its password or token."""
    config = tmp_path / "gateway.yaml"
    config.write_text("alerts:\n  sinks:\n    - {type: pager, url: 'https://hooks.example/T0KEN-123'}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings({"redis_url": "http://:hunter2-secret@redis:6379"}, {}, config)
    errors = "\n".join(raised.value.errors)
    assert "--redis-url: must be a Redis URL" in errors
    assert "alerts" in errors
    assert "hunter2-secret" not in errors
    assert "T0KEN-123" not in errors


def _serve_help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The lines of `gateway serve --help`, as wide as a terminal often is."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out.splitlines()


def _entry(lines: list[str], name: str) -> str:
    """The one entry of the help that describes setting ``name``, its lines joined by spaces."""
    entries: list[str] = []
    for line in lines:
        if line.startswith(" " * 24) and entries:
            entries[-1] += " " + line.strip()
        else:
            entries.append(line)
    if name in FILE_ONLY:
        pattern = rf"^  {name} +\S"
    else:
        pattern = r"\b" + " or ".join(reversed(env_variables(name))) + r"\b"
    (entry,) = [entry for entry in entries if re.search(pattern, entry)]
    return entry


@pytest.mark.parametrize("name", [f.name for f in fields(Settings)])
def test_serve_help_names_every_setting_with_its_variable_and_default(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every setting, flag or not, has a line naming its variable (or its config key) and its default."""
    entry = _entry(_serve_help(capsys, monkeypatch), name)
    assert re.search(r"default \S", entry), entry


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        pytest.param("port", "(env GATEWAY_PORT, default 8080)", id="a flag names its variable and default"),
        pytest.param("admin_port", "(env GATEWAY_ADMIN_PORT, default 9090)", id="the admin port"),
        pytest.param("policies", "(env GATEWAY_POLICIES, default builtin)", id="no policies: the pack"),
        pytest.param("read_timeout", "default 300)", id="seconds as written"),
        pytest.param("admin_open", "default healthz, readyz, metrics)", id="a list as the variable takes it"),
        pytest.param("quota_fail_closed", "default false)", id="a switch"),
        pytest.param("redis_url", "(env GATEWAY_REDIS_URL or REDIS_URL, default none)", id="an alias"),
        pytest.param("admin_token", "  GATEWAY_ADMIN_TOKEN ", id="a secret without a flag"),
        pytest.param("origin_secret", "  GATEWAY_ORIGIN_SECRET ", id="the origin secret"),
        pytest.param("quotas", "  quotas ", id="a mapping by its config key"),
    ],
)
def test_serve_help_shows(
    name: str, shown: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _entry(_serve_help(capsys, monkeypatch), name)
    assert shown in entry, entry


def test_mappings_are_listed_as_keys_of_the_config_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quotas, alerts and model encodings are written in the config file: help lists them there."""
    lines = _serve_help(capsys, monkeypatch)
    header = lines.index("settings of the --config file only:")
    keys = [line.split()[0] for line in lines[header + 1 :] if re.match(r"  \S", line)]
    assert sorted(keys) == sorted(FILE_ONLY)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (f.name, shown)
        for f in fields(Settings)
        if (shown := shown_default(f.name, getattr(Settings(), f.name))) not in {"none", "builtin"}
    ],
)
def test_the_default_shown_is_what_its_variable_would_set(name: str, shown: str) -> None:
    """Writing the shown default into the variable changes nothing: help and reading agree."""
    (variable, *_) = reversed(env_variables(name))
    assert getattr(load_settings({}, {variable: shown}, None), name) == getattr(Settings(), name)


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        pytest.param("admin_token", "c4nary-c4nary-c4nary", "hidden", id="a token"),
        pytest.param("origin_secret", "c4nary-c4nary-c4nary", "hidden", id="the origin secret"),
        pytest.param("audit_key", "c4nary", "hidden", id="the audit key"),
        pytest.param("upstream", "https://user:pw@backend.example", "hidden", id="a URL with a password"),
        pytest.param("upstream", "https://backend.example/?token=c4nary", "hidden", id="a URL with a query"),
        pytest.param("redis_url", "redis://:pw@redis:6379", "hidden", id="a Redis URL with a password"),
        pytest.param("admin_token", None, "none", id="no token"),
        pytest.param("upstream", "https://backend.example", "https://backend.example", id="a plain URL"),
        pytest.param("port", 8080, "8080", id="must show: a number"),
    ],
)
def test_a_default_that_may_hold_a_secret_is_never_shown(name: str, value: object, shown: str) -> None:
    assert shown_default(name, value) == shown


def test_serve_help_shows_the_defaults_never_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Help is the same whatever the variables hold: a secret set in them never reaches it."""
    for variable in ("GATEWAY_ADMIN_TOKEN", "GATEWAY_ORIGIN_SECRET", "GATEWAY_AUDIT_KEY", "REDIS_URL"):
        monkeypatch.setenv(variable, "c4nary-c4nary-c4nary")
    monkeypatch.setenv("GATEWAY_UPSTREAM", "https://user:c4nary@backend.example")
    assert "c4nary" not in "\n".join(_serve_help(capsys, monkeypatch))
