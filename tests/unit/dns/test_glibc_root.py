"""glibc against kvpn's resolver in a network namespace (root): search list, AAAA, upstreams.

A ``kvpnt-`` namespace gets a fake "ISP" resolver on 127.0.0.2:53 and kvpn's resolver on
127.0.0.1:53 (a fake cluster path behind it); its resolv.conf (``/etc/netns/<ns>``, which
``ip netns exec`` bind-mounts) is switched to resolv.conf mode and back. ``getent ahosts``
(getaddrinfo: A and AAAA in parallel, like curl) must find cluster short names through the
search list and external names through the original server, and resolv.conf must come back
byte for byte.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, RR, SOA, A, DNSRecord

from kvpn.dns.actions import UpstreamServer
from kvpn.dns.os_config import DnsMode, DnsPaths, apply_dns_plan, plan_dns, restore_from_state
from kvpn.dns.server import start_dns_server

from .fake_servers import FakeDnsServer

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("getent"),
    reason="needs root, ip(8) and getent(1)",
)
CLONE_NEWNET = 0x40000000
ORIGINAL = b"nameserver 127.0.0.2\n"


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def outside(query: DNSRecord, transport: str) -> DNSRecord:
    reply = query.reply()
    if str(query.q.qname).lower() == "example.test." and query.q.qtype == QTYPE.A:
        reply.add_answer(RR("example.test", QTYPE.A, ttl=5, rdata=A("198.18.0.80")))
    elif str(query.q.qname).lower() != "example.test.":
        reply.header.rcode = RCODE.NXDOMAIN
    return reply


class FakeCluster:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        name = str(request.q.qname).lower()
        self.asked.append(name)
        reply = request.reply()
        if name == "echo.team.svc.cluster.local." and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=5, rdata=A("10.96.0.20")))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
            soa = SOA("ns.dns.cluster.local", "hostmaster.cluster.local", (1, 2, 3, 4, 5))
            reply.add_auth(RR("cluster.local", QTYPE.SOA, ttl=5, rdata=soa))
        return bytes(reply.pack())


class ResolverThread:
    """kvpn's resolver and the fake ISP resolver, on an event loop inside the namespace."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.cluster = FakeCluster()
        self.outside_seen: list[tuple[str, str]] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            _setns(f"/run/netns/{self.netns}")
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        isp = await FakeDnsServer.start_on("127.0.0.2", 53, outside)
        server = await start_dns_server(
            listen_host="127.0.0.1",
            cluster_query=self.cluster,
            upstreams=[UpstreamServer("127.0.0.2")],
            namespace="team",
            namespaces=["team"],
        )
        self.ready.set()
        await self.stop.wait()
        self.outside_seen = list(isp.seen)
        await server.close()
        await isp.close()

    def __enter__(self) -> ResolverThread:
        self.thread.start()
        self.ready.wait(30)
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture
def netns() -> Iterator[tuple[str, Path]]:
    name = f"kvpnt-dnsg-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    folder = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # getaddrinfo's AI_ADDRCONFIG wants a non-loopback IPv4 address before it asks for A
        for args in (["link", "set", "lo", "up"], ["addr", "add", "192.0.2.1/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *args], check=True)
        folder.mkdir(parents=True)
        (folder / "resolv.conf").write_bytes(ORIGINAL)
        yield name, folder / "resolv.conf"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def _getent(netns: str, name: str) -> list[str]:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "getent", "ahostsv4", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return sorted({line.split()[0] for line in done.stdout.splitlines() if line.strip()})


def test_getaddrinfo_through_kvpn(netns: tuple[str, Path], tmp_path: Path) -> None:
    name, resolv_conf = netns
    state = tmp_path / "state"
    plan = plan_dns(DnsMode.RESOLV_CONF, nameserver="127.0.0.1", namespace="team")
    apply_dns_plan(plan, state_dir=state, paths=DnsPaths(resolv_conf=resolv_conf))
    try:
        with ResolverThread(name) as resolver:
            assert _getent(name, "echo") == ["10.96.0.20"]
            assert _getent(name, "echo.team") == ["10.96.0.20"]
            assert _getent(name, "echo.team.svc.cluster.local") == ["10.96.0.20"]
            assert _getent(name, "example.test") == ["198.18.0.80"]
            assert _getent(name, "nosuch") == []
        # external names never went to the cluster; cluster names never went outside
        assert not any("example.test" in asked for asked in resolver.cluster.asked)
        assert not any("echo" in seen for _, seen in resolver.outside_seen)
    finally:
        report = restore_from_state(state)
    assert report.ok
    assert resolv_conf.read_bytes() == ORIGINAL
