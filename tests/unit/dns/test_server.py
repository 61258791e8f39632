"""The asyncio adapter on loopback addresses, with a fake upstream and a fake cluster path."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord

from kvpn.dns.actions import UpstreamServer
from kvpn.dns.exchange import DnsExchangeError, tcp_exchange, udp_exchange
from kvpn.dns.resolver import ResolverConfig
from kvpn.dns.server import DnsServer, start_dns_server

from .fake_servers import FakeDnsServer
from .messages import query

LISTEN = "127.53.0.1"
FAST = ResolverConfig(
    upstreams=(), upstream_attempt_timeout=0.2, cluster_attempt_timeout=0.2, servfail_after=0.6
)


def outside(query_record: DNSRecord, transport: str) -> DNSRecord | None:
    """The laptop's ISP resolver: example.test, a big TXT answer truncated over UDP, silence."""
    name = str(query_record.q.qname).lower()
    reply = query_record.reply()
    if name == "silent.test.":
        return None
    if name == "big.test.":
        if transport == "udp":
            reply.header.tc = 1
            return reply
        for i in range(40):
            reply.add_answer(RR("big.test", QTYPE.TXT, ttl=60, rdata=TXT("x" * 60 + str(i))))
        return reply
    if name == "example.test." and query_record.q.qtype == QTYPE.A:
        reply.add_answer(RR("example.test", QTYPE.A, ttl=60, rdata=A("198.18.0.80")))
        return reply
    reply.header.rcode = RCODE.NXDOMAIN
    return reply


@dataclass
class FakeCluster:
    """Stands in for "UDP to kube-dns through the shadow"."""

    asked: list[str] = field(default_factory=list)
    broken: bool = False

    async def __call__(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        self.asked.append(str(request.q.qname).lower().rstrip("."))
        if self.broken:
            raise ConnectionError("tunnel down")
        reply = request.reply()
        if str(request.q.qname).startswith("echo."):
            reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=5, rdata=A("10.96.0.20")))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())


@dataclass
class Setup:
    server: DnsServer
    upstream: FakeDnsServer
    cluster: FakeCluster

    @property
    def at(self) -> UpstreamServer:
        return UpstreamServer(*self.server.address)


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    upstream = await FakeDnsServer.start("127.0.0.1", outside)
    cluster = FakeCluster()
    server = await start_dns_server(
        listen_host=LISTEN,
        listen_port=0,
        cluster_query=cluster,
        upstreams=[UpstreamServer(*upstream.address)],
        namespace="default",
        namespaces=["default", "other"],
        config=FAST,
    )
    try:
        yield Setup(server, upstream, cluster)
    finally:
        await server.close()
        await upstream.close()


def _parse(data: bytes) -> DNSRecord:
    return DNSRecord.parse(data)


async def test_cluster_names_go_to_the_cluster_only(setup: Setup) -> None:
    for name in ["echo", "echo.default", "echo.default.svc.cluster.local", "echo.other.svc"]:
        answer = _parse(await udp_exchange(setup.at, query(name), timeout=2))
        assert [str(rr.rdata) for rr in answer.rr] == ["10.96.0.20"], name
    # the three spellings of one name are asked separately (cached by the asked name)
    assert setup.cluster.asked == ["echo.default.svc.cluster.local"] * 3 + [
        "echo.other.svc.cluster.local"
    ]
    assert setup.upstream.seen == []


async def test_external_names_go_upstream_only(setup: Setup) -> None:
    answer = _parse(await udp_exchange(setup.at, query("example.test"), timeout=2))
    assert str(answer.rr[0].rdata) == "198.18.0.80"
    assert setup.upstream.seen == [("udp", "example.test")]
    assert setup.cluster.asked == []


async def test_aaaa_for_cluster_name_answered_at_once(setup: Setup) -> None:
    answer = _parse(
        await udp_exchange(setup.at, query("echo.default.svc.cluster.local", "AAAA"), timeout=2)
    )
    assert answer.header.rcode == RCODE.NOERROR and not answer.rr
    assert setup.cluster.asked == [] and setup.upstream.seen == []


async def test_truncated_upstream_answer_fetched_over_tcp(setup: Setup) -> None:
    via_tcp = _parse(await tcp_exchange(setup.at, query("big.test", "TXT"), timeout=2))
    assert len(via_tcp.rr) == 40 and not via_tcp.header.tc
    assert setup.upstream.seen == [("udp", "big.test"), ("tcp", "big.test")]
    # a classic UDP client then gets TC from the cache and retries over TCP itself
    via_udp = _parse(await udp_exchange(setup.at, query("big.test", "TXT"), timeout=2))
    assert via_udp.header.tc and not via_udp.rr


async def test_silent_upstream_gives_servfail_in_bounded_time(setup: Setup) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = _parse(await udp_exchange(setup.at, query("silent.test"), timeout=3))
    assert answer.header.rcode == RCODE.SERVFAIL
    assert loop.time() - started < 2.0  # servfail_after is 0.6 s


async def test_broken_tunnel_gives_servfail(setup: Setup) -> None:
    setup.cluster.broken = True
    answer = _parse(
        await udp_exchange(setup.at, query("echo.default.svc.cluster.local"), timeout=2)
    )
    assert answer.header.rcode == RCODE.SERVFAIL


async def test_tcp_clients_may_pipeline(setup: Setup) -> None:
    reader, writer = await asyncio.open_connection(*setup.server.address)
    for qid, name in [(1, "example.test"), (2, "echo.default.svc.cluster.local")]:
        data = query(name, qid=qid)
        writer.write(struct.pack("!H", len(data)) + data)
    await writer.drain()
    ids = set()
    for _ in range(2):
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        ids.add(_parse(await reader.readexactly(size)).header.id)
    writer.close()
    assert ids == {1, 2}


async def test_garbage_is_answered_or_dropped_and_service_goes_on(setup: Setup) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for junk in [b"", b"\x00", b"\xff" * 40, query("x")[:15], b"\x12\x34" + b"\x00" * 10]:
            sock.sendto(junk, setup.server.address)
    finally:
        sock.close()
    answer = _parse(await udp_exchange(setup.at, query("example.test"), timeout=2))
    assert answer.rr
    assert setup.server.resolver.counters.malformed_queries >= 3


async def test_listens_on_the_given_address_only(setup: Setup) -> None:
    assert setup.server.address[0] == LISTEN
    with pytest.raises(DnsExchangeError):
        await tcp_exchange(
            UpstreamServer("127.0.0.1", setup.server.address[1]), query("x"), timeout=1
        )


async def test_refuses_unspecified_address() -> None:
    for host in ["0.0.0.0", "::"]:
        with pytest.raises(ValueError, match="TUN address"):
            await start_dns_server(
                listen_host=host, cluster_query=FakeCluster(), upstreams=[], namespace="default"
            )


async def test_own_address_is_never_an_upstream() -> None:
    server = await start_dns_server(
        listen_host=LISTEN,
        listen_port=0,
        cluster_query=FakeCluster(),
        upstreams=[UpstreamServer(LISTEN, 53), UpstreamServer("127.0.0.9")],
        namespace="default",
    )
    try:
        assert server.resolver.config.upstreams == (UpstreamServer("127.0.0.9"),)
    finally:
        await server.close()
