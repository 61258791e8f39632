"""A scripted DNS server (UDP and TCP on one port) to play the laptop's upstream."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from typing import Any

from dnslib import DNSRecord

Handler = Callable[[DNSRecord, str], DNSRecord | None]  # query, "udp"/"tcp" -> answer or silence


class FakeDnsServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[tuple[str, str]] = []  # (transport, lower-case name)
        self.address: tuple[str, int] = ("", 0)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    @classmethod
    async def start_on(cls, host: str, port: int, handler: Handler) -> FakeDnsServer:
        server = cls(handler)
        loop = asyncio.get_running_loop()
        server._udp, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(server), local_addr=(host, port)
        )
        server._tcp = await asyncio.start_server(server._serve_tcp, host, port)
        server.address = (host, port)
        return server

    @classmethod
    async def start(cls, host: str, handler: Handler) -> FakeDnsServer:
        server = cls(handler)
        loop = asyncio.get_running_loop()
        for _ in range(8):
            udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(server), local_addr=(host, 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                server._tcp = await asyncio.start_server(server._serve_tcp, host, port)
            except OSError:
                udp.close()
                continue
            server._udp = udp
            server.address = (host, port)
            return server
        raise OSError("no port")

    def answer(self, data: bytes, transport: str) -> bytes | None:
        query = DNSRecord.parse(data)
        self.seen.append((transport, str(query.q.qname).lower().rstrip(".")))
        reply = self.handler(query, transport)
        return None if reply is None else bytes(reply.pack())

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                out = self.answer(await reader.readexactly(size), "tcp")
                if out is not None:
                    writer.write(struct.pack("!H", len(out)) + out)
        writer.close()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: FakeDnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        out = self.server.answer(data, "udp")
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)
