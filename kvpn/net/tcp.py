"""TCP header parsing and the segments kvpn builds itself (RFC 793 / RFC 9293).

kvpn never runs a TCP state machine for data: the kernel terminates TCP (the NAT
"system stack" trick, see nat.py).  This module only reads the fields the router
needs (ports, sequence numbers, flags) and builds resets, following the reset
generation rules of RFC 9293 section 3.10.7.1: a segment that carries ACK is answered
by ``<SEQ=SEG.ACK><CTL=RST>``, any other by
``<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`` (SYN and FIN each count one).
A reset is never answered.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvpn.net.checksum import checksum, pseudo_header_sum
from kvpn.net.errors import DropReason, PacketError
from kvpn.net.ipv4 import PROTO_TCP, build_ipv4_header

__all__ = [
    "ACK",
    "CHECKSUM_OFFSET",
    "FIN",
    "HEADER_LENGTH",
    "PSH",
    "RST",
    "SYN",
    "TcpHeader",
    "build_tcp_packet",
    "parse_tcp",
    "reset_for",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

HEADER_LENGTH = 20
CHECKSUM_OFFSET = 16
_HEADER = struct.Struct("!HHIIBBHHH")


class TcpHeader(NamedTuple):
    """The fields of a TCP header the router looks at."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    header_length: int
    flags: int
    window: int
    checksum: int


def parse_tcp(buf: bytes | bytearray | memoryview, offset: int, end: int) -> TcpHeader:
    """Parse the TCP header in ``buf[offset:end]``; raise :class:`PacketError`."""
    if end - offset < HEADER_LENGTH:
        raise PacketError(DropReason.TCP_BAD_HEADER)
    sport, dport, seq, ack, data_offset, flags, window, csum, _urg = _HEADER.unpack_from(
        buf, offset
    )
    header_length = (data_offset >> 4) * 4
    if header_length < HEADER_LENGTH or offset + header_length > end:
        raise PacketError(DropReason.TCP_BAD_HEADER)
    return TcpHeader(sport, dport, seq, ack, header_length, flags & 0x3F, window, csum)


def build_tcp_packet(
    src: bytes,
    src_port: int,
    dst: bytes,
    dst_port: int,
    *,
    seq: int,
    ack: int,
    flags: int,
    window: int = 0,
    payload: bytes = b"",
    ident: int = 0,
) -> bytes:
    """A complete IPv4+TCP packet (no options) with correct checksums."""
    segment = bytearray(
        _HEADER.pack(
            src_port,
            dst_port,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            (HEADER_LENGTH // 4) << 4,
            flags,
            window,
            0,
            0,
        )
    )
    segment += payload
    csum = checksum(segment, pseudo_header_sum(src, dst, PROTO_TCP, len(segment)))
    struct.pack_into("!H", segment, CHECKSUM_OFFSET, csum)
    return build_ipv4_header(src, dst, PROTO_TCP, len(segment), ident=ident) + bytes(segment)


def reset_for(
    src: bytes, dst: bytes, tcp: TcpHeader, payload_length: int, *, ident: int = 0
) -> bytes | None:
    """The reset answering segment ``src -> dst`` (as received), or None for a RST."""
    if tcp.flags & RST:
        return None
    if tcp.flags & ACK:
        return build_tcp_packet(
            dst, tcp.dst_port, src, tcp.src_port, seq=tcp.ack, ack=0, flags=RST, ident=ident
        )
    seg_len = payload_length + (1 if tcp.flags & SYN else 0) + (1 if tcp.flags & FIN else 0)
    return build_tcp_packet(
        dst,
        tcp.dst_port,
        src,
        tcp.src_port,
        seq=0,
        ack=tcp.seq + seg_len,
        flags=RST | ACK,
        ident=ident,
    )
