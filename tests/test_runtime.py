import gc

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
