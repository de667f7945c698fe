import asyncio

from gateway.batches import AfterAnswers


async def test_items_are_handled_together_on_the_next_turn_then_done_once() -> None:
    handled: list[int] = []
    batches: list[int] = []
    after = AfterAnswers(handled.append, lambda: batches.append(len(handled)))
    for number in range(3):
        after.add(number)
    assert handled == []
    await asyncio.sleep(0)
    assert handled == [0, 1, 2]
    assert batches == [3]


async def test_a_failing_item_costs_only_itself() -> None:
    handled: list[int] = []

    def handle(number: int) -> None:
        if number == 1:
            raise ValueError("bug")
        handled.append(number)

    after = AfterAnswers(handle)
    for number in range(3):
        after.add(number)
    await asyncio.sleep(0)
    assert handled == [0, 2]


async def test_flush_handles_what_is_pending_at_once_and_only_once() -> None:
    handled: list[int] = []
    after = AfterAnswers(handled.append)
    after.add(1)
    after.flush()
    assert handled == [1]
    await asyncio.sleep(0)
    assert handled == [1]
    after.add(2)
    await asyncio.sleep(0)
    assert handled == [1, 2]
