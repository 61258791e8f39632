"""Run a block of Python code with the calling thread inside a named network namespace.

Sockets keep the namespace they were created in, so a client made inside the block (the
official kubernetes client, a websocket) goes on working after the block ends. Only the calling
thread moves: ``setns(2)`` is per thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Move the calling thread into ``/run/netns/<name>`` for the duration of the block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
