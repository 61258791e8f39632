"""Link, address and route set-up for the TUN device through netlink (pyroute2).

pyroute2 0.9's synchronous ``IPRoute`` runs its own event loop and cannot be used from
inside a running one, so this is built on ``AsyncIPRoute``; synchronous callers wrap
it in ``asyncio.run``.  Everything applies to the caller's current network namespace
(the netlink socket is opened by the calling thread).  :class:`TunLinkConfig`
records what it added and :meth:`TunLinkConfig.close` removes it again in reverse
order (routes, then addresses); the device itself disappears when its descriptor is
closed.  Removing something that is already gone is not an error.

**Any event loop.** pyroute2 hands its netlink socket to ``loop.create_datagram_endpoint``;
uvloop refuses that ("cannot open a UDP handle, invalid family 16": libuv's UDP handle is
for IP sockets only).  :func:`netlink_datagram_endpoint` is the same endpoint built on
``loop.add_reader``; :mod:`kvpn.event_loop` makes kvpn's uvloop use it for ``AF_NETLINK``
sockets, so this module and every other pyroute2 user work on either loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = [
    "NetlinkConfigError",
    "NetlinkDatagramTransport",
    "TunLinkConfig",
    "netlink_datagram_endpoint",
]

log = logging.getLogger(__name__)

_MAX_DATAGRAM = 256 * 1024  # what asyncio's datagram transport reads at most
_READS_PER_WAKEUP = 32  # a dump arrives as a burst of datagrams: drain some per wake-up


class NetlinkConfigError(OSError):
    """A link, address or route change was refused by the kernel."""


class TunLinkConfig:
    """Configure interface *ifname*: ``link = await TunLinkConfig.open(name)``, then
    ``await link.close()`` (or ``async with``) to remove what was added."""

    def __init__(self, ifname: str, ipr: AsyncIPRoute, index: int) -> None:
        self._ifname = ifname
        self._ipr = ipr
        self._index = index
        self._addresses: list[tuple[IPv4Address, int]] = []
        self._routes: list[IPv4Network] = []

    @classmethod
    async def open(cls, ifname: str) -> TunLinkConfig:
        ipr = AsyncIPRoute()
        try:
            found = await ipr.link_lookup(ifname=ifname)
        except NetlinkError:
            found = []
        if not found:
            ipr.close()
            raise NetlinkConfigError(errno.ENODEV, f"no such interface: {ifname}")
        return cls(ifname, ipr, found[0])

    @property
    def index(self) -> int:
        return self._index

    @property
    def routes(self) -> list[IPv4Network]:
        return list(self._routes)

    async def set_up(self, *, mtu: int | None = None, txqueuelen: int | None = None) -> None:
        """Bring the link up, optionally setting its MTU and transmit queue length."""
        attrs: dict[str, object] = {"state": "up"}
        if mtu is not None:
            attrs["mtu"] = mtu
        if txqueuelen is not None:
            attrs["txqlen"] = txqueuelen
        await self._call("set link", self._ipr.link, "set", index=self._index, **attrs)

    async def add_address(self, address: IPv4Address, prefixlen: int = 32) -> None:
        await self._call(
            f"add address {address}/{prefixlen}",
            self._ipr.addr,
            "add",
            index=self._index,
            address=str(address),
            prefixlen=prefixlen,
        )
        self._addresses.append((address, prefixlen))

    async def add_route(self, network: IPv4Network) -> None:
        """Route *network* into the device (fails if the same prefix is already routed)."""
        await self._call(
            f"add route {network}",
            self._ipr.route,
            "add",
            dst=str(network.network_address),
            dst_len=network.prefixlen,
            oif=self._index,
        )
        self._routes.append(network)

    async def remove_route(self, network: IPv4Network) -> None:
        if network in self._routes:
            self._routes.remove(network)
        await self._quietly(
            self._ipr.route,
            "del",
            dst=str(network.network_address),
            dst_len=network.prefixlen,
            oif=self._index,
        )

    async def close(self) -> None:
        """Remove every route and address this object added; release the netlink socket."""
        try:
            for network in reversed(self._routes):
                await self._quietly(
                    self._ipr.route,
                    "del",
                    dst=str(network.network_address),
                    dst_len=network.prefixlen,
                    oif=self._index,
                )
            for address, prefixlen in reversed(self._addresses):
                await self._quietly(
                    self._ipr.addr,
                    "del",
                    index=self._index,
                    address=str(address),
                    prefixlen=prefixlen,
                )
            self._routes.clear()
            self._addresses.clear()
        finally:
            self._ipr.close()

    async def __aenter__(self) -> TunLinkConfig:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(
        self, what: str, method: Callable[..., Awaitable[object]], *args: object, **kwargs: object
    ) -> None:
        try:
            await method(*args, **kwargs)
        except NetlinkError as exc:
            code = exc.code if isinstance(exc.code, int) else errno.EIO
            raise NetlinkConfigError(code, f"{self._ifname}: {what}: {exc}") from exc

    async def _quietly(
        self, method: Callable[..., Awaitable[object]], *args: object, **kwargs: object
    ) -> None:
        try:
            await method(*args, **kwargs)
        except NetlinkError as exc:
            # ENODEV/ESRCH/EADDRNOTAVAIL: already gone with the device or removed by someone
            log.debug("netlink cleanup on %s: %s", self._ifname, exc)


class NetlinkDatagramTransport(asyncio.DatagramTransport):
    """A netlink socket's datagram transport on ``loop.add_reader`` (works on any loop that
    can watch a descriptor, uvloop included).  Only the calls pyroute2 makes are needed:
    datagrams are delivered to the protocol, ``sendto`` sends, ``close``/``abort`` stop
    watching, close the socket and call ``connection_lost`` once."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
    ) -> None:
        super().__init__({"socket": sock, "sockname": sock.getsockname()})
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._fileno = sock.fileno()
        self._closing = False

    def start(self) -> None:
        self._sock.setblocking(False)
        self._protocol.connection_made(self)
        self._loop.add_reader(self._fileno, self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            if self._closing:
                return
            try:
                data, addr = self._sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ENOBUFS (the kernel dropped messages) and the like
                self._protocol.error_received(exc)
                return
            self._protocol.datagram_received(data, addr)

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            if addr is None:
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
        except OSError as exc:
            self._protocol.error_received(exc)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fileno)
            self._loop.call_soon(self._finish)
        else:
            self._sock.close()

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0  # sends are synchronous

    def _finish(self) -> None:
        try:
            self._protocol.connection_lost(None)
        finally:
            self._sock.close()


def netlink_datagram_endpoint(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.DatagramProtocol],
    sock: socket.socket,
) -> tuple[NetlinkDatagramTransport, asyncio.DatagramProtocol]:
    """``loop.create_datagram_endpoint(protocol_factory, sock=sock)`` for a netlink socket,
    on ``loop.add_reader`` (the protocol's ``connection_made`` has run on return)."""
    protocol = protocol_factory()
    transport = NetlinkDatagramTransport(loop, sock, protocol)
    transport.start()
    return transport, protocol
