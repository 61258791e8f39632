"""The fast path for segments of established TCP flows (no parse, no objects).

Theory of operation
-------------------
Once a NAT flow is ESTABLISHED every plain data/ACK segment of it gets the same
rewrite (nat.py :class:`RewritePlan`).  The router caches, per direction, the 12 raw
bytes ``src addr, dst addr, src port, dst port`` of the IPv4/TCP header (contiguous
when the IPv4 header has no options) -> (entry, plan); the NAT table drops the keys
of an entry when it leaves ESTABLISHED or is removed (:meth:`NatTable.cache_route`).

:func:`fast_rewrite` checks exactly what the full path would check for such a
segment (virtio-net header, IPv4 version/IHL/length/fragment/header checksum, TCP
data offset) and takes only the packets the full path would rewrite without any
side effect besides ``last_seen`` and the traffic counters: no SYN, FIN or RST, no
IPv4 options, no fragment, a known cached 4-tuple.  Anything else returns None and
the caller runs the full path, which then decides (and drops/counts) as before.
"""

from __future__ import annotations

import struct

from kvpn.net.nat import FastRoutes

__all__ = ["fast_rewrite"]

_U16 = struct.Struct("!H")
_CSUM_FIELDS = struct.Struct("=HH")
_MASK = 0xFFFF
_TCP_FIN_SYN_RST = 0x07


def fast_rewrite(
    packet: bytes | bytearray, offset: int, routes: FastRoutes, now: float
) -> bytearray | None:
    """The rewritten copy of *packet* (an established flow's segment), or None.

    *offset* is the IPv4 header's offset (10 with a virtio-net header, else 0).
    """
    if not routes:
        return None
    ip = offset
    available = len(packet) - ip
    if available < 40 or packet[ip] != 0x45 or packet[ip + 9] != 6:
        return None
    key = packet[ip + 12 : ip + 24]
    route = routes.get(key if type(key) is bytes else bytes(key))
    if route is None:
        return None
    if packet[ip + 33] & _TCP_FIN_SYN_RST or packet[ip + 6] & 0x3F or packet[ip + 7]:
        return None
    total = (packet[ip + 2] << 8) | packet[ip + 3]
    if total > available or total < 20 + ((packet[ip + 32] >> 4) << 2) or packet[ip + 32] < 0x50:
        return None
    partial = False
    if ip:
        flags = packet[0]
        if packet[1] & 0x7F > 1 or flags & ~0x03:
            return None
        partial = bool(flags & 1)
        if partial and _CSUM_FIELDS.unpack_from(packet, 6) != (20, 16):
            return None
    if int.from_bytes(packet[ip : ip + 20], "big") % _MASK:
        return None  # bad IPv4 header checksum: the full path drops and counts it
    buf = bytearray(packet[: ip + total])
    at = ip + 10
    (value,) = _U16.unpack_from(buf, at)
    total_sum = (~value & _MASK) + route.address_delta
    total_sum = (total_sum & _MASK) + (total_sum >> 16)
    _U16.pack_into(buf, at, ~((total_sum & _MASK) + (total_sum >> 16)) & _MASK)
    at = ip + 36
    (value,) = _U16.unpack_from(buf, at)
    if partial:
        total_sum = value + route.address_delta
        total_sum = (total_sum & _MASK) + (total_sum >> 16)
        value = (total_sum & _MASK) + (total_sum >> 16)
    else:
        total_sum = (~value & _MASK) + route.full_delta
        total_sum = (total_sum & _MASK) + (total_sum >> 16)
        value = ~((total_sum & _MASK) + (total_sum >> 16)) & _MASK
    _U16.pack_into(buf, at, value)
    buf[ip + 12 : ip + 24] = route.endpoints
    route.entry.last_seen = now
    return buf
