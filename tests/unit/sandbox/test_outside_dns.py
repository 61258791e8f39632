"""The outside world's DNS zone (sans-IO) and its UDP/TCP and HTTP adapters on loopback."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from sandbox.outside_dns import OutsideDns, OutsideWeb, OutsideZone


def ask(zone: OutsideZone, name: str, qtype: str = "A", **kw: int | None) -> DNSRecord:
    data = zone.handle(DNSRecord.question(name, qtype).pack(), **kw)
    assert data is not None
    return DNSRecord.parse(data)


def answers(reply: DNSRecord) -> list[tuple[str, str, str]]:
    return [(str(rr.rname), QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr]


CASES = [
    # name, qtype, rcode, answers, has SOA in authority
    ("example.test", "A", RCODE.NOERROR, [("example.test.", "A", "198.18.0.80")], False),
    ("EXAMPLE.Test.", "A", RCODE.NOERROR, [("example.test.", "A", "198.18.0.80")], False),
    ("outside.test", "A", RCODE.NOERROR, [("outside.test.", "A", "198.18.0.80")], False),
    (
        "www.example.test",
        "A",
        RCODE.NOERROR,
        [("www.example.test.", "CNAME", "example.test."), ("example.test.", "A", "198.18.0.80")],
        False,
    ),
    (
        "www.example.test",
        "CNAME",
        RCODE.NOERROR,
        [("www.example.test.", "CNAME", "example.test.")],
        False,
    ),
    ("example.test", "AAAA", RCODE.NOERROR, [], True),  # NODATA, not NXDOMAIN
    ("nothing.test", "A", RCODE.NXDOMAIN, [], True),
    ("a.example.test", "A", RCODE.NXDOMAIN, [], True),
    (
        "test",
        "SOA",
        RCODE.NOERROR,
        [("test.", "SOA", "ns.test. hostmaster.test. 1 3600 600 86400 5")],
        False,
    ),
    ("kubernetes.default.svc.cluster.local", "A", RCODE.REFUSED, [], False),
    ("example.com", "A", RCODE.REFUSED, [], False),
    ("xtest", "A", RCODE.REFUSED, [], False),
]


@pytest.mark.parametrize(("name", "qtype", "rcode", "expected", "soa"), CASES)
def test_zone_answers(
    name: str, qtype: str, rcode: int, expected: list[tuple[str, str, str]], soa: bool
) -> None:
    reply = ask(OutsideZone(), name, qtype)
    assert reply.header.rcode == rcode
    assert answers(reply) == expected
    assert [QTYPE[rr.rtype] for rr in reply.auth] == (["SOA"] if soa else [])


def test_counts_every_query_by_name_and_reports_them_over_txt() -> None:
    zone = OutsideZone()
    for name in ("example.test", "Example.Test.", "nothing.test", "echo.default.svc.cluster.local"):
        ask(zone, name)
    assert zone.count("example.test") == 2
    assert zone.count("EXAMPLE.TEST.") == 2
    assert zone.count("echo.default.svc.cluster.local") == 1
    assert zone.count("outside.test") == 0
    stats = ask(zone, "stats.example.test", "TXT")
    assert [str(rr.rdata) for rr in stats.rr] == [
        '"echo.default.svc.cluster.local=1"',
        '"example.test=2"',
        '"nothing.test=1"',
    ]
    assert zone.count("stats.example.test") == 0  # asking for stats is not counted


def test_malformed_and_response_messages_are_dropped_and_counted() -> None:
    zone = OutsideZone()
    assert zone.handle(b"") is None
    assert zone.handle(b"\x12\x34\x01") is None
    response = DNSRecord.question("example.test").reply().pack()
    assert zone.handle(response) is None
    assert zone.malformed == 3
    notify = DNSRecord.question("example.test")
    notify.header.opcode = 4
    reply = zone.handle(notify.pack())
    assert reply is not None and DNSRecord.parse(reply).header.rcode == RCODE.NOTIMP


def test_big_udp_answers_are_truncated_unless_edns_allows_them() -> None:
    zone = OutsideZone()
    for i in range(40):
        ask(zone, f"name-number-{i:03d}.example.test")
    plain = ask(zone, "stats.example.test", "TXT", max_size=4096)
    assert plain.header.tc == 1 and plain.rr == []
    query = DNSRecord.question("stats.example.test", "TXT")
    query.add_ar(EDNS0(udp_len=4096))
    data = zone.handle(query.pack(), max_size=4096)
    assert data is not None
    big = DNSRecord.parse(data)
    assert big.header.tc == 0 and len(big.rr) == 40
    over_tcp = ask(zone, "stats.example.test", "TXT", max_size=None)
    assert len(over_tcp.rr) == 40


async def test_dns_over_udp_and_tcp_on_loopback() -> None:
    dns = OutsideDns("127.0.0.1", 0)
    await dns.start()
    try:
        loop = asyncio.get_running_loop()
        query = DNSRecord.question("www.example.test", "A")
        udp_reply = await loop.run_in_executor(
            None, lambda: query.send("127.0.0.1", dns.port, timeout=2)
        )
        tcp_reply = await loop.run_in_executor(
            None, lambda: query.send("127.0.0.1", dns.port, tcp=True, timeout=2)
        )
        for data in (udp_reply, tcp_reply):
            assert answers(DNSRecord.parse(data))[-1] == ("example.test.", "A", "198.18.0.80")
        # Two queries on one TCP connection, the second split across writes.
        reader, writer = await asyncio.open_connection("127.0.0.1", dns.port)
        for i, name in enumerate(("outside.test", "nothing.test")):
            packed = DNSRecord.question(name).pack()
            framed = struct.pack("!H", len(packed)) + packed
            if i:
                writer.write(framed[:1])
                await writer.drain()
                await asyncio.sleep(0.01)
                framed = framed[1:]
            writer.write(framed)
            length = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = DNSRecord.parse(await reader.readexactly(length))
            assert reply.header.rcode == (RCODE.NOERROR, RCODE.NXDOMAIN)[i]
        writer.close()
        # Garbage over UDP gets no answer and does not stop the server.
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", dns.port)
        )
        transport.sendto(b"\x00garbage")
        transport.close()
        async with asyncio.timeout(2):
            while dns.zone.malformed < 1:
                await asyncio.sleep(0.01)
        assert dns.count("www.example.test") == 2
        assert dns.count("outside.test") == 1
    finally:
        await dns.stop()


async def test_outside_web_answers_outside() -> None:
    site = OutsideWeb("127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{site.port}/") as resp:
                assert resp.status == 200
                assert await resp.text() == "outside"
            async with session.get(f"http://127.0.0.1:{site.port}/any/path") as resp:
                assert await resp.text() == "outside"
            async with session.get(f"http://127.0.0.1:{site.port}/whoami") as resp:
                assert await resp.text() == "127.0.0.1"
        assert site.requests == 3
    finally:
        await site.stop()
