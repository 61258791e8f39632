"""The sandbox's "outside world": a DNS server for zone ``test.`` and a web server.

Theory of operation
-------------------
The node holds 198.18.0.53 and 198.18.0.80 on ``lo``; the laptop routes 198.18.0.0/24 to the
node and its resolv.conf names 198.18.0.53. So these two servers play the laptop's ISP
resolver and a public web site: kvpn must leave them working while it diverts cluster names.

``OutsideZone`` is the sans-IO DNS core: bytes in, bytes (or nothing) out. It is authoritative
for ``test.``:

=====================  ===========================================
``example.test``       A 198.18.0.80
``www.example.test``   CNAME example.test (the A record follows)
``outside.test``       A 198.18.0.80
``stats.example.test`` TXT, one ``"<name>=<count>"`` per name asked so far
other names in .test   NXDOMAIN with the SOA; known name, other type: NODATA with the SOA
outside .test          REFUSED
=====================  ===========================================

Every query is counted by name (lowercase, no trailing dot), refused ones included, so a test
can show a name did *not* travel through the laptop's own resolver. Malformed messages are
dropped and counted. UDP answers larger than the client's limit (512, or its EDNS0 size) are
sent truncated (TC) so the client retries over TCP. ``OutsideDns`` and ``OutsideWeb`` are the
asyncio adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from dnslib import CNAME, EDNS0, OPCODE, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSRecord

from sandbox.config import OUTSIDE_DNS_ADDRESS, OUTSIDE_WEB_ADDRESS

log = logging.getLogger("sandbox.outside_dns")

ZONE = "test."
STATS_NAME = "stats.example.test."
TTL = 5
UDP_DEFAULT_SIZE = 512
UDP_MAX_SIZE = 4096
TCP_IDLE_TIMEOUT_S = 10.0
WEB_BODY = "outside"


@dataclass(frozen=True, slots=True)
class Record:
    rtype: str  # "A" | "CNAME"
    value: str


def default_records(web_address: str = str(OUTSIDE_WEB_ADDRESS)) -> dict[str, tuple[Record, ...]]:
    return {
        "example.test.": (Record("A", web_address),),
        "www.example.test.": (Record("CNAME", "example.test."),),
        "outside.test.": (Record("A", web_address),),
    }


RDATA: dict[str, Callable[[str], object]] = {"A": A, "CNAME": CNAME}


class OutsideZone:
    """Answers DNS queries for zone ``test.`` (sans-IO) and counts them by name."""

    def __init__(self, records: dict[str, tuple[Record, ...]] | None = None) -> None:
        self.records = default_records() if records is None else records
        self.queries: collections.Counter[str] = collections.Counter()
        self.malformed = 0

    def count(self, name: str) -> int:
        """How many queries asked for ``name`` (any case, trailing dot optional)."""
        return self.queries[name.lower().rstrip(".")]

    def handle(self, data: bytes, *, max_size: int | None = None) -> bytes | None:
        """One DNS message in, the reply out; None for a message not worth an answer.

        ``max_size``: the transport's limit (UDP); None for TCP (no limit but 65535).
        """
        try:
            request = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError, struct.error, UnicodeDecodeError):
            self.malformed += 1
            return None
        if request.header.qr:  # a response sent to a server: ignore
            self.malformed += 1
            return None
        reply = request.reply()
        reply.header.ra = 0
        edns = next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)
        if edns is not None:
            reply.add_ar(EDNS0(udp_len=UDP_MAX_SIZE))
        if request.header.opcode != OPCODE.QUERY:
            reply.header.rcode = RCODE.NOTIMP
        elif len(request.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
        else:
            self._answer(request, reply)
        packed: bytes = reply.pack()
        if max_size is not None:
            limit = UDP_DEFAULT_SIZE
            if edns is not None:
                limit = max(UDP_DEFAULT_SIZE, min(int(edns.rclass), UDP_MAX_SIZE))
            if len(packed) > min(limit, max_size):
                reply.rr, reply.auth = [], []
                reply.header.tc = 1
                packed = reply.pack()
        return packed

    def _answer(self, request: DNSRecord, reply: DNSRecord) -> None:
        question = request.q
        name = str(question.qname).lower()
        if not name.endswith("."):
            name += "."
        qtype = question.qtype
        if name == STATS_NAME:
            if qtype in (QTYPE.TXT, QTYPE.ANY):
                for counted, n in sorted(self.queries.items()):
                    reply.add_answer(RR(name, QTYPE.TXT, rdata=TXT(f"{counted}={n}"), ttl=0))
            return
        self.queries[name.rstrip(".")] += 1
        if not (name == ZONE or name.endswith("." + ZONE)):
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
            return
        if name == ZONE and qtype in (QTYPE.SOA, QTYPE.ANY):
            reply.add_answer(self._soa())
            return
        if name != ZONE and name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa())
            return
        for _ in range(8):  # follow in-zone CNAMEs, as an authoritative server does
            records = self.records.get(name, ())
            cname = next((r for r in records if r.rtype == "CNAME"), None)
            if cname is not None and qtype != QTYPE.CNAME:
                reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(cname.value), ttl=TTL))
                name = cname.value.lower()
                continue
            for r in records:
                if qtype in (getattr(QTYPE, r.rtype), QTYPE.ANY):
                    reply.add_answer(
                        RR(name, getattr(QTYPE, r.rtype), rdata=RDATA[r.rtype](r.value), ttl=TTL)
                    )
            break
        if not reply.rr:
            reply.add_auth(self._soa())

    @staticmethod
    def _soa() -> RR:
        soa = SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, TTL))
        return RR(ZONE, QTYPE.SOA, rdata=soa, ttl=TTL)


# -- asyncio adapters ----------------------------------------------------------------------


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: OutsideZone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.zone.handle(data, max_size=UDP_MAX_SIZE)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class OutsideDns:
    """The zone served on ``address:port`` over UDP and TCP."""

    def __init__(
        self,
        address: str = str(OUTSIDE_DNS_ADDRESS),
        port: int = 53,
        *,
        zone: OutsideZone | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self.zone = zone or OutsideZone()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def count(self, name: str) -> int:
        return self.zone.count(name)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tcp = await asyncio.start_server(self._serve_tcp, self.address, self.port)
        if self.port == 0:  # tests: the same free port for both transports
            self.port = self._tcp.sockets[0].getsockname()[1]
        try:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self.zone), local_addr=(self.address, self.port)
            )
        except BaseException:
            await self.stop()
            raise
        log.info("outside DNS on %s:%d", self.address, self.port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT_S)
                data = await asyncio.wait_for(
                    reader.readexactly(struct.unpack("!H", header)[0]), TCP_IDLE_TIMEOUT_S
                )
                reply = self.zone.handle(data)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class OutsideWeb:
    """A public web site: every path answers ``outside``; ``/whoami`` answers the client IP."""

    def __init__(self, address: str = str(OUTSIDE_WEB_ADDRESS), port: int = 80) -> None:
        self.address = address
        self.port = port
        self.requests = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/whoami", self._whoami)
        app.router.add_route("*", "/{tail:.*}", self._outside)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.address, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0 and runner.addresses:
            self.port = runner.addresses[0][1]
        log.info("outside web on %s:%d", self.address, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _outside(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(text=WEB_BODY)

    async def _whoami(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(text=request.remote or "")


async def _serve(args: argparse.Namespace) -> None:
    dns = OutsideDns(args.dns_address, args.dns_port)
    site = OutsideWeb(args.web_address, args.web_port)
    await dns.start()
    await site.start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await site.stop()
        await dns.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.outside_dns")
    parser.add_argument("--dns-address", default=str(OUTSIDE_DNS_ADDRESS))
    parser.add_argument("--dns-port", type=int, default=53)
    parser.add_argument("--web-address", default=str(OUTSIDE_WEB_ADDRESS))
    parser.add_argument("--web-port", type=int, default=80)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
