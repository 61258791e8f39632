"""ICMP echo and destination-unreachable messages (RFC 792, RFC 1122 section 3.2.2).

The router relays echo requests (type 8) through the shadow agent and answers with
echo replies (type 0).  It builds destination-unreachable messages (type 3) to fail
TCP connects (code 1, host unreachable) and UDP sends to closed ports (code 3, port
unreachable); they quote the offending datagram's IP header plus its first 8 payload
bytes, which is what the kernel matches against its sockets.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from kvpn.net.checksum import checksum
from kvpn.net.errors import DropReason, PacketError
from kvpn.net.ipv4 import HEADER_LENGTH as IP_HEADER_LENGTH
from kvpn.net.ipv4 import PROTO_ICMP, build_ipv4_header

__all__ = [
    "ECHO_REPLY",
    "ECHO_REQUEST",
    "HEADER_LENGTH",
    "DEST_UNREACHABLE",
    "EchoMessage",
    "UnreachableCode",
    "build_echo",
    "build_unreachable",
    "parse_echo",
    "quote_of",
]

ECHO_REPLY = 0
DEST_UNREACHABLE = 3
ECHO_REQUEST = 8
HEADER_LENGTH = 8
_HEADER = struct.Struct("!BBHHH")


class UnreachableCode(enum.IntEnum):
    NET = 0
    HOST = 1
    PROTOCOL = 2
    PORT = 3
    ADMIN_PROHIBITED = 13


class EchoMessage(NamedTuple):
    type: int
    code: int
    ident: int
    seq: int
    payload: bytes


def parse_echo(buf: bytes | bytearray | memoryview, offset: int, end: int) -> EchoMessage:
    """Parse an ICMP echo request/reply in ``buf[offset:end]``; raise :class:`PacketError`."""
    if end - offset < HEADER_LENGTH:
        raise PacketError(DropReason.ICMP_BAD_HEADER)
    icmp_type, code, _csum, ident, seq = _HEADER.unpack_from(buf, offset)
    if icmp_type not in (ECHO_REQUEST, ECHO_REPLY) or code != 0:
        raise PacketError(DropReason.ICMP_UNSUPPORTED_TYPE)
    return EchoMessage(icmp_type, code, ident, seq, bytes(buf[offset + HEADER_LENGTH : end]))


def build_echo(
    src: bytes,
    dst: bytes,
    *,
    icmp_type: int,
    ident: int,
    seq: int,
    payload: bytes,
    ip_ident: int = 0,
) -> bytes:
    """A complete IPv4 ICMP echo request or reply."""
    message = bytearray(_HEADER.pack(icmp_type, 0, 0, ident & 0xFFFF, seq & 0xFFFF))
    message += payload
    struct.pack_into("!H", message, 2, checksum(message))
    return build_ipv4_header(src, dst, PROTO_ICMP, len(message), ident=ip_ident) + bytes(message)


def quote_of(packet: bytes | bytearray | memoryview) -> bytes:
    """The part of an IPv4 packet an ICMP error quotes: its header and 8 payload bytes."""
    return bytes(packet[: IP_HEADER_LENGTH + 8])


def build_unreachable(
    src: bytes, dst: bytes, code: UnreachableCode, quoted: bytes, *, ip_ident: int = 0
) -> bytes:
    """A complete IPv4 ICMP destination-unreachable from *src* to *dst* quoting *quoted*."""
    message = bytearray(_HEADER.pack(DEST_UNREACHABLE, int(code), 0, 0, 0))
    message += quoted
    struct.pack_into("!H", message, 2, checksum(message))
    return build_ipv4_header(src, dst, PROTO_ICMP, len(message), ident=ip_ident) + bytes(message)
