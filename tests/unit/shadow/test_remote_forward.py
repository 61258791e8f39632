"""Remote port forwarding (``tcpip-forward``) through the shadow agent: the policy table and
an in-process agent carrying connections back to a local server (what exchange relies on)."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from kvpn.shadow.agent import remote_forward_refusal
from tests.unit.tunnel.helpers import closed_port, echo_server, running_agent

POLICY_CASES = [
    # listen host, port, own port, refused?
    ("", 8080, 2222, False),
    ("0.0.0.0", 8080, 2222, False),
    ("::", 8080, 2222, False),
    ("localhost", 8080, 2222, False),
    ("127.0.0.1", 0, 2222, False),
    ("0.0.0.0", 2222, 2222, True),  # the agent's own SSH port
    ("10.0.0.7", 8080, 2222, True),  # some other address
    ("example.com", 8080, 2222, True),  # host names are never looked up
    ("0.0.0.0", 70000, 2222, True),
    ("0.0.0.0", 0, 0, False),  # dynamic port on an agent that listens on a dynamic port
]


@pytest.mark.parametrize(("host", "port", "own", "refused"), POLICY_CASES)
def test_remote_forward_policy(host: str, port: int, own: int, refused: bool) -> None:
    assert (remote_forward_refusal(host, port, own_port=own) is not None) is refused


async def test_forwarded_connection_reaches_the_local_server() -> None:
    async with running_agent() as fx, echo_server() as local_port:
        tunnel = await fx.connect()
        listener = await tunnel.connection.forward_remote_port(
            "127.0.0.1", 0, "localhost", local_port
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
        writer.write(b"from the cluster")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"from the cluster"
        writer.close()
        listener.close()
        await listener.wait_closed()
        await asyncio.sleep(0.1)  # the cancel-tcpip-forward request is asynchronous
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", listener.get_port())


async def test_forward_on_the_agents_own_port_is_refused() -> None:
    async with running_agent() as fx:
        tunnel = await fx.connect()
        with pytest.raises(asyncssh.ChannelListenError):
            await tunnel.connection.forward_remote_port("127.0.0.1", fx.port, "localhost", 1)
        with pytest.raises(asyncssh.ChannelListenError):
            await tunnel.connection.forward_remote_port("10.1.2.3", 0, "localhost", 1)


async def test_local_port_closed_means_the_cluster_side_is_closed() -> None:
    async with running_agent() as fx:
        tunnel = await fx.connect()
        listener = await tunnel.connection.forward_remote_port(
            "127.0.0.1", 0, "localhost", closed_port()
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        listener.close()


async def test_listeners_go_when_the_client_disconnects() -> None:
    async with running_agent() as fx, echo_server() as local_port:
        tunnel = await fx.connect()
        listener = await tunnel.connection.forward_remote_port(
            "127.0.0.1", 0, "localhost", local_port
        )
        port = listener.get_port()
        await tunnel.close()
        for _ in range(50):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                break
            writer.close()
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the agent kept listening after its client left")
