"""ShadowTunnel.open_tcp streams carry TCP resets both ways (kvpn.tunnel.tcp_channel over
kvpn.shadow.tcp_splice), the way the data plane consumes them: a destination RST raises
ConnectionResetError from read()/drain(); closing before both EOFs resets the destination."""

from __future__ import annotations

import asyncio

import pytest

from kvpn.tunnel.client import StreamReset

from .helpers import reset_stream, running_agent, tcp_server

STEP = 20.0


async def test_destination_reset_raises_after_the_data_before_it() -> None:
    async def hello_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2)
        writer.write(b"hello")
        await writer.drain()
        await reader.readexactly(3)
        reset_stream(writer)

    async with running_agent() as agent, tcp_server(hello_then_reset) as port:
        tunnel = await agent.connect()
        reader, writer = await tunnel.open_tcp("127.0.0.1", port)
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(5), STEP) == b"hello"
        writer.write(b"bye")
        with pytest.raises(ConnectionResetError) as info:
            await asyncio.wait_for(reader.read(100), STEP)
        assert isinstance(info.value, StreamReset)
        with pytest.raises(StreamReset):
            await writer.drain()
        assert writer.was_reset
        writer.close()


async def test_a_writing_client_learns_of_the_reset() -> None:
    async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        reset_stream(writer)

    async with running_agent() as agent, tcp_server(reset_at_once) as port:
        tunnel = await agent.connect()
        _, writer = await tunnel.open_tcp("127.0.0.1", port)

        async def write_until_error() -> BaseException:
            while True:
                try:
                    writer.write(b"x" * 4096)
                    await writer.drain()
                except (ConnectionResetError, BrokenPipeError) as exc:
                    return exc
                await asyncio.sleep(0.005)

        error = await asyncio.wait_for(write_until_error(), STEP)
        assert isinstance(error, (StreamReset, BrokenPipeError))
        writer.close()


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_client_reset_reaches_the_destination_as_econnreset(how: str) -> None:
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        try:
            while await reader.read(65536):
                pass
            seen.set_result("eof")
        except ConnectionResetError:
            seen.set_result("reset")

    async with running_agent() as agent, tcp_server(watch) as port:
        tunnel = await agent.connect()
        reader, writer = await tunnel.open_tcp("127.0.0.1", port)
        writer.write(b"some data")
        assert await asyncio.wait_for(reader.readexactly(5), STEP) == b"ready"
        getattr(writer, how)()  # the data plane closes the channel when the app sends RST
        assert await asyncio.wait_for(seen, STEP) == "reset"


async def test_orderly_end_is_eof_both_ways_and_no_reset() -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF
        writer.write(b"got " + request)
        writer.write_eof()
        await writer.drain()
        await asyncio.sleep(STEP)  # stay open: the agent closes after both EOFs

    async with running_agent() as agent, tcp_server(reply_after_eof) as port:
        tunnel = await agent.connect()
        reader, writer = await tunnel.open_tcp("127.0.0.1", port)
        writer.write(b"request")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), STEP) == b"got request"
        await asyncio.wait_for(writer.channel.wait_closed(), STEP)  # the agent closed it
        await writer.drain()  # no StreamReset: the end was orderly
        assert await reader.read() == b""
        assert not writer.was_reset
        writer.close()
