"""JSON on the request path: orjson for speed, the standard library where orjson refuses.

orjson rejects lone surrogates, which JSON allows (``"\\ud800"``); such a body is parsed by
the standard library instead, so the gateway's behaviour does not depend on which one ran.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    """Parse JSON; raise ``ValueError`` (as ``json`` does) when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            return json.loads(data)
        except RecursionError:
            # SECURITY: nesting deep enough to exhaust the stack is refused as not JSON.
            raise ValueError("JSON nested too deeply") from None


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()
