"""The event loop: uvloop when it is installed (it is a dependency), asyncio's otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

try:
    import uvloop

    _run: Any = uvloop.run
except ImportError:  # pragma: no cover - declared, but not built for every platform
    _run = asyncio.run


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    _run(main)
