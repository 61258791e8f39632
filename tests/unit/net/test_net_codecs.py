"""Byte-level round trips from one case table, and every parse rejection by reason."""

import struct
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import IPv6

from kvpn.net import icmp
from kvpn.net.checksum import checksum
from kvpn.net.errors import DropReason, PacketError
from kvpn.net.ipv4 import build_ipv4_header, parse_ipv4
from kvpn.net.tcp import ACK, FIN, RST, SYN, build_tcp_packet, parse_tcp, reset_for
from kvpn.net.udp import build_udp_packet, parse_udp
from kvpn.net.vnet import F_NEEDS_CSUM, GsoType, VirtioNetHeader, build_vnet, parse_vnet

from .packets import checksums_valid

APP = IPv4Address("198.19.255.1").packed
DST = IPv4Address("10.96.0.10").packed

BUILT = {
    "tcp_syn": lambda: build_tcp_packet(
        APP, 40000, DST, 80, seq=1000, ack=0, flags=SYN, window=64240, ident=7
    ),
    "tcp_data": lambda: build_tcp_packet(
        APP, 40000, DST, 80, seq=5, ack=9, flags=ACK, window=500, payload=b"GET / HTTP/1.1\r\n\r\n"
    ),
    "tcp_odd_payload": lambda: build_tcp_packet(
        DST, 80, APP, 40000, seq=1, ack=2, flags=ACK, payload=b"x" * 33
    ),
    "udp": lambda: build_udp_packet(DST, 53, APP, 5353, b"\x12\x34answer", ident=3),
    "udp_empty": lambda: build_udp_packet(DST, 53, APP, 5353, b""),
    "echo_reply": lambda: icmp.build_echo(
        DST, APP, icmp_type=icmp.ECHO_REPLY, ident=77, seq=3, payload=b"ping" * 10
    ),
    "echo_request": lambda: icmp.build_echo(
        APP, DST, icmp_type=icmp.ECHO_REQUEST, ident=1, seq=65535, payload=b""
    ),
    "port_unreachable": lambda: icmp.build_unreachable(
        DST,
        APP,
        icmp.UnreachableCode.PORT,
        icmp.quote_of(build_udp_packet(APP, 5353, DST, 53, b"q")),
    ),
}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_built_packets_have_scapy_valid_checksums(name: str) -> None:
    raw = BUILT[name]()
    assert checksums_valid(raw)
    ip = parse_ipv4(raw)
    assert ip.total_length == len(raw)
    assert IP(raw).len == len(raw)


def test_tcp_round_trip_fields() -> None:
    raw = BUILT["tcp_data"]()
    ip = parse_ipv4(raw)
    tcp = parse_tcp(raw, 20, ip.total_length)
    s = IP(raw)
    assert (tcp.src_port, tcp.dst_port, tcp.seq, tcp.ack, tcp.window) == (
        s[TCP].sport,
        s[TCP].dport,
        s[TCP].seq,
        s[TCP].ack,
        s[TCP].window,
    )
    assert tcp.flags == ACK
    assert ip.src == APP and ip.dst == DST and ip.protocol == 6


def test_parse_tcp_with_options_from_scapy() -> None:
    raw = bytes(
        IP(src="1.2.3.4", dst="5.6.7.8") / TCP(flags="S", options=[("MSS", 1460), ("WScale", 7)])
    )
    tcp = parse_tcp(raw, 20, len(raw))
    assert tcp.header_length == len(raw) - 20 and tcp.flags == SYN


def test_udp_round_trip() -> None:
    raw = BUILT["udp"]()
    udp = parse_udp(raw, 20, len(raw))
    assert (udp.src_port, udp.dst_port, udp.length) == (53, 5353, 8 + 8)
    assert raw[28:] == b"\x12\x34answer"


def test_echo_round_trip() -> None:
    raw = BUILT["echo_reply"]()
    msg = icmp.parse_echo(raw, 20, len(raw))
    assert (msg.type, msg.ident, msg.seq, msg.payload) == (0, 77, 3, b"ping" * 10)


def test_port_unreachable_quotes_header_and_8_bytes() -> None:
    sent = build_udp_packet(APP, 5353, DST, 53, b"question")
    raw = icmp.build_unreachable(DST, APP, icmp.UnreachableCode.PORT, icmp.quote_of(sent))
    s = IP(raw)
    assert s[ICMP].type == 3 and s[ICMP].code == 3
    assert s[IPerror].src == "198.19.255.1" and s[UDPerror].dport == 53
    assert raw[28:] == sent[:28]


@pytest.mark.parametrize(
    ("flags", "payload", "expect_flags", "expect_seq", "expect_ack"),
    [
        (SYN, 0, RST | ACK, 0, 1001),  # refused connect: ack = ISN + 1
        (SYN | FIN, 0, RST | ACK, 0, 1002),
        (0, 10, RST | ACK, 0, 1010),
        (ACK, 0, RST, 5555, 0),  # segment with ACK: seq = SEG.ACK, no ACK flag
        (ACK | FIN, 3, RST, 5555, 0),
    ],
)
def test_reset_generation(
    flags: int, payload: int, expect_flags: int, expect_seq: int, expect_ack: int
) -> None:
    raw = build_tcp_packet(
        APP, 40000, DST, 80, seq=1000, ack=5555, flags=flags, payload=b"p" * payload
    )
    tcp = parse_tcp(raw, 20, len(raw))
    reset = reset_for(APP, DST, tcp, payload)
    assert reset is not None and checksums_valid(reset)
    s = IP(reset)
    assert (s.src, s.dst, s[TCP].sport, s[TCP].dport) == ("10.96.0.10", "198.19.255.1", 80, 40000)
    assert (int(s[TCP].flags), s[TCP].seq, s[TCP].ack) == (expect_flags, expect_seq, expect_ack)


def test_reset_is_never_answered() -> None:
    raw = build_tcp_packet(APP, 1, DST, 2, seq=1, ack=1, flags=RST | ACK)
    assert reset_for(APP, DST, parse_tcp(raw, 20, len(raw)), 0) is None


def test_vnet_round_trip() -> None:
    header = VirtioNetHeader(F_NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 20, 16)
    raw = build_vnet(header)
    assert len(raw) == 10 and parse_vnet(raw) == header
    assert parse_vnet(raw).needs_csum and parse_vnet(raw).gso == GsoType.TCPV4


GOOD = bytes(IP(src="1.2.3.4", dst="5.6.7.8") / UDP(sport=1, dport=2) / b"abcd")


def _mangle(offset: int, value: bytes, fix_checksum: bool = True) -> bytes:
    buf = bytearray(GOOD)
    buf[offset : offset + len(value)] = value
    if fix_checksum:
        buf[10:12] = b"\0\0"
        struct.pack_into("!H", buf, 10, checksum(buf[:20]))
    return bytes(buf)


REJECTIONS = [
    ("empty", b"", DropReason.TRUNCATED),
    ("short", GOOD[:19], DropReason.TRUNCATED),
    ("ipv6", bytes(IPv6(src="::1", dst="::2") / UDP()), DropReason.IPV6_UNSUPPORTED),
    ("version_5", _mangle(0, b"\x55"), DropReason.NOT_IP),
    ("ihl_4", _mangle(0, b"\x44"), DropReason.BAD_LENGTH),
    (
        "options",
        bytes(IP(src="1.2.3.4", dst="5.6.7.8", options=[b"\x01\x01\x01\x00"]) / UDP()),
        DropReason.IPV4_OPTIONS,
    ),
    (
        "fragment_mf",
        bytes(IP(src="1.2.3.4", dst="5.6.7.8", flags="MF") / UDP()),
        DropReason.FRAGMENT,
    ),
    (
        "fragment_offset",
        bytes(IP(src="1.2.3.4", dst="5.6.7.8", frag=10) / UDP()),
        DropReason.FRAGMENT,
    ),
    ("total_too_long", _mangle(2, struct.pack("!H", len(GOOD) + 1)), DropReason.BAD_LENGTH),
    ("total_too_short", _mangle(2, struct.pack("!H", 19)), DropReason.BAD_LENGTH),
    ("bad_checksum", _mangle(8, b"\x01", fix_checksum=False), DropReason.BAD_IP_CHECKSUM),
]


@pytest.mark.parametrize(("name", "raw", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_ipv4_rejections(name: str, raw: bytes, reason: DropReason) -> None:
    with pytest.raises(PacketError) as info:
        parse_ipv4(raw)
    assert info.value.reason is reason


def test_transport_rejections() -> None:
    tcp = bytes(IP() / TCP())
    with pytest.raises(PacketError, match="tcp_bad_header"):
        parse_tcp(tcp, 20, 39)
    bad_offset = bytearray(tcp)
    bad_offset[32] = 0x40  # data offset 4 words
    with pytest.raises(PacketError, match="tcp_bad_header"):
        parse_tcp(bad_offset, 20, len(bad_offset))
    bad_offset[32] = 0xF0  # 60 bytes, more than present
    with pytest.raises(PacketError, match="tcp_bad_header"):
        parse_tcp(bad_offset, 20, len(bad_offset))
    udp = bytearray(bytes(IP() / UDP() / b"xy"))
    with pytest.raises(PacketError, match="udp_bad_header"):
        parse_udp(udp, 20, 27)
    udp[24:26] = struct.pack("!H", 11)  # claims more than present
    with pytest.raises(PacketError, match="udp_bad_header"):
        parse_udp(udp, 20, len(udp))
    with pytest.raises(PacketError, match="icmp_unsupported_type"):
        raw = bytes(IP() / ICMP(type=13))
        icmp.parse_echo(raw, 20, len(raw))
    with pytest.raises(PacketError, match="icmp_bad_header"):
        icmp.parse_echo(b"\0" * 27, 20, 27)
    with pytest.raises(PacketError, match="bad_vnet_header"):
        parse_vnet(b"\0" * 9)


def test_ipv4_header_builder_matches_scapy() -> None:
    header = build_ipv4_header(APP, DST, 17, 12, ident=99)
    s = IP(src="198.19.255.1", dst="10.96.0.10", proto=17, id=99, flags="DF", ttl=64, len=32)
    assert header == bytes(s)[:20]


def test_tcp_error_quote_matches_syn() -> None:
    syn = BUILT["tcp_syn"]()
    raw = icmp.build_unreachable(DST, APP, icmp.UnreachableCode.HOST, icmp.quote_of(syn))
    s = IP(raw)
    assert s[ICMP].code == 1 and s[TCPerror].seq == 1000 and checksums_valid(raw)
