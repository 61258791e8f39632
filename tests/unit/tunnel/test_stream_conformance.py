"""Every byte stream kvpn uses passes the same two-way stream suite (tests/unit/tunnel/conformance.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from kvpn.tunnel.transport import DirectTransport, PortForwardTransport

from .conformance import CHECKS, HALF_CLOSE_CHECKS, StreamEnd, StreamPairFactory
from .helpers import FakePortForwardServer, TcpAcceptor, running_agent


@contextlib.asynccontextmanager
async def direct_pair() -> AsyncIterator[tuple[StreamEnd, StreamEnd]]:
    async with TcpAcceptor() as acceptor:
        transport = DirectTransport("127.0.0.1", acceptor.port)
        reader, writer = await asyncio.open_connection(sock=await transport.open())
        far_reader, far_writer = await acceptor.next()
        try:
            yield (
                StreamEnd.from_streams("direct", reader, writer),
                StreamEnd.from_streams("far", far_reader, far_writer),
            )
        finally:
            writer.close()
            far_writer.close()
            await transport.close()


@contextlib.asynccontextmanager
async def port_forward_pair() -> AsyncIterator[tuple[StreamEnd, StreamEnd]]:
    async with TcpAcceptor() as acceptor, FakePortForwardServer({"p": acceptor.port}) as server:
        transport = PortForwardTransport(server.client_config(), "default", "p", 2222)
        reader, writer = await asyncio.open_connection(sock=await transport.open())
        far_reader, far_writer = await acceptor.next()
        try:
            yield (
                StreamEnd.from_streams("port-forward", reader, writer),
                StreamEnd.from_streams("pod", far_reader, far_writer),
            )
        finally:
            writer.close()
            far_writer.close()
            await transport.close()


@contextlib.asynccontextmanager
async def ssh_channel_pair() -> AsyncIterator[tuple[StreamEnd, StreamEnd]]:
    async with running_agent() as agent, TcpAcceptor() as acceptor:
        tunnel = await agent.connect()
        reader, writer = await tunnel.open_tcp("127.0.0.1", acceptor.port)
        far_reader, far_writer = await acceptor.next()
        # A tunnel stream's orderly close is its EOF (TCP's close() sends FIN too); the
        # agent closes the channel once both EOFs have passed. writer.close() before that
        # is a reset (kvpn.shadow.channel_ending; tested in test_shadow_tunnel.py).
        near = StreamEnd.from_streams("ssh-channel", reader, writer)

        async def orderly_close() -> None:
            writer.write_eof()

        try:
            yield (
                dataclasses.replace(near, close=orderly_close),
                StreamEnd.from_streams("destination", far_reader, far_writer),
            )
        finally:
            writer.close()
            far_writer.close()


PAIRS: dict[str, tuple[StreamPairFactory, bool]] = {
    # name: (factory, supports half-close)
    "direct": (direct_pair, True),
    "port-forward": (port_forward_pair, False),  # the k8s protocol has no half-close
    "ssh-channel": (ssh_channel_pair, True),
}

CASES = [
    pytest.param(factory, check, id=f"{name}-{check.__name__.removeprefix('check_')}")
    for name, (factory, half_close) in PAIRS.items()
    for check in CHECKS + (HALF_CLOSE_CHECKS if half_close else [])
]


@pytest.mark.parametrize(("make_pair", "check"), CASES)
async def test_two_way_stream(
    make_pair: StreamPairFactory, check: Callable[[StreamPairFactory], Awaitable[None]]
) -> None:
    await check(make_pair)
