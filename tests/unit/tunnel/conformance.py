"""One reusable two-way byte-stream suite (after trio.testing.check_two_way_stream).

A *stream pair factory* is an async context manager yielding two connected
:class:`StreamEnd` objects. Every stream kvpn moves bytes over (plain TCP, the API server
port-forward, an SSH direct-tcpip channel, later the userspace TCP flows) runs the same
checks; streams that support half-close also run :data:`HALF_CLOSE_CHECKS`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

STEP_TIMEOUT = 30.0


class _Reader(Protocol):
    async def read(self, n: int = -1) -> Any: ...


class _Writer(Protocol):
    def write(self, data: Any) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class StreamEnd:
    name: str
    send: Callable[[bytes], Awaitable[None]]
    recv: Callable[[], Awaitable[bytes]]  # some bytes, b"" at EOF
    send_eof: Callable[[], Awaitable[None]]
    close: Callable[[], Awaitable[None]]

    @classmethod
    def from_streams(cls, name: str, reader: _Reader, writer: _Writer) -> StreamEnd:
        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def recv() -> bytes:
            return bytes(await reader.read(65536))

        async def send_eof() -> None:
            writer.write_eof()

        async def close() -> None:
            writer.close()

        return cls(name, send, recv, send_eof, close)


StreamPairFactory = Callable[[], AbstractAsyncContextManager[tuple[StreamEnd, StreamEnd]]]


async def recv_exactly(end: StreamEnd, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await asyncio.wait_for(end.recv(), STEP_TIMEOUT)
        if not chunk:
            raise AssertionError(f"{end.name}: EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def recv_until_eof(end: StreamEnd) -> bytes:
    buf = bytearray()
    while chunk := await asyncio.wait_for(end.recv(), STEP_TIMEOUT):
        buf += chunk
    return bytes(buf)


async def check_small_messages_both_ways(make_pair: StreamPairFactory) -> None:
    async with make_pair() as (a, b):
        await a.send(b"ping")
        assert await recv_exactly(b, 4) == b"ping"
        await b.send(b"pong!")
        assert await recv_exactly(a, 5) == b"pong!"


async def check_bulk_both_ways_concurrently(make_pair: StreamPairFactory) -> None:
    size = 1 << 20
    up, down = os.urandom(size), os.urandom(size)

    async def send_in_chunks(end: StreamEnd, data: bytes) -> None:
        for i in range(0, len(data), 50_000):
            await end.send(data[i : i + 50_000])

    async with make_pair() as (a, b):
        _, _, got_b, got_a = await asyncio.gather(
            send_in_chunks(a, up),
            send_in_chunks(b, down),
            recv_exactly(b, size),
            recv_exactly(a, size),
        )
        assert hashlib.sha256(got_b).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_a).digest() == hashlib.sha256(down).digest()


async def check_many_small_writes_keep_order(make_pair: StreamPairFactory) -> None:
    pieces = [i.to_bytes(2, "big") for i in range(2000)]
    async with make_pair() as (a, b):
        for piece in pieces:
            await a.send(piece)
        assert await recv_exactly(b, 2 * len(pieces)) == b"".join(pieces)


async def check_close_gives_peer_eof(make_pair: StreamPairFactory) -> None:
    async with make_pair() as (a, b):
        await a.send(b"last words")
        await a.close()
        assert await recv_until_eof(b) == b"last words"


async def check_peer_close_gives_eof(make_pair: StreamPairFactory) -> None:
    async with make_pair() as (a, b):
        await b.send(b"bye")
        await b.close()
        assert await recv_until_eof(a) == b"bye"


async def check_half_close_each_way(make_pair: StreamPairFactory) -> None:
    async with make_pair() as (a, b):
        await a.send(b"request")
        await a.send_eof()
        assert await recv_until_eof(b) == b"request"
        # b can still talk after a's EOF
        await b.send(b"response")
        await b.send_eof()
        assert await recv_until_eof(a) == b"response"


async def check_half_close_with_bulk_reply(make_pair: StreamPairFactory) -> None:
    reply = os.urandom(300_000)
    async with make_pair() as (a, b):
        await a.send_eof()
        assert await recv_until_eof(b) == b""
        await b.send(reply)
        await b.send_eof()
        assert await recv_until_eof(a) == reply


CHECKS = [
    check_small_messages_both_ways,
    check_bulk_both_ways_concurrently,
    check_many_small_writes_keep_order,
    check_close_gives_peer_eof,
    check_peer_close_gives_eof,
]
HALF_CLOSE_CHECKS = [check_half_close_each_way, check_half_close_with_bulk_reply]
