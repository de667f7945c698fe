"""The event loop: uvloop when it is installed (it is a dependency), asyncio's otherwise.

Before serving, the heap built at start-up (modules, the compiled rule set, settings) is moved
out of the cyclic garbage collector's sight with ``gc.freeze()``, and young collections are made
less frequent. Measured under load (bench/http_load.py), the collector's full passes over that
heap took about 25 ms each, a stall for every request in flight, and all collections together
about 5% of the process's time; reference counting frees a request's objects either way.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any

from gateway.heap import release_free_heap

try:
    import uvloop

    _run: Any = uvloop.run
except ImportError:  # pragma: no cover - declared, but not built for every platform
    _run = asyncio.run

# Young-generation threshold (CPython's default is 700 allocations): a request allocates a few
# thousand objects, nearly all freed by reference counting before any collection sees them.
YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Collect once, freeze what survives start-up, and space out young collections; hand the
    heap that start-up left free (compiling the rule set) back to the system."""
    gc.collect()
    gc.freeze()
    release_free_heap()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    settle_heap()
    _run(main)
