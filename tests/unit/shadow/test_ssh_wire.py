"""kvpn.shadow.ssh_wire: one send per SSH packet, no empty IGNOREs, reads fed in pieces."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from kvpn.shadow import gcm_channel_data
from kvpn.shadow.ssh_wire import (
    MSG_IGNORE,
    CoalescingProtocol,
    CoalescingTransport,
    WriteCounters,
    suppress_empty_ignores,
)
from tests.unit.tunnel.helpers import running_agent, tcp_server

MSG_CHANNEL_DATA = 94


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def write_eof(self) -> None:
        self.events.append("eof")

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.events.append("close")
        self.closing = True

    def abort(self) -> None:
        self.events.append("abort")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.1", 22)}.get(name, default)


class FakeProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.chunks: list[bytes] = []
        self.events: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def eof_received(self) -> bool:
        self.events.append("eof")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")


async def test_a_small_write_leaves_with_the_next_one() -> None:
    real = FakeTransport()
    wrapped = CoalescingTransport(real, asyncio.get_running_loop(), hold_below=64)
    wrapped.write(b"i" * 36)
    assert real.sent == [] and wrapped.get_write_buffer_size() == 36
    wrapped.write(b"d" * 100)
    assert real.sent == [b"i" * 36 + b"d" * 100]
    assert wrapped.counters.writes == 2 and wrapped.counters.sends == 1


async def test_a_lone_small_write_is_sent_on_the_next_loop_iteration() -> None:
    real = FakeTransport()
    wrapped = CoalescingTransport(real, asyncio.get_running_loop(), hold_below=64)
    wrapped.write(b"eof-packet")
    assert real.sent == []
    await asyncio.sleep(0)
    assert real.sent == [b"eof-packet"]
    assert wrapped.counters.deferred_flushes == 1


async def test_big_writes_pass_straight_through() -> None:
    real = FakeTransport()
    wrapped = CoalescingTransport(real, asyncio.get_running_loop(), hold_below=64)
    wrapped.write(b"x" * 64)
    wrapped.write(bytearray(b"y" * 1000))
    assert real.sent == [b"x" * 64, b"y" * 1000]


async def test_writelines_goes_out_in_one_send_after_what_is_held() -> None:
    real = FakeTransport()  # asyncio's default writelines: one write() of the joined pieces
    wrapped = CoalescingTransport(real, asyncio.get_running_loop(), hold_below=64)
    wrapped.write(b"i" * 36)
    wrapped.writelines([b"a" * 100, bytearray(b"b" * 100)])
    assert real.sent == [b"i" * 36 + b"a" * 100 + b"b" * 100]
    assert wrapped.counters.sends == 1 and wrapped.get_write_buffer_size() == 0
    wrapped.writelines([])
    assert real.sent == [b"i" * 36 + b"a" * 100 + b"b" * 100]


async def test_close_abort_and_eof_send_what_is_held_first() -> None:
    loop = asyncio.get_running_loop()
    for action in ("close", "abort", "eof"):
        real = FakeTransport()
        wrapped = CoalescingTransport(real, loop, hold_below=64)
        wrapped.write(b"disconnect")
        {"close": wrapped.close, "abort": wrapped.abort, "eof": wrapped.write_eof}[action]()
        assert real.sent == [b"disconnect"]
        assert real.events == [action]
    await asyncio.sleep(0)  # the deferred flushes find nothing left
    assert real.sent == [b"disconnect"]


async def test_protocol_feeds_big_reads_in_pieces_and_forwards_the_rest() -> None:
    inner = FakeProtocol()
    shim = CoalescingProtocol(inner, feed_size=1000)
    real = FakeTransport()
    shim.connection_made(real)
    assert isinstance(inner.transport, CoalescingTransport)
    assert inner.transport.get_extra_info("peername") == ("192.0.2.1", 22)
    data = bytes(range(256)) * 10
    shim.data_received(data)
    shim.data_received(b"small")
    assert [len(c) for c in inner.chunks] == [1000, 1000, 560, 5]
    assert b"".join(inner.chunks) == data + b"small"
    assert shim.eof_received() is True
    shim.connection_lost(None)
    assert inner.events == ["eof", "lost"]


class FakeConnection:
    def __init__(self, cipher: str) -> None:
        self.cipher = cipher
        self.sent: list[tuple[int, tuple[bytes, ...]]] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.cipher if name == "send_cipher" else default

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_CHANNEL_DATA:  # asyncssh's own IGNORE, through self.send_packet
            self.send_packet(MSG_IGNORE, b"\x00\x00\x00\x00")
        self.sent.append((pkttype, args))


def test_empty_ignores_are_suppressed_unless_the_cipher_is_cbc() -> None:
    counters = WriteCounters()
    conn = FakeConnection("aes128-gcm@openssh.com")
    suppress_empty_ignores(conn, counters)
    conn.send_packet(MSG_CHANNEL_DATA, b"payload")
    conn.send_packet(MSG_IGNORE, b"\x00\x00\x00\x03abc")  # not empty: kept
    assert conn.sent == [(MSG_CHANNEL_DATA, (b"payload",)), (MSG_IGNORE, (b"\x00\x00\x00\x03abc",))]
    assert counters.ignores_suppressed == 1

    cbc = FakeConnection("aes128-cbc")
    suppress_empty_ignores(cbc)
    cbc.send_packet(MSG_CHANNEL_DATA, b"payload")
    assert [t for t, _ in cbc.sent] == [MSG_IGNORE, MSG_CHANNEL_DATA]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_tunnel_round_trips_send_one_segment_per_packet_and_no_ignores() -> None:
    async with tcp_server(_echo) as port, running_agent() as agent:
        tunnel = await agent.connect()
        reader, writer = await tunnel.open_tcp("127.0.0.1", port)
        transport = getattr(tunnel.connection, "_transport", None)
        assert isinstance(transport, CoalescingTransport)
        writes, sends = transport.counters.writes, transport.counters.sends
        fast_packets = gcm_channel_data.COUNTERS.packets_sent
        for _ in range(20):
            writer.write(b"m" * 64)
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(64), 10) == b"m" * 64
        # one packet per message and one send() per packet: no IGNORE in front of it (the
        # data packets bypass asyncssh's send_packet, so there is none to suppress either)
        assert transport.counters.writes - writes == 20
        assert transport.counters.sends - sends == 20
        assert gcm_channel_data.COUNTERS.packets_sent - fast_packets >= 40  # both ways


async def test_bulk_data_survives_both_ways() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with tcp_server(_echo) as port, running_agent() as agent:
        tunnel = await agent.connect()
        reader, writer = await tunnel.open_tcp("127.0.0.1", port)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        got = await asyncio.wait_for(reader.read(-1), 60)
        await sender
        assert got == payload
