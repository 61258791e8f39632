"""The resolver's asyncio adapter: UDP and TCP listeners on the TUN address, and forwards.

Theory of operation
-------------------
:class:`DnsServer` owns no DNS logic. It feeds every datagram and every length-prefixed TCP
message (RFC 1035 §4.2.2, pipelining allowed per RFC 7766 §6.2.1) to the sans-IO
:class:`~kvpn.dns.resolver.DnsResolver`, then drains ``next_action()`` and re-arms one timer
at ``get_timer()`` - the aioquic pattern. Forwards run as tasks keyed by forward ID:

- ``ForwardToCluster``: ``await cluster_query(query)`` (the caller backs it with the tunnel;
  ``cluster_query_tcp``, if given, after a truncated answer); the answer goes to
  ``receive_response``, an exception to ``forward_failed``;
- ``ForwardUpstream``: a connected UDP socket per forward (a fresh random source port)
  delivering every datagram to ``receive_response`` until the forward finishes, or one TCP
  exchange when the core asks for TCP after a truncated answer;
- ``ForwardFinished``: cancel the forward's tasks and close their sockets.

The listeners bind the given address only; an unspecified address (0.0.0.0, ::) is refused so
the resolver is never reachable from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network
from typing import Any

from kvpn.dns.actions import (
    ClientTransport,
    ForwardFinished,
    ForwardToCluster,
    ForwardUpstream,
    Reply,
    UpstreamServer,
)
from kvpn.dns.exchange import DnsExchangeError, tcp_exchange
from kvpn.dns.names import ClusterNames
from kvpn.dns.resolver import DnsResolver, ResolverConfig

__all__ = ["ClusterQuery", "DnsServer", "start_dns_server"]

log = logging.getLogger("kvpn.dns.server")

ClusterQuery = Callable[[bytes], Awaitable[bytes]]
TCP_IDLE_TIMEOUT = 10.0
TCP_EXCHANGE_TIMEOUT = 4.0
MAX_TCP_CLIENTS = 64
UDP_RECEIVE_BUFFER = 1 << 20
BIND_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class UdpClient:
    address: tuple[str, int]


@dataclass(frozen=True, slots=True)
class TcpClient:
    connection_id: int


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self._server.local_sources.allows(addr[0], now=self._server._loop.time()):
            self._server.refused_remote += 1
            return
        self._server._query(data, UdpClient((addr[0], addr[1])), ClientTransport.UDP)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS listener: %s", exc)


class _UpstreamSocket(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer, forward_id: int) -> None:
        self._server = server
        self._forward_id = forward_id

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._server._response(self._forward_id, data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable etc.
        self._server._forward_failed(self._forward_id)


class LocalSources:
    """Which client addresses belong to this machine (the resolver serves nobody else).

    Linux accepts packets for any local address on any interface, so a host on the LAN could
    reach the resolver on the TUN address. A source address is local when a socket can be
    bound to it; answers are cached (bounded, expiring) so the check costs nothing per query.
    """

    TTL = 30.0
    MAX_ENTRIES = 256

    def __init__(self) -> None:
        self._cache: dict[str, tuple[bool, float]] = {}

    def allows(self, address: str, *, now: float) -> bool:
        cached = self._cache.get(address)
        if cached is not None and cached[1] > now:
            return cached[0]
        local = _is_local_address(address)
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.clear()
        self._cache[address] = (local, now + self.TTL)
        return local


def _is_local_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((address, 0))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class DnsServer:
    """Listens on one address (UDP and TCP, same port); use :meth:`start`."""

    def __init__(
        self,
        resolver: DnsResolver,
        cluster_query: ClusterQuery,
        cluster_query_tcp: ClusterQuery | None = None,
    ) -> None:
        self.resolver = resolver
        self._cluster_query = cluster_query
        self._cluster_query_tcp = cluster_query_tcp or cluster_query
        self._loop = asyncio.get_running_loop()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_writers: dict[int, asyncio.StreamWriter] = {}
        self._connection_ids = itertools.count(1)
        self._forward_tasks: dict[int, set[asyncio.Task[None]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._handlers: dict[type, Callable[[Any], None]] = {
            Reply: self._send_reply,
            ForwardToCluster: self._forward_to_cluster,
            ForwardUpstream: self._forward_upstream,
            ForwardFinished: self._forward_finished,
        }
        self.address: tuple[str, int] = ("", 0)
        self.local_sources = LocalSources()
        #: Queries dropped because they came from another machine.
        self.refused_remote = 0

    @classmethod
    async def start(
        cls,
        resolver: DnsResolver,
        *,
        host: str,
        port: int = 53,
        cluster_query: ClusterQuery,
        cluster_query_tcp: ClusterQuery | None = None,
    ) -> DnsServer:
        """*cluster_query_tcp* (optional) is used after a truncated cluster answer."""
        if ipaddress.ip_address(host).is_unspecified:
            raise ValueError(f"refusing to listen on {host}: bind the TUN address only")
        server = cls(resolver, cluster_query, cluster_query_tcp)
        await server._bind(host, port)
        return server

    async def _bind(self, host: str, port: int) -> None:
        for _ in range(BIND_ATTEMPTS if port == 0 else 1):
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _UdpListener(self), local_addr=(host, port)
            )
            # A burst of queries (a browser, a test flood) must not overflow the default
            # ~200 KiB receive buffer and drop the next real query.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            bound_port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound_port)
            except OSError as exc:
                transport.close()
                if exc.errno != errno.EADDRINUSE or port != 0:
                    raise
                continue
            self._udp = transport
            self.address = (host, bound_port)
            return
        raise OSError(errno.EADDRINUSE, f"no free port on {host} for both UDP and TCP")

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._tcp_writers.values()):
            writer.close()
        tasks = [task for group in self._forward_tasks.values() for task in group]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 1.0)

    # -- inputs -> resolver -------------------------------------------------------------

    def _query(self, data: bytes, client: object, transport: ClientTransport) -> None:
        self.resolver.receive_query(data, client, transport=transport, now=self._loop.time())
        self._pump()

    def _response(self, forward_id: int, data: bytes) -> None:
        self.resolver.receive_response(forward_id, data, now=self._loop.time())
        self._pump()

    def _forward_failed(self, forward_id: int) -> None:
        self.resolver.forward_failed(forward_id, now=self._loop.time())
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self.resolver.handle_timer(now=self._loop.time())
        self._pump()

    def _pump(self) -> None:
        while (action := self.resolver.next_action()) is not None:
            self._handlers[type(action)](action)
        when = self.resolver.get_timer()
        if self._timer is not None and (when is None or self._timer.when() != when):
            self._timer.cancel()
            self._timer = None
        if when is not None and self._timer is None:
            self._timer = self._loop.call_at(when, self._on_timer)

    # -- actions ------------------------------------------------------------------------

    def _send_reply(self, action: Reply) -> None:
        client = action.client
        if isinstance(client, UdpClient) and self._udp is not None:
            self._udp.sendto(action.response, client.address)
        elif isinstance(client, TcpClient):
            writer = self._tcp_writers.get(client.connection_id)
            if writer is not None and not writer.is_closing():
                writer.write(struct.pack("!H", len(action.response)) + action.response)

    def _spawn(self, forward_id: int, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        group = self._forward_tasks.setdefault(forward_id, set())
        group.add(task)
        task.add_done_callback(group.discard)

    def _forward_to_cluster(self, action: ForwardToCluster) -> None:
        self._spawn(action.forward_id, self._cluster_exchange(action))

    def _forward_upstream(self, action: ForwardUpstream) -> None:
        exchange = self._upstream_tcp(action) if action.tcp else self._upstream_udp(action)
        self._spawn(action.forward_id, exchange)

    def _forward_finished(self, action: ForwardFinished) -> None:
        current = asyncio.current_task()
        for task in self._forward_tasks.pop(action.forward_id, set()):
            if task is not current:
                task.cancel()

    async def _cluster_exchange(self, action: ForwardToCluster) -> None:
        try:
            query = self._cluster_query_tcp if action.tcp else self._cluster_query
            answer = await query(action.query)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever the tunnel raised: one failed attempt
            log.debug("cluster DNS query failed: %r", exc)
            self._forward_failed(action.forward_id)
            return
        self._response(action.forward_id, answer)

    async def _upstream_udp(self, action: ForwardUpstream) -> None:
        server = action.server
        try:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _UpstreamSocket(self, action.forward_id),
                remote_addr=(server.host, server.port),
            )
        except OSError:
            self._forward_failed(action.forward_id)
            return
        try:
            transport.sendto(action.query)
            await self._loop.create_future()  # answers arrive via _UpstreamSocket until cancelled
        finally:
            transport.close()

    async def _upstream_tcp(self, action: ForwardUpstream) -> None:
        try:
            answer = await tcp_exchange(action.server, action.query, timeout=TCP_EXCHANGE_TIMEOUT)
        except DnsExchangeError:
            self._forward_failed(action.forward_id)
            return
        self._response(action.forward_id, answer)

    # -- TCP clients --------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if peer is None or not self.local_sources.allows(peer[0], now=self._loop.time()):
            self.refused_remote += 1
            writer.close()
            return
        if len(self._tcp_writers) >= MAX_TCP_CLIENTS:
            writer.close()
            return
        connection_id = next(self._connection_ids)
        self._tcp_writers[connection_id] = writer
        client = TcpClient(connection_id)
        try:
            while True:
                prefix = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                (size,) = struct.unpack("!H", prefix)
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_TIMEOUT)
                self._query(data, client, ClientTransport.TCP)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_writers.pop(connection_id, None)
            writer.close()


async def start_dns_server(
    *,
    listen_host: str,
    cluster_query: ClusterQuery,
    upstreams: Sequence[UpstreamServer],
    namespace: str,
    cluster_domain: str = "cluster.local",
    namespaces: Iterable[str] = (),
    reverse_networks: Iterable[IPv4Network] = (),
    listen_port: int = 53,
    config: ResolverConfig | None = None,
    cluster_query_tcp: ClusterQuery | None = None,
) -> DnsServer:
    """Build the resolver and start listening on ``listen_host`` (the TUN address).

    Upstreams at the listen address are dropped (a resolv.conf that already names us,
    e.g. after a crash, must not make the resolver ask itself).
    """
    names = ClusterNames.build(
        domain=cluster_domain,
        namespace=namespace,
        namespaces=namespaces,
        reverse_networks=reverse_networks,
    )
    usable = tuple(u for u in upstreams if u.host != listen_host)
    config = (
        ResolverConfig(upstreams=usable) if config is None else replace(config, upstreams=usable)
    )
    resolver = DnsResolver(config, names)
    return await DnsServer.start(
        resolver,
        host=listen_host,
        port=listen_port,
        cluster_query=cluster_query,
        cluster_query_tcp=cluster_query_tcp,
    )
