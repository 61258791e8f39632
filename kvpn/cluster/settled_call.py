"""A cluster write that, once sent, is seen through even when its caller is cancelled.

``await asyncio.to_thread(core.create_namespaced_pod, ...)`` cancelled by Ctrl-C returns at
once, but the request goes on in its thread: the pod can appear *after* the undo that deletes
it has found nothing to delete (an orphan until ``kvpn clean``), a selector patch can land
after the undo that restores the selector found nothing to restore. :func:`call_settled`
waits, on cancellation, until the request has finished (bounded by ``settle_s``; the client's
own timeout bounds it too) and then lets the cancellation through, so the undo sees what the
request did. Creates and patches go through it; reads and deletes need not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["SETTLE_S", "call_settled"]

SETTLE_S = 30.0  # longest wait for a cancelled write to finish

T = TypeVar("T")


async def call_settled(
    fn: Callable[..., T], *args: Any, settle_s: float = SETTLE_S, **kwargs: Any
) -> T:
    """``await asyncio.to_thread(fn, *args, **kwargs)``; cancelled, wait for *fn* to finish
    (at most *settle_s*) before the cancellation goes on."""
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(call), settle_s)
        if call.done() and not call.cancelled():
            call.exception()  # retrieved: no "exception was never retrieved" warning
        raise
