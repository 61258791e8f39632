"""The agent's TCP splice, seen from a plain asyncssh client (no kvpn client code): early
server data, orderly endings and resets both ways."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable

import asyncssh

from tests.unit.tunnel.helpers import reset_stream, running_agent, tcp_server

BANNER = b"220 kvpn-test ESMTP ready\r\n"
STEP = 20.0
CHANNEL_WINDOW = 2 * 1024 * 1024  # asyncssh's default receive window


class Recorder(asyncssh.SSHTCPSession[bytes]):
    """Client side of one channel: what arrived, and how the channel ended."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.data = bytearray()
        self.events: list[str] = []
        self.changed = asyncio.Event()

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.data += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.changed.set()
        return True  # keep our direction open, like the kvpn client

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("close")
        self.changed.set()

    async def wait(self, predicate: Callable[[], bool]) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), STEP)

    def ended_or_got(self, size: int) -> bool:
        return len(self.data) >= size or bool(self.events)

    def closed(self) -> bool:
        return "close" in self.events

    @property
    def was_reset(self) -> bool:
        """Closed without EOF: how the agent reports a destination RST."""
        return self.events[:1] == ["close"]


@contextlib.asynccontextmanager
async def ssh_connection() -> AsyncIterator[asyncssh.SSHClientConnection]:
    async with running_agent() as agent:
        yield (await agent.connect()).connection


async def open_channel(
    conn: asyncssh.SSHClientConnection, port: int
) -> tuple[asyncssh.SSHTCPChannel[bytes], Recorder]:
    chan, session = await conn.create_connection(Recorder, "127.0.0.1", port)
    assert isinstance(session, Recorder)
    return chan, session


# --- early data ----------------------------------------------------------------------


async def test_server_first_banner_reaches_every_concurrent_channel() -> None:
    """The destination talks right after accept, before the channel is confirmed."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        await writer.drain()
        await reader.read()  # until the client's EOF

    async with ssh_connection() as conn, tcp_server(banner) as port:
        channels = await asyncio.gather(*(open_channel(conn, port) for _ in range(90)))
        for _, rec in channels:
            await rec.wait(functools.partial(rec.ended_or_got, len(BANNER)))
        assert [bytes(rec.data) for _, rec in channels] == [BANNER] * 90
        for chan, _ in channels:
            chan.write_eof()
        for _, rec in channels:
            await rec.wait(rec.closed)
            assert rec.events == ["eof", "close"]  # orderly: the agent closed after both EOFs


async def test_banner_then_immediate_close_keeps_data_and_eof() -> None:
    """Banner + FIN before the channel is open: both are replayed, in order."""

    async def banner_and_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        writer.write_eof()
        await reader.read()

    async with ssh_connection() as conn, tcp_server(banner_and_bye) as port:
        chan, rec = await open_channel(conn, port)
        await rec.wait(lambda: "eof" in rec.events)
        assert bytes(rec.data) == BANNER
        chan.write_eof()
        await rec.wait(lambda: "close" in rec.events)
        assert rec.events == ["eof", "close"]


# --- orderly endings -----------------------------------------------------------------


async def test_orderly_close_waits_for_the_agent_eof_to_be_sent() -> None:
    """The client sends EOF, then stops reading; the destination answers with a little more
    than one channel window, then FIN. The agent gets the FIN while its EOF is queued behind
    unsent data and must not close before the EOF is out (a bare CLOSE reads as a reset)."""
    payload = os.urandom(CHANNEL_WINDOW + 32 * 1024)  # the tail stays under the high-water mark
    sent = asyncio.Event()

    async def bulk_then_fin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.read() == b""  # the client's EOF first
        writer.write(payload)
        writer.write_eof()
        await writer.drain()
        sent.set()
        await asyncio.sleep(STEP)  # stay open; the agent closes us

    async with ssh_connection() as conn, tcp_server(bulk_then_fin) as port:
        chan, rec = await open_channel(conn, port)
        chan.pause_reading()  # no window adjust: the agent can send one window, no more
        chan.write_eof()
        await asyncio.wait_for(sent.wait(), STEP)
        await asyncio.sleep(0.2)  # ordering only: let the agent read the FIN while we stall
        chan.resume_reading()
        await rec.wait(lambda: "close" in rec.events)
        assert rec.events == ["eof", "close"]
        assert bytes(rec.data) == payload


async def test_half_close_from_the_client_then_reply() -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        writer.write(b"got " + request)
        writer.write_eof()

    async with ssh_connection() as conn, tcp_server(reply_after_eof) as port:
        chan, rec = await open_channel(conn, port)
        chan.write(b"request")
        chan.write_eof()
        await rec.wait(lambda: "close" in rec.events)
        assert bytes(rec.data) == b"got request"
        assert rec.events == ["eof", "close"]


# --- resets --------------------------------------------------------------------------


async def test_destination_reset_closes_the_channel_without_eof_after_its_data() -> None:
    async def hello_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2)
        writer.write(b"hello")
        await writer.drain()
        await reader.readexactly(3)
        reset_stream(writer)

    async with ssh_connection() as conn, tcp_server(hello_then_reset) as port:
        chan, rec = await open_channel(conn, port)
        chan.write(b"hi")
        await rec.wait(lambda: bytes(rec.data) == b"hello")
        chan.write(b"bye")
        await rec.wait(lambda: bool(rec.events))
        assert rec.was_reset
        assert bytes(rec.data) == b"hello"


async def test_client_close_without_eof_resets_the_destination() -> None:
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        try:
            while await reader.read(65536):
                pass
            seen.set_result("eof")
        except ConnectionResetError:
            seen.set_result("reset")

    async with ssh_connection() as conn, tcp_server(watch) as port:
        chan, rec = await open_channel(conn, port)
        chan.write(b"some data")
        await rec.wait(lambda: bytes(rec.data) == b"ready")
        chan.close()  # what the data plane does when the app sends RST
        assert await asyncio.wait_for(seen, STEP) == "reset"


async def test_client_eof_then_close_before_the_reply_resets_the_destination() -> None:
    """An app that half-closes and then resets: the FIN arrives, then the RST."""
    seen: list[str] = []
    done = asyncio.Event()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        assert await reader.read() == b""
        seen.append("eof")
        try:
            for _ in range(200):  # the RST follows the FIN; writing runs into it
                writer.write(b"x" * 1024)
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            seen.append("reset")
        done.set()

    async with ssh_connection() as conn, tcp_server(watch) as port:
        chan, rec = await open_channel(conn, port)
        await rec.wait(lambda: bytes(rec.data) == b"ready")
        chan.write_eof()
        await asyncio.sleep(0.05)
        chan.close()
        await asyncio.wait_for(done.wait(), STEP)
        assert seen == ["eof", "reset"]


async def test_lost_ssh_connection_resets_the_destination() -> None:
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        try:
            await reader.read()
            seen.set_result("eof")
        except ConnectionResetError:
            seen.set_result("reset")

    async with running_agent() as agent, tcp_server(watch) as port:
        tunnel = await agent.connect()
        _, rec = await open_channel(tunnel.connection, port)
        await rec.wait(lambda: bytes(rec.data) == b"ready")
        tunnel.connection.abort()
        assert await asyncio.wait_for(seen, STEP) == "reset"
