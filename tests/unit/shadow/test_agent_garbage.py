"""A running shadow agent (in-process, on loopback) fed SSH-level garbage: random bytes instead
of a banner, a banner then junk packets, an authenticated client asking for impossible
direct-tcpip and tcpip-forward channels or sending malformed requests, and the
kvpn-datagrams subsystem fed junk frames. The agent must stay up and keep serving a
well-behaved client afterwards (and the client's own connection too, where SSH allows).

Datagram sockets are loopback-only here, so junk that decodes as a valid frame never sends
anything off the machine; ping sockets are refused."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, ip_address
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_OPEN, MSG_GLOBAL_REQUEST
from asyncssh.packet import Boolean, String, UInt32

from kvpn.shadow.datagram_relay import DatagramSockets
from kvpn.shadow.relay_codec import SUBSYSTEM_NAME, UdpReceived, UdpSend, encode
from kvpn.tunnel.client import DatagramEvent, DialError, ShadowTunnel
from tests.unit.tunnel.helpers import AgentFixture, echo_server, running_agent, udp_echo_server

LOCALHOST = IPv4Address("127.0.0.1")
SEED = 20261125


class _LoopbackOnlyUdp(socket.socket):
    def __init__(self, family: int) -> None:
        super().__init__(family, socket.SOCK_DGRAM)

    def connect(self, address: Any) -> None:
        if not ip_address(address[0]).is_loopback:
            raise OSError(errno.ENETUNREACH, "test: only loopback")
        super().connect(address)


def _no_ping(family: int) -> socket.socket:
    raise PermissionError(errno.EACCES, "test: no ping sockets")


@contextlib.asynccontextmanager
async def agent() -> AsyncIterator[AgentFixture]:
    sockets = DatagramSockets(udp=_LoopbackOnlyUdp, ping=_no_ping)
    async with running_agent(sockets=sockets, dial_timeout=2.0) as fx:
        yield fx


async def _serves_a_good_client(fx: AgentFixture, tunnel: ShadowTunnel | None = None) -> None:
    """TCP through a direct-tcpip channel and UDP through the relay, round trip."""
    tunnel = tunnel or await fx.connect()
    async with echo_server() as tcp_port, udp_echo_server() as udp_port:
        reader, writer = await tunnel.open_tcp("127.0.0.1", tcp_port)
        writer.write(b"still here")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"still here"
        writer.close()
        got: asyncio.Queue[DatagramEvent] = asyncio.Queue()
        relay = await tunnel.open_datagrams(got.put_nowait)
        assert relay.send_udp(1, LOCALHOST, udp_port, b"ping")
        event = await asyncio.wait_for(got.get(), 10)
        assert isinstance(event, UdpReceived) and event.payload == b"echo:ping"
        await relay.close()


async def _wait_connections(fx: AgentFixture, count: int) -> None:
    for _ in range(200):
        if fx.agent.connection_count <= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"agent still has {fx.agent.connection_count} connections")


async def _send_raw(port: int, data: bytes, *, linger: float = 0.5) -> bytes:
    """Write ``data`` to the agent; return what it answered before closing (or ``linger``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        writer.write(data)
        with contextlib.suppress(OSError):
            await writer.drain()
        with contextlib.suppress(TimeoutError, OSError):
            while chunk := await asyncio.wait_for(reader.read(65536), linger):
                answer += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return answer


def _garbage(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _raw_cases() -> list[bytes]:
    rng = random.Random(SEED)
    return [
        _garbage(rng, 1),
        _garbage(rng, 100),
        _garbage(rng, 70_000),
        b"\x00" * 4096,
        b"\r\n" * 2000,  # empty lines, no version
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"SSH-" + b"A" * 10_000,  # a version line that never ends
        b"SSH-1.5-ancient\r\n",
        b"SSH-2.0-junk\r\n" + _garbage(rng, 5000),
        b"SSH-2.0-junk\r\n" + b"\xff\xff\xff\xff" + _garbage(rng, 64),  # huge packet length
        b"SSH-2.0-junk\r\n" + b"\x00\x00\x00\x0c\x0a\x14" + _garbage(rng, 10),  # short KEXINIT
        b"SSH-2.0-junk\r\n" + b"\x00\x00\x00\x05\x00" + b"\x00" * 4,  # zero-length payload
    ]


async def test_garbage_instead_of_ssh_leaves_the_agent_serving() -> None:
    async with agent() as fx:
        for case in _raw_cases():
            await _send_raw(fx.port, case)
        await _wait_connections(fx, 0)
        await _serves_a_good_client(fx)


async def test_many_garbage_connections_at_once() -> None:
    rng = random.Random(SEED + 1)
    async with agent() as fx:
        await asyncio.gather(*(_send_raw(fx.port, _garbage(rng, 2000)) for _ in range(30)))
        await _wait_connections(fx, 0)
        await _serves_a_good_client(fx)


BAD_DIALS = [
    ("a" * 300, 80),
    ("a" * 30_000, 80),  # a huge string, still inside one SSH packet
    ("a\x00b", 80),
    ("..", 80),
    ("127.0.0.1", 70_000),
    ("127.0.0.1", 2**32 - 1),
    ("127.0.0.1", 0),
]


async def test_bad_direct_tcpip_is_refused_and_the_connection_lives_on() -> None:
    async with agent() as fx:
        tunnel = await fx.connect()
        for host, port in BAD_DIALS:
            with pytest.raises(DialError):
                await tunnel.open_tcp(host, port, timeout=10)
        assert not tunnel.is_closed
        await _serves_a_good_client(fx, tunnel)  # the same connection still works
        await _serves_a_good_client(fx)


BAD_FORWARDS = [
    ("10.1.2.3", 8080),  # not all addresses or loopback
    ("example.com", 8080),
    ("a" * 30_000, 8080),
    ("\x00", 8080),
    ("0.0.0.0", 70_000),
    ("0.0.0.0", 2**32 - 1),
]


async def test_bad_tcpip_forward_is_refused_and_the_connection_lives_on() -> None:
    async with agent() as fx:
        tunnel = await fx.connect()
        for host, port in BAD_FORWARDS:
            with pytest.raises(asyncssh.ChannelListenError):
                await tunnel.connection.forward_remote_port(host, port, "localhost", 1)
        with pytest.raises(asyncssh.ChannelListenError):  # the agent's own SSH port
            await tunnel.connection.forward_remote_port("0.0.0.0", fx.port, "localhost", 1)
        assert not tunnel.is_closed
        await _serves_a_good_client(fx, tunnel)


async def test_refused_session_requests() -> None:
    async with agent() as fx:
        tunnel = await fx.connect()
        conn = tunnel.connection
        for kwargs in ({"command": "id"}, {"subsystem": "sftp"}, {}):  # exec, sftp, shell
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_session(asyncssh.SSHClientSession, encoding=None, **kwargs)
        await _serves_a_good_client(fx, tunnel)


MALFORMED_PACKETS = [
    # tcpip-forward whose host is not UTF-8, and one cut short
    (MSG_GLOBAL_REQUEST, String(b"tcpip-forward") + Boolean(True) + String(b"\xff\xfe") + UInt32(80)),
    (MSG_GLOBAL_REQUEST, String(b"tcpip-forward") + Boolean(True) + b"\x00\x00"),
    (MSG_GLOBAL_REQUEST, String(b"no-such-request") + Boolean(True)),
    # direct-tcpip opens: cut short, host not UTF-8, absurd window/packet sizes
    (MSG_CHANNEL_OPEN, String(b"direct-tcpip") + UInt32(77) + UInt32(2**20)),
    (MSG_CHANNEL_OPEN, String(b"direct-tcpip") + UInt32(78) + UInt32(2**20) + UInt32(32768)
     + String(b"\xc3\x28") + UInt32(80) + String(b"127.0.0.1") + UInt32(1)),  # fmt: skip
    (MSG_CHANNEL_OPEN, String(b"direct-tcpip") + UInt32(79) + UInt32(0) + UInt32(0)
     + String(b"127.0.0.1") + UInt32(9) + String(b"") + UInt32(0)),  # fmt: skip
    (MSG_CHANNEL_OPEN, String(b"x11") + UInt32(80) + UInt32(2**20) + UInt32(32768)),
]


@pytest.mark.parametrize("packet", MALFORMED_PACKETS, ids=range(len(MALFORMED_PACKETS)))
async def test_malformed_requests_never_take_the_agent_down(packet: tuple[int, bytes]) -> None:
    """asyncssh may answer a malformed packet by refusing it or by disconnecting that client;
    either way the agent serves the next one."""
    async with agent() as fx:
        tunnel = await fx.connect()
        pkttype, payload = packet
        tunnel.connection.send_packet(pkttype, payload)
        await asyncio.sleep(0.2)
        if not tunnel.is_closed:
            with contextlib.suppress(asyncssh.Error, DialError, OSError, TimeoutError):
                await asyncio.wait_for(_serves_a_good_client(fx, tunnel), 10)
        await _serves_a_good_client(fx)


class _Collect(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.received = b""

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.received += data


async def test_datagram_subsystem_fed_garbage() -> None:
    rng = random.Random(SEED + 2)
    async with agent() as fx, udp_echo_server() as udp_port:
        tunnel = await fx.connect()
        chan, session = await tunnel.connection.create_session(
            _Collect, subsystem=SUBSYSTEM_NAME, encoding=None
        )
        for _ in range(200):
            chan.write(_garbage(rng, rng.randint(0, 600)))
        chan.write(b"\x00\x00" * 100)  # empty frames
        chan.write(b"\xff\xff" + _garbage(rng, 1000))  # a frame longer than what follows
        chan.write(encode(UdpSend(9, IPv4Address("192.0.2.1"), 53, b"x")))  # not loopback
        chan.write_eof()
        # ... and a well-formed frame on a fresh channel of the same connection still works
        await _serves_a_good_client(fx, tunnel)
        chan.close()
        await chan.wait_closed()
        assert not tunnel.is_closed
        assert udp_port  # the echo server outlived it all
        await _serves_a_good_client(fx)
