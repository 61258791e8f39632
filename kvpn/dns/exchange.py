"""One DNS question-and-answer with a server over UDP or TCP (asyncio).

Used by tests as a client, and usable as the ``cluster_query`` callable of
:class:`~kvpn.dns.server.DnsServer` when the kernel already routes the cluster DNS address
into the TUN (``functools.partial(exchange, UpstreamServer(str(kube_dns_ip)), timeout=2.0)``).
Only the answer whose ID matches the query is taken; other datagrams are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

from kvpn.dns.actions import UpstreamServer

__all__ = ["DnsExchangeError", "exchange", "tcp_exchange", "udp_exchange"]

TC_BIT = 0x0200
MAX_TCP_MESSAGE = 65535


class DnsExchangeError(Exception):
    """The server did not answer, refused the connection, or sent garbage."""


class _OneAnswer(asyncio.DatagramProtocol):
    def __init__(self, query_id: bytes) -> None:
        self._query_id = query_id
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if data[:2] == self._query_id and len(data) >= 12 and not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(DnsExchangeError(f"UDP error: {exc}"))


async def udp_exchange(server: UpstreamServer, query: bytes, *, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _OneAnswer(query[:2]), remote_addr=(server.host, server.port)
        )
    except OSError as exc:
        raise DnsExchangeError(f"cannot reach {server.host}:{server.port}: {exc}") from exc
    try:
        transport.sendto(query)
        return await asyncio.wait_for(protocol.answer, timeout)
    except TimeoutError as exc:
        raise DnsExchangeError(f"no answer from {server.host}:{server.port}") from exc
    finally:
        transport.close()


async def tcp_exchange(server: UpstreamServer, query: bytes, *, timeout: float) -> bytes:
    async def run() -> bytes:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                answer = await reader.readexactly(size)
                if answer[:2] == query[:2]:
                    return answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(run(), timeout)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        raise DnsExchangeError(f"TCP query to {server.host}:{server.port} failed: {exc}") from exc


async def exchange(server: UpstreamServer, query: bytes, *, timeout: float) -> bytes:
    """UDP first; the same question over TCP when the UDP answer is truncated (TC)."""
    answer = await udp_exchange(server, query, timeout=timeout)
    if len(answer) >= 4 and struct.unpack_from("!H", answer, 2)[0] & TC_BIT:
        return await tcp_exchange(server, query, timeout=timeout)
    return answer
