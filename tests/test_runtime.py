import ctypes
import gc
from pathlib import Path

import pytest

from gateway.heap import release_free_heap
from gateway.runtime import YOUNG_THRESHOLD, settle_heap


def test_settle_heap_freezes_what_start_up_built_and_spaces_out_young_collections() -> None:
    before = gc.get_threshold()
    survivor = [object() for _ in range(10)]
    try:
        settle_heap()
        assert gc.get_freeze_count() > len(survivor)
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_free_heap_goes_back_to_the_system() -> None:
    """What loading freed (here 40 MB of small malloc blocks) leaves the resident set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        pytest.skip("not glibc: nothing to trim")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(1024) for _ in range(40_000)]
    fence = libc.malloc(1024)  # above the freed blocks: free() alone cannot shrink the heap
    for block in blocks:
        ctypes.memset(block, 1, 1024)
    for block in blocks:
        libc.free(block)
    before = _rss_kb()
    assert release_free_heap()
    assert _rss_kb() < before - 20_000
    libc.free(fence)
