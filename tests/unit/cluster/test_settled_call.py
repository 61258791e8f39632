"""kvpn.cluster.settled_call: a cancelled cluster write is seen through before the cancel goes on."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kvpn.cluster.settled_call import call_settled


async def test_a_cancelled_create_finishes_before_the_cancel_goes_on() -> None:
    created = threading.Event()

    def slow_create(name: str) -> str:
        time.sleep(0.3)  # the request is on its way
        created.set()
        return name

    task = asyncio.ensure_future(call_settled(slow_create, "pod"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert created.is_set()  # an undo that runs now finds the pod


async def test_the_wait_after_a_cancel_is_bounded() -> None:
    release = threading.Event()

    def stuck_create() -> None:
        release.wait(5)

    task = asyncio.ensure_future(call_settled(stuck_create, settle_s=0.2))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2
    release.set()


async def test_results_and_errors_pass_through() -> None:
    assert await call_settled(lambda a, b=0: a + b, 1, b=2) == 3

    def failing() -> None:
        raise ValueError("409 Conflict")

    with pytest.raises(ValueError, match="409"):
        await call_settled(failing)


async def test_an_error_of_a_cancelled_create_is_not_left_unretrieved() -> None:
    def failing_late() -> None:
        time.sleep(0.2)
        raise ValueError("late")

    task = asyncio.ensure_future(call_settled(failing_late))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
