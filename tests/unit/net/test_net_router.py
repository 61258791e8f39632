"""PacketRouter with crafted packets and a scripted clock (plain and vnet modes)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror

from kvpn.net.checksum import checksum, ones_sum, pseudo_header_sum
from kvpn.net.events import Event, PingOut, TcpDialRequested, TcpFlowEnded, UdpOut
from kvpn.net.nat import FlowKey, NatConfig
from kvpn.net.router import PacketRouter, RouterConfig
from kvpn.net.tcp_gate import DialOutcome
from kvpn.net.vnet import F_NEEDS_CSUM, NO_OFFLOAD_HEADER, GsoType, VirtioNetHeader, build_vnet

from .packets import checksums_valid

A = "198.19.255.1"
B = "198.19.255.2"
P = 4444
D = "10.96.0.10"
APP = A  # the kernel picks the TUN address as the source for routes via the TUN


def make_router(vnet: bool = False, **kw: object) -> PacketRouter:
    return PacketRouter(
        RouterConfig(IPv4Address(A), IPv4Address(B), P, vnet_header=vnet, dial_timeout=6.0, **kw)  # type: ignore[arg-type]
    )


def syn(sport: int = 40000, dport: int = 80, seq: int = 1000) -> bytes:
    return bytes(
        IP(src=APP, dst=D, id=1)
        / TCP(sport=sport, dport=dport, flags="S", seq=seq, options=[("MSS", 1460)])
    )


def events(router: PacketRouter) -> list[Event]:
    out: list[Event] = []
    while (event := router.next_event()) is not None:
        out.append(event)
    return out


def flow_key(sport: int = 40000, dport: int = 80) -> FlowKey:
    return FlowKey(IPv4Address(APP).packed, sport, IPv4Address(D).packed, dport)


def test_syn_requests_dial_and_is_held() -> None:
    router = make_router()
    router.receive_from_tun(syn(), now=0)
    assert events(router) == [TcpDialRequested(flow_key(), IPv4Address(D), 80)]
    assert router.packets_to_tun() == []
    assert router.get_timer() == 6.0


def test_refused_gives_exact_rst_ack() -> None:
    router = make_router()
    router.receive_from_tun(syn(seq=123456), now=0)
    router.dial_failed(flow_key(), DialOutcome.REFUSED, now=0.01)
    [rst] = router.packets_to_tun()
    s = IP(bytes(rst))
    assert (s.src, s.dst, s[TCP].sport, s[TCP].dport) == (D, APP, 80, 40000)
    assert s[TCP].flags == "RA" and s[TCP].seq == 0 and s[TCP].ack == 123457
    assert checksums_valid(bytes(rst))
    assert router.counters.tcp_dials_refused == 1 and router.get_timer() is None


def test_duplicate_syn_dropped_while_dialing() -> None:
    router = make_router()
    router.receive_from_tun(syn(), now=0)
    router.receive_from_tun(syn(), now=1)
    assert len(events(router)) == 1
    assert router.counters.drops == {"tcp_duplicate_syn": 1}


def test_dial_timeout_gives_icmp_unreachable() -> None:
    router = make_router()
    router.receive_from_tun(syn(seq=77), now=0)
    now = router.get_timer()
    assert now == 6.0
    router.handle_timer(now - 0.001)
    assert router.packets_to_tun() == []
    router.handle_timer(now)
    [answer] = router.packets_to_tun()
    s = IP(bytes(answer))
    assert s[ICMP].type == 3 and s[ICMP].code == 1 and (s.src, s.dst) == (D, APP)
    assert s[IPerror].dst == D and s[TCPerror].seq == 77 and s[TCPerror].sport == 40000
    assert checksums_valid(bytes(answer))
    # the tunnel's late answer is ignored and the caller told to discard its stream
    assert router.dial_succeeded(flow_key(), now=7) is False
    assert router.counters.tcp_dials_timed_out == 1


def test_unreachable_outcome_gives_icmp() -> None:
    router = make_router()
    router.receive_from_tun(syn(), now=0)
    router.dial_failed(flow_key(), DialOutcome.UNREACHABLE, now=0)
    [answer] = router.packets_to_tun()
    assert IP(bytes(answer))[ICMP].code == 1


def test_unknown_non_syn_gets_rst() -> None:
    router = make_router()
    pkt = bytes(
        IP(src=APP, dst=D) / TCP(sport=40000, dport=80, flags="PA", seq=5, ack=999) / b"late"
    )
    router.receive_from_tun(pkt, now=0)
    [rst] = router.packets_to_tun()
    s = IP(bytes(rst))
    assert s[TCP].flags == "R" and s[TCP].seq == 999
    router.receive_from_tun(bytes(IP(src=APP, dst=D) / TCP(sport=1, dport=2, flags="R")), now=0)
    assert router.packets_to_tun() == []
    assert router.counters.drops == {"tcp_no_flow": 1, "tcp_rst_no_flow": 1}


def _listener(
    natport: int, flags: str, seq: int = 5000, ack: int = 1001, payload: bytes = b""
) -> bytes:
    return bytes(
        IP(src=A, dst=B) / TCP(sport=P, dport=natport, flags=flags, seq=seq, ack=ack) / payload
    )


def _app(flags: str, seq: int = 1001, ack: int = 5001, payload: bytes = b"") -> bytes:
    return bytes(
        IP(src=APP, dst=D) / TCP(sport=40000, dport=80, flags=flags, seq=seq, ack=ack) / payload
    )


def test_full_flow_through_nat() -> None:
    router = make_router()
    router.receive_from_tun(syn(), now=0)
    events(router)
    assert router.dial_succeeded(flow_key(), now=0.05)
    [released] = router.packets_to_tun()
    s = IP(bytes(released))
    assert (s.src, s.dst, s[TCP].dport, s[TCP].flags, s[TCP].seq) == (B, A, P, "S", 1000)
    assert s[TCP].options == [("MSS", 1460)] and checksums_valid(bytes(released))
    natport = s[TCP].sport

    router.receive_from_tun(_listener(natport, "SA"), now=0.06)
    [synack] = router.packets_to_tun()
    s = IP(bytes(synack))
    assert (s.src, s[TCP].sport, s.dst, s[TCP].dport) == (D, 80, APP, 40000) and checksums_valid(
        bytes(synack)
    )
    assert router.nat_lookup_accepted(natport, now=0.07) == flow_key()
    assert router.nat_lookup_accepted(natport + 1, now=0.07) is None

    router.receive_from_tun(_app("PA", payload=b"GET /"), now=0.08)
    [data] = router.packets_to_tun()
    assert IP(bytes(data))[TCP].load == b"GET /" and checksums_valid(bytes(data))

    # a retransmitted SYN of an open flow is translated, not re-dialed
    router.receive_from_tun(syn(), now=0.09)
    assert len(router.packets_to_tun()) == 1 and events(router) == []

    # half-close from the app, then from the listener: the entry starts closing
    router.receive_from_tun(_app("FA"), now=1)
    router.receive_from_tun(_listener(natport, "FA"), now=1)
    router.packets_to_tun()
    assert (router.counters.tcp_flows_open, router.counters.tcp_flows_closing) == (0, 1)
    assert router.nat.by_natport(natport) is not None  # still translating while it lingers
    linger = router.get_timer()
    assert linger == 1 + NatConfig().closing_linger
    router.handle_timer(linger)
    assert router.counters.tcp_flows_closing == 0 and router.nat.by_natport(natport) is None
    assert events(router) == []


def test_syn_reusing_closing_tuple_dials_again() -> None:
    router = make_router()
    router.receive_from_tun(syn(), now=0)
    router.dial_succeeded(flow_key(), now=0)
    natport = IP(bytes(router.packets_to_tun()[0]))[TCP].sport
    router.nat_lookup_accepted(natport, now=0)
    router.tcp_flow_closed(flow_key(), now=1)
    events(router)
    router.receive_from_tun(syn(seq=9999), now=2)
    assert events(router) == [TcpDialRequested(flow_key(), IPv4Address(D), 80)]
    router.dial_succeeded(flow_key(), now=2)
    assert IP(bytes(router.packets_to_tun()[0]))[TCP].sport != natport  # old one quarantined


def test_rst_before_accept_reports_flow_ended() -> None:
    router = make_router()
    router.receive_from_tun(syn(), now=0)
    router.dial_succeeded(flow_key(), now=0)
    natport = IP(bytes(router.packets_to_tun()[0]))[TCP].sport
    events(router)
    router.receive_from_tun(_app("R", ack=0), now=1)
    assert events(router) == [TcpFlowEnded(flow_key())]
    assert router.nat_lookup_accepted(natport, now=1) is None


def test_inbound_without_nat_and_fake_peer_traffic_dropped() -> None:
    router = make_router()
    router.receive_from_tun(_listener(30000, "A"), now=0)
    router.receive_from_tun(bytes(IP(src=A, dst=B) / TCP(sport=1, dport=2, flags="S")), now=0)
    router.receive_from_tun(bytes(IP(src=A, dst=B) / UDP(sport=1, dport=2)), now=0)
    assert router.packets_to_tun() == []
    assert router.counters.drops == {"tcp_inbound_no_nat": 1, "to_fake_peer": 2}


# --- UDP and ICMP --------------------------------------------------------------------


def test_udp_relay_and_port_unreachable() -> None:
    router = make_router()
    query = bytes(IP(src=APP, dst=D) / UDP(sport=5353, dport=53) / b"query")
    router.receive_from_tun(query, now=0)
    [out] = events(router)
    assert isinstance(out, UdpOut) and (out.dst, out.dport, out.payload) == (
        IPv4Address(D),
        53,
        b"query",
    )
    router.receive_from_tun(query, now=1)
    assert events(router) == [out]

    router.udp_received(out.flow_id, IPv4Address(D), 53, b"answer", now=1)
    [reply] = router.packets_to_tun()
    s = IP(bytes(reply))
    assert (s.src, s[UDP].sport, s.dst, s[UDP].dport, s[UDP].load) == (D, 53, APP, 5353, b"answer")
    assert checksums_valid(bytes(reply))

    router.udp_unreachable(out.flow_id)
    [unreach] = router.packets_to_tun()
    s = IP(bytes(unreach))
    assert (s[ICMP].type, s[ICMP].code) == (3, 3)
    assert bytes(unreach)[28:] == query[:28] and s[UDPerror].sport == 5353
    assert checksums_valid(bytes(unreach))


def test_udp_flow_idle_expiry() -> None:
    router = make_router(udp_idle_timeout=60.0)
    router.receive_from_tun(bytes(IP(src=APP, dst=D) / UDP(sport=1, dport=2)), now=0)
    [out] = events(router)
    router.receive_from_tun(bytes(IP(src=APP, dst=D) / UDP(sport=1, dport=2)), now=30)
    events(router)
    assert router.get_timer() == 60
    router.handle_timer(60)
    assert router.get_timer() == 90 and router.counters.udp_flows_open == 1
    router.handle_timer(90)
    assert router.counters.udp_flows_open == 0
    assert isinstance(out, UdpOut)
    router.udp_received(out.flow_id, IPv4Address(D), 2, b"late")
    assert router.packets_to_tun() == [] and router.counters.drops == {"udp_flow_unknown": 1}


def test_ping_relay() -> None:
    router = make_router()
    router.receive_from_tun(
        bytes(IP(src=APP, dst=D) / ICMP(type=8, id=0x4242, seq=7) / b"abc"), now=0
    )
    [out] = events(router)
    assert isinstance(out, PingOut) and (out.dst, out.ident, out.seq, out.payload) == (
        IPv4Address(D),
        0x4242,
        7,
        b"abc",
    )
    router.ping_reply(out.flow_id, IPv4Address(D), 999, 7, b"abc")  # agent's ident differs
    [reply] = router.packets_to_tun()
    s = IP(bytes(reply))
    assert (s.src, s.dst, s[ICMP].type, s[ICMP].id, s[ICMP].seq) == (D, APP, 0, 0x4242, 7)
    assert checksums_valid(bytes(reply))
    router.ping_unreachable(out.flow_id)
    assert IP(bytes(router.packets_to_tun()[0]))[ICMP].code == 1


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (bytes(IP(src=APP, dst=D, proto=47) / b"gre!"), "unsupported_protocol"),
        (bytes(IP(src=APP, dst=D) / ICMP(type=3, code=3)), "icmp_unsupported_type"),
        (bytes(IP(src=APP, dst=D, flags="MF") / UDP()), "fragment"),
        (b"\x60" + bytes(39), "ipv6_unsupported"),
    ],
)
def test_unsupported_dropped_and_counted(packet: bytes, reason: str) -> None:
    router = make_router()
    router.receive_from_tun(packet, now=0)
    assert router.counters.drops == {reason: 1} and router.packets_to_tun() == []


# --- vnet (offload) mode --------------------------------------------------------------


def _partial(raw: bytes, gso: int = GsoType.NONE, gso_size: int = 0) -> bytes:
    """The packet as the kernel hands it over with TUN_F_CSUM: partial TCP checksum."""
    pkt = bytearray(raw)
    length = len(pkt) - 20
    pkt[36:38] = struct.pack("!H", ones_sum(bytes(pkt[12:20]), 6 + length))
    header = VirtioNetHeader(F_NEEDS_CSUM, gso, 40, gso_size, 20, 16)
    return build_vnet(header) + bytes(pkt)


def _finish(packet: bytes | bytearray) -> bytes:
    """Strip the vnet header and complete a partial checksum like the kernel would."""
    pkt = bytearray(packet[10:])
    seg = pkt[20:]
    seg[16:18] = struct.pack("!H", checksum(seg))
    pkt[20:] = seg
    return bytes(pkt)


def test_vnet_gso_packet_rewritten_with_header_kept() -> None:
    router = make_router(vnet=True)
    first = _partial(syn())
    router.receive_from_tun(first, now=0)
    assert router.dial_succeeded(flow_key(), now=0)
    [released] = router.packets_to_tun()
    assert bytes(released[:10]) == first[:10]
    assert checksums_valid(_finish(released))
    natport = IP(bytes(released[10:]))[TCP].sport
    router.nat_lookup_accepted(natport, now=0)

    big = _partial(_listener(natport, "A", payload=b"z" * 60000), GsoType.TCPV4, 1448)
    router.receive_from_tun(big, now=1)
    [down] = router.packets_to_tun()
    assert bytes(down[:10]) == big[:10] and len(down) == len(big)
    s = IP(_finish(down))
    assert (s.src, s[TCP].sport, s.dst, s[TCP].dport) == (D, 80, APP, 40000)
    assert checksums_valid(_finish(down))
    # the partial field equals the new pseudo-header sum
    (field,) = struct.unpack_from("!H", down, 10 + 36)
    assert (
        field % 0xFFFF
        == pseudo_header_sum(IPv4Address(D).packed, IPv4Address(APP).packed, 6, len(big) - 30)
        % 0xFFFF
    )


def test_vnet_generated_packets_get_zero_header() -> None:
    router = make_router(vnet=True)
    router.receive_from_tun(NO_OFFLOAD_HEADER + syn(), now=0)
    router.dial_failed(flow_key(), DialOutcome.REFUSED, now=0)
    [rst] = router.packets_to_tun()
    assert bytes(rst[:10]) == NO_OFFLOAD_HEADER and checksums_valid(bytes(rst[10:]))


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (VirtioNetHeader(0, GsoType.UDP_L4, 0, 1400, 0, 0), "gso_unsupported"),
        (VirtioNetHeader(F_NEEDS_CSUM, 0, 0, 0, 14, 16), "bad_vnet_header"),
    ],
)
def test_vnet_rejections(header: VirtioNetHeader, reason: str) -> None:
    router = make_router(vnet=True)
    router.receive_from_tun(build_vnet(header) + syn(), now=0)
    assert router.counters.drops == {reason: 1}
    router.receive_from_tun(b"\0" * 5, now=0)
    assert router.counters.drops["bad_vnet_header"] >= 1
