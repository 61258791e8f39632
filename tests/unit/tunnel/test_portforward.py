"""PortForwardTransport against a fake API server port-forward endpoint, and its framing."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from kvpn.shadow.relay_codec import UdpReceived
from kvpn.tunnel.client import ShadowTunnel
from kvpn.tunnel.portforward_framing import (
    DataReceived,
    ErrorReceived,
    PortConfirmed,
    PortForwardFraming,
)
from kvpn.tunnel.transport import PortForwardError, PortForwardTransport

from .helpers import (
    FakePortForwardServer,
    TcpAcceptor,
    closed_port,
    running_agent,
    self_signed_tls,
    udp_echo_server,
)

# --- framing (sans-IO) -------------------------------------------------------------------


def test_framing_port_prefix_then_data() -> None:
    f = PortForwardFraming(2222)
    assert f.receive_message(b"\x00\xae\x08") == [PortConfirmed(0, 2222)]
    assert not f.ready
    assert f.receive_message(b"\x01\xae\x08") == [PortConfirmed(1, 2222)]
    assert f.ready
    assert f.receive_message(b"\x00SSH-2.0-x") == [DataReceived(b"SSH-2.0-x")]
    assert f.receive_message(b"\x01boom\n") == [ErrorReceived("boom")]
    assert f.malformed == 0


def test_framing_prefix_split_and_followed_by_data() -> None:
    f = PortForwardFraming(2222)
    assert f.receive_message(b"\x00\xae") == []
    assert f.receive_message(b"\x00\x08hello") == [PortConfirmed(0, 2222), DataReceived(b"hello")]
    assert f.receive_message(b"\x01") == []  # channel byte only: nothing yet
    assert f.receive_message(b"\x01\xae\x08") == [PortConfirmed(1, 2222)]


def test_framing_wrong_port_is_an_error() -> None:
    f = PortForwardFraming(2222)
    events = f.receive_message(b"\x00\x50\x00")
    assert len(events) == 1 and isinstance(events[0], ErrorReceived)
    assert "80" in events[0].message


@pytest.mark.parametrize("message", [b"", b"\x02\xae\x08", b"\xffabc"])
def test_framing_malformed_is_counted(message: bytes) -> None:
    f = PortForwardFraming(2222)
    assert f.receive_message(message) == []
    assert f.malformed == 1


def test_framing_encode() -> None:
    assert PortForwardFraming.encode_data(b"abc") == b"\x00abc"


# --- transport against the fake server ---------------------------------------------------


async def _roundtrip(sock: socket.socket, acceptor: TcpAcceptor) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    far_reader, far_writer = await acceptor.next()
    writer.write(b"to pod")
    assert await far_reader.readexactly(6) == b"to pod"
    far_writer.write(b"from pod")
    assert await reader.readexactly(8) == b"from pod"
    writer.close()
    far_writer.close()


@pytest.mark.parametrize("split_prefix", [False, True])
async def test_open_sends_bearer_token_and_moves_bytes(split_prefix: bool) -> None:
    async with TcpAcceptor() as acceptor, FakePortForwardServer(
        {"kvpn-shadow-1": acceptor.port}, split_prefix=split_prefix
    ) as server:
        transport = PortForwardTransport(server.client_config(), "default", "kvpn-shadow-1", 2222)
        sock = await transport.open()
        await _roundtrip(sock, acceptor)
        await transport.close()
        [request] = server.requests
        assert request["Authorization"] == "Bearer test-token"
        assert request["Sec-WebSocket-Protocol"] == "v4.channel.k8s.io"
        assert request["query"] == "ports=2222"


async def test_tls_api_server_with_pinned_ca(tmp_path: Path) -> None:
    server_ctx, ca_path = self_signed_tls(str(tmp_path))
    async with TcpAcceptor() as acceptor, FakePortForwardServer(
        {"p": acceptor.port}, ssl_context=server_ctx
    ) as server:
        config = server.client_config()
        assert config.host.startswith("https://")
        config.ssl_ca_cert = ca_path
        transport = PortForwardTransport(config, "default", "p")
        await _roundtrip(await transport.open(), acceptor)
        await transport.close()

        untrusted = server.client_config()  # system CAs only: must refuse the server
        with pytest.raises(PortForwardError, match="cannot reach the API server"):
            await PortForwardTransport(untrusted, "default", "p").open()


async def test_bad_token_is_a_clear_error() -> None:
    async with FakePortForwardServer({"p": closed_port()}) as server:
        transport = PortForwardTransport(server.client_config(token="wrong"), "default", "p")
        with pytest.raises(PortForwardError, match="refused port-forward.*401"):
            await transport.open()


async def test_missing_pod_is_a_clear_error() -> None:
    async with FakePortForwardServer({}) as server:
        transport = PortForwardTransport(server.client_config(), "default", "gone")
        with pytest.raises(PortForwardError, match="404"):
            await transport.open()


async def test_unreachable_api_server_is_a_clear_error() -> None:
    from kubernetes.client import Configuration

    config = Configuration(host=f"http://127.0.0.1:{closed_port()}")
    transport = PortForwardTransport(config, "default", "p")
    with pytest.raises(PortForwardError, match="cannot reach the API server"):
        await transport.open()


async def test_error_channel_text_becomes_the_failure() -> None:
    """The kubelet cannot dial the pod port: its error text reaches the caller."""
    async with FakePortForwardServer({"p": closed_port()}) as server:
        transport = PortForwardTransport(server.client_config(), "default", "p")
        sock = await transport.open()
        reader, writer = await asyncio.open_connection(sock=sock)
        assert await asyncio.wait_for(reader.read(), 20) == b""  # EOF, then:
        assert isinstance(transport.failure, PortForwardError)
        assert "error forwarding port 2222" in str(transport.failure)
        writer.close()
        await transport.close()


async def test_wrong_port_announcement_fails_open() -> None:
    async with TcpAcceptor() as acceptor, FakePortForwardServer(
        {"p": acceptor.port}, announce_port=80
    ) as server:
        transport = PortForwardTransport(server.client_config(), "default", "p")
        with pytest.raises(PortForwardError, match="announced port 80"):
            await transport.open()


async def test_server_close_gives_eof_and_local_close_ends_stream() -> None:
    async with TcpAcceptor() as acceptor, FakePortForwardServer({"p": acceptor.port}) as server:
        transport = PortForwardTransport(server.client_config(), "default", "p")
        reader, writer = await asyncio.open_connection(sock=await transport.open())
        _, far_writer = await acceptor.next()
        far_writer.write(b"bye")
        far_writer.close()
        assert await asyncio.wait_for(reader.read(), 20) == b"bye"
        writer.close()
        await transport.close()

        transport = PortForwardTransport(server.client_config(), "default", "p")
        _, writer = await asyncio.open_connection(sock=await transport.open())
        far_reader, far_writer = await acceptor.next()
        writer.close()
        assert await asyncio.wait_for(far_reader.read(), 20) == b""
        far_writer.close()
        await transport.close()


# --- the SSH tunnel over the port-forward ------------------------------------------------


async def test_shadow_tunnel_over_port_forward() -> None:
    async with running_agent() as agent, udp_echo_server() as udp_port:
        async with TcpAcceptor() as acceptor, FakePortForwardServer(
            {"kvpn-shadow-x": agent.port}
        ) as server:
            transport = PortForwardTransport(server.client_config(), "ns", "kvpn-shadow-x")
            tunnel = await ShadowTunnel.connect(
                transport, client_key=agent.client_key, host_key=agent.agent.host_public_key
            )
            try:
                reader, writer = await tunnel.open_tcp("127.0.0.1", acceptor.port)
                far_reader, far_writer = await acceptor.next()
                writer.write(b"x" * 200_000)
                assert await far_reader.readexactly(200_000) == b"x" * 200_000
                far_writer.write(b"reply")
                far_writer.write_eof()
                assert await reader.read() == b"reply"
                writer.close()
                far_writer.close()

                got: asyncio.Queue[object] = asyncio.Queue()
                relay = await tunnel.open_datagrams(got.put_nowait)
                relay.send_udp(1, IPv4Address("127.0.0.1"), udp_port, b"dns?")
                event = await asyncio.wait_for(got.get(), 20)
                assert event == UdpReceived(1, IPv4Address("127.0.0.1"), udp_port, b"echo:dns?")
                assert transport.bytes_up > 200_000
            finally:
                await tunnel.close()


async def test_shadow_tunnel_reports_port_forward_failure() -> None:
    async with running_agent() as agent:
        async with FakePortForwardServer({"p": closed_port()}) as server:
            transport = PortForwardTransport(server.client_config(), "ns", "p")
            with pytest.raises(PortForwardError, match="error forwarding port"):
                await ShadowTunnel.connect(
                    transport, client_key=agent.client_key, host_key=agent.agent.host_public_key
                )
