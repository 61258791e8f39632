"""Root test: a real TUN in a fresh netns, configured by netlink, then removed without a trace."""

from __future__ import annotations

import asyncio
import select
import socket
from ipaddress import IPv4Address, IPv4Network

import pytest

from kvpn.net.ipv4 import parse_ipv4
from kvpn.net.udp import parse_udp
from kvpn.net.vnet import VNET_HEADER_LENGTH, parse_vnet
from kvpn.tun.device import TunDevice
from kvpn.tun.netlink import NetlinkConfigError, TunLinkConfig

from .netns import ip, netns, requires_root, run_in

pytestmark = requires_root
ROUTED = IPv4Network("10.77.0.0/24")


async def _scenario(offload: bool) -> dict[str, object]:
    tun = TunDevice.open("kvpnt0", offload=offload)
    with tun:
        async with await TunLinkConfig.open(tun.name) as link:
            await link.set_up(mtu=1500, txqueuelen=1000)
            await link.add_address(IPv4Address("198.19.255.1"))
            await link.add_route(ROUTED)
            await link.add_route(IPv4Network("198.19.255.2/32"))
            with pytest.raises(NetlinkConfigError):
                await link.add_route(ROUTED)  # already there: a clear error, not a silent success
            link.routes.pop()  # the returned list is a copy
            configured = ip("-4", "route", "show", "dev", tun.name)

            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.sendto(b"hello tun", ("10.77.0.5", 9999))
            packet = None
            offset = VNET_HEADER_LENGTH if tun.vnet_header else 0
            for _ in range(50):  # skip IPv6 router solicitations and the like
                select.select([tun.fileno()], [], [], 2.0)
                packet = tun.read()
                if packet is not None and packet[offset] >> 4 == 4:
                    break
            sender.close()
        after_close = ip("-4", "route", "show", "dev", tun.name) + ip(
            "-4", "addr", "show", "dev", tun.name
        )
    links_left = ip("link", "show")
    return {
        "vnet": tun.vnet_header,
        "configured": configured,
        "packet": packet,
        "after_close": after_close,
        "links_left": links_left,
    }


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_tun_route_udp_and_cleanup(offload: bool) -> None:
    with netns("tun") as name:
        result = run_in(name, lambda: asyncio.run(_scenario(offload)))
    assert result["vnet"] is offload
    assert "10.77.0.0/24" in str(result["configured"]) and "198.19.255.2" in str(
        result["configured"]
    )
    packet = result["packet"]
    assert isinstance(packet, bytes)
    offset = VNET_HEADER_LENGTH if offload else 0
    if offload:
        parse_vnet(packet)
    header = parse_ipv4(packet, offset)
    assert header.src == IPv4Address("198.19.255.1").packed
    assert header.dst == IPv4Address("10.77.0.5").packed
    udp = parse_udp(packet, offset + 20, offset + header.total_length)
    assert udp.dst_port == 9999 and packet[offset + 28 :] == b"hello tun"
    assert result["after_close"] == ""  # routes and address removed before the device went
    assert "kvpnt0" not in str(result["links_left"])
