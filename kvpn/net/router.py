"""The sans-IO packet router between the TUN device and the tunnel.

Theory of operation
-------------------
The caller feeds every packet read from the TUN to :meth:`PacketRouter.receive_from_tun`
and writes whatever :meth:`PacketRouter.packets_to_tun` returns back to it.  The router
never does I/O and never reads a clock: time comes in as ``now``, deadlines go out
through :meth:`get_timer` and come back through :meth:`handle_timer` (aioquic style).

* TCP (protocol 6) uses the NAT "system stack" trick (nat.py) with dial-first
  semantics (tcp_gate.py).  A SYN for an unknown 4-tuple becomes a
  :class:`TcpDialRequested` event; the caller dials through the tunnel and reports
  :meth:`dial_succeeded` (the held SYN is rewritten to ``B:natport -> A:P`` and
  released to the kernel listener) or :meth:`dial_failed` (RST|ACK or ICMP
  unreachable back to the application).  When the listener accepts a connection from
  (B, natport) the caller asks :meth:`nat_lookup_accepted` which flow it is.  Other
  segments of an unknown flow are answered with a RST (RFC 9293 section 3.10.7.1).
* UDP (17) and ICMP echo (1) become :class:`UdpOut` / :class:`PingOut` events for the
  datagram relay; the relay's answers come back through :meth:`udp_received`,
  :meth:`udp_unreachable` (ICMP port unreachable), :meth:`ping_reply` and
  :meth:`ping_unreachable`.
* With ``vnet_header`` every packet in both directions carries a virtio-net header
  (vnet.py); NAT rewrites keep the kernel's header (GSO, partial checksum), packets the
  router builds get an all-zero one.

Anything malformed or unsupported is dropped and counted by reason, never raised.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from kvpn.net import icmp
from kvpn.net.counters import Counters
from kvpn.net.errors import DropReason, PacketError
from kvpn.net.events import Event, PingOut, TcpDialRequested, TcpFlowEnded, UdpOut
from kvpn.net.fastpath import fast_rewrite
from kvpn.net.flows import DatagramFlowTable, EchoKey
from kvpn.net.ipv4 import HEADER_LENGTH as IP_HEADER_LENGTH
from kvpn.net.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, IPv4Header, parse_ipv4
from kvpn.net.nat import (
    FlowKey,
    NatConfig,
    NatEntry,
    NatExhausted,
    NatState,
    NatTable,
    apply_rewrite,
    plan_rewrite,
)
from kvpn.net.tcp import ACK, FIN, RST, SYN, TcpHeader, parse_tcp, reset_for
from kvpn.net.tcp_gate import DialOutcome, GateAction, GateDecision, SynGate
from kvpn.net.udp import HEADER_LENGTH as UDP_HEADER_LENGTH
from kvpn.net.udp import build_udp_packet, parse_udp
from kvpn.net.vnet import NO_OFFLOAD_HEADER, VNET_HEADER_LENGTH, GsoType, parse_vnet

__all__ = ["PacketRouter", "RouterConfig"]

_TCP_CSUM_OFFSET = 16
_ACCEPTED_GSO = frozenset({GsoType.NONE, GsoType.TCPV4})
_PORTS = struct.Struct("!HH")
_Handler = Callable[[bytes | bytearray, int, int, IPv4Header, bool, float], None]


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """*tun_address* is A, *fake_peer* B; the kernel listener is bound to A:listener_port."""

    tun_address: IPv4Address
    fake_peer: IPv4Address
    listener_port: int
    vnet_header: bool = False
    dial_timeout: float = 6.0
    udp_idle_timeout: float = 60.0
    echo_idle_timeout: float = 30.0
    nat: NatConfig = field(default_factory=NatConfig)


class PacketRouter:
    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        self._a = config.tun_address.packed
        self._b = config.fake_peer.packed
        self._p = config.listener_port
        self._ip_offset = VNET_HEADER_LENGTH if config.vnet_header else 0
        self._prefix = NO_OFFLOAD_HEADER if config.vnet_header else b""
        self._nat = NatTable(config.nat)
        self._gate = SynGate(config.dial_timeout)
        self._udp: DatagramFlowTable[FlowKey] = DatagramFlowTable(config.udp_idle_timeout)
        self._echo: DatagramFlowTable[EchoKey] = DatagramFlowTable(config.echo_idle_timeout)
        self._out: list[bytes | bytearray] = []
        self._events: deque[Event] = deque()
        self._ip_ident = 0
        self._counters = Counters()
        self._handlers: dict[int, _Handler] = {
            PROTO_TCP: self._receive_tcp,
            PROTO_UDP: self._receive_udp,
            PROTO_ICMP: self._receive_icmp,
        }
        self._gate_answers: dict[GateAction, Callable[[GateDecision], None]] = {
            GateAction.ANSWER_RST: self._answer_rst,
            GateAction.ANSWER_UNREACHABLE: self._answer_unreachable,
        }

    # ------------------------------------------------------------------ outputs

    @property
    def config(self) -> RouterConfig:
        return self._config

    @property
    def counters(self) -> Counters:
        counters = self._counters
        entries = self._nat.entries()
        counters.tcp_flows_closing = sum(1 for e in entries if e.state is NatState.CLOSING)
        counters.tcp_flows_open = len(entries) - counters.tcp_flows_closing
        counters.tcp_dials_pending = len(self._gate)
        counters.udp_flows_open = len(self._udp)
        counters.echo_flows_open = len(self._echo)
        return counters

    @property
    def nat(self) -> NatTable:
        return self._nat

    def packets_to_tun(self) -> list[bytes | bytearray]:
        """Packets to write to the TUN (each one ``write()``), oldest first."""
        out = self._out
        self._out = []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        deadlines = [
            deadline
            for deadline in (
                self._gate.next_deadline(),
                self._nat.next_deadline(),
                self._udp.next_deadline(),
                self._echo.next_deadline(),
            )
            if deadline is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        for decision in self._gate.expire(now=now):
            self._counters.tcp_dials_timed_out += 1
            self._apply_failure(decision)
        for entry in self._nat.expire(now=now):
            self._events.append(TcpFlowEnded(entry.flow))
        self._udp.expire(now=now)
        self._echo.expire(now=now)

    # ------------------------------------------------------------------ TUN input

    def receive_from_tun(self, packet: bytes | bytearray, *, now: float) -> None:
        """Handle one packet read from the TUN (with its virtio-net header if enabled)."""
        counters = self._counters
        counters.packets_from_tun += 1
        counters.bytes_from_tun += len(packet)
        rewritten = fast_rewrite(packet, self._ip_offset, self._nat.fast_routes, now)
        if rewritten is not None:
            counters.packets_to_tun += 1
            counters.bytes_to_tun += len(rewritten)
            self._out.append(rewritten)
            return
        try:
            self._receive(packet, now)
        except PacketError as exc:
            counters.drop(exc.reason)
        except (struct.error, IndexError, ValueError):
            counters.drop(DropReason.MALFORMED)

    def _receive(self, packet: bytes | bytearray, now: float) -> None:
        offset = self._ip_offset
        vnet = parse_vnet(packet) if offset else None
        ip = parse_ipv4(packet, offset)
        handler = self._handlers.get(ip.protocol)
        if handler is None:
            raise PacketError(DropReason.UNSUPPORTED_PROTOCOL)
        partial = False
        if vnet is not None:
            gso = vnet.gso
            if gso not in _ACCEPTED_GSO:
                raise PacketError(DropReason.GSO_UNSUPPORTED)
            if gso != GsoType.NONE and ip.protocol != PROTO_TCP:
                raise PacketError(DropReason.BAD_VNET_HEADER)
            partial = vnet.needs_csum
            if (
                partial
                and ip.protocol == PROTO_TCP
                and (vnet.csum_start != IP_HEADER_LENGTH or vnet.csum_offset != _TCP_CSUM_OFFSET)
            ):
                raise PacketError(DropReason.BAD_VNET_HEADER)
        handler(packet, offset, offset + ip.total_length, ip, partial, now)

    def _receive_tcp(
        self,
        packet: bytes | bytearray,
        offset: int,
        end: int,
        ip: IPv4Header,
        partial: bool,
        now: float,
    ) -> None:
        tcp = parse_tcp(packet, offset + IP_HEADER_LENGTH, end)
        if ip.dst == self._b:
            self._from_listener(packet, offset, end, ip, tcp, partial, now)
            return
        flow = FlowKey(ip.src, tcp.src_port, ip.dst, tcp.dst_port)
        entry = self._nat.by_flow(flow)
        syn_only = tcp.flags & (SYN | ACK | RST) == SYN
        if entry is not None and syn_only and entry.state is NatState.CLOSING:
            self._nat.remove(entry, now=now)  # the 4-tuple is reused by a new connection
            entry = None
        if entry is not None and entry.outbound is not None:
            buf = bytearray(memoryview(packet)[:end])
            apply_rewrite(buf, offset, entry.outbound, partial_checksum=partial)
            self._emit_rewritten(buf)
            entry.last_seen = now
            if tcp.flags & (FIN | RST):
                self._observe_close(entry, tcp.flags, from_app=True, now=now)
        elif syn_only:
            decision = self._gate.on_syn(flow, bytes(packet[:end]), now=now)
            if decision.action is GateAction.DROP_DUPLICATE:
                raise PacketError(DropReason.TCP_DUPLICATE_SYN)
            self._counters.tcp_dials_requested += 1
            self._events.append(TcpDialRequested(flow, IPv4Address(ip.dst), tcp.dst_port))
        elif self._gate.is_pending(flow):
            raise PacketError(DropReason.TCP_DIAL_PENDING)
        elif tcp.flags & RST:
            raise PacketError(DropReason.TCP_RST_NO_FLOW)
        else:
            payload_length = end - offset - IP_HEADER_LENGTH - tcp.header_length
            self._send_reset(ip.src, ip.dst, tcp, payload_length)
            raise PacketError(DropReason.TCP_NO_FLOW)

    def _from_listener(
        self,
        packet: bytes | bytearray,
        offset: int,
        end: int,
        ip: IPv4Header,
        tcp: TcpHeader,
        partial: bool,
        now: float,
    ) -> None:
        if ip.src != self._a or tcp.src_port != self._p:
            raise PacketError(DropReason.TO_FAKE_PEER)
        entry = self._nat.by_natport(tcp.dst_port)
        if entry is None or entry.inbound is None:
            raise PacketError(DropReason.TCP_INBOUND_NO_NAT)
        buf = bytearray(memoryview(packet)[:end])
        apply_rewrite(buf, offset, entry.inbound, partial_checksum=partial)
        self._emit_rewritten(buf)
        entry.last_seen = now
        if tcp.flags & (FIN | RST):
            self._observe_close(entry, tcp.flags, from_app=False, now=now)

    def _observe_close(self, entry: NatEntry, flags: int, *, from_app: bool, now: float) -> None:
        if not flags & RST:
            if from_app:
                entry.fin_from_app = True
            else:
                entry.fin_from_listener = True
            if not (entry.fin_from_app and entry.fin_from_listener):
                return
        was_pending = entry.state is NatState.ACCEPT_PENDING
        if self._nat.close(entry, now=now) and was_pending:
            self._events.append(TcpFlowEnded(entry.flow))

    def _receive_udp(
        self,
        packet: bytes | bytearray,
        offset: int,
        end: int,
        ip: IPv4Header,
        partial: bool,
        now: float,
    ) -> None:
        start = offset + IP_HEADER_LENGTH
        udp = parse_udp(packet, start, end)
        if ip.dst == self._b:
            raise PacketError(DropReason.TO_FAKE_PEER)
        flow, _ = self._udp.open(FlowKey(ip.src, udp.src_port, ip.dst, udp.dst_port), now=now)
        flow.quote = icmp.quote_of(packet[offset:end])
        payload = bytes(packet[start + UDP_HEADER_LENGTH : start + udp.length])
        self._counters.udp_datagrams_out += 1
        self._counters.udp_bytes_out += len(payload)
        self._events.append(UdpOut(flow.flow_id, IPv4Address(ip.dst), udp.dst_port, payload))

    def _receive_icmp(
        self,
        packet: bytes | bytearray,
        offset: int,
        end: int,
        ip: IPv4Header,
        partial: bool,
        now: float,
    ) -> None:
        message = icmp.parse_echo(packet, offset + IP_HEADER_LENGTH, end)
        if message.type != icmp.ECHO_REQUEST:
            raise PacketError(DropReason.ICMP_UNSUPPORTED_TYPE)
        if ip.dst == self._b:
            raise PacketError(DropReason.TO_FAKE_PEER)
        flow, _ = self._echo.open(EchoKey(ip.src, ip.dst, message.ident), now=now)
        flow.quote = icmp.quote_of(packet[offset:end])
        self._counters.pings_out += 1
        self._events.append(
            PingOut(flow.flow_id, IPv4Address(ip.dst), message.ident, message.seq, message.payload)
        )

    # ------------------------------------------------------------------ TCP dial results

    def dial_succeeded(self, flow_key: FlowKey, *, now: float) -> bool:
        """The dial for *flow_key* worked: release its SYN.  False: discard the stream."""
        decision = self._gate.on_outcome(flow_key, DialOutcome.SUCCEEDED)
        if decision.action is not GateAction.RELEASE_SYN:
            return False
        try:
            entry = self._nat.alloc(flow_key, now=now)
        except NatExhausted:
            self._counters.drop(DropReason.NAT_EXHAUSTED)
            self._answer_rst(decision)
            return False
        a, b, p, natport = self._a, self._b, self._p, entry.natport
        entry.outbound = plan_rewrite(*flow_key, b, natport, a, p)
        entry.inbound = plan_rewrite(
            a, p, b, natport, flow_key.dst, flow_key.dst_port, flow_key.src, flow_key.src_port
        )
        offset = self._ip_offset
        partial = bool(offset) and parse_vnet(decision.syn).needs_csum
        buf = bytearray(decision.syn)
        apply_rewrite(buf, offset, entry.outbound, partial_checksum=partial)
        self._counters.tcp_dials_succeeded += 1
        self._emit_rewritten(buf)
        return True

    def dial_failed(self, flow_key: FlowKey, outcome: DialOutcome, *, now: float) -> None:
        """The dial failed (REFUSED -> RST|ACK; UNREACHABLE/TIMED_OUT -> ICMP unreachable)."""
        if outcome is DialOutcome.SUCCEEDED:
            raise ValueError("dial_failed needs a failure outcome")
        decision = self._gate.on_outcome(flow_key, outcome)
        if decision.action is GateAction.IGNORE:
            return
        if outcome is DialOutcome.REFUSED:
            self._counters.tcp_dials_refused += 1
        elif outcome is DialOutcome.UNREACHABLE:
            self._counters.tcp_dials_unreachable += 1
        else:
            self._counters.tcp_dials_timed_out += 1
        self._apply_failure(decision)

    def _apply_failure(self, decision: GateDecision) -> None:
        answer = self._gate_answers.get(decision.action)
        if answer is not None:
            answer(decision)

    def _answer_rst(self, decision: GateDecision) -> None:
        offset = self._ip_offset
        syn = decision.syn
        ip = parse_ipv4(syn, offset)
        tcp = parse_tcp(syn, offset + IP_HEADER_LENGTH, offset + ip.total_length)
        self._send_reset(ip.src, ip.dst, tcp, 0)

    def _answer_unreachable(self, decision: GateDecision) -> None:
        flow = decision.flow
        quoted = icmp.quote_of(decision.syn[self._ip_offset :])
        self._send_unreachable(flow.dst, flow.src, icmp.UnreachableCode.HOST, quoted)

    def nat_lookup_accepted(self, peer_port: int, *, now: float) -> FlowKey | None:
        """The listener accepted (B, peer_port): the application's flow, or None (refuse it)."""
        nat = self._nat
        entry = nat.accepted(peer_port, now=now)
        if entry is None:
            return None
        flow = entry.flow
        if entry.outbound is not None and entry.inbound is not None:
            ports = _PORTS.pack(flow.src_port, flow.dst_port)
            nat.cache_route(flow.src + flow.dst + ports, entry, entry.outbound)
            ports = _PORTS.pack(self._p, entry.natport)
            nat.cache_route(self._a + self._b + ports, entry, entry.inbound)
        return flow

    def tcp_flow_closed(self, flow_key: FlowKey, *, now: float) -> None:
        """The caller closed the accepted socket of *flow_key*: start the NAT linger."""
        entry = self._nat.by_flow(flow_key)
        if entry is not None:
            self._nat.close(entry, now=now)

    # ------------------------------------------------------------------ datagram relay input

    def udp_received(
        self,
        flow_id: int,
        src: IPv4Address,
        sport: int,
        payload: bytes,
        *,
        now: float | None = None,
    ) -> None:
        flow = self._udp.by_id(flow_id)
        if flow is None:
            self._counters.drop(DropReason.UDP_FLOW_UNKNOWN)
            return
        if now is not None:
            flow.last_seen = now
        self._counters.udp_datagrams_in += 1
        self._counters.udp_bytes_in += len(payload)
        key = flow.key
        self._emit(
            build_udp_packet(
                src.packed, sport, key.src, key.src_port, payload, ident=self._next_ident()
            )
        )

    def udp_unreachable(self, flow_id: int, code: int = icmp.UnreachableCode.PORT) -> None:
        """The destination of *flow_id* is closed (port) or unreachable: ICMP to the app."""
        flow = self._udp.by_id(flow_id)
        if flow is None or not flow.quote:
            self._counters.drop(DropReason.UDP_FLOW_UNKNOWN)
            return
        self._send_unreachable(flow.key.dst, flow.key.src, _unreachable_code(code), flow.quote)

    def ping_reply(
        self,
        flow_id: int,
        src: IPv4Address,
        ident: int,
        seq: int,
        payload: bytes,
        *,
        now: float | None = None,
    ) -> None:
        """An echo reply for *flow_id* (its *ident* may differ: the app's is restored)."""
        flow = self._echo.by_id(flow_id)
        if flow is None:
            self._counters.drop(DropReason.ICMP_FLOW_UNKNOWN)
            return
        if now is not None:
            flow.last_seen = now
        self._counters.ping_replies_in += 1
        self._emit(
            icmp.build_echo(
                src.packed,
                flow.key.src,
                icmp_type=icmp.ECHO_REPLY,
                ident=flow.key.ident,
                seq=seq,
                payload=payload,
                ip_ident=self._next_ident(),
            )
        )

    def ping_unreachable(self, flow_id: int, code: int = icmp.UnreachableCode.HOST) -> None:
        flow = self._echo.by_id(flow_id)
        if flow is None or not flow.quote:
            self._counters.drop(DropReason.ICMP_FLOW_UNKNOWN)
            return
        self._send_unreachable(flow.key.dst, flow.key.src, _unreachable_code(code), flow.quote)

    # ------------------------------------------------------------------ helpers

    def _send_reset(self, src: bytes, dst: bytes, tcp: TcpHeader, payload_length: int) -> None:
        reset = reset_for(src, dst, tcp, payload_length, ident=self._next_ident())
        if reset is not None:
            self._counters.tcp_resets_sent += 1
            self._emit(reset)

    def _send_unreachable(
        self, src: bytes, dst: bytes, code: icmp.UnreachableCode, quoted: bytes
    ) -> None:
        self._counters.icmp_unreachables_sent += 1
        self._emit(icmp.build_unreachable(src, dst, code, quoted, ip_ident=self._next_ident()))

    def _emit(self, packet: bytes) -> None:
        """Queue a packet the router built (it gets an all-zero vnet header if enabled)."""
        self._emit_rewritten(self._prefix + packet if self._prefix else packet)

    def _emit_rewritten(self, packet: bytes | bytearray) -> None:
        """Queue a packet read from the TUN and rewritten (it keeps its own vnet header)."""
        self._counters.packets_to_tun += 1
        self._counters.bytes_to_tun += len(packet)
        self._out.append(packet)

    def _next_ident(self) -> int:
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        return self._ip_ident


def _unreachable_code(code: int) -> icmp.UnreachableCode:
    """A destination-unreachable code the router builds; anything unknown becomes HOST."""
    try:
        return icmp.UnreachableCode(code)
    except ValueError:
        return icmp.UnreachableCode.HOST
