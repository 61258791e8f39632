"""UDP header parsing and datagram building (RFC 768).

kvpn relays UDP payloads through the shadow agent; it reads the ports and payload of
datagrams the applications send and builds the datagrams that come back.  The
checksum of an incoming datagram is not verified: the kernel wrote it (or left it
partial under offload), and the payload is relayed, not delivered.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvpn.net.checksum import checksum, pseudo_header_sum
from kvpn.net.errors import DropReason, PacketError
from kvpn.net.ipv4 import PROTO_UDP, build_ipv4_header

__all__ = ["HEADER_LENGTH", "UdpHeader", "build_udp_packet", "parse_udp"]

HEADER_LENGTH = 8
_HEADER = struct.Struct("!HHHH")


class UdpHeader(NamedTuple):
    src_port: int
    dst_port: int
    length: int
    checksum: int


def parse_udp(buf: bytes | bytearray | memoryview, offset: int, end: int) -> UdpHeader:
    """Parse the UDP header in ``buf[offset:end]``; the payload is ``[offset+8, offset+length)``."""
    if end - offset < HEADER_LENGTH:
        raise PacketError(DropReason.UDP_BAD_HEADER)
    header = UdpHeader._make(_HEADER.unpack_from(buf, offset))
    if header.length < HEADER_LENGTH or offset + header.length > end:
        raise PacketError(DropReason.UDP_BAD_HEADER)
    return header


def build_udp_packet(
    src: bytes, src_port: int, dst: bytes, dst_port: int, payload: bytes, *, ident: int = 0
) -> bytes:
    """A complete IPv4+UDP packet with a real checksum (0 is sent as 0xFFFF, RFC 768)."""
    length = HEADER_LENGTH + len(payload)
    segment = bytearray(_HEADER.pack(src_port, dst_port, length, 0))
    segment += payload
    csum = checksum(segment, pseudo_header_sum(src, dst, PROTO_UDP, length)) or 0xFFFF
    struct.pack_into("!H", segment, 6, csum)
    return build_ipv4_header(src, dst, PROTO_UDP, length, ident=ident) + bytes(segment)
