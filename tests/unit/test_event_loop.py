"""kvpn.event_loop: which loop runs, the KVPN_EVENT_LOOP override, and netlink on uvloop."""

from __future__ import annotations

import asyncio
import io
import socket
from contextlib import redirect_stderr
from ipaddress import IPv4Address, IPv4Network

import pytest

from kvpn.event_loop import (
    EventLoopChoiceError,
    LoopKind,
    choose_loop_kind,
    new_event_loop,
    run,
    uvloop_available,
)
from kvpn.shadow.agent import main as agent_main
from kvpn.tun.netlink import NetlinkDatagramTransport, netlink_datagram_endpoint
from tests.unit.tun.netns import ip, netns, requires_root, run_in

needs_uvloop = pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed")
ALL_KINDS = [
    LoopKind.ASYNCIO,
    pytest.param(LoopKind.UVLOOP, marks=needs_uvloop),
]


@pytest.mark.parametrize(
    ("value", "have_uvloop", "expected"),
    [
        (None, True, LoopKind.UVLOOP),
        (None, False, LoopKind.ASYNCIO),
        ("auto", True, LoopKind.UVLOOP),
        ("", False, LoopKind.ASYNCIO),
        ("asyncio", True, LoopKind.ASYNCIO),
        (" UVLOOP ", True, LoopKind.UVLOOP),
    ],
)
def test_choice(value: str | None, have_uvloop: bool, expected: LoopKind) -> None:
    env = {} if value is None else {"KVPN_EVENT_LOOP": value}
    assert choose_loop_kind(env, have_uvloop=have_uvloop) is expected


@pytest.mark.parametrize(("value", "have_uvloop"), [("uvloop", False), ("trio", True)])
def test_bad_choice_is_an_error(value: str, have_uvloop: bool) -> None:
    with pytest.raises(EventLoopChoiceError, match="KVPN_EVENT_LOOP"):
        choose_loop_kind({"KVPN_EVENT_LOOP": value}, have_uvloop=have_uvloop)


def test_run_with_a_bad_choice_does_not_start_the_coroutine() -> None:
    started = []

    async def body() -> None:
        started.append(True)

    with pytest.raises(EventLoopChoiceError):
        run(body(), env={"KVPN_EVENT_LOOP": "nope"})
    assert started == []


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_run_uses_the_chosen_loop(kind: LoopKind) -> None:
    async def body() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    module = run(body(), env={"KVPN_EVENT_LOOP": kind.value})
    assert ("uvloop" in module or module == "kvpn.event_loop") is (kind is LoopKind.UVLOOP)


def test_default_is_uvloop_when_installed() -> None:
    async def body() -> bool:
        return isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop)

    assert run(body(), env={}) is not uvloop_available()


def test_agent_refuses_a_bad_loop_choice() -> None:
    env = {
        "KVPN_AUTHORIZED_KEY": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxmsDNi4FoOxAh7SlLNUY9fKSQ2iKsQ3aJ1E7HHwbSD",
        "KVPN_EVENT_LOOP": "nope",
    }
    err = io.StringIO()
    with redirect_stderr(err):
        assert agent_main(env) == 2
    assert "KVPN_EVENT_LOOP" in err.getvalue()


class _Recorder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.made = 0
        self.lost: list[Exception | None] = []
        self.datagrams: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made += 1

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.datagrams.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_netlink_transport_delivers_and_closes_once(kind: LoopKind) -> None:
    """A route dump request answered through the add_reader transport; close is idempotent."""

    async def body() -> tuple[_Recorder, bool]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
        sock.bind((0, 0))
        transport, protocol = netlink_datagram_endpoint(loop, _Recorder, sock)
        assert isinstance(transport, NetlinkDatagramTransport) and isinstance(protocol, _Recorder)
        # RTM_GETLINK dump: nlmsghdr (len, type 18, flags REQUEST|DUMP, seq 1, pid 0) + ifinfomsg
        request = (32).to_bytes(4, "little") + (18).to_bytes(2, "little")
        request += (0x301).to_bytes(2, "little") + (1).to_bytes(4, "little") + bytes(4)
        request += bytes(16)
        transport.sendto(request, (0, 0))
        for _ in range(200):
            if protocol.datagrams:
                break
            await asyncio.sleep(0.01)
        transport.abort()
        transport.close()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return protocol, transport.is_closing() and sock.fileno() == -1

    protocol, closed = run(body(), env={"KVPN_EVENT_LOOP": kind.value})
    assert protocol.made == 1
    assert protocol.datagrams and protocol.lost == [None]
    assert closed


async def _configure_tun() -> tuple[str, str, str]:
    from kvpn.routes.local_routes import read_local_routes_async
    from kvpn.tun.device import TunDevice
    from kvpn.tun.netlink import TunLinkConfig

    tun = TunDevice.open("kvpnt0", offload=False)
    with tun:
        async with await TunLinkConfig.open(tun.name) as link:
            await link.set_up(mtu=1500)
            await link.add_address(IPv4Address("198.19.255.1"))
            await link.add_route(IPv4Network("10.77.0.0/24"))
            configured = ip("-4", "route", "show", "dev", tun.name)
            routes = await read_local_routes_async(skip_dev=None)
        after = ip("-4", "route", "show", "dev", tun.name)
    return configured, after, " ".join(str(r) for r in routes)


@requires_root
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_tun_link_config_on_each_loop(kind: LoopKind) -> None:
    """pyroute2 (TunLinkConfig, read_local_routes_async) in a kvpnt- netns on either loop."""

    def scenario() -> tuple[str, str, str]:
        loop = new_event_loop(kind)
        try:
            return loop.run_until_complete(_configure_tun())
        finally:
            loop.close()

    with netns("evloop") as name:
        configured, after, routes = run_in(name, scenario)
    assert "10.77.0.0/24" in configured
    assert after == ""
    assert "10.77.0.0/24" in routes
