"""The benchmark's TCP server, run as a pod in the sandbox cluster.

Every connection starts with a 9-byte header: one operation byte and a big-endian 64-bit
argument. Operations (dispatched by table):

* ``U`` (upload sink): read until EOF, then answer the number of bytes read (8 bytes) and close.
* ``D`` (download source): send zeros for ``arg`` milliseconds, then close.
* ``E`` (echo): send back everything read, until EOF.
* ``W`` (who am I): answer the peer address this server sees, as text, and close - so the
  benchmark can prove which path a connection really took (laptop, sshd pod or shadow pod).

A connection that closes before a full header (a readiness probe, a port check) is just
closed. One thread per connection, with small stacks: blocking ``recv_into``/``sendall``
release the GIL, which is the fastest plain-Python way to move bulk data.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable

HEADER = struct.Struct(">cQ")
CHUNK = 256 * 1024
THREAD_STACK = 256 * 1024
BACKLOG = 4096
IDLE_TIMEOUT_S = 120.0

OP_UPLOAD = b"U"
OP_DOWNLOAD = b"D"
OP_ECHO = b"E"
OP_WHOAMI = b"W"


def header(op: bytes, arg: int = 0) -> bytes:
    """The 9 bytes a client sends first."""
    return HEADER.pack(op, arg)


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _upload(conn: socket.socket, _arg: int) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while n := conn.recv_into(view):
        total += n
    conn.sendall(struct.pack(">Q", total))


def _download(conn: socket.socket, arg: int) -> None:
    data = bytes(CHUNK)
    deadline = time.monotonic() + arg / 1000.0
    while time.monotonic() < deadline:
        conn.sendall(data)


def _echo(conn: socket.socket, _arg: int) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _whoami(conn: socket.socket, _arg: int) -> None:
    conn.sendall(str(conn.getpeername()[0]).encode())


HANDLERS: dict[bytes, Callable[[socket.socket, int], None]] = {
    OP_UPLOAD: _upload,
    OP_DOWNLOAD: _download,
    OP_ECHO: _echo,
    OP_WHOAMI: _whoami,
}


def handle(conn: socket.socket) -> None:
    """Serve one connection; any socket error just ends it."""
    with conn, contextlib.suppress(OSError):
        conn.settimeout(IDLE_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw = _recv_exactly(conn, HEADER.size)
        if raw is None:
            return
        op, arg = HEADER.unpack(raw)
        handler = HANDLERS.get(op)
        if handler is not None:
            handler(conn, arg)


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (1000 concurrent connections need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def serve_forever(listener: socket.socket) -> None:
    """Accept connections and serve each in a thread, until the listener is closed."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def serve(port: int) -> None:
    raise_fd_limit()
    threading.stack_size(THREAD_STACK)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(BACKLOG)
    print(f"bench server listening on port {port}", flush=True)
    serve_forever(listener)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5201)
    serve(parser.parse_args().port)


if __name__ == "__main__":
    main()
