"""Network namespaces for root tests: named ``kvpnt-...``, always removed, entered per thread.

``setns(2)`` switches only the calling thread, so a test runs its scenario in a worker
thread that enters the namespace and leaves pytest's own thread where it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def have_root_netns() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun") and _which("ip")


def _which(cmd: str) -> bool:
    return any(
        os.access(os.path.join(p, cmd), os.X_OK) for p in os.environ.get("PATH", "").split(":")
    )


requires_root = pytest.mark.skipif(
    not have_root_netns(), reason="needs root, ip(8) and /dev/net/tun"
)


def ip(*args: str, netns: str | None = None) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def netns(tag: str) -> Iterator[str]:
    name = f"kvpnt-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip("link", "set", "lo", "up", netns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into netns *name* and back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def socket_in(name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that lives in netns *name* (creation fixes a socket's namespace)."""
    with entered(name):
        return socket.socket(family, kind, proto)


def run_in(name: str, fn: Callable[[], T], timeout: float = 60.0) -> T:
    """Run *fn* in a new thread inside netns *name*; return its result or raise its error."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            with entered(name):
                result.append(fn())
        except BaseException as exc:  # handed to the test thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"scenario in {name} did not finish in {timeout} s")
    if error:
        raise error[0]
    return result[0]
