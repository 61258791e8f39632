"""Reading the main routing table: message conversion, and a real table in a kvpnt- netns."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from kvpn.routes.local_routes import (
    local_route_from_message,
    read_local_routes,
    read_local_routes_async,
)
from kvpn.routes.plan import LocalRoute
from tests.unit.tun.netns import entered, ip, netns, requires_root

N = IPv4Network
A = IPv4Address
IFNAMES = {2: "eth0", 3: "docker0"}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            {"dst_len": 0, "oif": 2, "gateway": "192.168.1.1", "priority": 100},
            LocalRoute(N("0.0.0.0/0"), "eth0", A("192.168.1.1"), 100),
        ),
        ({"dst": "172.17.0.0", "dst_len": 16, "oif": 3}, LocalRoute(N("172.17.0.0/16"), "docker0")),
        ({"dst": "10.9.0.0", "dst_len": 16, "oif": 99}, LocalRoute(N("10.9.0.0/16"), None)),
        (
            {"dst": "10.50.0.0", "dst_len": 16, "multipath": [{"oif": 2, "gateway": "10.0.0.1"}]},
            LocalRoute(N("10.50.0.0/16"), "eth0", A("10.0.0.1")),
        ),
        ({"dst": "10.0.0.0", "dst_len": 8, "type": 6}, None),  # blackhole
        ({"dst": "10.0.0.0", "dst_len": 8, "table": 100}, None),  # another table
        ({"family": socket.AF_INET6, "dst": "fd00::", "dst_len": 8}, None),
        ({"dst": "10.0.0.1", "dst_len": 8}, None),  # host bits: malformed
        ({"dst": "10.0.0.0", "dst_len": 40}, None),
        ({"dst": object(), "dst_len": 8}, None),
    ],
)
def test_local_route_from_message(message: dict[str, Any], expected: LocalRoute | None) -> None:
    assert local_route_from_message(message, IFNAMES) == expected


@requires_root
def test_read_the_main_table_of_a_namespace() -> None:
    with netns("routes") as name:
        # No dummy module here: a veth pair stands for the LAN, a tun device for kvpn's own.
        ip("link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1", netns=name)
        ip("tuntap", "add", "mode", "tun", "kvpn0", netns=name)
        for dev in ("dummy0", "dummy1", "kvpn0"):
            ip("link", "set", dev, "up", netns=name)
        ip("addr", "add", "10.0.0.1/24", "dev", "dummy0", netns=name)
        ip("route", "add", "default", "via", "10.0.0.254", "metric", "100", netns=name)
        ip("route", "add", "10.96.128.0/17", "via", "10.0.0.254", "dev", "dummy0", netns=name)
        ip("route", "add", "10.96.0.0/12", "dev", "kvpn0", netns=name)
        ip("route", "add", "blackhole", "10.66.0.0/16", netns=name)
        ip("route", "add", "10.77.0.0/16", "dev", "dummy0", "table", "100", netns=name)
        with entered(name):
            routes = read_local_routes()
            everything = read_local_routes(skip_dev=None)
            from_async = asyncio.run(read_local_routes_async())
    assert set(routes) == {
        LocalRoute(N("0.0.0.0/0"), "dummy0", A("10.0.0.254"), 100),
        LocalRoute(N("10.0.0.0/24"), "dummy0"),
        LocalRoute(N("10.96.128.0/17"), "dummy0", A("10.0.0.254")),
    }
    assert LocalRoute(N("10.96.0.0/12"), "kvpn0") in everything
    assert from_async == routes
