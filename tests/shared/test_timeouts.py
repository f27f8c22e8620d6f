"""Watchdog budgets behave like asyncio.timeout(), with one timer for all of them."""

from __future__ import annotations

import asyncio

import pytest

from mxward.shared.timeouts import Watchdog


async def test_a_block_over_its_budget_raises_timeout_error() -> None:
    dog = Watchdog(resolution=0.001)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with dog.budget(0.05):
            await asyncio.sleep(5)
    assert 0.04 <= loop.time() - started < 0.5
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)  # no cancellation is left pending for the task


async def test_a_block_in_time_is_untouched_and_leaves_nothing_behind() -> None:
    dog = Watchdog(resolution=0.001)
    for _ in range(100):
        async with dog.budget(0.05):
            await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # the timer fires once and finds only finished budgets
    assert dog.pending == 0


async def test_an_outside_cancellation_passes_through_as_cancelled_error() -> None:
    dog = Watchdog()

    async def guarded() -> None:
        async with dog.budget(10):
            await asyncio.sleep(10)

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_concurrent_budgets_expire_independently() -> None:
    dog = Watchdog(resolution=0.001)

    async def sleeper(budget: float, sleep: float) -> str:
        try:
            async with dog.budget(budget):
                await asyncio.sleep(sleep)
        except TimeoutError:
            return "timeout"
        return "done"

    results = await asyncio.gather(
        sleeper(0.02, 1.0), sleeper(1.0, 0.01), sleeper(0.05, 0.2), sleeper(0.5, 0.06)
    )
    assert results == ["timeout", "done", "timeout", "done"]


async def test_nested_with_asyncio_timeout_the_outer_one_wins() -> None:
    """Our budget inside an asyncio.timeout: the outer expiry stays the outer's."""
    dog = Watchdog(resolution=0.001)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            try:
                async with dog.budget(5):
                    await asyncio.sleep(1)
            except TimeoutError:  # pragma: no cover - would mean our budget claimed it
                pytest.fail("the inner budget claimed the outer timeout")


async def test_budgets_of_many_lengths_all_expire_in_time() -> None:
    """More distinct lengths than FIFO queues: the rest go to the heap and still expire."""
    dog = Watchdog(resolution=0.001)

    async def sleeper(budget: float) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            async with dog.budget(budget):
                await asyncio.sleep(5)
        return loop.time() - started - budget

    lateness = await asyncio.gather(*(sleeper(0.02 + n * 0.002) for n in range(40)))
    assert all(-0.001 <= late < 0.2 for late in lateness), lateness
    await asyncio.sleep(0.05)
    assert dog.pending == 0


async def test_lengths_within_the_resolution_share_one_queue() -> None:
    """What is left of a check's budget differs a little on every request: one FIFO queue still."""
    dog = Watchdog(resolution=0.01)
    # Remaining budgets that shrink a little while the loop's clock stands still: the ends are
    # not in the order of entry, but within the resolution.
    budgets = [dog.budget(2.0 - n * 1e-5).enter() for n in range(200)]
    assert dog.pending == 200
    assert len(dog._queues) == 1 and not dog._heap
    for budget in budgets:
        assert not budget.leave()
