"""IPv4 header parsing and building (RFC 791).

Only what a host-side router on a TUN device needs: a 20-byte header without options,
never a fragment.  Anything else is refused with a :class:`PacketError` naming the
reason; the router drops and counts it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvpn.net.checksum import checksum, ones_sum
from kvpn.net.errors import DropReason, PacketError

__all__ = [
    "HEADER_LENGTH",
    "PROTO_ICMP",
    "PROTO_TCP",
    "PROTO_UDP",
    "IPv4Header",
    "build_ipv4_header",
    "parse_ipv4",
]

HEADER_LENGTH = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

_FLAG_DF = 0x4000
_MF_AND_OFFSET = 0x3FFF
_HEADER = struct.Struct("!BBHHHBBH4s4s")


class IPv4Header(NamedTuple):
    """A parsed option-less IPv4 header; addresses are 4-byte ``bytes``."""

    tos: int
    total_length: int
    ident: int
    flags_fragment: int
    ttl: int
    protocol: int
    checksum: int
    src: bytes
    dst: bytes


def parse_ipv4(buf: bytes | bytearray | memoryview, offset: int = 0) -> IPv4Header:
    """Parse and validate the IPv4 header at *offset*; raise :class:`PacketError`."""
    available = len(buf) - offset
    if available < 1:
        raise PacketError(DropReason.TRUNCATED)
    version = buf[offset] >> 4
    if version != 4:
        raise PacketError(DropReason.IPV6_UNSUPPORTED if version == 6 else DropReason.NOT_IP)
    if available < HEADER_LENGTH:
        raise PacketError(DropReason.TRUNCATED)
    ver_ihl, tos, total, ident, frag, ttl, proto, csum, src, dst = _HEADER.unpack_from(buf, offset)
    ihl = ver_ihl & 0x0F
    if ihl < 5:
        raise PacketError(DropReason.BAD_LENGTH)
    if ihl > 5:
        raise PacketError(DropReason.IPV4_OPTIONS)
    if total < HEADER_LENGTH or total > available:
        raise PacketError(DropReason.BAD_LENGTH)
    if frag & _MF_AND_OFFSET:
        raise PacketError(DropReason.FRAGMENT)
    if ones_sum(memoryview(buf)[offset : offset + HEADER_LENGTH]) != 0xFFFF:
        raise PacketError(DropReason.BAD_IP_CHECKSUM)
    return IPv4Header(tos, total, ident, frag, ttl, proto, csum, src, dst)


def build_ipv4_header(
    src: bytes,
    dst: bytes,
    protocol: int,
    payload_length: int,
    *,
    ident: int,
    ttl: int = 64,
    dont_fragment: bool = True,
) -> bytes:
    """A complete 20-byte IPv4 header with its checksum."""
    header = bytearray(
        _HEADER.pack(
            0x45,
            0,
            HEADER_LENGTH + payload_length,
            ident & 0xFFFF,
            _FLAG_DF if dont_fragment else 0,
            ttl,
            protocol,
            0,
            src,
            dst,
        )
    )
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header)
