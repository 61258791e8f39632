"""The shadow agent and ShadowTunnel, both in-process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import asyncssh
import pytest

from kvpn.shadow.datagram_relay import DatagramSockets, RelayLimits
from kvpn.shadow.relay_codec import (
    SUBSYSTEM_NAME,
    FlowExpired,
    PingReply,
    PingUnreachable,
    UdpReceived,
    UdpSend,
    UdpUnreachable,
    encode,
)
from kvpn.tunnel.client import (
    AuthenticationRefused,
    DatagramEvent,
    DialRefused,
    DialTimeout,
    DialUnreachable,
    HostKeyMismatch,
    ShadowTunnel,
)
from kvpn.tunnel.keys import new_session_key
from kvpn.tunnel.transport import DirectTransport

from .helpers import (
    closed_port,
    echo_server,
    ping_namespace,
    running_agent,
    udp_echo_server,
)

LOCALHOST = IPv4Address("127.0.0.1")


class Events:
    """Collects relay events; wait for one matching a predicate."""

    def __init__(self) -> None:
        self.items: list[DatagramEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: DatagramEvent) -> None:
        self.items.append(event)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[DatagramEvent], bool]) -> DatagramEvent:
        async def scan() -> DatagramEvent:
            while True:
                for event in self.items:
                    if predicate(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(scan(), 20)


def udp_payload(payload: bytes) -> Callable[[DatagramEvent], bool]:
    return lambda e: isinstance(e, UdpReceived) and e.payload == payload


def ping_seq(seq: int) -> Callable[[DatagramEvent], bool]:
    return lambda e: isinstance(e, PingReply) and e.seq == seq


# --- authentication ----------------------------------------------------------------------


async def test_right_key_authenticates() -> None:
    async with running_agent() as agent:
        tunnel = await agent.connect()
        assert not tunnel.is_closed


async def test_wrong_client_key_is_refused() -> None:
    async with running_agent() as agent:
        with pytest.raises(AuthenticationRefused):
            await ShadowTunnel.connect(
                DirectTransport("127.0.0.1", agent.port),
                client_key=new_session_key(),
                host_key=agent.agent.host_public_key,
            )


async def test_wrong_host_key_is_refused_by_client() -> None:
    async with running_agent() as agent:
        impostor = new_session_key().convert_to_public()
        with pytest.raises(HostKeyMismatch, match="pinned host key"):
            await ShadowTunnel.connect(
                DirectTransport("127.0.0.1", agent.port),
                client_key=agent.client_key,
                host_key=impostor,
            )


async def test_no_shell_exec_pty_or_other_subsystem() -> None:
    async with running_agent() as agent:
        conn = (await agent.connect()).connection
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run("id", check=False)
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process()  # shell
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process("id", term_type="xterm")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_session(asyncssh.SSHClientSession, subsystem="sftp")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_unix_connection("/run/anything.sock")
        # the connection survives all of that
        assert not conn.is_closed()


# --- TCP ---------------------------------------------------------------------------------


async def test_tcp_one_megabyte_both_ways_with_half_close() -> None:
    payload = os.urandom(1 << 20)
    async with running_agent() as agent, echo_server() as port:
        tunnel = await agent.connect()
        reader, writer = await tunnel.open_tcp("127.0.0.1", port)

        async def upload() -> None:
            for i in range(0, len(payload), 64 * 1024):
                writer.write(payload[i : i + 64 * 1024])
                await writer.drain()
            writer.write_eof()  # half-close: we are done sending, still reading

        received, _ = await asyncio.gather(reader.read(), upload())
        assert received == payload  # the echo server's EOF came back after all data
        writer.close()


async def test_refused_port_is_dial_refused() -> None:
    async with running_agent() as agent:
        tunnel = await agent.connect()
        # A long timeout: the answer must come from the RST, not from a timer.
        with pytest.raises(DialRefused, match="kvpn-dial-refused"):
            await tunnel.open_tcp("127.0.0.1", closed_port(), timeout=60)


class _FakeDials:
    """Patch loop.create_connection for TEST-NET addresses only (no traffic leaves)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.behaviours: dict[str, Callable[[], Any]] = {}
        loop = asyncio.get_running_loop()
        real = loop.create_connection

        async def create_connection(factory: Any, host: Any = None, port: Any = None, **kw: Any) -> Any:
            behaviour = self.behaviours.get(host)
            if behaviour is None:
                return await real(factory, host, port, **kw)
            return await behaviour()(factory)

        monkeypatch.setattr(loop, "create_connection", create_connection)


async def test_unreachable_host_is_dial_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeDials(monkeypatch)

    def unreachable() -> Any:
        async def dial(_factory: Any) -> Any:
            raise OSError(errno.EHOSTUNREACH, "No route to host")

        return dial

    fake.behaviours["192.0.2.1"] = unreachable
    async with running_agent() as agent:
        tunnel = await agent.connect()
        with pytest.raises(DialUnreachable, match="kvpn-dial-unreachable"):
            await tunnel.open_tcp("192.0.2.1", 80, timeout=60)


async def test_agent_dial_timeout_is_dial_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeDials(monkeypatch)

    def blackhole() -> Any:
        async def dial(_factory: Any) -> Any:
            await asyncio.Event().wait()

        return dial

    fake.behaviours["192.0.2.2"] = blackhole
    async with running_agent(dial_timeout=0.2) as agent:
        tunnel = await agent.connect()
        with pytest.raises(DialTimeout, match="kvpn-dial-timeout"):
            await tunnel.open_tcp("192.0.2.2", 80, timeout=60)


async def test_client_timeout_closes_a_channel_that_opens_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeDials(monkeypatch)
    loop = asyncio.get_running_loop()
    real = loop.create_connection
    accepted: asyncio.Queue[str] = asyncio.Queue()

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
            await accepted.put("eof")
        except ConnectionResetError:
            await accepted.put("reset")  # the abandoned dial is reset, like an app that gave up
        writer.close()

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    release = asyncio.Event()

    def slow() -> Any:
        async def dial(factory: Any) -> Any:
            await release.wait()
            return await real(factory, "127.0.0.1", target)

        return dial

    fake.behaviours["192.0.2.3"] = slow
    try:
        async with running_agent(dial_timeout=30) as agent:
            tunnel = await agent.connect()
            with pytest.raises(DialTimeout):
                await tunnel.open_tcp("192.0.2.3", 80, timeout=0.1)
            release.set()
            assert await asyncio.wait_for(accepted.get(), 20) == "reset"
            # the tunnel is still usable afterwards
            async with echo_server() as port:
                reader, writer = await tunnel.open_tcp("127.0.0.1", port)
                writer.write(b"ok")
                writer.write_eof()
                assert await reader.read() == b"ok"
    finally:
        server.close()


async def test_remote_port_forwarding_is_allowed() -> None:
    async with running_agent() as agent, echo_server() as port:
        conn = (await agent.connect()).connection
        listener = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
        writer.write(b"through the pod")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 20) == b"through the pod"
        writer.close()
        listener.close()


# --- datagrams ---------------------------------------------------------------------------


async def test_udp_echo_through_relay() -> None:
    async with running_agent() as agent, udp_echo_server() as port:
        events = Events()
        relay = await (await agent.connect()).open_datagrams(events)
        for i in range(3):
            assert relay.send_udp(7, LOCALHOST, port, b"hello %d" % i)
        for i in range(3):
            got = await events.wait_for(udp_payload(b"echo:hello %d" % i))
            assert got == UdpReceived(7, LOCALHOST, port, b"echo:hello %d" % i)
        assert relay.counters.frames_malformed == 0


async def test_udp_to_closed_port_is_unreachable() -> None:
    async with running_agent() as agent:
        events = Events()
        relay = await (await agent.connect()).open_datagrams(events)
        port = closed_port()
        relay.send_udp(3, LOCALHOST, port, b"anyone?")
        event = await events.wait_for(lambda e: isinstance(e, UdpUnreachable))
        assert event == UdpUnreachable(3, 3)


async def test_ping_localhost_gets_reply() -> None:
    with ping_namespace() as ping_factory:
        sockets = DatagramSockets(ping=ping_factory)
        async with running_agent(sockets=sockets) as agent:
            events = Events()
            relay = await (await agent.connect()).open_datagrams(events)
            relay.send_ping(11, LOCALHOST, ident=0xBEEF, seq=1, payload=b"kvpn ping 1")
            relay.send_ping(11, LOCALHOST, ident=0xBEEF, seq=2, payload=b"kvpn ping 2")
            for seq in (1, 2):
                reply = await events.wait_for(ping_seq(seq))
                assert reply == PingReply(11, LOCALHOST, 0xBEEF, seq, b"kvpn ping %d" % seq)


async def test_ping_without_ping_socket_permission_is_unreachable() -> None:
    def forbidden(family: int) -> socket.socket:
        raise PermissionError(errno.EACCES, "Permission denied")

    async with running_agent(sockets=DatagramSockets(ping=forbidden)) as agent:
        events = Events()
        relay = await (await agent.connect()).open_datagrams(events)
        relay.send_ping(5, LOCALHOST, ident=1, seq=1, payload=b"x")
        assert await events.wait_for(lambda e: True) == PingUnreachable(5, 13)


async def test_idle_flows_expire() -> None:
    limits = RelayLimits(udp_idle_timeout=0.2, ping_idle_timeout=0.2)
    async with running_agent(limits=limits) as agent, udp_echo_server() as port:
        events = Events()
        relay = await (await agent.connect()).open_datagrams(events)
        relay.send_udp(21, LOCALHOST, port, b"x")
        await events.wait_for(lambda e: isinstance(e, UdpReceived))
        assert await events.wait_for(lambda e: isinstance(e, FlowExpired)) == FlowExpired(21)
        # the flow id is usable again afterwards
        relay.send_udp(21, LOCALHOST, port, b"again")
        await events.wait_for(udp_payload(b"echo:again"))


async def test_flow_reused_for_new_destination_and_closed_explicitly() -> None:
    async with running_agent() as agent, udp_echo_server() as port_a, udp_echo_server() as port_b:
        events = Events()
        relay = await (await agent.connect()).open_datagrams(events)
        relay.send_udp(1, LOCALHOST, port_a, b"a")
        await events.wait_for(lambda e: isinstance(e, UdpReceived) and e.sport == port_a)
        relay.send_udp(1, LOCALHOST, port_b, b"b")
        await events.wait_for(lambda e: isinstance(e, UdpReceived) and e.sport == port_b)
        assert relay.close_flow(1)
        relay.send_udp(2, LOCALHOST, port_a, b"c")
        await events.wait_for(udp_payload(b"echo:c"))


async def test_malformed_relay_frames_are_dropped_not_fatal() -> None:
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class RawSession(asyncssh.SSHClientSession[bytes]):
        def data_received(self, data: bytes, datatype: int | None) -> None:
            received.put_nowait(data)

    async with running_agent() as agent, udp_echo_server() as port:
        tunnel = await agent.connect()
        chan, _ = await tunnel.connection.create_session(
            RawSession, subsystem=SUBSYSTEM_NAME, encoding=None
        )
        garbage = [
            b"\x00\x00",  # empty frame
            b"\x00\x03\x7f\x01\x02",  # unknown type
            b"\x00\x05\x81\x00\x00\x00\x01",  # agent->client type sent by the client
            b"\x00\x06\x01\x00\x00\x00\x01\x09",  # bad address family
        ]
        for frame in garbage:
            chan.write(frame)
        chan.write(encode(UdpSend(9, LOCALHOST, port, b"still alive")))
        data = await asyncio.wait_for(received.get(), 20)
        assert b"echo:still alive" in data
        # and TCP on the same connection still works
        async with echo_server() as echo_port:
            reader, writer = await tunnel.open_tcp("127.0.0.1", echo_port)
            writer.write(b"tcp")
            writer.write_eof()
            assert await reader.read() == b"tcp"
        chan.close()


async def test_event_handler_exception_does_not_break_relay() -> None:
    async with running_agent() as agent, udp_echo_server() as port:
        seen: list[DatagramEvent] = []

        def flaky(event: DatagramEvent) -> None:
            seen.append(event)
            if len(seen) == 1:
                raise RuntimeError("consumer bug")

        relay = await (await agent.connect()).open_datagrams(flaky)
        relay.send_udp(1, LOCALHOST, port, b"1")
        relay.send_udp(1, LOCALHOST, port, b"2")
        for _ in range(200):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(seen) == 2
        assert relay.counters.callback_errors == 1


async def test_keepalive_detects_a_silent_agent() -> None:
    """A proxy that stops forwarding (a frozen node, a dropped NAT entry) is noticed by the
    client's SSH keepalive: the tunnel closes instead of hanging forever."""
    frozen = asyncio.Event()

    async with running_agent() as agent:

        async def relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if frozen.is_set():
                        await asyncio.Event().wait()  # swallow everything from now on
                    dst.write(data)
                    await dst.drain()

        tasks: list[asyncio.Task[None]] = []
        writers: list[asyncio.StreamWriter] = []

        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", agent.port)
            writers.extend([writer, up_writer])
            tasks.append(asyncio.create_task(relay(reader, up_writer)))
            tasks.append(asyncio.create_task(relay(up_reader, writer)))

        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        try:
            tunnel = await ShadowTunnel.connect(
                DirectTransport("127.0.0.1", server.sockets[0].getsockname()[1]),
                client_key=agent.client_key,
                host_key=agent.agent.host_public_key,
                keepalive_interval=0.1,
                keepalive_count_max=2,
            )
            frozen.set()
            await asyncio.wait_for(tunnel.wait_closed(), 20)
            assert tunnel.is_closed
            await tunnel.close()
        finally:
            for task in tasks:
                task.cancel()
            for writer in writers:
                writer.close()
            server.close()
