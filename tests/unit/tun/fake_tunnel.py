"""A stand-in for ShadowTunnel: it dials real sockets that live in the "cluster" netns.

It plays the shadow agent's part with plain kernel sockets: TCP connects (refused ->
DialRefused, no route -> DialUnreachable, a "silent" host -> DialTimeout), UDP per flow
(ECONNREFUSED -> UdpUnreachable) and ICMP echo through unprivileged ping sockets.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from kvpn.shadow.relay_codec import PingReply, UdpReceived, UdpUnreachable
from kvpn.tunnel.client import DialRefused, DialTimeout, DialUnreachable

from .netns import socket_in


class FakeTunnel:
    def __init__(self, netns: str, *, silent_hosts: tuple[str, ...] = ()) -> None:
        self.netns = netns
        self.silent_hosts = silent_hosts
        self.dials: list[tuple[str, int]] = []
        self.relays: list[FakeRelay] = []

    async def open_tcp(self, host: str, port: int, *, timeout: float = 5.0) -> tuple[Any, Any]:
        self.dials.append((host, port))
        if host in self.silent_hosts:
            await asyncio.sleep(timeout)
            raise DialTimeout(f"{host}:{port}: no answer")
        sock = socket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        except ConnectionRefusedError:
            sock.close()
            raise DialRefused(f"{host}:{port}: refused") from None
        except TimeoutError:
            sock.close()
            raise DialTimeout(f"{host}:{port}: no answer") from None
        except OSError as exc:
            sock.close()
            raise DialUnreachable(f"{host}:{port}: {exc}") from None
        return await asyncio.open_connection(sock=sock)

    async def open_datagrams(self, on_event: Callable[[Any], None]) -> FakeRelay:
        relay = FakeRelay(self.netns, on_event)
        self.relays.append(relay)
        return relay


class FakeRelay:
    def __init__(self, netns: str, on_event: Callable[[Any], None]) -> None:
        self._netns = netns
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        self._udp: dict[int, socket.socket] = {}
        self._ping: dict[int, socket.socket] = {}

    def send_udp(self, flow_id: int, dst: IPv4Address, dport: int, payload: bytes) -> bool:
        sock = self._udp.get(flow_id)
        if sock is None:
            sock = socket_in(self._netns, socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect((str(dst), dport))
            self._udp[flow_id] = sock
            self._loop.add_reader(sock.fileno(), self._udp_readable, flow_id, sock)
        try:
            sock.send(payload)
        except ConnectionRefusedError:
            self._on_event(UdpUnreachable(flow_id))
        return True

    def _udp_readable(self, flow_id: int, sock: socket.socket) -> None:
        try:
            data, (host, port) = sock.recvfrom(65535)
        except ConnectionRefusedError:
            self._on_event(UdpUnreachable(flow_id))
            return
        except BlockingIOError:
            return
        self._on_event(UdpReceived(flow_id, IPv4Address(host), port, data))

    def send_ping(
        self, flow_id: int, dst: IPv4Address, ident: int, seq: int, payload: bytes
    ) -> bool:
        sock = self._ping.get(flow_id)
        if sock is None:
            sock = socket_in(self._netns, socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            sock.setblocking(False)
            self._ping[flow_id] = sock
            self._loop.add_reader(sock.fileno(), self._ping_readable, flow_id, sock)
        sock.sendto(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload, (str(dst), 0))
        return True

    def _ping_readable(self, flow_id: int, sock: socket.socket) -> None:
        try:
            data, (host, _) = sock.recvfrom(65535)
        except OSError:
            return
        icmp_type, _code, _csum, ident, seq = struct.unpack_from("!BBHHH", data)
        if icmp_type == 0:
            self._on_event(PingReply(flow_id, IPv4Address(host), ident, seq, data[8:]))

    async def close(self) -> None:
        for sock in (*self._udp.values(), *self._ping.values()):
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._udp.clear()
        self._ping.clear()
