"""Run Python code with the calling thread inside a named network namespace.

``setns(2)`` moves only the calling thread; threads it starts afterwards inherit its namespace.
Sockets keep the namespace they were created in - but note that clients which connect lazily
(urllib3 pools, as used by the official kubernetes client) open their sockets at the first
request, so such a client must also be *used* inside the namespace, not just created there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter_netns(name: str) -> Callable[[], None]:
    """Move the calling thread into ``/run/netns/<name>``; return a function that moves it back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
    except BaseException:
        os.close(own)
        raise

    def restore() -> None:
        try:
            _setns(own)
        finally:
            os.close(own)

    return restore


@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Move the calling thread into ``/run/netns/<name>`` for the duration of the block."""
    restore = enter_netns(name)
    try:
        yield
    finally:
        restore()
