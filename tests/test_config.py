"""Settings: precedence of flags, environment and file, and every error reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings, load_settings


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
