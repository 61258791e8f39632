"""Agent side of the ``kvpn-datagrams`` relay: frames in, sockets out (asyncio adapter).

One :class:`DatagramRelay` serves one SSH session channel. Each client flow id gets one
*connected* non-blocking socket, watched with ``loop.add_reader``:

* UDP: ``socket(AF_INET, SOCK_DGRAM)`` connected to (dst, dport). Replies come back as
  UdpReceived; an ICMP error queued on the socket (``ECONNREFUSED`` for port unreachable,
  ``EHOSTUNREACH``/``ENETUNREACH``) becomes UdpUnreachable with the matching ICMP code.
* ICMP echo: an unprivileged "ping socket" ``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``
  (Linux, allowed by ``net.ipv4.ping_group_range``). The kernel owns the echo identifier
  and the checksum, so the agent sends ident 0 and restores the client's ident in
  PingReply.

Flows expire after idle timeouts (:mod:`kvpn.shadow.flow_table`). Datagrams are lossy by
nature: when the SSH channel is flow-controlled or a socket buffer is full the datagram is
dropped and counted rather than queued.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvpn.shadow.flow_table import FlowTable
from kvpn.shadow.relay_codec import (
    CLIENT_TO_AGENT,
    AgentMessage,
    CloseFlow,
    FlowExpired,
    IcmpUnreachableCode,
    IPAddress,
    Message,
    PingReply,
    PingSend,
    PingUnreachable,
    RelayDecoder,
    UdpReceived,
    UdpSend,
    UdpUnreachable,
    encode,
)

logger = logging.getLogger(__name__)

_RECV_SIZE = 65535
_READS_PER_WAKEUP = 64
_ECHO_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, ident, seq

# errno of a failed socket call -> ICMP unreachable code for the client to synthesise.
_UNREACHABLE_CODES: Mapping[int, IcmpUnreachableCode] = {
    errno.ECONNREFUSED: IcmpUnreachableCode.PORT,
    errno.EHOSTUNREACH: IcmpUnreachableCode.HOST,
    errno.EHOSTDOWN: IcmpUnreachableCode.HOST,
    errno.ENETUNREACH: IcmpUnreachableCode.NET,
    errno.ENETDOWN: IcmpUnreachableCode.NET,
    errno.EACCES: IcmpUnreachableCode.ADMIN_PROHIBITED,
    errno.EPERM: IcmpUnreachableCode.ADMIN_PROHIBITED,
}


class FlowKind(enum.Enum):
    UDP = "udp"
    PING = "ping"


@dataclass(frozen=True, slots=True)
class _EchoTypes:
    request: int
    reply: int


_ECHO_TYPES: Mapping[int, _EchoTypes] = {
    4: _EchoTypes(request=8, reply=0),  # ICMP, RFC 792
    6: _EchoTypes(request=128, reply=129),  # ICMPv6, RFC 4443
}


def open_udp_socket(family: int) -> socket.socket:
    return socket.socket(family, socket.SOCK_DGRAM)


def open_ping_socket(family: int) -> socket.socket:
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    return socket.socket(family, socket.SOCK_DGRAM, proto)


@dataclass(frozen=True, slots=True)
class DatagramSockets:
    """Socket factories (the syscall boundary; tests substitute them)."""

    udp: Callable[[int], socket.socket] = open_udp_socket
    ping: Callable[[int], socket.socket] = open_ping_socket


@dataclass(frozen=True, slots=True)
class RelayLimits:
    udp_idle_timeout: float = 60.0
    ping_idle_timeout: float = 10.0
    max_flows: int = 1024


@dataclass(slots=True)
class RelayCounters:
    frames_received: int = 0
    frames_malformed: int = 0
    frames_sent: int = 0
    udp_sent: int = 0
    udp_received: int = 0
    pings_sent: int = 0
    ping_replies: int = 0
    unreachable: int = 0
    dropped_outbound: int = 0
    dropped_inbound: int = 0
    flows_opened: int = 0
    flows_expired: int = 0
    socket_errors: int = 0
    errors_by_errno: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Flow:
    flow_id: int
    kind: FlowKind
    sock: socket.socket
    remote: IPAddress
    port: int
    ident: int = 0


def _family(addr: IPAddress) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


class DatagramRelay:
    """Relay engine for one ``kvpn-datagrams`` channel."""

    def __init__(
        self,
        send_frame: Callable[[bytes], None],
        *,
        loop: asyncio.AbstractEventLoop,
        limits: RelayLimits | None = None,
        sockets: DatagramSockets | None = None,
    ) -> None:
        self._send_frame = send_frame
        self._loop = loop
        self._limits = limits or RelayLimits()
        self._sockets = sockets or DatagramSockets()
        self._decoder = RelayDecoder(CLIENT_TO_AGENT)
        self._flows: FlowTable[_Flow] = FlowTable(self._limits.max_flows)
        self._timer: asyncio.TimerHandle | None = None
        self._output_paused = False
        self._closed = False
        self._ping_warning_logged = False
        self.counters = RelayCounters()
        self._handlers: Mapping[type, Callable[[Any], None]] = {
            UdpSend: self._on_udp_send,
            PingSend: self._on_ping_send,
            CloseFlow: self._on_close_flow,
        }

    # --- input from the SSH channel ------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._closed:
            return
        decoder = self._decoder
        decoder.receive_data(data)
        if decoder.malformed != self.counters.frames_malformed:
            logger.debug("dropped malformed relay frame: %s", decoder.last_error)
            self.counters.frames_malformed = decoder.malformed
        while (message := decoder.next_message()) is not None:
            self.counters.frames_received += 1
            self._handlers[type(message)](message)

    def pause_output(self) -> None:
        self._output_paused = True

    def resume_output(self) -> None:
        self._output_paused = False

    @property
    def flow_count(self) -> int:
        return len(self._flows)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, flow in self._flows.pop_all():
            self._close_socket(flow)

    # --- message handlers ----------------------------------------------------------------

    def _on_udp_send(self, m: UdpSend) -> None:
        flow = self._flow_for(m.flow_id, FlowKind.UDP, m.dst, m.dport)
        if flow is None:
            return
        self._send(flow, m.payload)
        self.counters.udp_sent += 1

    def _on_ping_send(self, m: PingSend) -> None:
        flow = self._flow_for(m.flow_id, FlowKind.PING, m.dst, 0)
        if flow is None:
            return
        flow.ident = m.ident
        request = _ECHO_TYPES[m.dst.version].request
        self._send(flow, _ECHO_HEADER.pack(request, 0, 0, 0, m.seq) + m.payload)
        self.counters.pings_sent += 1

    def _on_close_flow(self, m: CloseFlow) -> None:
        flow = self._flows.pop(m.flow_id)
        if flow is not None:
            self._close_socket(flow)
        self._arm_timer()

    # --- flows ---------------------------------------------------------------------------

    def _flow_for(self, flow_id: int, kind: FlowKind, remote: IPAddress, port: int) -> _Flow | None:
        now = self._loop.time()
        key = (kind, remote, port)
        flow = self._flows.lookup(flow_id, key)
        if flow is not None:
            self._flows.touch(flow_id, now=now)
            return flow
        try:
            sock = self._open_socket(kind, remote, port)
        except OSError as exc:
            self._report_error(flow_id, kind, exc)
            return None
        flow = _Flow(flow_id, kind, sock, remote, port)
        timeout = (
            self._limits.udp_idle_timeout if kind is FlowKind.UDP else self._limits.ping_idle_timeout
        )
        for _, displaced in self._flows.add(flow_id, key, flow, idle_timeout=timeout, now=now):
            self._close_socket(displaced)
        self._loop.add_reader(sock.fileno(), self._on_readable, flow)
        self.counters.flows_opened += 1
        self._arm_timer()
        return flow

    def _open_socket(self, kind: FlowKind, remote: IPAddress, port: int) -> socket.socket:
        factory = self._sockets.udp if kind is FlowKind.UDP else self._sockets.ping
        sock = factory(_family(remote))
        try:
            sock.setblocking(False)
            sock.connect((str(remote), port))
        except OSError:
            sock.close()
            raise
        return sock

    def _close_socket(self, flow: _Flow) -> None:
        try:
            self._loop.remove_reader(flow.sock.fileno())
        except (OSError, ValueError):  # already closed
            pass
        flow.sock.close()

    def _arm_timer(self) -> None:
        if self._timer is not None or self._closed:
            return
        deadline = self._flows.next_deadline()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for flow_id, flow in self._flows.pop_expired(now=self._loop.time()):
            self._close_socket(flow)
            self.counters.flows_expired += 1
            self._emit(FlowExpired(flow_id))
        self._arm_timer()

    # --- socket I/O ----------------------------------------------------------------------

    def _send(self, flow: _Flow, data: bytes) -> None:
        try:
            flow.sock.send(data)
        except BlockingIOError:
            self.counters.dropped_outbound += 1
        except OSError as exc:
            self._report_error(flow.flow_id, flow.kind, exc)

    def _on_readable(self, flow: _Flow) -> None:
        if flow.sock.fileno() < 0:
            return
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = flow.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._report_error(flow.flow_id, flow.kind, exc)
                return
            self._flows.touch(flow.flow_id, now=self._loop.time())
            self._deliver(flow, data)

    def _deliver(self, flow: _Flow, data: bytes) -> None:
        if flow.kind is FlowKind.UDP:
            self.counters.udp_received += 1
            self._emit(UdpReceived(flow.flow_id, flow.remote, flow.port, data))
            return
        if len(data) < _ECHO_HEADER.size or data[0] != _ECHO_TYPES[flow.remote.version].reply:
            self.counters.dropped_inbound += 1
            return
        _, _, _, _, seq = _ECHO_HEADER.unpack_from(data)
        self.counters.ping_replies += 1
        self._emit(PingReply(flow.flow_id, flow.remote, flow.ident, seq, data[_ECHO_HEADER.size :]))

    def _report_error(self, flow_id: int, kind: FlowKind, exc: OSError) -> None:
        code = _UNREACHABLE_CODES.get(exc.errno or 0)
        if code is None:
            self.counters.socket_errors += 1
            by_errno = self.counters.errors_by_errno
            by_errno[exc.errno or 0] = by_errno.get(exc.errno or 0, 0) + 1
            logger.debug("flow %d: %s", flow_id, exc)
            return
        if (
            code is IcmpUnreachableCode.ADMIN_PROHIBITED
            and kind is FlowKind.PING
            and not self._ping_warning_logged
        ):
            self._ping_warning_logged = True
            logger.warning(
                "cannot open an ICMP ping socket (%s); check net.ipv4.ping_group_range", exc
            )
        self.counters.unreachable += 1
        message: AgentMessage = (
            UdpUnreachable(flow_id, code) if kind is FlowKind.UDP else PingUnreachable(flow_id, code)
        )
        self._emit(message)

    def _emit(self, message: Message) -> None:
        if self._closed:
            return
        if self._output_paused:
            self.counters.dropped_inbound += 1
            return
        try:
            frame = encode(message)
        except ValueError:
            self.counters.dropped_inbound += 1
            return
        self.counters.frames_sent += 1
        self._send_frame(frame)
