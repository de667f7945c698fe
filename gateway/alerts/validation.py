"""Checks shared by the sinks and the ``alerts:`` parser: positive numbers, http(s) URLs."""

from __future__ import annotations

import math
from typing import Any

from yarl import URL


def _positive(value: object, *, integer: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("must be a positive number")
    if integer and not isinstance(value, int):
        raise ValueError("must be a positive whole number")
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def _is_http_url(value: object) -> bool:
    try:
        _http_url(value)
    except ValueError:
        return False
    return True


def _http_url(value: object) -> URL:
    if not isinstance(value, str | URL):
        raise ValueError("must be an http:// or https:// URL")
    url = URL(value) if isinstance(value, str) else value
    if url.scheme not in {"http", "https"} or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return url


def _url_problem(value: object) -> str:
    # SECURITY: a webhook URL may carry its token: say what is wrong without echoing it.
    if not isinstance(value, str):
        return f"must be an http:// or https:// URL, not {type(value).__name__}"
    try:
        scheme = URL(value).scheme
    except ValueError:
        return "is not a URL"
    return f"must be an http:// or https:// URL with a host (scheme {scheme!r})"
