"""The 10-byte ``struct virtio_net_hdr`` that prefixes packets on an IFF_VNET_HDR TUN.

Layout (include/uapi/linux/virtio_net.h, legacy header, native byte order on a TUN
without TUNSETVNETBE/LE): flags u8, gso_type u8, hdr_len u16, gso_size u16,
csum_start u16, csum_offset u16.

With ``TUN_F_CSUM`` the kernel may hand over packets whose transport checksum is
partial (``flags & NEEDS_CSUM``; see checksum.py), and with ``TUN_F_TSO4`` TCP
"super-packets" of up to 64 KiB (``gso_type == TCPV4``, ``gso_size`` = MSS) that the
kernel segments again when they are written back.  ``hdr_len`` is only a hint and is
never trusted.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from kvpn.net.errors import DropReason, PacketError

__all__ = [
    "F_DATA_VALID",
    "F_NEEDS_CSUM",
    "GSO_ECN",
    "NO_OFFLOAD_HEADER",
    "VNET_HEADER_LENGTH",
    "GsoType",
    "VirtioNetHeader",
    "build_vnet",
    "parse_vnet",
]

VNET_HEADER_LENGTH = 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_ECN = 0x80
_HEADER = struct.Struct("=BBHHHH")


class GsoType(enum.IntEnum):
    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


class VirtioNetHeader(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & F_NEEDS_CSUM)

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~GSO_ECN


def parse_vnet(buf: bytes | bytearray | memoryview) -> VirtioNetHeader:
    """Parse the header at the start of *buf*; raise :class:`PacketError` if too short."""
    if len(buf) < VNET_HEADER_LENGTH:
        raise PacketError(DropReason.BAD_VNET_HEADER)
    return VirtioNetHeader._make(_HEADER.unpack_from(buf, 0))


def build_vnet(header: VirtioNetHeader) -> bytes:
    return _HEADER.pack(*header)


#: The header for a packet with a complete checksum and no segmentation.
NO_OFFLOAD_HEADER = bytes(VNET_HEADER_LENGTH)
