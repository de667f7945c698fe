"""Secrets the gateway is handed: the admin port's token and the origin secret it adds upstream.

Each comes from a variable (``GATEWAY_ADMIN_TOKEN``, ``GATEWAY_ORIGIN_SECRET``) or a file
(``admin_token_file``, ``origin_secret_file``: what a Kubernetes Secret volume mounts). No
message here ever holds a secret, nor the path it was read from (a token pasted where its path
belongs would be shown otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Long enough that guessing over the network is hopeless; `openssl rand -hex 32` gives 64.
MIN_SECRET_LENGTH = 16
# Each secret setting and the setting naming its file; load_settings reads the file into the first.
SECRET_FILES = {
    "admin_token": "admin_token_file",
    "origin_secret": "origin_secret_file",
    "judge_api_key": "judge_api_key_file",
    "platform_token": "platform_token_file",
}

# Headers the gateway itself sets or drops on the way upstream (proxy.upstream_headers), and the
# hop-by-hop ones: none of them can carry the origin secret.
_RESERVED_HEADERS = frozenset(
    {
        "host", "authorization", "cookie", "content-length", "content-type", "content-encoding",
        "accept-encoding", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
_TOKEN_CHARACTERS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_secret(value: object) -> str:
    """One word of visible ASCII, surrounding whitespace (a file's newline) dropped."""
    if not isinstance(value, str):
        raise ValueError("must be text")
    secret = value.strip()
    if not secret:
        raise ValueError("is empty")
    if not all("!" <= char <= "~" for char in secret):
        raise ValueError("must be one word of visible ASCII characters")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters (openssl rand -hex 32)")
    return secret


def read_secret_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError("must be one word of visible ASCII characters") from None
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror or type(exc).__name__})") from None
    return parse_secret(text)


def read_secret_files(values: dict[str, Any], origins: Mapping[str, str], errors: list[str]) -> None:
    """Each secret given as a file takes the file's content; one given both ways is refused."""
    for secret, file_setting in SECRET_FILES.items():
        path = values.get(file_setting)
        if path is None:
            continue
        if secret in origins:
            errors.append(
                f"{secret} and {file_setting} are both given "
                f"({origins[secret]}, {origins[file_setting]}): give one"
            )
            continue
        try:
            values[secret] = read_secret_file(path)
        except ValueError as exc:
            errors.append(f"{origins[file_setting]}: {exc}")


def parse_origin_header(value: object) -> str:
    if not isinstance(value, str) or not value or not set(value) <= _TOKEN_CHARACTERS:
        raise ValueError("must be an HTTP header name")
    if value.lower() in _RESERVED_HEADERS:
        raise ValueError("is a header the gateway sets or drops itself: choose another name")
    return value
