"""Root test: the resolver answers this machine only, never a host on the LAN.

Linux accepts packets for a local address on any interface, so a LAN host that routes the TUN
address to us could use kvpn's resolver (and reach cluster names) unless the server checks.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator

import pytest

from kvpn.dns.actions import UpstreamServer
from kvpn.dns.exchange import udp_exchange
from kvpn.dns.server import start_dns_server
from sandbox.inside_netns import enter_netns

from .messages import query
from .test_server import FAST, FakeCluster

RESOLVER = "198.19.255.1"


@pytest.fixture
def lan() -> Iterator[tuple[str, str]]:
    tag = os.urandom(3).hex()
    laptop, neighbour = f"kvpnt-dl-{tag}", f"kvpnt-dn-{tag}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", laptop)
    ip("netns", "add", neighbour)
    try:
        ip(
            "link",
            "add",
            "lan0",
            "netns",
            laptop,
            "type",
            "veth",
            "peer",
            "name",
            "lan0",
            "netns",
            neighbour,
        )
        ip("-n", laptop, "addr", "add", "100.71.9.1/24", "dev", "lan0")
        ip("-n", laptop, "addr", "add", f"{RESOLVER}/32", "dev", "lo")
        ip("-n", neighbour, "addr", "add", "100.71.9.2/24", "dev", "lan0")
        for ns in (laptop, neighbour):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", "lan0", "up")
        ip("-n", neighbour, "route", "add", f"{RESOLVER}/32", "via", "100.71.9.1")
        yield laptop, neighbour
    finally:
        for ns in (laptop, neighbour):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


NEIGHBOUR_QUERY = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 53))
try:
    s.recvfrom(4096); print("answered")
except socket.timeout:
    print("silent")
"""


async def test_lan_hosts_get_no_answer(lan: tuple[str, str]) -> None:
    laptop, neighbour = lan
    cluster = FakeCluster()
    # The whole test runs in the laptop's namespace, as kvpn itself does.
    restore = enter_netns(laptop)
    try:
        await _serve_and_probe(neighbour, cluster)
    finally:
        restore()


async def _serve_and_probe(neighbour: str, cluster: FakeCluster) -> None:
    server = await start_dns_server(
        listen_host=RESOLVER,
        listen_port=53,
        cluster_query=cluster,
        upstreams=[],
        namespace="default",
        namespaces=["default"],
        config=FAST,
    )
    try:
        local = await udp_exchange(
            UpstreamServer(RESOLVER, 53), query("echo.default.svc.cluster.local"), timeout=2
        )
        assert local
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            neighbour,
            "python3",
            "-c",
            NEIGHBOUR_QUERY,
            query("echo.default.svc.cluster.local").hex(),
            RESOLVER,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert out.decode().strip() == "silent"
        assert server.refused_remote == 1
        assert cluster.asked == ["echo.default.svc.cluster.local"]
    finally:
        await server.close()
